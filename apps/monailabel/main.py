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
"""

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import monailabel
import torch
from fastapi import HTTPException
from filelock import FileLock
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
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
from medssl.data import DataError, atomic_path, check_headers, data_error_message, write_nifti
from medssl.clinic.label import (
    SEMI_SUPERVISED,
    SERVED_BUNDLES,
    RequestError,
    bundle_label_names,
    check_image_upload,
    check_name,
    check_request_paths,
    check_uid,
    is_within,
    label_to_seg,
    prepare_models,
    publish_weights,
    read_label_upload,
    seg_to_nifti,
    series_to_nifti,
    write_datastore_split,
)

logger = logging.getLogger(__name__)

# bundle settings a /train request may change (besides MONAI Label's own: device, pretrained, val_split, ...)
TRAIN_OPTIONS = ("max_iterations", "patch_size", "batch_size", "learning_rate", "lr_step", "num_workers")
DEFAULT_DICOMWEB_FILTER = {"Modality": "MR"}
# SEG segment algorithm types of labels a person saved (an AUTOMATIC SEG, e.g. a DICOM node's, is not a label)
PERSON_MADE = {"MANUAL", "SEMIAUTOMATIC"}


def refuse(e: DataError, names: Optional[Dict[str, str]] = None) -> HTTPException:
    """The HTTP answer to a refused request: its status (422 for bad data) and its reason as ``detail``, with the
    server's temporary file names replaced by what they are to the client (``names``)."""
    detail = " ".join(str(e).split())
    for path, name in (names or {}).items():
        detail = detail.replace(path, name)
    return HTTPException(status_code=getattr(e, "status", 422), detail=detail)


def is_upload(value: Any) -> bool:
    """Whether ``value`` is the path MONAI Label's endpoints give an uploaded file (``tempfile.NamedTemporaryFile``
    names in the temporary folder)."""
    return (
        isinstance(value, str)
        and os.path.dirname(os.path.realpath(value)) == os.path.realpath(tempfile.gettempdir())
        and Path(value).name.startswith("tmp")
        and os.path.isfile(value)
    )


# -- datastores --------------------------------------------------------------------------------------------------


class CheckedDatastore:
    """What both datastores add to MONAI Label's folder datastore: requests checked before anything is written, files
    placed atomically, and the index (``datastore_v2.json``) re-read under its lock before each change and replaced
    in one step, so that the server and a training process never write over each other's entries.

    The subclass sets ``label_names`` (label value -> name of the served models) and implements
    :meth:`check_image_id`.
    """

    label_names: Dict[int, str] = {}

    # ids and files --------------------------------------------------------------------------------------------------

    def check_image_id(self, image_id: Any, field: str = "image") -> str:
        """``image_id`` if it is a well-formed id the datastore holds; else a 400 (malformed) or 404."""
        raise NotImplementedError

    def _image_file(self, image_id: str) -> str:
        """The image's NIfTI file (a DICOMweb series is fetched and converted first)."""
        uri = LocalDatastore.get_image_uri(self, image_id)
        if not uri:
            raise RequestError(404, f"image {image_id!r}: no such image in the datastore.")
        return uri

    def _load_index(self) -> None:
        """Re-read ``datastore_v2.json`` if another process changed it (the caller holds the lock)."""
        path = self._datastore_config_path
        if os.path.exists(path) and os.stat(path).st_mtime != self._config_ts:
            with open(path) as f:
                model = LocalDatastoreModel.model_validate_json(f.read())
            model.base_path = self._datastore_path
            self._datastore, self._config_ts = model, os.stat(path).st_mtime

    def _update_datastore_file(self, lock=True):
        # MONAI Label rewrites the index in place; a crash there would leave half a JSON that stops the next start
        def write():
            self._ignore_event_config = True
            content = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            with atomic_path(self._datastore_config_path) as tmp:
                tmp.write_text(content)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    @contextlib.contextmanager
    def _staging(self):
        """A fresh folder inside the datastore (same disk: a file made there is renamed into place in one step) whose
        name matches none of the datastore's file patterns, so the datastore's watcher never lists a half-made file."""
        folder = tempfile.mkdtemp(dir=self._datastore_path, prefix=".staging-")
        try:
            yield Path(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _register_image(self, image_id: str, src: str, ext: str, info: Dict[str, Any]) -> str:
        name = image_id + ext
        dest = os.path.join(self._datastore.image_path(), name)
        with FileLock(self._lock_file):
            self._load_index()
            if os.path.realpath(src) != os.path.realpath(dest):
                with self._staging() as tmp:
                    shutil.copyfile(src, tmp / name)
                    os.replace(tmp / name, dest)
            info = {**(info or {}), "ts": int(time.time()), "name": name}
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
            self._update_datastore_file(lock=False)
        return image_id

    def _register_label(self, image_id: str, tag: str, labels, affine, info: Dict[str, Any]) -> str:
        name = image_id + ".nii.gz"
        folder = self._datastore.label_path(tag)
        os.makedirs(folder, exist_ok=True)
        with FileLock(self._lock_file):
            self._load_index()
            obj = self._datastore.objects.get(image_id)
            if obj is None:
                raise RequestError(404, f"image {image_id!r}: no such image in the datastore.")
            with self._staging() as tmp:
                write_nifti(labels, affine, tmp / name, "uint8")
                os.replace(tmp / name, os.path.join(folder, name))
            old = obj.labels.get(tag)
            if old is not None and old.ext != ".nii.gz":  # one label file per image and tag
                Path(folder, image_id + old.ext).unlink(missing_ok=True)
            info = {k: v for k, v in (info or {}).items() if k not in ("ts", "name")}
            obj.labels[tag] = DataModel(info={**info, "ts": int(time.time()), "name": name}, ext=".nii.gz")
            self._update_datastore_file(lock=False)
        return image_id

    # the datastore API --------------------------------------------------------------------------------------------

    def get_image_uri(self, image_id: str) -> str:
        try:
            image_id = self.check_image_id(image_id)
            return self._image_file(image_id)
        except RequestError as e:
            if e.status == 404:
                return ""  # MONAI Label's "no such image"; the app and endpoints say so
            raise refuse(e) from e
        except DataError as e:
            raise refuse(e) from e

    def save_label(self, image_id, label_filename, label_tag, label_info, label_id=""):
        """Check the label against its image, then store it (see the subclasses); a refused label changes nothing."""
        try:
            image_id = self.check_image_id(image_id)
            tag = check_name(label_tag or DefaultLabelTag.FINAL.value, "tag")
            check_request_paths(label_info or {}, [self._datastore_path], "params")
            image = self._image_file(image_id)
            labels, affine = read_label_upload(label_filename, image, self.label_names, f"label for image {image_id!r}")
            return self._store_label(image_id, tag, labels, affine, dict(label_info or {}))
        except DataError as e:
            raise refuse(e, {str(label_filename): "the uploaded label"}) from e

    def _store_label(self, image_id, tag, labels, affine, info) -> str:
        return self._register_label(image_id, tag, labels, affine, info)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        try:
            check_name(label_tag, "tag")
            label_id = self.check_image_id(label_id, "id")
        except DataError as e:
            raise refuse(e) from e
        if not LocalDatastore.get_label_uri(self, label_id, label_tag):
            raise refuse(RequestError(404, f"label {label_id!r} with tag {label_tag!r}: no such label."))
        super().remove_label(label_id, label_tag)

    def update_image_info(self, image_id, info):
        try:
            image_id = self.check_image_id(image_id)
        except DataError as e:
            raise refuse(e) from e
        super().update_image_info(image_id, info)

    def update_label_info(self, label_id, label_tag, info):
        try:
            check_name(label_tag, "tag")
            label_id = self.check_image_id(label_id, "label")
        except DataError as e:
            raise refuse(e) from e
        if not LocalDatastore.get_label_uri(self, label_id, label_tag):
            raise refuse(RequestError(404, f"label {label_id!r} with tag {label_tag!r}: no such label."))
        super().update_label_info(label_id, label_tag, info)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        try:
            check_name(label_tag, "tag")
            label_id = self.check_image_id(label_id, "label")
        except RequestError as e:
            if e.status == 404:
                return ""
            raise refuse(e) from e
        return LocalDatastore.get_label_uri(self, label_id, label_tag)


class MedsslLocalDatastore(CheckedDatastore, LocalDatastore):
    """MONAI Label's folder datastore with checked requests and atomic writes."""

    def __init__(self, path: str, label_names: Dict[int, str], **kwargs):
        self.label_names = dict(label_names)
        super().__init__(path, **kwargs)

    def check_image_id(self, image_id: Any, field: str = "image") -> str:
        image_id = check_name(image_id, field)
        if image_id not in self._datastore.objects:
            with FileLock(self._lock_file):
                self._load_index()
        if image_id not in self._datastore.objects:
            raise RequestError(404, f"{field} {image_id!r}: no such image in the datastore.")
        return image_id

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        """A new image from an upload: a plain new id, a readable 3D NIfTI volume; refused (and nothing written)
        otherwise."""
        try:
            file_id, ext = self._to_id(os.path.basename(image_filename))
            image_id = check_name(image_id or file_id, "image")
            check_request_paths(image_info or {}, [self._datastore_path], "params")
            check_image_upload(image_filename, f"image upload for {image_id!r}")
            ext = ".nii.gz" if image_filename.endswith(".nii.gz") else ".nii"
            old = self._datastore.objects.get(image_id)
            if old is not None and old.image.ext != ext:
                raise RequestError(
                    400, f"image {image_id!r} is already in the datastore as {image_id + old.image.ext}."
                )
            return self._register_image(image_id, image_filename, ext, dict(image_info or {}))
        except DataError as e:
            raise refuse(
                e, {image_filename: "the uploaded image", os.path.basename(image_filename): "the upload"}
            ) from e

    def remove_image(self, image_id: str) -> None:
        try:
            image_id = self.check_image_id(image_id, "id")
        except DataError as e:
            raise refuse(e) from e
        super().remove_image(image_id)


class MedsslDicomWebDatastore(CheckedDatastore, DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore, converting with medssl instead of SimpleITK, pydicom-seg and dcmqi.

    Images are the series the search filter finds (ids: SeriesInstanceUIDs); each is downloaded once into the cache
    (``<cache>/<uid>/``, then ``<uid>.nii`` read by :func:`medssl.clinic.label.series_to_nifti`). A saved final label
    goes to the PACS as a DICOM SEG of its series (:func:`medssl.clinic.label.label_to_seg`) and into the cache; labels
    that other annotators saved in the PACS (SEGs whose segments are MANUAL or SEMIAUTOMATIC; the newest per series) are
    fetched when training asks for the labeled images. Uploading or deleting images is the PACS's business: refused
    (405).
    """

    def __init__(self, client, search_filter, cache_path, label_names, algorithm, list_ttl: float = 30.0):
        self.label_names = dict(label_names)
        self.algorithm = algorithm  # (bundle name, version) named in the SEGs
        self.list_ttl = float(list_ttl)
        self._listed = (0.0, [])
        self._seg_refs: Dict[str, Optional[Dict[str, str]]] = {}  # SEG series -> what it labels (None: not a label)
        super().__init__(client=client, search_filter=search_filter, cache_path=cache_path, convert_to_nifti=True)

    # the PACS ---------------------------------------------------------------------------------------------------

    def _ask(self, what: str, call, *args, **kwargs):
        """One DICOMweb call; a PACS that fails or does not answer is a 502 naming it and what was asked."""
        try:
            return call(*args, **kwargs)
        except Exception as e:  # requests' and dicomweb-client's errors
            url = self._client.base_url
            raise RequestError(502, f"the PACS at {url} could not {what} ({type(e).__name__}: {e}).") from e

    def list_images(self) -> List[str]:
        stamp, series = self._listed
        if time.monotonic() - stamp > self.list_ttl:
            found = self._ask("list the series", self._client.search_for_series, search_filters=self._search_filter)
            series = [s["0020000E"]["Value"][0] for s in found if s.get("0020000E", {}).get("Value")]
            self._listed = (time.monotonic(), series)
        return list(series)

    def _find_series(self, uid: str) -> Optional[Dict[str, Any]]:
        query = {**self._search_filter, "SeriesInstanceUID": uid}
        found = self._ask(f"search series {uid}", self._client.search_for_series, search_filters=query)
        return next((s for s in found if s.get("0020000E", {}).get("Value") == [uid]), None)

    def check_image_id(self, image_id: Any, field: str = "image") -> str:
        uid = check_uid(image_id, field)
        if uid not in self._datastore.objects and uid not in self.list_images() and not self._find_series(uid):
            raise RequestError(
                404, f"{field} {uid!r}: no series with this SeriesInstanceUID matches {self._search_filter}."
            )
        return uid

    def _download(self, study_uid: str, series_uid: str, folder: Path) -> None:
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{series_uid}."))
        try:
            for ds in self._ask(f"send series {series_uid}", self._client.retrieve_series, study_uid, series_uid):
                ds.save_as(str(tmp / f"{ds.SOPInstanceUID}.dcm"))
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _image_file(self, image_id: str) -> str:
        obj = self._datastore.objects.get(image_id)
        nifti = os.path.join(self._datastore.image_path(), image_id + ".nii")
        if obj is not None and os.path.exists(nifti):
            return nifti
        with FileLock(os.path.join(self._datastore_path, f".{image_id}.lock")):  # one download per series
            if not os.path.exists(nifti):
                meta = self._find_series(image_id)
                if meta is None:
                    raise RequestError(404, f"image {image_id!r}: no such series in the PACS.")
                study = meta["0020000D"]["Value"][0]
                folder = Path(self._datastore.image_path(), image_id)
                if not folder.is_dir():
                    self._download(study, image_id, folder)
                with self._staging() as tmp:
                    series_to_nifti(folder, tmp / "image.nii")
                    os.replace(tmp / "image.nii", nifti)
            info = self._series_info(image_id)
            self._register_image(image_id, nifti, ".nii", info)
        return nifti

    def _series_info(self, uid: str) -> Dict[str, Any]:
        meta = self._find_series(uid) or {}
        tags = {"StudyInstanceUID": "0020000D", "PatientID": "00100020", "Modality": "00080060",
                "SeriesDescription": "0008103E", "StudyDate": "00080020"}  # fmt: skip
        info = {"SeriesInstanceUID": uid}
        for name, tag in tags.items():
            value = meta.get(tag, {}).get("Value")
            info[name] = str(value[0]) if value else ""
        return info

    def _store_label(self, image_id, tag, labels, affine, info) -> str:
        """A final label: a DICOM SEG of the series into the PACS first (a refusal there changes nothing here), then
        the cache; other tags stay in the cache."""
        if tag == DefaultLabelTag.FINAL.value:
            import pydicom

            bundle, version = self.algorithm
            user = str(info.get("user") or "annotator")[:64]
            with tempfile.TemporaryDirectory() as tmp:
                seg = label_to_seg(
                    labels,
                    os.path.join(self._datastore.image_path(), image_id),
                    Path(tmp) / "seg.dcm",
                    bundle,
                    version,
                    self.label_names,
                    algorithm_type="SEMIAUTOMATIC",
                    content_creator=user,
                    series_description=f"MONAI Label {tag} label ({bundle})",
                )
                ds = pydicom.dcmread(str(seg))
                self._ask(f"store the SEG of series {image_id}", self._client.store_instances, [ds])
            info.update({"SeriesInstanceUID": str(ds.SeriesInstanceUID), "StudyInstanceUID": str(ds.StudyInstanceUID)})
            self._seg_refs[str(ds.SeriesInstanceUID)] = {"image": image_id, "when": _seg_time(ds)}
            logger.info(f"SEG {ds.SeriesInstanceUID} of series {image_id} stored in the PACS")
        return self._register_label(image_id, tag, labels, affine, info)

    def _pacs_labels(self) -> Dict[str, str]:
        """``{image series: its newest person-made SEG series}`` in the PACS (SEG metadata read once per SEG)."""
        newest: Dict[str, tuple] = {}
        images = set(self.list_images())
        segs = self._ask("list the SEG series", self._client.search_for_series, search_filters={"Modality": "SEG"})
        for seg in segs:
            uid = seg.get("0020000E", {}).get("Value", [None])[0]
            study = seg.get("0020000D", {}).get("Value", [None])[0]
            if not uid or not study:
                continue
            if uid not in self._seg_refs:
                meta = self._ask(f"describe SEG {uid}", self._client.retrieve_series_metadata, study, uid)
                try:
                    self._seg_refs[uid] = _seg_reference(meta)
                except Exception as e:  # a SEG this reader does not understand labels nothing here
                    logger.warning(f"SEG {uid} ignored: its metadata cannot be read ({type(e).__name__}: {e})")
                    self._seg_refs[uid] = None
            ref = self._seg_refs[uid]
            if ref and ref["image"] in images and (ref["when"], uid) > newest.get(ref["image"], ("", "")):
                newest[ref["image"]] = (ref["when"], uid)
        return {image: uid for image, (_, uid) in newest.items()}

    def _sync_labels(self) -> None:
        """Fetch the PACS's newest person-made SEG of each series as its final label, unless the cache has it; a SEG
        that does not fit its series (another grid, values that are not the served labels) is skipped and logged."""
        for image_id, seg_uid in self._pacs_labels().items():
            label = self._datastore.label(image_id, DefaultLabelTag.FINAL.value)
            if label is not None and label.info.get("SeriesInstanceUID") == seg_uid:
                continue
            image = self._image_file(image_id)
            study = self._series_info(image_id)["StudyInstanceUID"]
            with tempfile.TemporaryDirectory() as tmp:
                seg = Path(tmp) / "seg.dcm"
                self._ask(f"send SEG {seg_uid}", self._client.retrieve_series, study, seg_uid)[0].save_as(str(seg))
                try:
                    seg_to_nifti(seg, os.path.join(self._datastore.image_path(), image_id), Path(tmp) / "l.nii.gz")
                    labels, affine = read_label_upload(
                        Path(tmp) / "l.nii.gz", image, self.label_names, f"SEG {seg_uid}"
                    )
                except DataError as e:
                    logger.warning(f"SEG {seg_uid} is not used as the label of series {image_id}: {e}")
                    continue
            self._register_label(image_id, DefaultLabelTag.FINAL.value, labels, affine, {"SeriesInstanceUID": seg_uid})
            logger.info(f"final label of {image_id} fetched from SEG {seg_uid}")

    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        return sorted(
            set(self.list_images()) & (set(self._pacs_labels()) | set(LocalDatastore.get_labeled_images(self)))
        )

    def get_unlabeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        labeled = set(self.get_labeled_images())
        return [s for s in self.list_images() if s not in labeled]

    def datalist(self, full_path=True) -> List[Dict[str, Any]]:
        self._sync_labels()
        images = set(self.list_images())
        return [d for d in LocalDatastore.datalist(self, full_path) if Path(d["image"]).name[: -len(".nii")] in images]

    def status(self) -> Dict[str, Any]:
        try:
            return LocalDatastore.status(self)  # with this class's list_images and get_labeled_images
        except RequestError as e:
            raise refuse(e) from e

    def add_image(self, image_id, image_filename, image_info):
        raise refuse(RequestError(405, "the images of a DICOMweb datastore are the PACS's series: send the series to "
                                       "the PACS (C-STORE or STOW-RS) instead of uploading it here."))  # fmt: skip

    def remove_image(self, image_id):
        raise refuse(RequestError(405, "the images of a DICOMweb datastore are the PACS's series: remove them there."))


def _seg_time(ds) -> str:
    return f"{ds.get('ContentDate', '')}{ds.get('ContentTime', '')}"


def _seg_reference(metadata: List[Dict[str, Any]]) -> Optional[Dict[str, str]]:
    """What a SEG series labels (``{"image": referenced series, "when": content date and time}``), from its DICOMweb
    metadata; None when it references no series or its segments are all AUTOMATIC (an algorithm's output)."""
    from pydicom import Dataset

    if not metadata:
        return None
    ds = Dataset.from_json(metadata[0])
    refs = ds.get("ReferencedSeriesSequence") or []
    kinds = {str(s.get("SegmentAlgorithmType", "")) for s in ds.get("SegmentSequence") or []}
    if not refs or not (kinds & PERSON_MADE):
        return None
    return {"image": str(refs[0].SeriesInstanceUID), "when": _seg_time(ds)}


# -- tasks -------------------------------------------------------------------------------------------------------


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


# -- the app -----------------------------------------------------------------------------------------------------


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
        for path in self.models.values():
            self.label_names.update(bundle_label_names(path))
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
            search_filter = json.loads(search_filter) if search_filter else dict(DEFAULT_DICOMWEB_FILTER)
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
        return MedsslDicomWebDatastore(client, search_filter, cache.strip(), self.label_names, algorithm)

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
            seg = label_to_seg(labels, series_dir, out, name, version, self.label_names, algorithm_type="AUTOMATIC")
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
            status = next((x.status for x in _chain(e) if isinstance(x, RequestError)), 422)
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


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__
