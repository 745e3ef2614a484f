"""MONAI Label app serving the medssl segmentation bundles to annotators, on a folder or on a PACS.

Start it with::

    .venv-label/bin/python -m monailabel.main start_server --app apps/monailabel --studies DATASTORE \\
        --conf models la_seg_finetune,cvrl_semisup,simcvd_distill

``DATASTORE`` is a folder of NIfTI volumes (labels in ``labels/final/``) or a DICOMweb service
(``http://HOST:PORT/dicom-web``, e.g. Orthanc with its DICOMweb plugin). Each served bundle gets a writable copy under
``<app>/model/<name>/`` (copied from the checkout's bundles, ``--conf bundles DIR``, or pulled by name with
``--conf bundle_index PATH_OR_URL``, checksum verified).

Auto-segmentation runs the bundle's ``inference.json`` through :class:`medssl.clinic.segment.Segmenter`, the code of
``python -m medssl segment``: the same precision, memory layout and threads, the label map in the input's geometry,
and the weights read from ``models/model.pt`` at each request (a finished training is used by the next one).
``--conf runtime auto|torch|openvino|openvino-int8`` (default ``auto``, or ``$MEDSSL_RUNTIME``: the fastest runtime that
keeps the release's label maps on this CPU, see :mod:`medssl.clinic.runtime_choice`; weights trained here have no
accuracy record, so ``auto`` runs them in PyTorch) and ``--conf model_format pt|ts|pt2`` choose what runs; ``/infer``
reports it. Training (``/train/<name>``) runs the bundle's ``train.json`` on the datastore's labeled images; the
semi-supervised bundles (cvrl_semisup, simcvd_distill) also train on the images that have no label yet. Each training
run gets its own folder ``<bundle>/monailabel/<time>/`` (its dataset.json, checkpoints, logs); when it finishes, its
weights replace ``models/model.pt`` in one atomic step.

On a PACS (DICOMweb) the images are the series that match ``--conf dicomweb_filter`` (default ``{"Modality": "MR"}``),
their ids the SeriesInstanceUIDs. A series is downloaded once into the cache (``--conf dicomweb_cache DIR``, default
MONAI Label's ``~/.cache/monailabel/dicom``) and read by :mod:`medssl.clinic.dicom` (the reader of ``segment``); a saved
final label is stored in the PACS as a DICOM SEG of that series written by :func:`medssl.clinic.dicom.write_seg`
(SEMIAUTOMATIC, the served bundle as the algorithm), and SEGs that people saved (not the AUTOMATIC ones of a DICOM
node) are the labels training reads back. Nothing calls dcmqi: MONAI Label 0.8.5 would download it from GitHub at
start-up and convert with it; here the DICOM SEG of ``/infer?output=dicom_seg`` is medssl's too.

Requests are checked before anything changes (:mod:`medssl.clinic.label`): an image id the datastore does not hold is a
404, a path outside the datastore in any field or a malformed id or tag a 400, an upload that is not a readable 3D NIfTI
volume, a label of another shape or affine than its image or with values that are not the served labels a 422,
each with the reason as its ``detail``; files and the datastore's index are written atomically.

This file is the app (:class:`MedsslApp`: which datastore, which tasks, the checks around ``/infer`` and ``/train``);
its pieces are in ``medssl_app/``: ``datastores.py``, ``tasks.py`` and ``refusals.py``.
"""

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import monailabel
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.others.generic import strtobool

from medssl.data import DataError, data_error_message
from medssl.task import read_task
from medssl.clinic.label import (
    SEMI_SUPERVISED,
    SERVED_BUNDLES,
    RequestError,
    bundle_label_names,
    check_request_paths,
    is_within,
    label_to_seg,
    prepare_models,
    read_label_upload,
)

from medssl_app.datastores import MedsslDicomWebDatastore, MedsslLocalDatastore
from medssl_app.refusals import causes, is_upload, refuse
from medssl_app.tasks import MedsslInferTask, MedsslTrainTask

logger = logging.getLogger(__name__)

DEFAULT_DICOMWEB_FILTER = {"Modality": "MR"}  # the released bundles' (default_dicomweb_filter follows the served ones)


def default_dicomweb_filter(modalities: Dict[str, str]) -> Dict[str, str]:
    """The PACS series to list: those of the served bundles' modality (``{"Modality": "CT"}`` for CT bundles).

    Raises:
        ValueError: the served bundles segment different modalities (give ``--conf dicomweb_filter``).
    """
    kinds = sorted(set(modalities.values()))
    if len(kinds) > 1:
        raise ValueError(
            f"the served bundles segment different modalities ({modalities}); serve one modality per app, or give "
            "--conf dicomweb_filter '{\"Modality\": ...}'."
        )
    return {"Modality": kinds[0]} if kinds else dict(DEFAULT_DICOMWEB_FILTER)


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
        self.label_names: Dict[int, str] = {}
        self.label_codes: Dict[int, Any] = {}  # the bundles' own SNOMED codes, for the SEGs written here
        self.modalities: Dict[str, str] = {}  # bundle -> the modality it segments
        for name, path in self.models.items():
            self.label_names.update(bundle_label_names(path))
            task = read_task(path)
            self.label_codes.update(task.codes)
            self.modalities[name] = task.modality
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"medssl - label-efficient 3D segmentation (MONAI Label {monailabel.__version__})",
            description="medssl bundles: supervised VNet, CVRL and SimCVD semi-supervised training",
            version="0.1.0",
        )
        if isinstance(self._datastore, DICOMWebDatastore):
            # MONAI Label's /infer?output=dicom_seg converts with dcmqi's itkimage2segimage: medssl's writer instead
            import monailabel.endpoints.infer as infer_endpoint

            infer_endpoint.nifti_to_dicom_seg = self.dicom_seg_of_inference

    # datastore --------------------------------------------------------------------------------------------------

    def init_datastore(self) -> Datastore:
        studies = self.studies.strip()
        if not studies.startswith(("http://", "https://")):
            return MedsslLocalDatastore(
                studies,
                self.label_names,
                extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            )
        self.studies = studies.rstrip("/")
        logger.info(f"DICOMweb datastore: {self.studies} (SEG written by medssl; dcmqi is not used)")
        client = DICOMwebClientX(
            url=self.studies,
            qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
            wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
            stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
        )
        search_filter = self.conf.get("dicomweb_filter")
        try:
            search_filter = json.loads(search_filter) if search_filter else default_dicomweb_filter(self.modalities)
        except json.JSONDecodeError as e:
            raise ValueError(f"--conf dicomweb_filter {search_filter!r}: expected a JSON object ({e}).") from e
        cache = (
            self.conf.get("dicomweb_cache")
            or settings.MONAI_LABEL_DATASTORE_CACHE_PATH
            or settings.MONAI_LABEL_DICOMWEB_CACHE_PATH
            or os.path.join(Path.home(), ".cache", "monailabel", "dicom")
        )
        first = next(iter(self.models))
        algorithm = (first, str(json.loads((self.models[first] / "configs" / "metadata.json").read_text())["version"]))
        return MedsslDicomWebDatastore(
            client, search_filter, cache.strip(), self.label_names, algorithm, label_codes=self.label_codes
        )

    def _download_dcmqi_tools(self):
        pass  # SEG is written by medssl.clinic.dicom (highdicom); nothing to download

    def datastore_roots(self) -> List[str]:
        """The folders a request may name paths in: the datastore's (or the DICOMweb cache's) own."""
        return [self._datastore._datastore_path]

    def dicom_seg_of_inference(self, series_dir, label, label_info=None, file_ext="*", use_itk=True) -> str:
        """``/infer?output=dicom_seg``: the inferred label map as an AUTOMATIC DICOM SEG of its series (medssl's
        writer; MONAI Label's signature, which would call dcmqi)."""
        try:
            if not is_within(series_dir, self.datastore_roots()):
                raise RequestError(400, "output=dicom_seg needs an image of the datastore.")
            wanted = (label_info or [{}])[0].get("model_name") if isinstance(label_info, list) else None
            name = wanted if wanted in self.models else next(iter(self.models))
            version = str(json.loads((self.models[name] / "configs" / "metadata.json").read_text())["version"])
            labels, _ = read_label_upload(label, f"{series_dir}.nii", self.label_names, "inferred label")
            out = tempfile.NamedTemporaryFile(suffix=".dcm", delete=False).name
            seg = label_to_seg(
                labels, series_dir, out, name, version, self.label_names, algorithm_type="AUTOMATIC",
                label_codes=self.label_codes,
            )  # fmt: skip
            return str(seg)
        except DataError as e:
            raise refuse(e) from e

    # requests ---------------------------------------------------------------------------------------------------

    def _check_infer_request(self, request, datastore) -> None:
        image = request.get("image")
        if not isinstance(image, str):
            raise RequestError(400, f"image: expected an image id, got {type(image).__name__}.")
        # paths: what MONAI Label's endpoint makes of an uploaded file, or a file of the datastore; nothing else
        others = {k: v for k, v in request.items() if not is_upload(v)}
        check_request_paths(others, self.datastore_roots())
        if not (is_upload(image) or os.path.isfile(image)):
            datastore.check_image_id(image)

    def infer(self, request, datastore=None):
        """MONAI Label's infer, with the request checked first and its faults answered as such: a malformed id or a
        path outside the datastore in any field is a 400, an image id the datastore does not hold a 404, an
        unreadable or bad image (a :class:`medssl.data.DataError` naming the file) a 422, an unknown model a 400,
        each with the reason as its ``detail``. MONAI Label 0.8.5 answers them with a bare 500."""
        datastore = datastore or self.datastore()
        try:
            self._check_infer_request(request, datastore)
            return super().infer(request, datastore)
        except HTTPException:
            raise
        except MONAILabelException as e:
            if e.error != MONAILabelError.INVALID_INPUT:
                raise
            raise HTTPException(status_code=400, detail=e.msg) from e
        except Exception as e:
            message = data_error_message(e)
            if message is None:
                raise
            logger.error(f"infer {request.get('model')} on {request.get('image')!r}: {message}")
            if is_upload(request.get("image")):  # the server's temporary name means nothing to the client
                message = message.replace(request["image"], "the uploaded image")
            status = next((x.status for x in causes(e) if isinstance(x, RequestError)), 422)
            raise HTTPException(status_code=status, detail=message) from e

    def train(self, request):
        """MONAI Label's train, refusing a request that names a path outside the app's bundle and the datastore (a
        run in a background process ends with the reason in its status)."""
        try:
            roots = self.datastore_roots() + [str(p) for p in self.models.values()]
            check_request_paths(request, roots)
        except RequestError as e:
            raise refuse(e) from e
        return super().train(request)

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
