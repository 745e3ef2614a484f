"""Datalists (``dataset.json``) and NIfTI files: reading, checking and writing them safely.

A ``dataset_dir`` holds an MSD-style ``dataset.json``: an ordered ``"training"`` list (the first
``num_labeled`` entries are used with their labels, the rest as unlabeled images), optional
``"validation"`` and ``"test"`` lists; paths are relative to ``dataset_dir``. The bundles call
:func:`labeled_list`, :func:`unlabeled_list` and :func:`eval_list` from their configs, so a wrong
folder, key or count stops a run at once with the offending file or key named.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import nibabel as nib
import numpy as np

__all__ = [
    "DataError",
    "load_datalist",
    "labeled_list",
    "unlabeled_list",
    "eval_list",
    "check_case",
    "write_nifti",
    "write_json",
    "atomic_path",
]

DATASET_JSON = "dataset.json"


class DataError(ValueError):
    """Bad input data: the message names the file or key and what was expected."""


# -- safe writing ------------------------------------------------------------------------------------------


class atomic_path:
    """Context manager giving a temporary path beside ``path``; renamed onto ``path`` only on success.

    Readers never see a half-written file, and a failure leaves any earlier ``path`` untouched.
    """

    def __init__(self, path: os.PathLike | str, suffix: str = "") -> None:
        self.path = Path(path)
        self.suffix = suffix or "".join(self.path.suffixes)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=f".tmp{self.suffix}", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def write_nifti(array: np.ndarray, affine: np.ndarray, path: os.PathLike | str, dtype: Any = None) -> Path:
    """Write ``array`` as NIfTI at ``path`` atomically; ``dtype`` sets the stored type (default: the array's)."""
    array = np.asarray(array)
    if dtype is not None:
        array = array.astype(dtype)
    img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    img.header.set_data_dtype(array.dtype)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def write_json(obj: Any, path: os.PathLike | str) -> Path:
    """Write ``obj`` as indented JSON at ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
    return Path(path)


# -- reading datalists -------------------------------------------------------------------------------------


def load_datalist(dataset_dir: os.PathLike | str) -> Dict[str, Any]:
    """Read ``dataset_dir/dataset.json``, check its form, and return it with absolute paths.

    Raises:
        DataError: the folder or file is missing, the JSON is invalid, ``"training"`` is missing or
            empty, or an entry lacks ``"image"``.
    """
    root = Path(dataset_dir).expanduser()
    path = root / DATASET_JSON
    if not root.is_dir():
        raise DataError(f"dataset_dir {str(root)!r} is not a folder; expected a folder with {DATASET_JSON}.")
    if not path.is_file():
        raise DataError(
            f"{path}: file not found; expected an MSD-style datalist with a 'training' list "
            "(make one with `python -m medssl prepare_la` or `python -m medssl sample_data`)."
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}).") from e
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object with a 'training' list, got {type(raw).__name__}.")
    if not isinstance(raw.get("training"), list) or not raw["training"]:
        raise DataError(f"{path}: key 'training' must be a non-empty list of {{'image', 'label'}} entries.")
    out = dict(raw)
    for key in ("training", "validation", "test"):
        if key not in raw:
            continue
        if not isinstance(raw[key], list):
            raise DataError(f"{path}: key {key!r} must be a list, got {type(raw[key]).__name__}.")
        out[key] = [_resolve(root, path, key, i, item) for i, item in enumerate(raw[key])]
    return out


def _resolve(root: Path, path: Path, key: str, index: int, item: Any) -> Dict[str, Any]:
    if isinstance(item, str):
        item = {"image": item}
    if not isinstance(item, dict) or not isinstance(item.get("image"), str):
        raise DataError(f"{path}: {key}[{index}] must be an object with an 'image' path, got {item!r}.")
    entry = dict(item)
    for k in ("image", "label"):
        if isinstance(entry.get(k), str):
            entry[k] = str(root / entry[k])
    return entry


def _require_files(entries: Sequence[Dict[str, Any]], keys: Sequence[str], source: str) -> None:
    for i, entry in enumerate(entries):
        for k in keys:
            if k not in entry:
                raise DataError(f"{source}[{i}] has no {k!r}; expected an {k} path for every entry.")
            if not Path(entry[k]).is_file():
                raise DataError(f"{entry[k]}: file not found ({source}[{i}][{k!r}]).")


def labeled_list(dataset_dir: os.PathLike | str, num_labeled: Optional[int] = None) -> List[Dict[str, Any]]:
    """The first ``num_labeled`` ``"training"`` entries (all when None), each with an image and a label file.

    Raises:
        DataError: bad datalist, ``num_labeled`` out of range, or a missing image/label file.
    """
    training = load_datalist(dataset_dir)["training"]
    source = f"{Path(dataset_dir) / DATASET_JSON}: training"
    n = len(training) if num_labeled is None else int(num_labeled)
    if not 1 <= n <= len(training):
        raise DataError(f"num_labeled={num_labeled} is out of range: {source} has {len(training)} entries (need 1..).")
    entries = training[:n]
    _require_files(entries, ("image", "label"), source)
    return [{"image": e["image"], "label": e["label"]} for e in entries]


def unlabeled_list(dataset_dir: os.PathLike | str, num_labeled: int) -> List[Dict[str, Any]]:
    """The ``"training"`` entries after the first ``num_labeled``, as image-only entries (labels dropped)."""
    training = load_datalist(dataset_dir)["training"]
    source = f"{Path(dataset_dir) / DATASET_JSON}: training"
    if not 0 <= int(num_labeled) <= len(training):
        raise DataError(f"num_labeled={num_labeled} is out of range: {source} has {len(training)} entries.")
    entries = [{"image": e["image"]} for e in training[int(num_labeled):]]
    _require_files(entries, ("image",), source)
    return entries


def eval_list(dataset_dir: os.PathLike | str, key: str = "test", with_label: bool = True) -> List[Dict[str, Any]]:
    """The ``key`` list (``"validation"`` or ``"test"``); empty when the datalist has no such key.

    Raises:
        DataError: bad datalist, or a listed image/label file is missing.
    """
    datalist = load_datalist(dataset_dir)
    entries = datalist.get(key, [])
    keys = ("image", "label") if with_label else ("image",)
    _require_files(entries, keys, f"{Path(dataset_dir) / DATASET_JSON}: {key}")
    return [{k: e[k] for k in keys} for e in entries]


# -- checking volumes --------------------------------------------------------------------------------------


def check_case(image_path: os.PathLike | str, label_path: Optional[os.PathLike | str] = None,
               classes: Sequence[int] = (0, 1), min_shape: Optional[Sequence[int]] = None) -> None:
    """Check one case on disk before training on it; raises :class:`DataError` naming the file.

    Checks: readable NIfTI, a 3D volume (or 4D with one channel), finite voxels; the label has the image's
    shape and affine and holds only ``classes``.
    """
    image = _load_nifti(image_path)
    shape = _spatial_shape(image, image_path)
    data = np.asanyarray(image.dataobj)
    if not np.isfinite(data).all():
        raise DataError(f"{image_path}: image holds NaN or Inf voxels; expected finite intensities.")
    if label_path is None:
        return
    label = _load_nifti(label_path)
    lshape = _spatial_shape(label, label_path)
    if lshape != shape:
        raise DataError(f"{label_path}: label shape {lshape} differs from image shape {shape} ({image_path}).")
    if not np.allclose(label.affine, image.affine, atol=1e-3):
        raise DataError(
            f"{label_path}: label affine differs from the image's ({image_path});\n"
            f"label:\n{np.round(label.affine, 4)}\nimage:\n{np.round(image.affine, 4)}"
        )
    values = np.unique(np.asanyarray(label.dataobj))
    bad = sorted(set(values.tolist()) - set(classes))
    if bad:
        raise DataError(f"{label_path}: label values {bad[:10]} outside the expected classes {list(classes)}.")


def _load_nifti(path: os.PathLike | str) -> nib.Nifti1Image:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found.")
    try:
        img = nib.load(str(path))
        img.get_fdata(dtype=np.float32)  # force a full read: catches truncated files
    except Exception as e:  # nibabel raises several types for corrupt files
        raise DataError(f"{path}: not a readable NIfTI volume ({type(e).__name__}: {e}).") from e
    return img


def _spatial_shape(img: nib.Nifti1Image, path: os.PathLike | str) -> tuple:
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise DataError(f"{path}: expected a 3D volume (H, W, D), got shape {shape}.")
    return shape
