"""Datalists (``dataset.json``) and NIfTI files: reading, checking and writing them safely.

A ``dataset_dir`` holds an MSD-style ``dataset.json``: an ordered ``"training"`` list (the first
``num_labeled`` entries are used with their labels, the rest as unlabeled images), optional
``"validation"`` and ``"test"`` lists; paths are relative to ``dataset_dir``. The bundles call
:func:`labeled_list`, :func:`unlabeled_list` and :func:`eval_list` from their configs, so a wrong
folder, key or count stops a run at once with the offending file or key named.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import monai.data
import nibabel as nib
import numpy as np
import torch
from monai.utils import optional_import

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = [
    "DataError",
    "data_error_message",
    "as_bool",
    "file_sha256",
    "load_datalist",
    "labeled_list",
    "unlabeled_list",
    "eval_list",
    "image_list",
    "check_headers",
    "voxel_spacing",
    "resampled_shape",
    "CacheDataset",
    "InfiniteSampler",
    "write_nifti",
    "write_json",
    "atomic_path",
    "write_dev_split",
]

DATASET_JSON = "dataset.json"


class DataError(ValueError):
    """Bad input data: the message names the file or key and what was expected."""


def data_error_message(exc: BaseException) -> Optional[str]:
    """The message of the :class:`DataError` behind ``exc``, on one line; None when there is none.

    MONAI wraps an error raised in a transform (``applying transform <...LoadVolumed object ...>``) and again in a
    config expression (``Failed to evaluate ConfigExpression``), so the DataError is searched along the chain of
    causes. A DataLoader worker process sends only text: torch re-raises the worker's error in the main process as a
    new exception whose message holds the worker's traceback, so its ``medssl.data.DataError: ...`` line is taken.
    """
    cause, seen, found = exc, set(), None
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, DataError):
            return " ".join(str(cause).split())
        if found is None:
            prefix = f"{DataError.__module__}.{DataError.__name__}: "
            lines = [line[len(prefix) :] for line in str(cause).splitlines() if line.startswith(prefix)]
            found = " ".join(lines[-1].split()) if lines else None
        cause = cause.__cause__ or cause.__context__
    return found


def _repeat_data_error(exc_type, exc, tb) -> None:
    """Print the traceback, then the DataError buried under MONAI's errors as the last line: ``error: <file>: ...``."""
    _previous_excepthook(exc_type, exc, tb)
    message = data_error_message(exc) if isinstance(exc, Exception) else None
    if message:
        sys.stderr.write(f"\nerror: {message}\n")


# MONAI reports a failing config expression as "RuntimeError: Failed to evaluate ConfigExpression", with the
# real reason (which file, what was expected) in the middle of a long chained traceback, and the line before it
# names a transform object; say the reason again at the end, the way the medssl command line does.
_previous_excepthook = sys.excepthook
if sys.excepthook is sys.__excepthook__:
    sys.excepthook = _repeat_data_error


def as_bool(value: Any, name: str = "value") -> bool:
    """``value`` as a bool; command-line strings ``true/false/yes/no/1/0`` (any case) are understood.

    ``python -m monai.bundle run --resume false`` passes the string ``"false"``, which Python reads as True.

    Raises:
        ValueError: anything else, naming ``name``.
    """
    if isinstance(value, (bool, np.bool_)) or value is None:
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    raise ValueError(f"{name} must be true or false, got {value!r}.")


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
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
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


def file_sha256(path: os.PathLike | str) -> str:
    """sha256 of a file's bytes (read in 1 MB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
            if not isinstance(entry.get(k), str):
                raise DataError(f"{source}[{i}] has no {k!r}; expected an {k} path for every entry.")
            if not Path(entry[k]).is_file():
                raise DataError(f"{entry[k]}: file not found ({source}[{i}][{k!r}]).")


def labeled_list(
    dataset_dir: os.PathLike | str,
    num_labeled: Optional[int] = None,
    patch_size: Optional[Sequence[int]] = None,
    pad_small_volumes: bool = False,
    spacing: Optional[Sequence[float]] = None,
) -> List[Dict[str, Any]]:
    """The first ``num_labeled`` ``"training"`` entries (all when None), each with an image and a label file.

    The NIfTI headers are checked here (cheap; no voxels read): 3D volumes, a sane affine, label shape and affine
    equal to the image's, and, with ``patch_size``, every side at least the patch side unless ``pad_small_volumes``
    (on the ``spacing`` grid when given: the preprocessing resamples to it first).

    Raises:
        DataError: bad datalist, ``num_labeled`` out of range, a missing or unreadable file, or a bad header.
    """
    training = load_datalist(dataset_dir)["training"]
    source = f"{Path(dataset_dir) / DATASET_JSON}: training"
    n = len(training) if num_labeled is None else int(num_labeled)
    if not 1 <= n <= len(training):
        raise DataError(
            f"num_labeled={num_labeled} is out of range: {source} has {len(training)} entries; "
            "a supervised run needs 1 to that many labeled cases."
        )
    entries = [{"image": e["image"], "label": e.get("label")} for e in training[:n]]
    _require_files(entries, ("image", "label"), source)
    pad = as_bool(pad_small_volumes, "pad_small_volumes")
    for e in entries:
        check_headers(e["image"], e["label"], None if pad else patch_size, spacing)
    return entries


def unlabeled_list(
    dataset_dir: os.PathLike | str,
    num_labeled: int,
    patch_size: Optional[Sequence[int]] = None,
    pad_small_volumes: bool = False,
    min_count: int = 0,
    spacing: Optional[Sequence[float]] = None,
) -> List[Dict[str, Any]]:
    """The ``"training"`` entries after the first ``num_labeled``, as image-only entries: their labels are
    dropped and never read (an unlabeled entry needs no label file). Image headers are checked as in
    :func:`labeled_list`.

    Raises:
        DataError: bad datalist, ``num_labeled`` out of range, fewer than ``min_count`` entries, a missing or
            bad image.
    """
    training = load_datalist(dataset_dir)["training"]
    source = f"{Path(dataset_dir) / DATASET_JSON}: training"
    if not 0 <= int(num_labeled) <= len(training):
        raise DataError(f"num_labeled={num_labeled} is out of range: {source} has {len(training)} entries.")
    entries = [{"image": e["image"]} for e in training[int(num_labeled) :]]
    if len(entries) < min_count:
        raise DataError(
            f"{source} has {len(training)} entries and num_labeled={num_labeled}, leaving {len(entries)} unlabeled; "
            f"semi-supervised training needs at least {min_count} unlabeled volume(s)."
        )
    _require_files(entries, ("image",), source)
    pad = as_bool(pad_small_volumes, "pad_small_volumes")
    for e in entries:
        check_headers(e["image"], None, None if pad else patch_size, spacing)
    return entries


def eval_list(
    dataset_dir: os.PathLike | str, key: str = "test", with_label: bool = True, required: bool = False
) -> List[Dict[str, Any]]:
    """The ``key`` list (``"validation"`` or ``"test"``); empty when the datalist has no such key.

    Raises:
        DataError: bad datalist, a listed image/label file is missing, or ``required`` and the list is empty.
    """
    datalist = load_datalist(dataset_dir)
    entries = datalist.get(key, [])
    source = f"{Path(dataset_dir) / DATASET_JSON}: {key}"
    if required and not entries:
        raise DataError(f"{source}: no entries; expected a non-empty {key!r} list to evaluate on.")
    keys = ("image", "label") if with_label else ("image",)
    _require_files(entries, keys, source)
    for e in entries:
        check_headers(e["image"], e.get("label"))
    return [{k: e[k] for k in keys} for e in entries]


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def image_list(dataset_dir: os.PathLike | str, key: str = "test") -> List[str]:
    """Images to segment: the ``key`` list of ``dataset_dir/dataset.json`` when there is one, else every
    ``*.nii``/``*.nii.gz`` file in ``dataset_dir`` (or ``dataset_dir`` itself if it is one NIfTI file).

    Raises:
        DataError: nothing to segment, or a listed file is missing.
    """
    root = Path(dataset_dir).expanduser()
    if root.is_file():
        files = [str(root)]
    elif (root / DATASET_JSON).is_file():
        files = [e["image"] for e in eval_list(root, key, with_label=False, required=True)]
    else:
        files = sorted(str(p) for p in root.glob("*.nii*") if p.name.endswith(NIFTI_SUFFIXES))
    if not files:
        raise DataError(f"{root}: no images found; expected a NIfTI file, a folder of *.nii.gz, or a dataset.json.")
    for f in files:
        check_headers(f)
    return files


# -- checking volumes --------------------------------------------------------------------------------------


# voxel sizes a scan of a body can have; outside them a header is wrong (a 0 or an unset pixdim, metres for mm)
MIN_SPACING_MM, MAX_SPACING_MM = 0.01, 100.0


def voxel_spacing(affine: np.ndarray, path: os.PathLike | str = "<image>") -> np.ndarray:
    """Voxel sizes (mm) of a NIfTI ``affine``, checked: finite, invertible, each within 0.01-100 mm.

    Raises:
        DataError: naming ``path``: a non-finite or singular affine, or an absurd voxel size.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise DataError(f"{path}: the header's affine is not a finite 4x4 matrix:\n{affine}")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    det = abs(np.linalg.det(affine[:3, :3]))
    if not (zooms > 0).all() or det <= 1e-6 * float(np.prod(zooms)):
        raise DataError(
            f"{path}: the header's affine is singular (voxel axes {np.round(zooms, 4).tolist()} mm, determinant "
            f"{det:.3g}); it cannot be oriented or resampled. Fix the file's sform/qform (or pixdim)."
        )
    if ((zooms < MIN_SPACING_MM) | (zooms > MAX_SPACING_MM)).any():
        raise DataError(
            f"{path}: voxel spacing {np.round(zooms, 4).tolist()} mm is outside {MIN_SPACING_MM}-{MAX_SPACING_MM} mm; "
            "the header's pixdim / affine is wrong (unset, or not in millimetres)."
        )
    return zooms


def resampled_shape(shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float]) -> Tuple[int, ...]:
    """The spatial shape after ``Orientationd("RAS")`` and ``Spacingd(spacing)``, computed from the header alone
    with MONAI's own shape rule (the span of the first and last voxel centres, rounded on the new grid)."""
    from monai.data.utils import compute_shape_offset, zoom_affine

    voxel_spacing(affine)
    affine = np.asarray(affine, dtype=np.float64)
    ornt = nib.orientations.io_orientation(affine)
    ras_shape = [0, 0, 0]
    for i, (axis, _) in enumerate(ornt):
        ras_shape[int(axis)] = int(shape[i])
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    new_affine = zoom_affine(ras_affine, np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)), diagonal=False)
    out, _ = compute_shape_offset(ras_shape, ras_affine, new_affine)
    return tuple(int(s) for s in out)


def check_headers(
    image_path: os.PathLike | str,
    label_path: Optional[os.PathLike | str] = None,
    min_shape: Optional[Sequence[int]] = None,
    spacing: Optional[Sequence[float]] = None,
) -> Tuple[int, ...]:
    """Check a case's NIfTI headers (no voxels read) and return the image's spatial shape (on the ``spacing``
    grid, RAS-ordered, when ``spacing`` is given: what the bundles' preprocessing makes of it).

    Raises:
        DataError: naming the file: not NIfTI / unreadable, not 3D (a 4D volume with one channel is accepted),
            a singular affine or an absurd voxel size, label shape or affine different from the image's, or a side
            smaller than ``min_shape``.
    """
    image = _load_header(image_path)
    stored = _spatial_shape(image, image_path)
    voxel_spacing(image.affine, image_path)
    shape = stored if spacing is None else resampled_shape(stored, image.affine, spacing)
    if min_shape is not None:
        small = [(i, s, m) for i, (s, m) in enumerate(zip(shape, min_shape)) if s < int(m)]
        if small:
            grid = f" on the {list(spacing)} mm grid" if spacing is not None else ""
            raise DataError(
                f"{image_path}: volume shape {shape}{grid} is smaller than patch_size {list(min_shape)} along axes "
                f"{[i for i, _, _ in small]}; use a smaller --patch_size, or --pad_small_volumes true to zero-pad."
            )
    if label_path is None:
        return shape
    label = _load_header(label_path)
    lshape = _spatial_shape(label, label_path)
    if lshape != stored:
        raise DataError(f"{label_path}: label shape {lshape} differs from image shape {stored} ({image_path}).")
    if not np.allclose(label.affine, image.affine, atol=1e-3):
        raise DataError(
            f"{label_path}: label affine differs from the image's ({image_path});\n"
            f"label:\n{np.round(label.affine, 4)}\nimage:\n{np.round(image.affine, 4)}"
        )
    return shape


def _load_header(path: os.PathLike | str) -> nib.Nifti1Image:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found.")
    try:
        return nib.load(str(path))
    except Exception as e:  # nibabel raises several types for corrupt files
        reason = " ".join(f"{type(e).__name__}: {e}".split())  # one line: it may end a run's output
        raise DataError(f"{path}: not a readable NIfTI volume ({reason}).") from e


def _spatial_shape(img: nib.Nifti1Image, path: os.PathLike | str) -> tuple:
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise DataError(f"{path}: expected a 3D volume (H, W, D), got shape {shape}.")
    return shape


# -- caching and sampling ----------------------------------------------------------------------------------


class CacheDataset(monai.data.CacheDataset):
    """MONAI's ``CacheDataset`` that, when an item fails while the cache is filled (an unreadable file, NaN voxels),
    lets the items other threads are loading finish before the error goes on.

    MONAI leaves its thread pool on the error with those threads still inside torch's C++ code; the process then
    exits under them and aborts ("terminate called without an active exception", exit status 134) after the error
    was printed, so the abort, not the file's name, ends the run's output. The bundles' train.json use this class.
    """

    def _fill_cache(self, indices=None) -> list:
        if self.cache_num <= 0:
            return []
        indices = list(range(self.cache_num)) if indices is None else indices
        pool = ThreadPool(self.num_workers)
        try:
            items = pool.imap(self._load_cache_item, indices)
            if self.progress and has_tqdm:
                items = tqdm(items, total=len(indices), desc="Loading dataset")
            return list(items)
        finally:
            pool.terminate()  # the items not started are dropped...
            pool.join()  # ...and those being loaded are waited for


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless stream of dataset indices: one shuffled permutation after another, sharded over ranks.

    Training length in the LA papers is counted in iterations, not epochs; with this sampler a
    ``DataLoader`` never runs dry, so a small labeled set cycles (as UA-MT's two-stream sampler does) and
    the workers are started once. Permutation ``e`` is drawn from ``seed + e``, so every rank sees the same
    permutation and takes every ``num_replicas``-th index of it (padded by wrapping, so ranks stay in step).

    Args:
        data_source: the dataset (only its length is used) or that length.
        shuffle: draw a new permutation per pass; False cycles ``0..n-1``.
        seed: base seed of the permutations.
        num_replicas, rank: for distributed training (default: one process).

    The stream is a pure function of ``seed`` and the position, so a resumed run continues it exactly:
    :meth:`set_start` skips the indices the interrupted run consumed (``iterations * batch_size``).
    """

    def __init__(
        self, data_source: Any, shuffle: bool = True, seed: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        self.length = data_source if isinstance(data_source, int) else len(data_source)
        if self.length < 1:
            raise ValueError("InfiniteSampler needs a non-empty dataset.")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}.")
        self.shuffle, self.seed, self.num_replicas, self.rank = shuffle, int(seed), int(num_replicas), int(rank)
        self.start = 0

    def set_start(self, position: int) -> None:
        """Begin the next iteration of this sampler at ``position`` of this rank's stream (0: the beginning)."""
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}.")
        self.start = int(position)

    def __iter__(self) -> Iterator[int]:
        n, r = self.length, self.num_replicas
        padded = -(-n // r) * r
        per_rank = padded // r
        epoch, skip = divmod(self.start, per_rank)
        while True:
            if self.shuffle:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            else:
                order = list(range(n))
            order = (order * (-(-padded // n)))[:padded]
            yield from order[self.rank :: r][skip:]
            skip = 0
            epoch += 1


# -- the dev split -----------------------------------------------------------------------------------------


def write_dev_split(
    dataset_dir: os.PathLike | str, out: os.PathLike | str, num_train: Optional[int] = 60, downsample: int = 1
) -> Path:
    """Write a benchmark split of a dataset: with ``num_train``, the development split (training = the first
    ``num_train`` ``"training"`` entries, the first ``num_labeled`` of them the labeled ones; test = the rest, which no
    training sees, not even as unlabeled data; DESIGN.md: LA cases 1-60 / 61-80 of train.list); with ``num_train=None``,
    the dataset's own lists (training = its ``"training"``, test = its ``"test"``, else its ``"validation"``: ACDC's
    SSL4MIS split). Entries keep their ``patient`` key (label budgets in patients).

    With ``downsample=1`` only ``out/dataset.json`` is written, pointing at the original files (absolute paths;
    nothing copied). With ``downsample=k > 1`` every volume is resampled by ``1/k`` per axis into ``out/imagesTr``,
    ``out/labelsTr`` (images: mean of each ``k^3`` block; labels: the most frequent value of the block, any number of
    classes; the affine's spacing times ``k``) for CPU-sized protocols. Files already written are kept (safe to
    re-run); dataset.json is written last.

    Raises:
        DataError: bad datalist, ``num_train`` leaves no test case, or ``num_train=None`` and the dataset has no test
            or validation list.
    """
    datalist = load_datalist(dataset_dir)
    training = datalist["training"]
    source = Path(dataset_dir) / DATASET_JSON
    if num_train is None:
        own = next((k for k in ("test", "validation") if datalist.get(k)), None)
        if own is None:
            raise DataError(f"{source}: no 'test' or 'validation' list to test on; give num_train (a dev split).")
        parts = {"training": training, "test": datalist[own]}
        what = f"training = the 'training' list of {source.resolve()}, test = its {own!r} list"
    else:
        if not 0 < int(num_train) < len(training):
            raise DataError(f"num_train={num_train} must leave test cases: {dataset_dir} has {len(training)} entries.")
        parts = {"training": training[: int(num_train)], "test": training[int(num_train) :]}
        rest = len(training) - int(num_train)
        what = f"training = the first {num_train} cases of {source.resolve()}, test = the other {rest}"
    for key, entries in parts.items():
        _require_files(entries, ("image", "label"), f"{source}: {'training' if num_train else key}")
    out = Path(out)
    k = int(downsample)
    if k < 1:
        raise ValueError(f"downsample must be a positive integer, got {downsample}.")
    split = {}
    for part, entries in parts.items():
        split[part] = [_split_entry(e, out, k) for e in entries]
    name = datalist.get("name", Path(dataset_dir).name)
    result = {
        "name": f"{name} ({'dev split' if num_train else 'its own split'}{'' if k == 1 else f', downsampled x{k}'})",
        "description": f"{what}; written by medssl.data.write_dev_split.",
        **{key: datalist[key] for key in ("labels", "modality") if key in datalist},
        **split,
    }
    write_json(result, out / DATASET_JSON)
    return out


def _split_entry(e: Dict[str, Any], out: Path, k: int) -> Dict[str, Any]:
    """A split's entry: absolute paths (``k == 1``) or the ``1/k`` copies written under ``out``; ``patient`` kept."""
    extra = {"patient": e["patient"]} if "patient" in e else {}
    if k == 1:
        return {"image": str(Path(e["image"]).resolve()), "label": str(Path(e["label"]).resolve()), **extra}
    entry = {}
    for key, folder in (("image", "imagesTr"), ("label", "labelsTr")):
        target = out / folder / Path(e[key]).name
        if not target.is_file():
            img = _load_header(e[key])
            try:
                arr = np.asanyarray(img.dataobj, dtype=np.float32)
            except Exception as err:  # voxels cut short or not matching the header: name the file
                reason = " ".join(f"{type(err).__name__}: {err}".split())
                raise DataError(f"{e[key]}: not a readable NIfTI volume ({reason}).") from err
            small = _block_mode(arr, k) if key == "label" else _block_mean(arr, k).astype(np.float32)
            affine = img.affine.copy()
            affine[:3, :3] = affine[:3, :3] * k
            affine[:3, 3] = img.affine[:3, :3] @ np.full(3, (k - 1) / 2.0) + img.affine[:3, 3]
            write_nifti(small, affine, target)
        entry[key] = f"{folder}/{target.name}"
    return {**entry, **extra}


def _block_mode(labels: np.ndarray, k: int) -> np.ndarray:
    """The most frequent label of each ``k x k x k`` block (ties go to the higher label value, so a binary block half
    foreground stays foreground, as ``mean >= 0.5`` had it); any number of classes."""
    s = [d // k for d in labels.shape]
    a = np.rint(labels[: s[0] * k, : s[1] * k, : s[2] * k]).astype(np.int64)
    blocks = a.reshape(s[0], k, s[1], k, s[2], k).transpose(0, 2, 4, 1, 3, 5).reshape(*s, k**3)
    values = np.unique(a)
    counts = np.stack([(blocks == v).sum(axis=-1) for v in values[::-1]], axis=-1)  # highest value first
    return values[::-1][np.argmax(counts, axis=-1)].astype(np.uint8)


def _block_mean(arr: np.ndarray, k: int) -> np.ndarray:
    """Mean over ``k x k x k`` blocks (trailing voxels that do not fill a block are dropped)."""
    s = [d // k for d in arr.shape]
    a = arr[: s[0] * k, : s[1] * k, : s[2] * k]
    return a.reshape(s[0], k, s[1], k, s[2], k).mean(axis=(1, 3, 5))
