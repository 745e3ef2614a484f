"""MONAI Label app serving the medssl segmentation bundles to annotators.

Start it with::

    monailabel start_server --app apps/monailabel --studies DATASTORE \\
        --conf models la_seg_finetune,cvrl_semisup,simcvd_distill

Each served bundle gets a writable copy under ``<app>/model/<name>/`` (copied from the checkout's bundles,
``--conf bundles DIR``, or pulled by name with ``--conf bundle_index PATH_OR_URL``, checksum verified).
Auto-segmentation uses the bundle's ``inference.json`` and ``models/model.pt``; a bundle without weights is
trained first. Training (``/train/<name>``) runs the bundle's ``train.json`` on the datastore's labeled images;
the semi-supervised bundles (cvrl_semisup, simcvd_distill) also train on the images that have no label yet.
Each training run gets its own folder ``<bundle>/monailabel/<time>/`` (its dataset.json, checkpoints, logs);
when it finishes, its weights replace ``models/model.pt`` in one atomic step and the next inference uses them.
"""

import logging
import os
import time
from typing import Dict

import monailabel
import torch
from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import strtobool

import monai.bundle
from medssl.data import data_error_message
from medssl.label import (
    SEMI_SUPERVISED,
    SERVED_BUNDLES,
    StashRequestKeys,
    prepare_models,
    publish_weights,
    write_datastore_split,
)

logger = logging.getLogger(__name__)

# bundle settings a /train request may change (besides MONAI Label's own: device, pretrained, val_split, ...)
TRAIN_OPTIONS = ("max_iterations", "patch_size", "batch_size", "learning_rate", "lr_step", "num_workers")


class MedsslInferTask(BundleInferTask):
    """The bundle's inference.json as MONAI Label's auto-segmentation, with its request keys kept out of the way of
    the bundle's preprocessing (see ``medssl.label.StashRequestKeys``)."""

    def pre_transforms(self, data=None):
        return [StashRequestKeys()] + list(super().pre_transforms(data))

    def post_transforms(self, data=None):
        return list(super().post_transforms(data)) + [StashRequestKeys(restore=True)]


class MedsslTrainTask(BundleTrainTask):
    """Train a medssl bundle on the datastore: labeled images, and for the semi-supervised bundles the
    unlabeled ones too (``train#unlabeled_dataset``). The bundle reads them through a ``dataset.json``
    written per run, so its own checks (headers, shapes, small volumes) apply; training length is counted in
    iterations (``max_iterations``), as in the bundles, not in MONAI Label's epochs."""

    def __init__(self, path: str, conf: Dict[str, str], semi_supervised: bool):
        super().__init__(path, conf)
        self.semi_supervised = semi_supervised
        self._datastore = None
        self._init_weights = None
        self._run_dir = None

    def config(self):
        options = super().config()
        options.pop("max_epochs", None)
        options.update({k: self.bundle_config.get(k) for k in TRAIN_OPTIONS})
        options["val_split"] = 0.0
        return options

    def __call__(self, request, datastore):
        self._datastore = datastore
        self._run_dir = os.path.join(self.bundle_path, "monailabel", time.strftime("%Y%m%d-%H%M%S"))
        self._request = request
        result = super().__call__(request, datastore)
        weights = publish_weights(os.path.join(self._run_dir, "models", "model.pt"), self.bundle_path)
        logger.info(f"published {weights} from {self._run_dir}")
        return {**(result or {}), "run_dir": self._run_dir, "weights": str(weights)}

    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers):
        # the bundle's own pretrained_ckpt loader (it logs matched/missing tensors, refuses a mismatch)
        self._init_weights = model_pytorch if pretrained and os.path.isfile(model_pytorch) else None

    def _update_overrides(self, overrides):
        labeled = overrides.pop("train#dataset#data")
        validation = overrides.pop("validate#dataset#data", None) or []
        for key in ("train#trainer#max_epochs", "train#handlers"):
            overrides.pop(key, None)
        unlabeled = []
        if self.semi_supervised:
            ds = self._datastore
            unlabeled = [ds.get_image_uri(i) for i in ds.get_unlabeled_images()]
        data_dir, num_labeled = write_datastore_split(self._run_dir, labeled, unlabeled, validation)
        logger.info(f"training on {num_labeled} labeled and {len(unlabeled)} unlabeled images ({data_dir})")
        overrides.update(
            {
                "dataset_dir": str(data_dir),
                "num_labeled": num_labeled,
                "ckpt_dir": os.path.join(self._run_dir, "models"),
                "output_dir": os.path.join(self._run_dir, "eval"),
                "device": torch.device(str(overrides.get("device", "cpu"))),
                "pretrained_ckpt": self._init_weights or "",
            }
        )
        overrides.update({k: self._request[k] for k in TRAIN_OPTIONS if self._request.get(k) is not None})
        return overrides

    def run_single_gpu(self, request, overrides):
        monai.bundle.run(
            run_id="run",
            init_id="initialize",
            meta_file=self.bundle_metadata_path,
            config_file=self.bundle_config_path,
            **overrides,
        )


class MedsslApp(MONAILabelApp):
    """Auto-segmentation and training with la_seg_finetune, cvrl_semisup and simcvd_distill."""

    def __init__(self, app_dir, studies, conf):
        names = [n.strip() for n in conf.get("models", ",".join(SERVED_BUNDLES)).split(",") if n.strip()]
        self.models = prepare_models(
            os.path.join(app_dir, "model"),
            names,
            bundles_dir=conf.get("bundles"),
            index=conf.get("bundle_index"),
            version=conf.get("bundle_version"),
        )
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"medssl - label-efficient 3D segmentation (MONAI Label {monailabel.__version__})",
            description="medssl bundles: supervised VNet, CVRL and SimCVD semi-supervised training",
            version="0.1.0",
        )

    def infer(self, request, datastore=None):
        """MONAI Label's infer, with the request's own faults answered as such: an image id the datastore does not
        hold is a 404, an unreadable or bad image (a :class:`medssl.data.DataError` naming the file) a 422, an unknown
        model a 400, each with the reason as its ``detail``. MONAI Label 0.8.5 would answer all of them with a bare
        500 "Internal Server Error" and leave the reason in the server's log."""
        image = request.get("image")
        if isinstance(image, str) and not os.path.exists(image):
            if not (datastore or self.datastore()).get_image_uri(image):
                raise HTTPException(status_code=404, detail=f"image {image!r}: no such image in the datastore.")
        try:
            return super().infer(request, datastore)
        except MONAILabelException as e:
            if e.error != MONAILabelError.INVALID_INPUT:
                raise
            raise HTTPException(status_code=400, detail=e.msg) from e
        except Exception as e:
            message = data_error_message(e)
            if message is None:
                raise
            logger.error(f"infer {request.get('model')} on {image!r}: {message}")
            raise HTTPException(status_code=422, detail=message) from e

    def init_infers(self) -> Dict[str, InferTask]:
        infers = {}
        for name, path in self.models.items():
            task = MedsslInferTask(str(path), self.conf)
            if task.is_valid():
                infers[name] = task
            else:
                logger.warning(f"{name}: no models/model.pt yet; train it first (/train/{name}), then restart")
        return infers

    def init_trainers(self) -> Dict[str, TrainTask]:
        if strtobool(self.conf.get("skip_trainers", "false")):
            return {}
        return {
            name: MedsslTrainTask(str(path), self.conf, semi_supervised=name in SEMI_SUPERVISED)
            for name, path in self.models.items()
        }

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"random": Random(), "first": First()}
