"""A bundle's task as data: its label set (``labels``, from which ``num_classes`` follows) and its intensity
normalisation (``intensity``), the top-level keys every bundle config carries beside ``spacing``.

``labels`` maps each label value to a name, or to ``{"name": ..., "code": [value, scheme, meaning], "category":
[value, scheme, meaning], "largest_component": true}`` where ``code`` is the segmented property type of the DICOM SEG
(SNOMED CT, scheme ``SCT``), ``category`` its property category, and ``largest_component: false`` keeps every piece of
that label in post-processing (by default each label keeps its largest connected component). Values are 0
(background) to ``num_classes - 1``, each once::

    "labels": {"0": "background",
               "1": {"name": "liver", "code": ["10200004", "SCT", "Liver"],
                     "category": ["123037004", "SCT", "Anatomical Structure"]},
               "2": "spleen", "3": "kidney"}

``intensity`` says how the image's intensities are normalised (:data:`INTENSITY_MODES`):

- ``{"mode": "zscore"}`` (the default, for MRI): subtract the volume's mean, divide by its standard deviation;
- ``{"mode": "window", "range": [-175, 250]}`` (for CT): clip Hounsfield units to the window, then scale it to
  ``[0, 1]`` (``"output": [b_min, b_max]`` to choose another interval), so a voxel's value means the same tissue
  whatever else is in the field of view;
- ``{"mode": "percentile", "range": [0.5, 99.5]}``: clip at those percentiles of the volume, then z-score.

``modality`` (``MR`` or ``CT``, :func:`check_modality`) is what the bundle segments: ``segment`` reads DICOM series of
that modality only.

``distance_unit`` (evaluate.json, :data:`DISTANCE_UNITS`) is the unit of HD95 and ASD: ``mm`` (the default: from each
case's voxel size) or ``voxel`` (the LA benchmark tables of the literature, computed with medpy on voxel grids).

:func:`num_classes` and :func:`classes` check ``labels`` (and a given ``num_classes``) and :func:`check_intensity`
the intensity spec, each raising :class:`medssl.data.DataError` with a message naming the key and what was expected;
:class:`medssl.transforms.Intensityd` is the transform built from the spec. :func:`write_task` (run at the end of a
training by :class:`medssl.handlers.TaskRecord`) writes the run's task into the trained bundle's own configs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from medssl.data import DataError, as_bool, atomic_path

__all__ = [
    "INTENSITY_MODES",
    "Label",
    "parse_labels",
    "num_classes",
    "classes",
    "label_names",
    "largest_component_labels",
    "check_intensity",
    "check_modality",
    "DISTANCE_UNITS",
    "distance_spacing",
    "write_task",
    "BundleTask",
    "read_task",
]

INTENSITY_MODES = ("zscore", "window", "percentile")
MODALITIES = ("MR", "CT")
DISTANCE_UNITS = ("mm", "voxel")
_LABEL_FIELDS = ("name", "code", "category", "largest_component")
_INTENSITY_FIELDS = {"zscore": {"mode"}, "window": {"mode", "range", "output"}, "percentile": {"mode", "range"}}


@dataclass(frozen=True)
class Label:
    """One label value: its name, the DICOM SEG codes when given (``(value, scheme, meaning)``), and whether
    post-processing keeps only its largest connected component (``"largest_component": false`` for a label made of
    several pieces, e.g. both kidneys under one label)."""

    value: int
    name: str
    code: Optional[Tuple[str, str, str]] = None
    category: Optional[Tuple[str, str, str]] = None
    largest_component: bool = True


def _code(entry: Any, where: str) -> Optional[Tuple[str, str, str]]:
    if entry is None:
        return None
    if not isinstance(entry, (list, tuple)) or len(entry) != 3 or not all(str(x).strip() for x in entry):
        raise DataError(
            f"{where}: expected [value, scheme, meaning], e.g. [\"10200004\", \"SCT\", \"Liver\"]; got {entry!r}."
        )
    return tuple(str(x).strip() for x in entry)  # type: ignore[return-value]


def parse_labels(labels: Any, key: str = "labels") -> Dict[int, Label]:
    """``labels`` (value -> name or ``{"name", "code", "category"}``) as ``{value: Label}``, sorted by value.

    Raises:
        DataError: not a mapping, a value that is not an integer, values that are not 0..N-1 each once (at least a
            background and one class), an empty or repeated name, an unknown field, a code that is not a triple.
    """
    if not isinstance(labels, Mapping) or not labels:
        raise DataError(f"{key}: expected a mapping of label value -> name, e.g. {{\"0\": \"background\", \"1\": "
                        f"\"liver\"}}; got {labels!r}.")  # fmt: skip
    out: Dict[int, Label] = {}
    for raw, entry in labels.items():
        try:
            value = int(str(raw))
        except ValueError:
            raise DataError(f"{key}: label value {raw!r} is not an integer.") from None
        where = f"{key}[{value}]"
        if value in out:
            raise DataError(f"{key}: label value {value} is given twice.")
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, Mapping):
            raise DataError(f"{where}: expected a name or {{\"name\", \"code\", \"category\"}}; got {entry!r}.")
        unknown = sorted(set(entry) - set(_LABEL_FIELDS))
        if unknown:
            raise DataError(f"{where}: unknown fields {unknown}; expected some of {list(_LABEL_FIELDS)}.")
        name = str(entry.get("name", "")).strip()
        if not name:
            raise DataError(f"{where}: a label needs a non-empty name.")
        try:
            keep = as_bool(entry.get("largest_component", True), f"{where}.largest_component")
        except ValueError as e:
            raise DataError(str(e)) from None
        code, category = _code(entry.get("code"), f"{where}.code"), _code(entry.get("category"), f"{where}.category")
        out[value] = Label(value, name, code, category, keep)
    values = sorted(out)
    if values != list(range(len(values))) or len(values) < 2:
        raise DataError(
            f"{key}: label values {values}; expected 0 (background) to N-1, each once, with at least one class "
            "besides the background."
        )
    names = [out[v].name.lower() for v in values]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{key}: the names {repeated} are given to more than one label value.")
    return {v: out[v] for v in values}


def num_classes(labels: Any, num_classes: Optional[int] = None, key: str = "labels") -> int:
    """The number of classes of ``labels`` (background included); with ``num_classes`` given, checked against it.

    Raises:
        DataError: bad ``labels`` (see :func:`parse_labels`), or ``num_classes`` disagreeing with them.
    """
    parsed = parse_labels(labels, key)
    if num_classes is not None and int(num_classes) != len(parsed):
        listed = ", ".join(f"{v} {lab.name}" for v, lab in parsed.items())
        raise DataError(
            f"num_classes is {num_classes} but {key} has {len(parsed)} ({listed}); give every class a name in "
            f"{key} (num_classes then follows), e.g. --{key} '{{\"0\": \"background\", \"1\": \"liver\", ...}}'."
        )
    return len(parsed)


def classes(labels: Any, num_classes_: Optional[int] = None, key: str = "labels") -> List[int]:
    """The label values ``0..N-1`` of ``labels``, checked against ``num_classes_`` when given (for
    :class:`medssl.transforms.CheckVolumed`'s ``classes``)."""
    return list(range(num_classes(labels, num_classes_, key)))


def label_names(labels: Any, key: str = "labels") -> Dict[int, str]:
    """``{value: name}`` of the foreground labels (background left out)."""
    return {v: lab.name for v, lab in parse_labels(labels, key).items() if v > 0}


def largest_component_labels(labels: Any, key: str = "labels") -> List[int]:
    """The foreground label values whose largest connected component post-processing keeps (each label on its own:
    ``KeepLargestConnectedComponentd(applied_labels=..., independent=True)``), leaving out those marked
    ``"largest_component": false``."""
    return [v for v, lab in parse_labels(labels, key).items() if v > 0 and lab.largest_component]


def check_modality(modality: Any, key: str = "modality") -> str:
    """The imaging modality a bundle segments (:data:`MODALITIES`; DICOM series of another are refused).

    Raises:
        DataError: another value (the message lists the modalities).
    """
    value = str(modality or "MR").strip().upper()
    if value not in MODALITIES:
        raise DataError(f"{key}: {modality!r} is not a modality medssl reads; expected one of {list(MODALITIES)}.")
    return value


def distance_spacing(unit: Any, key: str = "distance_unit") -> Optional[str]:
    """The ``spacing`` of :class:`medssl.metrics.SegmentationMetric` for a distance unit: ``"image"`` (each case's
    voxel size, distances in mm) for ``mm``, None (voxel units) for ``voxel``.

    Raises:
        DataError: another unit (the message lists the units).
    """
    value = str(unit).strip().lower()
    if value not in DISTANCE_UNITS:
        raise DataError(f"{key}: {unit!r} is not a distance unit; expected one of {list(DISTANCE_UNITS)}.")
    return "image" if value == "mm" else None


def _pair(value: Any, where: str, what: str) -> Tuple[float, float]:
    try:
        lo, hi = (float(x) for x in value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: expected [low, high] ({what}); got {value!r}.") from None
    if not lo < hi:
        raise DataError(f"{where}: expected low < high ({what}); got {value!r}.")
    return lo, hi


def check_intensity(intensity: Any, key: str = "intensity") -> Dict[str, Any]:
    """The intensity spec, checked and completed: ``{"mode": "zscore"}``, ``{"mode": "window", "range": [lo, hi],
    "output": [b_min, b_max]}`` or ``{"mode": "percentile", "range": [lower, upper]}``. None gives z-score.

    Raises:
        DataError: an unknown mode (the message lists the modes), unknown fields, a missing or bad range.
    """
    if intensity is None:
        intensity = {"mode": "zscore"}
    if isinstance(intensity, str):
        intensity = {"mode": intensity}
    if not isinstance(intensity, Mapping):
        raise DataError(f"{key}: expected {{\"mode\": one of {list(INTENSITY_MODES)}, ...}}; got {intensity!r}.")
    mode = intensity.get("mode", "zscore")
    if mode not in INTENSITY_MODES:
        raise DataError(f"{key}.mode: {mode!r} is not a mode; expected one of {list(INTENSITY_MODES)}.")
    unknown = sorted(set(intensity) - _INTENSITY_FIELDS[mode])
    if unknown:
        expected = sorted(_INTENSITY_FIELDS[mode])
        raise DataError(f"{key}: unknown fields {unknown} for mode {mode!r}; expected some of {expected}.")
    spec: Dict[str, Any] = {"mode": mode}
    if mode == "window":
        if "range" not in intensity:
            raise DataError(f"{key}.range: mode 'window' needs the window, e.g. [-175, 250] (Hounsfield units).")
        spec["range"] = list(_pair(intensity["range"], f"{key}.range", "the window, e.g. [-175, 250]"))
        spec["output"] = list(_pair(intensity.get("output", [0.0, 1.0]), f"{key}.output", "the scaled interval"))
    elif mode == "percentile":
        lo, hi = _pair(intensity.get("range", [0.5, 99.5]), f"{key}.range", "percentiles, e.g. [0.5, 99.5]")
        if not 0 <= lo < hi <= 100:
            raise DataError(f"{key}.range: percentiles must lie in [0, 100]; got {[lo, hi]}.")
        spec["range"] = [lo, hi]
    return spec


def _write_json_if_changed(path: Path, content: Dict[str, Any]) -> bool:
    if json.loads(path.read_text()) == content:
        return False
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(content, indent=4) + "\n")
    return True


def _intensity_text(spec: Dict[str, Any]) -> str:
    if spec["mode"] == "window":
        (lo, hi), (b_min, b_max) = spec["range"], spec["output"]
        window = f"[{lo:g}, {hi:g}]"
        return f"clipped to the window {window} (Hounsfield units for CT), then scaled to [{b_min:g}, {b_max:g}]"
    if spec["mode"] == "percentile":
        lo, hi = spec["range"]
        return f"clipped at the volume's {lo:g} and {hi:g} percentiles, then z-score over the whole volume"
    return "z-score over the whole volume (mean 0, standard deviation 1), computed before patching"


def write_task(
    bundle_root: os.PathLike | str,
    labels: Any,
    spacing: Sequence[float],
    intensity: Any = None,
    patch_size: Optional[Sequence[int]] = None,
    modality: Optional[str] = None,
) -> List[str]:
    """Make a trained bundle describe its own task: the run's ``labels``, ``spacing``, ``intensity`` and
    ``patch_size`` (and ``modality``) go into ``bundle_root/configs/inference.json`` (``num_classes`` follows from
    ``labels``) and its ``metadata.json``'s ``network_data_format`` (``modality``, ``pixdim``, the intensity text,
    ``num_channels``, ``channel_def``, the label value range), so ``segment --bundle``, MONAI Label, ``pull`` and
    MONAI's verifier use the bundle as the run trained it. Files that already say so are left as they are; a bundle
    folder without ``configs/`` (a run whose configs live elsewhere) is left alone. Each file is replaced atomically.

    Returns:
        the files rewritten (paths relative to ``bundle_root``).

    Raises:
        DataError: bad ``labels`` or ``intensity`` (see :func:`parse_labels`, :func:`check_intensity`).
    """
    parsed = parse_labels(labels)
    spec = check_intensity(intensity)
    if modality is not None:
        check_modality(modality)
    root = Path(bundle_root)
    written: List[str] = []
    channel_def = {str(v): lab.name for v, lab in parsed.items()}
    inference = root / "configs" / "inference.json"
    if inference.is_file():
        config = json.loads(inference.read_text())
        config["labels"] = {str(k): v for k, v in dict(labels).items()}
        config["num_classes"] = "$medssl.task.num_classes(@labels)"
        config["spacing"] = [float(s) for s in spacing]
        config["intensity"] = spec
        if patch_size is not None:
            config["patch_size"] = [int(p) for p in patch_size]
        if modality is not None:
            config["modality"] = check_modality(modality)
        if _write_json_if_changed(inference, config):
            written.append("configs/inference.json")
    metadata = root / "configs" / "metadata.json"
    if metadata.is_file():
        meta = json.loads(metadata.read_text())
        formats = meta.setdefault("network_data_format", {})
        image = formats.setdefault("inputs", {}).setdefault("image", {})
        image["pixdim"] = [float(s) for s in spacing]
        if modality is not None:
            image["modality"] = check_modality(modality)
        image["intensity"] = _intensity_text(spec)
        pred = formats.setdefault("outputs", {}).setdefault("pred", {})
        pred["num_channels"] = len(parsed)
        pred["channel_def"] = dict(channel_def)
        post = formats.get("post_processed_outputs", {}).get("pred")
        if post is not None:
            post["value_range"] = [0, len(parsed) - 1]
            post["channel_def"] = dict(channel_def)
        if _write_json_if_changed(metadata, meta):
            written.append("configs/metadata.json")
    return written


@dataclass(frozen=True)
class BundleTask:
    """What a bundle folder says of its task (:func:`read_task`): the foreground label names (value -> name), their
    DICOM SEG codes where its ``labels`` key gives them (value -> (code, category), either None), and the modality."""

    names: Dict[int, str]
    codes: Dict[int, Tuple[Optional[Tuple[str, str, str]], Optional[Tuple[str, str, str]]]]
    modality: str


def read_task(bundle_root: os.PathLike | str) -> BundleTask:
    """The task of a bundle folder, from ``configs/metadata.json`` (``channel_def`` of the post-processed output, else
    of the output; ``inputs.image.modality``, MR when absent) and ``configs/inference.json``'s ``labels`` (the codes;
    configs from before that key have none, and are coded by name). What ``segment``, the DICOM node and the MONAI
    Deploy app read, so a trained bundle is served as it was trained.

    Raises:
        DataError: a missing or unreadable config file, no ``channel_def``, bad ``labels`` or ``modality``.
    """
    root = Path(bundle_root)
    configs = {}
    for name in ("metadata", "inference"):
        path = root / "configs" / f"{name}.json"
        try:
            configs[name] = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read the bundle's {name} config ({e}).") from None
    formats = configs["metadata"].get("network_data_format", {})
    post = formats.get("post_processed_outputs", {}).get("pred", {})
    channels = post.get("channel_def") or formats.get("outputs", {}).get("pred", {}).get("channel_def")
    if not channels:
        raise DataError(f"{root / 'configs' / 'metadata.json'}: network_data_format names no channel_def.")
    names = {int(k): str(v) for k, v in channels.items() if int(k) > 0}
    modality = check_modality(formats.get("inputs", {}).get("image", {}).get("modality"), "inputs.image.modality")
    labels = configs["inference"].get("labels")
    codes = {v: (lab.code, lab.category) for v, lab in parse_labels(labels).items() if v > 0} if labels else {}
    return BundleTask(names, codes, modality)
