"""The served bundles as MONAI Label tasks: auto-segmentation through :class:`medssl.clinic.segment.Segmenter`
(:class:`MedsslInferTask`) and training on the datastore, semi-supervised where the bundle is
(:class:`MedsslTrainTask`)."""

import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional

import nibabel as nib
import numpy as np
import torch
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask

import monai.bundle
from medssl.data import check_headers
from medssl.clinic.label import RequestError, check_name, publish_weights, write_datastore_split
from medssl.clinic.quality import Quality
from medssl.clinic.segment import label_volumes

logger = logging.getLogger(__name__)

# bundle settings a /train request may change (besides MONAI Label's own: device, pretrained, val_split, ...)
TRAIN_OPTIONS = ("max_iterations", "patch_size", "batch_size", "learning_rate", "lr_step", "num_workers")


class MedsslInferTask(BundleInferTask):
    """The bundle's inference.json as MONAI Label's auto-segmentation, run by :class:`medssl.clinic.segment.Segmenter`:
    the bundle's own evaluator with its precision (bf16 on a CPU with native bf16), channels-last layout and
    ``prob_network``, the label map in the input's shape and affine, and ``models/model.pt`` read at each request.
    One request at a time per model (the server answers them in turn)."""

    def __init__(self, path: str, conf: Dict[str, str]):
        super().__init__(path, conf)
        self._conf = dict(conf or {})  # MONAI Label's task keeps no copy
        self._segmenters: Dict[Any, Any] = {}
        self._lock = threading.Lock()

    def _segmenter(self, device: Optional[str], digest: str):
        from medssl.clinic.segment import Segmenter

        from medssl.clinic.runtime_choice import default_runtime

        runtime = str(self._conf.get("runtime") or default_runtime())
        model_format = str(self._conf.get("model_format", "pt"))
        # the eager network re-reads models/model.pt at every request; an exported one (--conf runtime / model_format)
        # is made from it, so new weights (a /train) mean a new segmenter, whose export is rebuilt as stale (and
        # whose auto choice is made again: trained weights have no accuracy record, so auto runs them in torch)
        exported = (runtime, model_format) != ("torch", "pt")
        key = (device or "", digest if exported else "")
        if key not in self._segmenters:
            for old in [k for k in self._segmenters if k[0] == key[0]]:
                self._segmenters.pop(old).close()
            self._segmenters[key] = Segmenter(
                self.bundle_path, device=device, progress=False, runtime=runtime, model_format=model_format
            )
        return self._segmenters[key]

    def __call__(self, request, callbacks=None):
        import hashlib

        image = request.get("image")
        if not isinstance(image, str) or not os.path.isfile(image):
            raise RequestError(
                400, f"image: expected an image id or an uploaded NIfTI file, got {type(image).__name__}."
            )
        check_headers(image)  # a bad file is named before the model runs
        device = str(request.get("device") or "")
        device = device if device.startswith("cuda") and torch.cuda.is_available() else ("cpu" if device else None)
        begin = time.perf_counter()
        with self._lock:
            weights = Path(self.bundle_path) / "models" / "model.pt"
            digest = hashlib.sha256(weights.read_bytes()).hexdigest()
            segmenter = self._segmenter(device, digest)
            pred = segmenter.infer(Path(image))
            written = nib.load(str(pred))
            labels = label_volumes(np.asarray(written.dataobj), written.affine, segmenter.label_names)
            quality = Quality()
            quality.add(segmenter.volume_reasons(labels))
            for reason in quality.reasons:
                logger.warning(f"{Path(self.bundle_path).name} on {image}: {reason}")
            out = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
            shutil.move(str(pred), out)
        seconds = round(time.perf_counter() - begin, 3)
        logger.info(
            f"{Path(self.bundle_path).name} on {image}: {seconds} s ({segmenter.device}, {segmenter.precision}, "
            f"{torch.get_num_threads()} threads)"
        )
        return out, {
            "label_names": self.labels,
            "latencies": {"total": seconds, "infer": seconds},
            "bundle": Path(self.bundle_path).name,
            "version": self.version,
            "device": segmenter.device,
            "precision": segmenter.precision,
            "runtime": segmenter.runtime,
            "runtime_choice": segmenter.runtime_choice,
            "weights_sha256": digest,
            "labels": labels,  # per structure: value, voxels, volume in mL
            "quality": quality.as_dict(),  # medssl.clinic.quality: the volume checks (verdict, reasons, numbers)
        }


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
        filename = request.get("model_filename", "model.pt")
        check_name(filename if isinstance(filename, str) else str(filename), "model_filename")
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
