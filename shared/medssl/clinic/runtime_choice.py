"""``runtime="auto"``: the fastest runtime that keeps the bundle's label maps, on this machine.

``segment``, the DICOM node and the MONAI Label app run ``auto`` unless told otherwise (``--runtime``, or
``MEDSSL_RUNTIME`` for the default). It picks among the runtimes of :mod:`medssl.export`:

1. **Candidates.** ``torch`` always (the eager network at the precision the bundle uses on this device: bf16 on a CPU
   with native bf16, else fp32). On a CPU with OpenVINO installed, also ``openvino`` and ``openvino-int8`` where the
   bundle carries an accuracy record (:data:`ACCURACY_FILE`, made at release time on held-out cases by
   ``benchmarks/openvino_accuracy.py``) that is for the bundle's current weights and shows the runtime met
   :data:`RULE`: label maps agreeing with PyTorch fp32 at >= 99.5 % Dice (mean over the cases) and mean Dice within
   0.2 points of it. A bundle without a record (one you trained, or weights changed after the release, e.g. by the
   MONAI Label app's training) runs ``torch``.
2. **This CPU.** Each candidate runs the same input: one batch as the sliding window sends it (``sw_batch_size``
   windows, at most :data:`MAX_PROBE_WINDOWS`), each window a synthetic LA-like volume of the bundle's patch size
   (:func:`medssl.synthetic.synthesize_case`, identical on every machine). Its label maps must agree with PyTorch fp32's
   on this CPU at >= :data:`PROBE_AGREEMENT` (kernels differ between CPUs: int8 on a CPU without VNNI is not the int8
   measured at release), and it is timed (best of :data:`PROBE_REPEATS` after one warm-up).
3. **The choice.** The fastest candidate that passed, if it is at least :data:`MIN_SPEEDUP` x as fast as ``torch``;
   else ``torch`` (where OpenVINO is not clearly faster, PyTorch stays the default).

The choice and its measurements are cached in ``$MEDSSL_HOME/runtime_choice.json`` (a probe takes 10-30 s, its exports
included) under a key of everything that could change it: the CPU model and flags, threads, the tools' versions, the
weights, the records, the patch and batch. A new CPU, a new torch or new weights probe again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from medssl.data import write_json
from medssl.export import RUNTIMES, eager_network, ensure, file_sha256, load_artefact

__all__ = [
    "ACCURACY_FILE",
    "RULE",
    "PROBE_AGREEMENT",
    "MIN_SPEEDUP",
    "Choice",
    "choose_runtime",
    "eligible_runtimes",
    "decide",
    "accuracy_record",
    "write_accuracy_record",
    "default_runtime",
]

logger = logging.getLogger(__name__)

ACCURACY_FILE = "configs/runtime_accuracy.json"
RULE = {"min_mean_agreement": 0.995, "max_dice_points_from_reference": 0.2}
REFERENCE = "torch-fp32"
MAX_PROBE_WINDOWS = 4  # synthetic cases 0, 1, ... of seed 0
PROBE_AGREEMENT = 0.99  # Dice of each candidate's label maps with PyTorch fp32's on the probe windows
PROBE_REPEATS = 2
MIN_SPEEDUP = 1.1
CACHE_FILE = "runtime_choice.json"
_CACHE_VERSION = 1


@dataclass
class Choice:
    """What ``auto`` chose and why: ``runtime`` (one of :data:`medssl.export.RUNTIMES`), ``reason`` (a sentence for
    the log and ``statistics.json``), ``seconds`` per probe batch and ``agreement`` with PyTorch fp32 per candidate,
    ``excluded`` (runtime -> why), ``cached`` (read from the cache, no probe this time)."""

    runtime: str
    reason: str
    seconds: Dict[str, float] = field(default_factory=dict)
    agreement: Dict[str, float] = field(default_factory=dict)
    excluded: Dict[str, str] = field(default_factory=dict)
    cached: bool = False

    def summary(self) -> Dict[str, Any]:
        return asdict(self)


def default_runtime() -> str:
    """The runtime used when none is named: ``$MEDSSL_RUNTIME`` or ``auto``."""
    return os.environ.get("MEDSSL_RUNTIME", "").strip() or "auto"


# -- the release's accuracy record ----------------------------------------------------------------------------------


def accuracy_record(root: os.PathLike | str) -> Optional[Dict[str, Any]]:
    """The bundle's :data:`ACCURACY_FILE`, or ``None`` when it has none.

    Raises:
        ValueError: the file exists but is not a record (names the file and what is wrong).
    """
    path = Path(root) / ACCURACY_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from e
    if not isinstance(record, dict) or not isinstance(record.get("runtimes"), dict) or "weights_sha256" not in record:
        raise ValueError(f"{path}: expected an object with 'weights_sha256' and 'runtimes' (runtime -> figures).")
    return record


def _meets_rule(figures: Dict[str, Any]) -> Optional[str]:
    """``None`` when ``figures`` meet :data:`RULE`, else why not."""
    try:
        agreement = float(figures["mean_agreement"])
        points = float(figures["dice_points_vs_reference"])
    except (KeyError, TypeError, ValueError):
        return "the accuracy record has no mean_agreement / dice_points_vs_reference for it"
    if agreement < RULE["min_mean_agreement"]:
        return f"agreement with PyTorch fp32 {100 * agreement:.2f} % < {100 * RULE['min_mean_agreement']:.1f} %"
    if abs(points) > RULE["max_dice_points_from_reference"]:
        return (
            f"mean Dice {points:+.2f} points from PyTorch fp32 (rule: within {RULE['max_dice_points_from_reference']})"
        )
    return None


def eligible_runtimes(root: os.PathLike | str, device: Any = "cpu") -> tuple[List[str], Dict[str, str]]:
    """The candidates of step 1 (``torch`` first) and, for each runtime left out, why."""
    root = Path(root)
    excluded: Dict[str, str] = {}
    others = [r for r in RUNTIMES if r != "torch"]
    if torch.device(device).type != "cpu":
        return ["torch"], {r: f"runs on the CPU only (device {device})" for r in others}
    try:
        from medssl.openvino import tool_versions

        tool_versions(int8=True)
    except ImportError as e:
        return ["torch"], {r: str(e) for r in others}
    record = accuracy_record(root)
    if record is None:
        return ["torch"], {r: f"the bundle has no accuracy record ({ACCURACY_FILE})" for r in others}
    weights = file_sha256(root / "models" / "model.pt")
    if record["weights_sha256"] != weights:
        why = f"{ACCURACY_FILE} was measured on other weights (sha256 {str(record['weights_sha256'])[:12]}...)"
        return ["torch"], {r: why for r in others}
    candidates = ["torch"]
    for runtime in others:
        figures = record["runtimes"].get(runtime)
        why = f"not in {ACCURACY_FILE}" if figures is None else _meets_rule(figures)
        if why is None and runtime == "openvino-int8":
            from medssl.openvino_int8 import RANGES_FILE

            if not (root / RANGES_FILE).is_file():
                why = f"no int8 calibration record ({RANGES_FILE})"
            elif record.get("int8_record_sha256") not in (None, file_sha256(root / RANGES_FILE)):
                why = f"{ACCURACY_FILE} was measured with another int8 calibration record than {RANGES_FILE}"
        if why is None:
            candidates.append(runtime)
        else:
            excluded[runtime] = why
    return candidates, excluded


def write_accuracy_record(summary: Dict[str, Dict[str, Any]], target: os.PathLike | str, **about: Any) -> Path:
    """Write a bundle's :data:`ACCURACY_FILE` from ``benchmarks/openvino_accuracy.py``'s per-runtime ``summary``
    (``about``: ``weights_sha256`` (required), the cases, CPU, versions, command), atomically.

    Raises:
        ValueError: no ``weights_sha256``, or a summary without the reference :data:`REFERENCE`.
    """
    if not about.get("weights_sha256"):
        raise ValueError("write_accuracy_record: weights_sha256 is required (the record holds for those weights only).")
    if REFERENCE not in summary:
        raise ValueError(f"write_accuracy_record: the summary has no {REFERENCE!r} reference run.")
    keys = ("mean_dice", "mean_dice_lcc", "mean_agreement", "min_agreement", "dice_points_vs_reference")
    record = {
        "about": "Label-map accuracy of each inference runtime of these weights, measured at release time; "
        "runtime 'auto' offers a runtime only where it meets 'rule' (medssl.clinic.runtime_choice).",
        **about,
        "reference": REFERENCE,
        "rule": RULE,
        "runtimes": {name: {k: round(float(s[k]), 6) for k in keys if k in s} for name, s in summary.items()},
    }
    for name, figures in record["runtimes"].items():
        figures["meets_rule"] = _meets_rule(figures) is None
    return write_json(record, target)


# -- the probe ------------------------------------------------------------------------------------------------------


def _cpu_identity() -> Dict[str, Any]:
    from medssl.precision import _cpu_flags, onednn_isa_cap

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = sorted(_cpu_flags())
    return {
        "model_name": name,
        "flags_sha256": hashlib.sha256(" ".join(flags).encode()).hexdigest()[:16],
        "onednn_isa_cap": onednn_isa_cap(),  # ONEDNN_MAX_CPU_ISA changes the kernels both runtimes use
    }


def _probe_input(patch: Sequence[int], windows: int) -> torch.Tensor:
    from medssl.synthetic import synthesize_case

    images = [synthesize_case(tuple(int(p) for p in patch), seed=0, index=i)[0] for i in range(windows)]
    return torch.from_numpy(np.stack(images)[:, None])


def _torch_network(root: Path, spec: Optional[Callable[[], nn.Module]], precision: str, device: Any) -> nn.Module:
    from medssl.precision import MixedPrecision, prepare_network

    channels_last = torch.device(device).type == "cpu"
    net = prepare_network(eager_network(root, spec), device, channels_last)
    return MixedPrecision(net, precision, channels_last)


def _run(net: nn.Module, x: torch.Tensor) -> tuple[float, np.ndarray]:
    """Best seconds of :data:`PROBE_REPEATS` calls after one warm-up, and the label maps."""
    with torch.no_grad():
        labels = net(x).float().argmax(1).cpu().numpy()
        best = float("inf")
        for _ in range(PROBE_REPEATS):
            start = time.perf_counter()
            net(x)
            best = min(best, time.perf_counter() - start)
    return best, labels


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of the foreground (label > 0) of two label maps (1.0 when both are empty)."""
    fa, fb = a > 0, b > 0
    total = int(fa.sum() + fb.sum())
    return 1.0 if total == 0 else 2.0 * int((fa & fb).sum()) / total


def decide(seconds: Dict[str, float], agreement: Dict[str, float], excluded: Optional[Dict[str, str]] = None) -> Choice:
    """Step 3 on measured ``seconds`` (``torch`` must be there) and ``agreement`` with PyTorch fp32 per candidate."""
    excluded = dict(excluded or {})
    passed = {}
    for runtime, secs in seconds.items():
        if runtime != "torch" and agreement.get(runtime, 0.0) < PROBE_AGREEMENT:
            excluded[runtime] = (
                f"label maps agree {100 * agreement.get(runtime, 0.0):.2f} % with PyTorch fp32 on this CPU "
                f"(< {100 * PROBE_AGREEMENT:.0f} %)"
            )
        else:
            passed[runtime] = secs
    fastest = min(passed, key=passed.get)
    speedup = seconds["torch"] / passed[fastest]
    if fastest == "torch" or speedup < MIN_SPEEDUP:
        others = ", ".join(f"{r} {seconds['torch'] / s:.2f}x" for r, s in passed.items() if r != "torch")
        reason = "torch: no other runtime is at least {:.1f}x as fast on this CPU{}".format(
            MIN_SPEEDUP, f" ({others})" if others else ""
        )
        return Choice("torch", reason, dict(seconds), dict(agreement), excluded)
    reason = (
        f"{fastest}: {speedup:.2f}x as fast as torch on this CPU, label maps {100 * agreement[fastest]:.2f} % in "
        "agreement with PyTorch fp32 on the probe"
    )
    return Choice(fastest, reason, dict(seconds), dict(agreement), excluded)


def _probe(
    root: Path, candidates: List[str], excluded: Dict[str, str], precision: str, patch: Sequence[int], batch: int, spec
) -> Choice:
    x = _probe_input(patch, max(1, min(int(batch), MAX_PROBE_WINDOWS)))
    seconds: Dict[str, float] = {}
    agreement: Dict[str, float] = {}
    reference_seconds, reference = _run(_torch_network(root, spec, "fp32", "cpu"), x)
    for runtime in candidates:
        if runtime == "torch":
            if precision == "fp32":
                seconds[runtime], labels = reference_seconds, reference
            else:
                seconds[runtime], labels = _run(_torch_network(root, spec, precision, "cpu"), x)
        else:
            try:
                net = load_artefact(ensure(root, runtime, spec), runtime, "cpu")
                seconds[runtime], labels = _run(net, x)
            except Exception as e:  # an export that fails here leaves the runtime out, it does not stop segment
                excluded[runtime] = f"failed on this machine ({type(e).__name__}: {e})"
                continue
        agreement[runtime] = _agreement(labels, reference)
    return decide(seconds, agreement, excluded)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_cache(path: Path) -> Dict[str, Any]:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cache, dict) or cache.get("version") != _CACHE_VERSION:
        return {}
    return cache


def choose_runtime(
    root: os.PathLike | str,
    device: Any = "cpu",
    precision: str = "fp32",
    patch: Sequence[int] = (112, 112, 80),
    batch: int = 4,
    spec: Optional[Callable[[], nn.Module]] = None,
    cache: Optional[os.PathLike | str] = None,
) -> Choice:
    """The runtime ``auto`` runs for the bundle at ``root`` on ``device`` (see the module docstring).

    Args:
        precision: what the ``torch`` runtime would run at (``medssl.precision.resolve_precision``).
        patch, batch: the bundle's sliding-window patch and ``sw_batch_size`` (part of the cache key).
        spec: the network's constructor (``network_spec``); default: read from the bundle's ``inference.json``.
        cache: the cache file; default ``$MEDSSL_HOME/runtime_choice.json``.
    """
    root = Path(root).resolve()
    candidates, excluded = eligible_runtimes(root, device)
    if candidates == ["torch"]:
        reason = "torch: the only candidate ({})".format("; ".join(f"{r}: {w}" for r, w in excluded.items()))
        return Choice("torch", reason, excluded=excluded)
    from medssl.bundle import cache_dir
    from medssl.openvino import tool_versions

    path = Path(cache) if cache else cache_dir() / CACHE_FILE
    key_parts = {
        "cpu": _cpu_identity(),
        "threads": torch.get_num_threads(),
        "tools": {"torch": torch.__version__, **tool_versions(int8=True)},
        "weights": file_sha256(root / "models" / "model.pt"),
        "records": {
            name: file_sha256(root / name)
            for name in (ACCURACY_FILE, "configs/openvino_int8.json")
            if (root / name).is_file()
        },
        "candidates": candidates,
        "precision": precision,
        "patch": [int(p) for p in patch],
        "batch": int(batch),
        "rule": [RULE, PROBE_AGREEMENT, MIN_SPEEDUP, MAX_PROBE_WINDOWS, PROBE_REPEATS],
    }
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()
    with _locked(path):
        entry = _read_cache(path).get("choices", {}).get(key)
        if entry:
            choice = Choice(**{**entry["choice"], "cached": True})
            logger.info("Runtime (auto, cached in %s): %s.", path, choice.reason)
            return choice
        logger.info("Runtime auto: timing %s on this CPU (once; cached in %s)...", ", ".join(candidates), path)
        start = time.perf_counter()
        choice = _probe(root, candidates, excluded, precision, patch, batch, spec)
        cache_now = _read_cache(path) or {"version": _CACHE_VERSION, "choices": {}}
        cache_now.setdefault("choices", {})[key] = {
            "key": key_parts,
            "choice": choice.summary(),
            "probe_seconds": round(time.perf_counter() - start, 2),
            "made": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json(cache_now, path)
    logger.info("Runtime (auto): %s.", choice.reason)
    return choice
