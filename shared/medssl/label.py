"""MONAI Label support: the parts of ``apps/monailabel`` that do not need MONAI Label installed.

MONAI Label trains a bundle on the datastore's labeled images by overriding ``train#dataset#data``. medssl
bundles read their data through ``dataset_dir`` instead (the lists are checked there: headers, shapes, small
volumes), and the semi-supervised bundles also need the unlabeled images. :func:`write_datastore_split` turns
the datastore into a medssl ``dataset.json`` (labeled entries first, then the unlabeled images), so a
MONAI Label training run is an ordinary bundle run with ``--dataset_dir`` and ``--num_labeled``.
:func:`prepare_models` gives the app one writable copy of each served bundle.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from medssl.bundle import bundle_path
from medssl.data import DataError, write_json

__all__ = [
    "SERVED_BUNDLES",
    "SEMI_SUPERVISED",
    "prepare_models",
    "write_datastore_split",
    "publish_weights",
    "StashRequestKeys",
]

logger = logging.getLogger("medssl")
SERVED_BUNDLES = ("la_seg_finetune", "cvrl_semisup", "simcvd_distill")
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
    unknown = [n for n in names if n not in SERVED_BUNDLES]
    if unknown:
        raise ValueError(f"models {unknown} cannot be served; choose from {list(SERVED_BUNDLES)}.")
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    released = set()
    if index:
        from medssl.release import read_index

        released = {key.rsplit("_v", 1)[0] for key in read_index(index)}
    out = {}
    for name in names:
        target = model_dir / name
        if not (target / "configs" / "metadata.json").is_file():
            with tempfile.TemporaryDirectory(dir=model_dir, prefix=f".{name}.") as tmp:
                if index and name not in released:
                    logger.info(
                        "%s is not released in %s: served from the bundles folder, without weights", name, index
                    )
                if name in released:
                    from medssl.release import pull

                    src = pull(name, tmp, version=version, index=index)
                    os.replace(src, target)
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


class StashRequestKeys:
    """Move MONAI Label's request entries out of the way of the bundle's preprocessing, and back (``restore=True``).

    MONAI Label puts the image's path under ``"image_path"``; MONAI's ``Spacingd`` (and other spatial dictionary
    transforms) treats every ``"image_*"`` entry of a NIfTI image as its metadata dict and calls ``.update`` on it,
    so the string breaks the bundle's preprocessing. The app stashes it under another name before the
    preprocessing and restores it after the postprocessing (MONAI Label's writer reads it).
    """

    def __init__(self, keys=("image_path",), restore: bool = False, prefix: str = "medssl_stashed_") -> None:
        self.keys, self.restore, self.prefix = tuple(keys), bool(restore), prefix

    def __call__(self, data):
        d = dict(data)
        for key in self.keys:
            src, dst = (self.prefix + key, key) if self.restore else (key, self.prefix + key)
            if src in d:
                d[dst] = d.pop(src)
        return d
