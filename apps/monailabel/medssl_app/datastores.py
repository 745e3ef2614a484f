"""The app's datastores: a folder of NIfTI volumes (:class:`MedsslLocalDatastore`) or a PACS over DICOMweb
(:class:`MedsslDicomWebDatastore`, series in, the labels people save stored back as DICOM SEG), both checking every
request before anything changes and writing files and the index atomically (:class:`CheckedDatastore`)."""

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from filelock import FileLock
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.datastore import DefaultLabelTag

from medssl.data import DataError, atomic_path, write_nifti
from medssl.clinic.label import (
    RequestError,
    check_image_upload,
    check_name,
    check_request_paths,
    check_uid,
    label_to_seg,
    read_label_upload,
    seg_to_nifti,
    series_to_nifti,
)

from .refusals import refuse

logger = logging.getLogger(__name__)

# SEG segment algorithm types of labels a person saved (an AUTOMATIC SEG, e.g. a DICOM node's, is not a label)
PERSON_MADE = {"MANUAL", "SEMIAUTOMATIC"}


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

    def __init__(
        self, client, search_filter, cache_path, label_names, algorithm, list_ttl: float = 30.0, label_codes=None
    ):
        self.label_names = dict(label_names)
        self.label_codes = dict(label_codes or {})  # value -> (code, category): the served bundles' own
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
                    label_codes=self.label_codes,
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
