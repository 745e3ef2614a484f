"""MONAI Label support: the parts of ``apps/monailabel`` that do not need MONAI Label installed.

MONAI Label trains a bundle on the datastore's labeled images by overriding ``train#dataset#data``. medssl
bundles read their data through ``dataset_dir`` instead (the lists are checked there: headers, shapes, small
volumes), and the semi-supervised bundles also need the unlabeled images. :func:`write_datastore_split` turns
the datastore into a medssl ``dataset.json`` (labeled entries first, then the unlabeled images), so a
MONAI Label training run is an ordinary bundle run with ``--dataset_dir`` and ``--num_labeled``.
:func:`prepare_models` gives the app one writable copy of each served bundle.

Requests are checked here before anything is written: ids and tags are plain names (a DICOMweb datastore's ids are
SeriesInstanceUIDs), no field names a path outside the datastore (:func:`check_request_paths`), an uploaded image is
a readable 3D NIfTI volume (:func:`check_image_upload`) and an uploaded label a label map on its image's grid with
the served label values (:func:`read_label_upload`). A refusal is a :class:`RequestError` carrying the HTTP status
the app answers with and a message naming the field and what was expected.

A DICOMweb datastore keeps each series as a NIfTI volume read by :mod:`medssl.clinic.dicom` (:func:`series_to_nifti`,
the reader ``segment`` uses), stores saved labels as DICOM SEG written by :func:`medssl.clinic.dicom.write_seg`
(:func:`label_to_seg`) and reads SEGs back onto their series' grid (:func:`seg_to_nifti`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
from medssl.bundle import bundle_path
from medssl.data import DataError, write_json, write_nifti

__all__ = [
    "SERVED_BUNDLES",
    "RELEASED_ONLY",
    "SEMI_SUPERVISED",
    "prepare_models",
    "write_datastore_split",
    "publish_weights",
    "RequestError",
    "check_name",
    "check_uid",
    "is_within",
    "check_request_paths",
    "check_image_upload",
    "read_label_upload",
    "bundle_label_names",
    "series_to_nifti",
    "label_to_seg",
    "seg_to_nifti",
]

logger = logging.getLogger("medssl")
# the segmentation bundles MONAI Label serves by default; RELEASED_ONLY ones are served from a release (pulled by name)
SERVED_BUNDLES = ("la_seg_finetune", "cvrl_semisup", "simcvd_distill")
RELEASED_ONLY = ("acdc_seg_finetune",)  # la_seg_finetune's configs with ACDC's cardiac labels (benchmarks/acdc_release.py)
SEMI_SUPERVISED = ("cvrl_semisup", "simcvd_distill")


def prepare_models(
    model_dir: os.PathLike | str,
    names: Sequence[str] = SERVED_BUNDLES,
    bundles_dir: Optional[str] = None,
    index: Optional[str] = None,
    version: Optional[str] = None,
) -> Dict[str, Path]:
    """One folder per served bundle under ``model_dir`` (MONAI Label trains into it and serves its weights).

    A folder already there is used as it is. Otherwise the bundle is pulled by name from ``index`` (a
    ``bundle_index.json`` path or URL, verified as ``python -m medssl pull`` does) when it is released there, or
    copied from the bundles folder (``bundles_dir``, ``$MEDSSL_BUNDLES`` or the checkout's ``bundles/``; without
    weights until it is trained).

    Raises:
        ValueError: a name that medssl does not serve for segmentation.
    """
    unknown = [n for n in names if n not in SERVED_BUNDLES + RELEASED_ONLY]
    if unknown:
        raise ValueError(f"models {unknown} cannot be served; choose from {list(SERVED_BUNDLES + RELEASED_ONLY)}.")
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    released = set()
    if index:
        from medssl.clinic.release import read_index

        released = {key.rsplit("_v", 1)[0] for key in read_index(index)}
    out = {}
    for name in names:
        target = model_dir / name
        if not (target / "configs" / "metadata.json").is_file():
            with tempfile.TemporaryDirectory(dir=model_dir, prefix=f".{name}.") as tmp:
                if index and name not in released and name not in RELEASED_ONLY:
                    logger.info(
                        "%s is not released in %s: served from the bundles folder, without weights", name, index
                    )
                if name in released:
                    from medssl.clinic.release import pull

                    src = pull(name, tmp, version=version, index=index)
                    os.replace(src, target)
                elif name in RELEASED_ONLY:  # no bundle folder: from the given index, else the checkout's
                    from medssl.bundle import default_index
                    from medssl.clinic.release import pull, read_index

                    own = index or default_index()
                    if not any(key.rsplit("_v", 1)[0] == name for key in read_index(own)):
                        raise ValueError(f"{name} is served from its release, which {own} does not list; pass the "
                                         "bundle_index.json that lists it (--conf bundle_index).")  # fmt: skip
                    os.replace(pull(name, tmp, version=version, index=own), target)
                else:
                    src = bundle_path(name, bundles_dir)
                    shutil.copytree(src, Path(tmp) / name, ignore=shutil.ignore_patterns("eval", "logs", "__pycache__"))
                    os.replace(Path(tmp) / name, target)
        out[name] = target
    return out


def write_datastore_split(
    out_dir: os.PathLike | str,
    labeled: Sequence[Dict[str, str]],
    unlabeled: Sequence[str] = (),
    validation: Sequence[Dict[str, str]] = (),
) -> Tuple[Path, int]:
    """Write ``out_dir/dataset.json``: the labeled ``{"image", "label"}`` entries first, then the unlabeled
    images (image only; their labels are never read), and an optional ``"validation"`` list.

    Returns ``(out_dir, num_labeled)`` for the bundle's ``dataset_dir`` and ``num_labeled``.

    Raises:
        DataError: no labeled image, or an entry without an image or label path.
    """
    if not labeled:
        raise DataError("the datastore has no labeled image; save at least one label (labels/final) before training.")
    for i, e in enumerate(list(labeled) + list(validation)):
        if not isinstance(e.get("image"), str) or not isinstance(e.get("label"), str):
            raise DataError(f"datastore entry {i} must have 'image' and 'label' paths, got {e!r}.")
    out_dir = Path(out_dir)
    split = {
        "name": "MONAI Label datastore",
        "description": f"{len(labeled)} labeled images first, then {len(unlabeled)} unlabeled images.",
        "training": [{"image": e["image"], "label": e["label"]} for e in labeled] + [{"image": u} for u in unlabeled],
    }
    if validation:
        split["validation"] = [{"image": e["image"], "label": e["label"]} for e in validation]
    write_json(split, out_dir / "dataset.json")
    return out_dir, len(labeled)


def publish_weights(trained: os.PathLike | str, bundle_dir: os.PathLike | str) -> Path:
    """Copy a finished run's ``model.pt`` onto ``bundle_dir/models/model.pt`` atomically (the served weights
    change in one step; MONAI Label reloads them on the next inference).

    Raises:
        FileNotFoundError: the run wrote no ``model.pt``.
    """
    trained = Path(trained)
    if not trained.is_file():
        raise FileNotFoundError(f"{trained}: the training run wrote no final weights.")
    target = Path(bundle_dir) / "models" / "model.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".model.pt.")
    os.close(fd)
    try:
        shutil.copyfile(trained, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


# -- checking requests -----------------------------------------------------------------------------------------

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# digits and dots; components with a leading zero break the standard but occur in archives, so they are accepted
DICOM_UID = re.compile(r"[0-9]+(\.[0-9]+)+")
NIFTI_EXTENSIONS = (".nii.gz", ".nii")


class RequestError(DataError):
    """A request the app refuses; ``status`` is the HTTP status to answer with: 400 a malformed field (a path where
    an id belongs, a bad tag), 404 an id the datastore does not hold, 405 an operation the datastore does not offer,
    422 an upload that is not what the field needs. The message names the field and what was expected."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = int(status)


def check_name(value: Any, field: str) -> str:
    """``value`` if it is a plain name (an image id or label tag of a folder datastore), else a 400.

    Raises:
        RequestError: anything that is not letters, digits, ``.``, ``_`` and ``-`` (a path, ``..``, empty).
    """
    if not isinstance(value, str) or not NAME.fullmatch(value) or ".." in value:
        raise RequestError(
            400, f"{field} {value!r}: expected a name of letters, digits, '.', '_' and '-' (not a path)."
        )
    return value


def check_uid(value: Any, field: str) -> str:
    """``value`` if it is a DICOM UID (a DICOMweb datastore's image ids are SeriesInstanceUIDs), else a 400."""
    if not isinstance(value, str) or len(value) > 64 or not DICOM_UID.fullmatch(value):
        raise RequestError(
            400, f"{field} {value!r}: expected a DICOM SeriesInstanceUID (digits and dots, at most 64 characters)."
        )
    return value


def is_within(path: os.PathLike | str, roots: Sequence[os.PathLike | str]) -> bool:
    """Whether ``path`` (links resolved) is one of ``roots`` or lies below one of them."""
    real = os.path.realpath(path)
    for root in roots:
        top = os.path.realpath(root)
        if real == top or real.startswith(top.rstrip(os.sep) + os.sep):
            return True
    return False


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value in (".", "..") or value.startswith("~")


def check_request_paths(request: Any, roots: Sequence[os.PathLike | str], field: str = "") -> None:
    """Refuse a request any of whose string values (nested mappings and lists included) names a path outside
    ``roots``: requests name images by id; only the server itself hands paths inside its datastore around.

    Raises:
        RequestError: 400 naming the field and the path.
    """
    if isinstance(request, Mapping):
        items = [(str(k), v) for k, v in request.items()]
    elif isinstance(request, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(request)]
    else:
        return
    for key, value in items:
        name = f"{field}.{key}" if field else key
        if isinstance(value, str):
            if _looks_like_path(value) and not is_within(os.path.expanduser(value), roots):
                raise RequestError(
                    400, f"{name}: {value!r} is a path outside the datastore; a request names images by their id."
                )
        else:
            check_request_paths(value, roots, name)


def _reason(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def _load_volume(path: os.PathLike | str, field: str):
    """The NIfTI image at ``path`` and all its voxels (a truncated file fails here, not later), as a 3D array."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        array = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel and gzip raise many types for damaged files
        raise RequestError(422, f"{field}: not a readable NIfTI volume ({_reason(e)}).") from e
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise RequestError(422, f"{field}: expected a 3D volume, got shape {tuple(array.shape)}.")
    return img, array


def check_image_upload(path: os.PathLike | str, field: str = "image upload") -> Tuple[int, ...]:
    """Check an uploaded image before it joins the datastore: a ``.nii``/``.nii.gz`` file whose voxels all read,
    3D, finite, with a usable affine. Returns its shape.

    Raises:
        RequestError: 422 naming ``field`` and the problem.
    """
    from medssl.data import voxel_spacing

    if not str(path).endswith(NIFTI_EXTENSIONS):
        raise RequestError(422, f"{field}: expected a NIfTI volume (.nii or .nii.gz), got {Path(path).name!r}.")
    img, array = _load_volume(path, field)
    if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
        raise RequestError(422, f"{field}: voxel values must be finite numbers.")
    try:
        voxel_spacing(img.affine, field)
    except DataError as e:
        raise RequestError(422, str(e)) from e
    return tuple(int(s) for s in array.shape)


def read_label_upload(
    label: os.PathLike | str,
    image: os.PathLike | str,
    label_names: Mapping[int, str],
    field: str = "label",
) -> Tuple[np.ndarray, np.ndarray]:
    """An uploaded label map checked against its image; returns ``(labels as uint8, the image's affine)``.

    ``label`` is a NIfTI file, or a ``.bin`` file of one uint8 per voxel in the image's (Fortran) voxel order, as
    OHIF sends it. It must have the image's shape (and, for NIfTI, its affine within 1e-3), integer values, and no
    value other than 0 and the keys of ``label_names``.

    Raises:
        RequestError: 422 naming ``field`` and what differs.
    """
    import nibabel as nib

    image_img = nib.load(str(image))
    shape = tuple(int(s) for s in image_img.shape[:3])
    if str(label).endswith(".bin"):
        raw = np.fromfile(str(label), np.uint8)
        if raw.size != int(np.prod(shape)):
            raise RequestError(
                422, f"{field}: {raw.size} bytes, expected {int(np.prod(shape))} (one uint8 per voxel of {shape})."
            )
        array = raw.reshape(shape, order="F")
    else:
        img, array = _load_volume(label, field)
        if tuple(array.shape) != shape:
            raise RequestError(422, f"{field}: shape {tuple(array.shape)} differs from its image's shape {shape}.")
        if not np.allclose(img.affine, image_img.affine, atol=1e-3):
            raise RequestError(
                422,
                f"{field}: affine {np.round(img.affine, 4).tolist()} differs from its image's "
                f"{np.round(image_img.affine, 4).tolist()}.",
            )
    if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all() or (array != np.round(array)).any():
        raise RequestError(422, f"{field}: values must be integer label values.")
    values = {int(v) for v in np.unique(array)}
    extra = sorted(values - {0} - {int(k) for k in label_names})
    if extra:
        raise RequestError(
            422, f"{field}: values {extra[:10]} are not labels of the served models {dict(label_names)} (or 0)."
        )
    return array.astype(np.uint8), image_img.affine


def bundle_label_names(bundle_dir: os.PathLike | str) -> Dict[int, str]:
    """``{label value: name}`` of a bundle's prediction (its metadata's ``channel_def``, background left out)."""
    import json

    meta = json.loads((Path(bundle_dir) / "configs" / "metadata.json").read_text())
    formats = meta.get("network_data_format", {})
    channels = formats.get("post_processed_outputs", {}).get("pred", {}).get("channel_def") or formats.get(
        "outputs", {}
    ).get("pred", {}).get("channel_def", {})
    return {int(k): str(v) for k, v in channels.items() if int(k) > 0}


# -- DICOM for a DICOMweb datastore --------------------------------------------------------------------------------


def series_to_nifti(series_dir: os.PathLike | str, out: os.PathLike | str) -> Path:
    """Read the DICOM series in ``series_dir`` with :func:`medssl.clinic.dicom.read_series` (as ``segment`` does) and
    write it as a NIfTI volume at ``out`` (float32, the affine from the DICOM attributes; atomic).

    Raises:
        medssl.clinic.dicom.DicomError: the series cannot be read as one 3D volume (the reason names the file).
    """
    from medssl.clinic.dicom import read_series
    from medssl.task import MODALITIES

    volume = read_series(series_dir, modalities=MODALITIES)  # the datastore's filter chose the series
    return write_nifti(volume.array, volume.affine, out, np.float32)


def label_to_seg(
    labels: np.ndarray,
    series_dir: os.PathLike | str,
    out: os.PathLike | str,
    bundle: str,
    version: str,
    label_names: Mapping[int, str],
    algorithm_type: str = "SEMIAUTOMATIC",
    content_creator: str = "medssl^annotator",
    series_description: Optional[str] = None,
    label_codes: Optional[Mapping[int, Any]] = None,
) -> Path:
    """Write a label map on the grid of :func:`series_to_nifti`'s volume of ``series_dir`` as a DICOM SEG of that
    series (:func:`medssl.clinic.dicom.write_seg`). An annotator's label is ``SEMIAUTOMATIC`` by default: a person saved
    it, starting from ``bundle``'s auto-segmentation. ``label_codes`` (value -> (code, category), the bundles' own,
    :func:`medssl.task.read_task`) code the segments.

    Raises:
        medssl.clinic.dicom.DicomError: the series cannot be read, or ``labels`` is not on its grid.
    """
    from medssl.clinic.dicom import read_series, write_seg
    from medssl.task import MODALITIES

    volume = read_series(series_dir, modalities=MODALITIES)
    return write_seg(
        labels,
        volume,
        out,
        bundle,
        version,
        dict(label_names),
        algorithm_type=algorithm_type,
        content_creator=content_creator,
        series_description=series_description,
        label_codes=label_codes,
    )


def seg_to_nifti(seg: os.PathLike | str, series_dir: os.PathLike | str, out: os.PathLike | str) -> Path:
    """A DICOM SEG of the series in ``series_dir`` as a uint8 NIfTI label map on the series' grid (the volume and
    affine of :func:`series_to_nifti`), segment numbers as label values; atomic."""
    from medssl.clinic.dicom import read_seg, read_series
    from medssl.task import MODALITIES

    volume = read_series(series_dir, modalities=MODALITIES)
    return write_nifti(read_seg(seg, volume), volume.affine, out, np.uint8)
