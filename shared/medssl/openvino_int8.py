"""int8 for OpenVINO: post-training quantisation with NNCF whose calibration is recorded once, at release time, and
replayed at pull time without data.

NNCF (``nncf.quantize``; :data:`QUANTIZE_ARGS`: the ``performance`` preset, i.e. symmetric 8-bit weights per
output channel and symmetric 8-bit activations, and full bias correction) needs calibration images, and a user pulling
a released bundle has none. The quantised model is a function of the fp32 IR (made from ``models/model.pt`` by
:func:`medssl.openvino.export_fp32`) and of the numbers NNCF derives from the calibration images: the range of each
activation ``FakeQuantize`` and the convolution biases that bias correction shifts. So at release time
:func:`calibrate_int8` quantises on crops of training images and records those numbers by node name in a small JSON
(:data:`RANGES_FILE` in the bundle, about 50 kB); at pull time :func:`int8_from_record` runs the same
``nncf.quantize`` on one zero-filled sample (which fixes the graph: where the quantisers go, the int8 weights and
their scales, all data-free) and then sets every recorded constant, checking that each recorded node exists with the
recorded shape and that every activation quantiser and every bias got its recorded value. The record also holds
fingerprints of the fp32 IR it was calibrated on and of the calibrated int8 graph
(:func:`medssl.openvino.model_fingerprint`): with the recorded OpenVINO and NNCF versions the rebuilt model must match
it exactly, so the pulled int8 IR computes what the calibrated one did, bit for bit. The recipe (cases, crop
positions, subset size, preset, versions) and the weights' sha256 travel in the record too
(:func:`calibration_recipe` gives the part worth putting in a bundle's metadata).

The record's ``format`` stays ``medssl.openvino.int8/1`` (the name it has in the released bundles); this module owns
the record, and :mod:`medssl.openvino` knows nothing of it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from medssl.data import atomic_path, file_sha256
from medssl.openvino import convert, decline_telemetry, model_fingerprint, read_model, save_ir, tool_versions

__all__ = [
    "RANGES_FILE",
    "RECORD_FORMAT",
    "QUANTIZE_ARGS",
    "DEFAULT_CALIBRATION_CASES",
    "DEFAULT_CROPS_PER_CASE",
    "DEV_TRAIN_CASES",
    "Int8RecordError",
    "bundle_preprocessing",
    "calibration_crops",
    "calibrate_int8",
    "int8_from_record",
    "quantize_from_record",
    "record_int8_calibration",
    "write_record",
    "calibration_recipe",
]

logger = logging.getLogger("medssl")

# the int8 calibration record of a bundle, relative to its root (shipped in the release zip with the configs)
RANGES_FILE = "configs/openvino_int8.json"
RECORD_FORMAT = "medssl.openvino.int8/1"
# nncf.quantize arguments of the calibration; the data-free rebuild repeats them exactly. NNCF's full bias correction
# (fast_bias_correction=False) is what brings int8 within the agreement rule: measured on 6 held-out training
# cases (3, 13, ..., 53) against the fp32 IR, label-map Dice 99.61 % (min 99.46) with it, 99.35 % (min 99.01) with the
# fast one; the mixed preset, MINMAX or quantile activation ranges, and keeping the first, last or full-resolution
# convolutions in fp32 all stayed at 99.23-99.35 %.
QUANTIZE_ARGS: Dict[str, Any] = {
    "preset": "performance",
    "target_device": "ANY",
    "fast_bias_correction": False,
    "model_type": None,
}
# the dev split's training cases (1-based positions in the datalist's "training" list); calibration never reads past
DEV_TRAIN_CASES = 60
# release recipe: 12 training cases spread over 1-60, 4 sliding-window crops of each (48 crops)
DEFAULT_CALIBRATION_CASES = tuple(range(1, DEV_TRAIN_CASES + 1, 5))
DEFAULT_CROPS_PER_CASE = 4


class Int8RecordError(RuntimeError):
    """An int8 calibration record does not fit the fp32 IR: other weights, another graph, a node missing."""


_quantize_lock = threading.Lock()


@contextlib.contextmanager
def _quiet_nncf():
    """NNCF's log at ERROR and its progress bars off inside (the data-free rebuild at pull time has nothing to say).
    Hold ``_quantize_lock`` around it: NNCF's ``track`` is patched for the duration."""
    from nncf.common.logging import track_progress

    nncf_log = logging.getLogger("nncf")
    level, init = nncf_log.level, track_progress.track.__init__

    def silent(self, *args, **kwargs):
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    nncf_log.setLevel(logging.ERROR)
    track_progress.track.__init__ = silent
    try:
        yield
    finally:
        track_progress.track.__init__ = init
        nncf_log.setLevel(level)


# -- calibration data ----------------------------------------------------------------------------------------------


def bundle_preprocessing(bundle_root: os.PathLike | str) -> Tuple[Any, Dict[str, Any]]:
    """The ``preprocessing`` transform of the bundle's ``inference.json`` and its sliding-window settings
    (``patch_size``, ``sw_batch_size``, ``sw_overlap``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(bundle_root) / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle_root)
    settings = {
        "patch_size": [int(s) for s in parser.get_parsed_content("patch_size")],
        "sw_batch_size": int(parser.get_parsed_content("sw_batch_size")),
        "sw_overlap": float(parser.get_parsed_content("sw_overlap")),
    }
    return parser.get_parsed_content("preprocessing"), settings


def _window_starts(shape: Sequence[int], patch: Sequence[int], overlap: float) -> List[Tuple[int, ...]]:
    """Start corners of the windows MONAI's sliding-window inference visits on a volume of ``shape`` (already padded
    to at least ``patch``), in its order."""
    from monai.data.utils import dense_patch_slices

    interval = [max(int(p * (1 - overlap)), 1) for p in patch]
    return [tuple(int(s.start) for s in sl) for sl in dense_patch_slices(tuple(shape), tuple(patch), interval)]


def _pad_to(volume: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    """Zero-pad the spatial sides of ``[C, ...]`` ``volume`` shorter than ``patch``, half before and half after (as
    MONAI's sliding-window inference does)."""
    pads = [(0, 0)] + [
        ((max(p - s, 0)) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(volume.shape[1:], patch)
    ]
    return np.pad(volume, pads) if any(sum(p) for p in pads) else volume


def calibration_crops(
    dataset_dir: os.PathLike | str,
    bundle_root: os.PathLike | str,
    cases: Sequence[int] = DEFAULT_CALIBRATION_CASES,
    crops_per_case: Optional[int] = DEFAULT_CROPS_PER_CASE,
    patch_size: Optional[Sequence[int]] = None,
    seed: int = 0,
    max_case: int = DEV_TRAIN_CASES,
) -> Tuple[List[np.ndarray], Dict[str, Any]]:
    """Calibration inputs: windows of training images, preprocessed as the bundle does at inference.

    Each case (a 1-based position in ``dataset_dir/dataset.json``'s ``"training"`` list) goes through the bundle's
    ``preprocessing`` (RAS, ``spacing``, z-score); of the sliding-window positions the bundle's inferer visits on it
    (``patch_size`` and ``sw_overlap`` of ``inference.json``), ``crops_per_case`` are drawn without replacement
    (``numpy.random.RandomState(seed + position)``; ``None``: all of them).

    Returns:
        ``(crops, recipe)``: float32 arrays ``[1, C, *patch_size]`` and a JSON-ready description (dataset name,
        cases with their IDs, each crop's case and start, patch size, overlap, seed).

    Raises:
        ValueError: a case outside 1..``max_case`` (the dev split's training cases by default: never calibrate on
            evaluation cases) or beyond the datalist.
    """
    from medssl.data import load_datalist

    cases = [int(c) for c in cases]
    if not cases:
        raise ValueError("calibration_crops: no cases given.")
    datalist = load_datalist(dataset_dir)
    training = datalist.get("training", [])
    limit = min(int(max_case), len(training))
    bad = [c for c in cases if not 1 <= c <= limit]
    if bad:
        raise ValueError(
            f"calibration_crops: cases {bad} are outside the training cases 1..{limit} of {dataset_dir} (calibration "
            f"reads training images only; max_case={max_case})."
        )
    preprocessing, settings = bundle_preprocessing(bundle_root)
    patch = [int(p) for p in (patch_size or settings["patch_size"])]
    crops: List[np.ndarray] = []
    described: List[Dict[str, Any]] = []
    case_ids: List[Dict[str, Any]] = []
    for position in cases:
        entry = training[position - 1]
        image = entry["image"] if isinstance(entry, dict) else entry
        case_id = Path(str(image)).name.split(".nii")[0]
        case_ids.append({"position": position, "id": case_id})
        volume = preprocessing({"image": str(image)})["image"]
        volume = _pad_to(np.asarray(volume.detach().cpu() if hasattr(volume, "detach") else volume, np.float32), patch)
        starts = _window_starts(volume.shape[1:], patch, settings["sw_overlap"])
        if crops_per_case is not None and crops_per_case < len(starts):
            rng = np.random.RandomState(seed + position)
            starts = [starts[i] for i in sorted(rng.choice(len(starts), int(crops_per_case), replace=False))]
        for start in starts:
            window = tuple(slice(s, s + p) for s, p in zip(start, patch))
            crops.append(np.ascontiguousarray(volume[(slice(None), *window)][None]))
            described.append({"case": case_id, "start": list(start)})
    recipe = {
        "dataset": str(datalist.get("name", Path(dataset_dir).name)),
        "cases": case_ids,
        "crops": described,
        "patch_size": patch,
        "sw_overlap": settings["sw_overlap"],
        "crops_per_case": crops_per_case,
        "seed": int(seed),
        "preprocessing": "the bundle's inference.json preprocessing (orientation RAS, spacing, z-score)",
    }
    return crops, recipe


# -- int8 -----------------------------------------------------------------------------------------------------------


def _quantize(fp32_model, samples: Sequence[np.ndarray], subset_size: int, args: Dict[str, Any], quiet: bool = False):
    """``nncf.quantize`` of a copy of ``fp32_model`` on ``samples`` with the arguments of :data:`QUANTIZE_ARGS`' form
    (one quantisation at a time per process: it uses every core anyway)."""
    decline_telemetry()
    import nncf

    kwargs = {
        "preset": nncf.QuantizationPreset(args["preset"]) if args.get("preset") else None,
        "target_device": nncf.TargetDevice[args.get("target_device", "ANY")],
        "fast_bias_correction": bool(args.get("fast_bias_correction", True)),
        "model_type": nncf.ModelType(args["model_type"]) if args.get("model_type") else None,
    }
    if args.get("ignored_scope"):  # {"names": [...], "patterns": [...], "types": [...]}: ops kept in fp32
        kwargs["ignored_scope"] = nncf.IgnoredScope(**args["ignored_scope"])
    if args.get("activations_range"):  # a RangeEstimatorParametersSet name: MINMAX, MEAN_MINMAX, MEAN_QUANTILE...
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet

        kwargs["advanced_parameters"] = AdvancedQuantizationParameters(
            activations_range_estimator_params=getattr(RangeEstimatorParametersSet, args["activations_range"])
        )
    with _quantize_lock, _quiet_nncf() if quiet else contextlib.nullcontext():
        return nncf.quantize(fp32_model.clone(), nncf.Dataset(list(samples)), subset_size=int(subset_size), **kwargs)


def _ranges_and_biases(model) -> Tuple[Dict[str, List[Any]], Dict[str, Any]]:
    """The data-derived constants of an NNCF-quantised model by node name: each ``FakeQuantize``'s four range inputs,
    and the constant operand of each ``Add`` fed by a convolution (the biases bias correction shifts)."""
    ranges: Dict[str, List[Any]] = {}
    biases: Dict[str, Any] = {}
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind == "FakeQuantize":
            ranges[op.get_friendly_name()] = [_constant_input(op, i).get_data().copy() for i in range(1, 5)]
        elif kind == "Add":
            bias = _bias_input(op)
            if bias is not None:
                biases[op.get_friendly_name()] = bias.get_data().copy()
    return ranges, biases


def _constant_input(op, port: int):
    src = op.input(port).get_source_output().get_node()
    if src.get_type_name() != "Constant":
        raise Int8RecordError(f"{op.get_friendly_name()}: input {port} is a {src.get_type_name()}, not a constant.")
    return src


def _bias_input(op) -> Optional[Any]:
    """The constant input of an ``Add`` whose other input is a (transposed) convolution, else None."""
    sources = [op.input(i).get_source_output().get_node() for i in range(2)]
    kinds = [s.get_type_name() for s in sources]
    if "Constant" in kinds and {"Convolution", "ConvolutionBackpropData", "GroupConvolution"} & set(kinds):
        return sources[kinds.index("Constant")]
    return None


def _as_json(array: np.ndarray) -> Dict[str, Any]:
    """A float32 array as JSON: each value written with the fewest digits that read back to the same float32."""
    array = np.asarray(array)
    if array.dtype != np.float32:
        raise Int8RecordError(f"expected a float32 constant, got {array.dtype}.")
    return {"shape": list(array.shape), "values": [float(str(v)) for v in array.ravel()]}


def _from_json(entry: Dict[str, Any]) -> np.ndarray:
    return np.asarray(entry["values"], dtype=np.float32).reshape(entry["shape"])


def calibrate_int8(
    fp32_model,
    crops: Sequence[np.ndarray],
    recipe: Optional[Dict[str, Any]] = None,
    weights_sha256: Optional[str] = None,
    quantize_args: Optional[Dict[str, Any]] = None,
) -> Tuple[Any, Dict[str, Any]]:
    """Quantise ``fp32_model`` (an ``openvino.Model`` from :func:`convert`, or its ``.xml``) with NNCF on ``crops``
    (float32 ``[1, C, ...]`` arrays of training images, e.g. from :func:`calibration_crops`) using
    :data:`QUANTIZE_ARGS` (updated by ``quantize_args``), and record what :func:`int8_from_record` needs to make the
    same model without them.

    Returns:
        ``(int8_model, record)``: the record (JSON-ready) holds the format, versions, ``quantize`` arguments with
        ``subset_size`` (= the number of crops), ``recipe`` as given, ``weights_sha256``, the fingerprints of the fp32
        and int8 models, the activation ranges (per ``FakeQuantize``: input low/high, output low/high) and the biases
        that bias correction changed (others stay as in the fp32 model).
    """
    fp32_model = read_model(fp32_model)
    if not crops:
        raise ValueError("calibrate_int8: no calibration crops.")
    args = {**QUANTIZE_ARGS, **(quantize_args or {}), "subset_size": len(crops)}
    int8 = _quantize(fp32_model, crops, len(crops), args)
    ranges, biases = _ranges_and_biases(int8)
    fp32_biases = _fp32_biases(fp32_model, biases)
    changed = {k: v for k, v in biases.items() if k not in fp32_biases or not np.array_equal(v, fp32_biases[k])}
    record = {
        "format": RECORD_FORMAT,
        "versions": tool_versions(int8=True),
        "quantize": args,
        "calibration": recipe or {},
        "weights_sha256": weights_sha256,
        "fp32_fingerprint": model_fingerprint(fp32_model),
        "int8_fingerprint": model_fingerprint(int8),
        "activation_ranges": {k: [_as_json(a) for a in v] for k, v in ranges.items()},
        "biases": {k: _as_json(v) for k, v in changed.items()},
    }
    return int8, record


def _fp32_biases(fp32_model, names: Any) -> Dict[str, np.ndarray]:
    """The biases of the fp32 model under the names the quantised model gives them (the ``Add`` after each
    convolution keeps its name through quantisation)."""
    found = {}
    for op in fp32_model.get_ordered_ops():
        if op.get_type_name() == "Add" and op.get_friendly_name() in names:
            bias = _bias_input(op)
            if bias is not None:
                found[op.get_friendly_name()] = bias.get_data().copy()
    return found


def _load_record(record: Any) -> Dict[str, Any]:
    if isinstance(record, (str, os.PathLike)):
        try:
            record = json.loads(Path(record).read_text())
        except (OSError, ValueError) as e:
            raise Int8RecordError(f"{record}: cannot read the int8 calibration record ({e}).") from e
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise Int8RecordError(f"not an int8 calibration record of format {RECORD_FORMAT!r}.")
    return record


def int8_from_record(fp32_model, record: Any, weights_sha256: Optional[str] = None, strict: Optional[bool] = None):
    """The int8 model of ``fp32_model`` (``openvino.Model`` or ``.xml``) from a :func:`calibrate_int8` ``record`` (a
    dict or a JSON file), without calibration data.

    ``nncf.quantize`` runs with the recorded arguments on one zero-filled sample, which places the quantisers and
    quantises the weights (neither depends on data); then every activation range and every bias is set from the
    record, by node name. Checked: the record is for ``weights_sha256`` (when both know it); every recorded node
    exists, with the recorded shape; every ``FakeQuantize`` of the model has recorded ranges. With ``strict`` (default:
    when the installed OpenVINO and NNCF are the recorded versions) the fp32 model and the result must have the
    recorded fingerprints, i.e. the result is the calibrated model exactly; otherwise a mismatch is logged.

    Raises:
        Int8RecordError: any of those checks fails (nothing is returned).
    """
    record = _load_record(record)
    fp32_model = read_model(fp32_model)
    if weights_sha256 and record.get("weights_sha256") and weights_sha256 != record["weights_sha256"]:
        raise Int8RecordError(
            f"the int8 calibration record was made for weights with sha256 {record['weights_sha256']}, these have "
            f"{weights_sha256}; calibrate again on training images (medssl.openvino_int8.record_int8_calibration)."
        )
    versions = tool_versions(int8=True)
    strict = versions == record.get("versions") if strict is None else strict
    fp32_print = model_fingerprint(fp32_model)
    if fp32_print != record.get("fp32_fingerprint"):
        message = (
            "the fp32 IR is not the one the int8 record was calibrated on (other weights, or another converter: "
            f"recorded {record.get('versions')}, installed {versions})"
        )
        if strict:
            raise Int8RecordError(message + "; calibrate again on training images.")
        logger.warning("OpenVINO int8: %s; applying the recorded ranges by node name.", message)
    args = dict(record["quantize"])
    sample = np.zeros(
        [1] + [int(d.get_length()) if d.is_static else 16 for d in fp32_model.inputs[0].get_partial_shape()][1:],
        np.float32,
    )
    int8 = _quantize(fp32_model, [sample], int(args["subset_size"]), args, quiet=True)
    _apply_record(int8, fp32_model, record)
    int8_print = model_fingerprint(int8)
    if int8_print != record.get("int8_fingerprint"):
        message = "the rebuilt int8 model differs from the calibrated one (fingerprint mismatch)"
        if strict:
            raise Int8RecordError(
                f"{message} with the recorded OpenVINO/NNCF {record.get('versions')}; the record or the fp32 IR is "
                "not the released one."
            )
        logger.warning("OpenVINO int8: %s; installed %s, recorded %s.", message, versions, record.get("versions"))
    return int8


def _apply_record(int8, fp32_model, record: Dict[str, Any]) -> None:
    """Set the recorded activation ranges and biases on ``int8`` (in place), checking that they cover it."""
    from openvino import op as ov_op

    ranges = {k: [_from_json(e) for e in v] for k, v in record["activation_ranges"].items()}
    biases = {k: _from_json(v) for k, v in record.get("biases", {}).items()}
    fq_nodes, bias_nodes = {}, {}
    for op in int8.get_ordered_ops():
        if op.get_type_name() == "FakeQuantize":
            fq_nodes[op.get_friendly_name()] = op
        elif op.get_type_name() == "Add" and _bias_input(op) is not None:
            bias_nodes[op.get_friendly_name()] = op
    missing = sorted(set(ranges) - set(fq_nodes)) + sorted(set(biases) - set(bias_nodes))
    unrecorded = sorted(set(fq_nodes) - set(ranges))
    if missing or unrecorded:
        raise Int8RecordError(
            f"the int8 record does not fit this graph: recorded nodes not found {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}; quantisers without recorded ranges {unrecorded[:5]}"
            f"{'...' if len(unrecorded) > 5 else ''} ({len(missing)} and {len(unrecorded)})."
        )
    fp32_biases = _fp32_biases(fp32_model, bias_nodes)
    plan: List[Tuple[Any, int, np.ndarray]] = []
    for name, values in ranges.items():
        plan += [(fq_nodes[name], port, values[port - 1]) for port in range(1, 5)]
    for name, node in bias_nodes.items():
        if name in biases:
            plan.append((node, None, biases[name]))
        elif name in fp32_biases:
            plan.append((node, None, fp32_biases[name]))  # bias correction left it (or would leave it) as it was
        else:
            raise Int8RecordError(f"{name}: a bias of the int8 model with no value in the record or the fp32 model.")
    for node, port, value in plan:
        if port is None:
            port = [node.input(i).get_source_output().get_node().get_type_name() for i in range(2)].index("Constant")
        old = _constant_input(node, port)
        if list(old.get_output_shape(0)) != list(value.shape) or old.get_data().dtype != value.dtype:
            raise Int8RecordError(
                f"{node.get_friendly_name()}: input {port} is {old.get_data().dtype}{list(old.get_output_shape(0))} in "
                f"this graph, the record has {value.dtype}{list(value.shape)}."
            )
        new = ov_op.Constant(np.array(value, order="C", copy=True))  # ascontiguousarray would make 0-d arrays 1-d
        new.set_friendly_name(old.get_friendly_name())
        node.input(port).replace_source_output(new.output(0))
    int8.validate_nodes_and_infer_types()


def quantize_from_record(
    fp32_xml: os.PathLike | str,
    record: Any,
    target: os.PathLike | str,
    weights_sha256: Optional[str] = None,
    strict: Optional[bool] = None,
) -> Path:
    """:func:`int8_from_record` of the fp32 IR ``fp32_xml`` written as the IR ``target`` (``.xml`` + ``.bin``)."""
    record = _load_record(record)
    int8 = int8_from_record(fp32_xml, record, weights_sha256, strict)
    return save_ir(
        int8,
        target,
        {
            "precision": "int8",
            "int8_fingerprint": record["int8_fingerprint"],
            "weights_sha256": record.get("weights_sha256"),
        },
    )


def calibration_recipe(record: Any) -> Dict[str, Any]:
    """The part of an int8 record worth putting in a bundle's metadata: method, versions, arguments, cases, crops
    (their count and the rule that drew them), and the weights and fingerprint it is bound to."""
    record = _load_record(record)
    cal = record.get("calibration", {})
    return {
        "method": "NNCF post-training quantisation (nncf.quantize) of the OpenVINO fp32 IR; activation ranges and "
        "bias corrections recorded at release time and re-applied at pull time without data",
        "versions": record.get("versions"),
        "quantize": record.get("quantize"),
        "dataset": cal.get("dataset"),
        "cases": [c.get("position") for c in cal.get("cases", [])],
        "case_ids": [c.get("id") for c in cal.get("cases", [])],
        "crops": len(cal.get("crops", [])),
        "crops_per_case": cal.get("crops_per_case"),
        "patch_size": cal.get("patch_size"),
        "seed": cal.get("seed"),
        "weights_sha256": record.get("weights_sha256"),
        "int8_fingerprint": record.get("int8_fingerprint"),
    }


def record_int8_calibration(
    bundle_root: os.PathLike | str,
    dataset_dir: os.PathLike | str,
    target: Optional[os.PathLike | str] = None,
    cases: Sequence[int] = DEFAULT_CALIBRATION_CASES,
    crops_per_case: Optional[int] = DEFAULT_CROPS_PER_CASE,
    seed: int = 0,
    max_case: int = DEV_TRAIN_CASES,
    quantize_args: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """The release step: calibrate the bundle's network (``models/model.pt``, converted as :func:`export_fp32` does)
    on :func:`calibration_crops` of ``dataset_dir`` and write the record to ``target`` (default: the bundle's
    :data:`RANGES_FILE`). Returns the record."""
    from medssl.weights import eager_network

    root = Path(bundle_root)
    weights = root / "models" / "model.pt"
    fp32 = convert(eager_network(root))
    crops, recipe = calibration_crops(dataset_dir, root, cases, crops_per_case, seed=seed, max_case=max_case)
    _, record = calibrate_int8(fp32, crops, recipe, file_sha256(weights), quantize_args)
    write_record(record, Path(target) if target else root / RANGES_FILE)
    return record


def write_record(record: Dict[str, Any], target: os.PathLike | str) -> Path:
    """Write an int8 calibration record as JSON (indented, each list of numbers on one line), atomically."""
    text = json.dumps(record, indent=1)
    text = re.sub(
        r"\[\s*((?:-?[0-9][-0-9.e+]*,\s*)*-?[0-9][-0-9.e+]*)\s*\]",
        lambda m: "[" + " ".join(m.group(1).split()) + "]",
        text,
    )
    with atomic_path(target) as tmp:
        Path(tmp).write_text(text + "\n")
    return Path(target)
