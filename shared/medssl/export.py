"""Derived model artefacts of a bundle, made from ``models/model.pt`` and never used stale.

A bundle ships (or trains) one weights file, ``models/model.pt``. Everything else a runtime loads is derived from it
on the machine that uses it, at pull time or on first use:

====================  =============================  =================================================
``kind``              artefact                       made by
====================  =============================  =================================================
``ts``                ``models/model.ts``            ``monai.bundle ckpt_export`` of ``network_def``
``pt2``               ``models/model.pt2``           ``torch.export`` (batch and spatial sizes dynamic,
                                                     spatial sizes multiples of 16)
``openvino``          ``models/openvino/fp32.xml``   OpenVINO's PyTorch converter (fp32)
``openvino-int8``     ``models/openvino/int8.xml``   the fp32 IR quantised by NNCF with the activation
                                                     ranges calibrated at release time
====================  =============================  =================================================

Each artefact is recorded in ``models/exports.json`` with the sha256 of the weights (and of any other input) it was
made from and the versions of the tools that made it. :func:`ensure` rebuilds an artefact whose record does not
match the bundle's current files or tools (weights changed after export, a new torch), or that has no record, and
writes it atomically under a lock (concurrent requests of a server build it once). So a stale export is rebuilt,
never silently used.

In ``inference.json`` the segmentation network is ``network_def = medssl.export.network(@network_spec, ...)``:
``network_spec`` is the network's constructor (``"_mode_": "callable"``: a partial, not instantiated until needed) and the two
keys ``runtime`` (``torch``, ``openvino``, ``openvino-int8``) and ``model_format`` (``pt``, ``ts``, ``pt2``; the
artefact the ``torch`` runtime runs) choose what it returns. With the defaults (``torch``/``pt``) it is the eager
network, whose weights the bundle's ``CheckpointLoader`` loads as before; otherwise it is the loaded artefact and the
``CheckpointLoader`` is disabled, so ``network_spec`` is never instantiated unless an artefact must be (re)built.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from medssl.data import file_sha256, write_json
from medssl.weights import eager_network  # part of this module's API, as before

__all__ = [
    "RUNTIMES",
    "MODEL_FORMATS",
    "ARTEFACTS",
    "ExportError",
    "file_sha256",
    "network",
    "ensure",
    "is_fresh",
    "load_artefact",
    "export_pt2",
    "ExportedNetwork",
    "check_runtime",
    "exported_precision",
]

RUNTIMES = ("torch", "openvino", "openvino-int8")
MODEL_FORMATS = ("pt", "ts", "pt2")
# artefact kind -> path inside the bundle
ARTEFACTS = {
    "ts": "models/model.ts",
    "pt2": "models/model.pt2",
    "openvino": "models/openvino/fp32.xml",
    "openvino-int8": "models/openvino/int8.xml",
}
RECORD = "models/exports.json"
_SPATIAL_MULTIPLE = 16  # the VNet halves each spatial size four times


class ExportError(RuntimeError):
    """An artefact cannot be made or loaded: the message names the bundle file and the reason."""


def check_runtime(runtime: str, model_format: str = "pt") -> str:
    """The artefact kind for ``runtime`` and ``model_format`` (``None``-like ``"pt"`` for eager PyTorch).

    Raises:
        ValueError: an unknown runtime or format, or a format other than ``pt`` with a non-torch runtime.
    """
    runtime, model_format = str(runtime), str(model_format)
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime: expected one of {', '.join(RUNTIMES)}; got {runtime!r}.")
    if model_format not in MODEL_FORMATS:
        raise ValueError(f"model_format: expected one of {', '.join(MODEL_FORMATS)}; got {model_format!r}.")
    if runtime != "torch":
        if model_format != "pt":
            raise ValueError(
                f"model_format {model_format!r} is a PyTorch artefact; runtime {runtime!r} builds its own from "
                "models/model.pt (leave model_format at 'pt')."
            )
        return runtime
    return model_format


def exported_precision(runtime: str, model_format: str, precision: str) -> str:
    """The precision the bundle runs at: ``precision`` for eager PyTorch and ``model.pt2`` (autocast applies to
    its ATen graph), ``fp32`` for TorchScript and OpenVINO (their graphs fix their own types)."""
    kind = check_runtime(runtime, model_format)
    return precision if kind in ("pt", "pt2") else "fp32"


def _tools(kind: str) -> Dict[str, str]:
    tools = {"torch": torch.__version__.split("+")[0]}
    if kind.startswith("openvino"):
        from medssl.openvino import tool_versions  # package metadata: importing NNCF would start its telemetry

        tools.update(tool_versions(int8=kind == "openvino-int8"))
    return tools


def _inputs(root: Path, kind: str) -> Dict[str, str]:
    """sha256 of every bundle file the artefact is made from."""
    weights = root / "models" / "model.pt"
    if not weights.is_file():
        raise ExportError(f"{weights}: no weights to export; pull the released bundle or train it first.")
    inputs = {"models/model.pt": file_sha256(weights)}
    if kind == "openvino-int8":
        from medssl.openvino_int8 import RANGES_FILE

        ranges = root / RANGES_FILE
        if not ranges.is_file():
            raise ExportError(
                f"{ranges}: no int8 calibration record in this bundle, so runtime 'openvino-int8' is not available "
                "(it is made at release time from training images: benchmarks/openvino_calibrate.py, i.e. "
                "medssl.openvino_int8.record_int8_calibration); use 'openvino'."
            )
        inputs[RANGES_FILE] = file_sha256(ranges)
    return inputs


def _read_record(root: Path) -> Dict[str, Any]:
    path = root / RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def is_fresh(root: os.PathLike | str, kind: str) -> bool:
    """Whether the artefact ``kind`` exists and was made from the bundle's current files with the current tools."""
    root = Path(root)
    entry = _read_record(root).get(ARTEFACTS[kind])
    if not entry or not (root / ARTEFACTS[kind]).is_file():
        return False
    try:
        return entry.get("inputs") == _inputs(root, kind) and entry.get("tools") == _tools(kind)
    except (ExportError, ImportError):
        return False


@contextlib.contextmanager
def _atomic_named(target: Path):
    """A temporary path with ``target``'s own file name (TorchScript and exported-program archives take their inner
    folder name from it, so the bytes do not depend on a random name), renamed onto ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp:
        path = Path(tmp) / target.name
        yield path
        os.replace(path, target)


@contextlib.contextmanager
def _lock(root: Path):
    """An exclusive lock on the bundle's ``models/`` (one builder at a time, across threads and processes)."""
    (root / "models").mkdir(parents=True, exist_ok=True)
    with open(root / "models" / ".exports.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def export_pt2(net: nn.Module, target: os.PathLike | str, example_size=(2, 1, 64, 64, 32)) -> Path:
    """``torch.export`` of ``net`` (eval mode, fp32) to ``target``: batch and spatial sizes dynamic, the spatial ones
    multiples of 16 (what the VNet accepts), written atomically."""
    dims = [torch.export.Dim(f"n{i}", min=1, max=64) for i in range(3)]
    shapes = (
        {0: torch.export.Dim("batch", min=1, max=1024), **{2 + i: _SPATIAL_MULTIPLE * d for i, d in enumerate(dims)}},
    )
    example = torch.zeros(example_size)
    with torch.no_grad():
        program = torch.export.export(net.eval(), (example,), dynamic_shapes=shapes)
    with _atomic_named(Path(target)) as tmp:
        torch.export.save(program, str(tmp))
    return Path(target)


def _export_ts(root: Path, target: Path) -> None:
    """``monai.bundle ckpt_export`` of ``network_def`` (eager, weights from ``models/model.pt``), as MONAI makes it
    (the bundle's configs travel inside the file for MONAI Deploy)."""
    from monai.bundle import ckpt_export

    with _atomic_named(target) as tmp:
        ckpt_export(
            net_id="network_def",
            filepath=str(tmp),
            ckpt_file=str(root / "models" / "model.pt"),
            meta_file=str(root / "configs" / "metadata.json"),
            config_file=str(root / "configs" / "inference.json"),
            bundle_root=str(root),
            runtime="torch",
            model_format="pt",
        )


def _build(root: Path, kind: str, spec: Optional[Callable[[], nn.Module]]) -> None:
    target = root / ARTEFACTS[kind]
    if kind == "ts":
        _export_ts(root, target)
    elif kind == "pt2":
        export_pt2(eager_network(root, spec), target)
    elif kind in ("openvino", "openvino-int8"):
        from medssl import openvino as ov
        from medssl import openvino_int8 as ov_int8

        fp32 = root / ARTEFACTS["openvino"]
        if kind == "openvino":
            ov.export_fp32(eager_network(root, spec), fp32)
        else:
            if not is_fresh(root, "openvino"):
                _build_and_record(root, "openvino", spec)
            weights = file_sha256(root / "models" / "model.pt")  # a record made for other weights is refused by name
            ov_int8.quantize_from_record(fp32, root / ov_int8.RANGES_FILE, target, weights_sha256=weights)
    else:  # pragma: no cover - guarded by check_runtime
        raise ValueError(kind)


def _build_and_record(root: Path, kind: str, spec: Optional[Callable[[], nn.Module]]) -> None:
    inputs = _inputs(root, kind)
    start = time.perf_counter()
    try:
        _build(root, kind, spec)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(
            f"{root / ARTEFACTS[kind]}: export from models/model.pt failed ({type(e).__name__}: {e})."
        ) from e
    record = _read_record(root)
    record[ARTEFACTS[kind]] = {
        "inputs": inputs,
        "tools": _tools(kind),
        "seconds": round(time.perf_counter() - start, 2),
        "made": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(record, root / RECORD)


def ensure(root: os.PathLike | str, kind: str, spec: Optional[Callable[[], nn.Module]] = None) -> Path:
    """The artefact ``kind`` of the bundle at ``root``, (re)built first if it is missing or stale.

    Raises:
        ExportError: the bundle has no weights, or the export failed (nothing half-written is left).
    """
    root = Path(root).resolve()
    if kind not in ARTEFACTS:
        raise ValueError(f"artefact: expected one of {', '.join(ARTEFACTS)}; got {kind!r}.")
    if not is_fresh(root, kind):
        with _lock(root):
            if not is_fresh(root, kind):  # another thread or process may have built it meanwhile
                _build_and_record(root, kind, spec)
    return root / ARTEFACTS[kind]


class ExportedNetwork(nn.Module):
    """A loaded ``torch.export`` program as a module: its graph is fixed in eval mode, so ``train()``/``eval()``
    only set the flag (an exported module refuses them), and ``.to()`` moves its constants as usual."""

    def __init__(self, program_module: nn.Module) -> None:
        super().__init__()
        self.program = program_module

    def train(self, mode: bool = True) -> "ExportedNetwork":
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


def load_artefact(path: os.PathLike | str, kind: str, device: Any = "cpu", threads: Optional[int] = None) -> nn.Module:
    """Load an artefact made by :func:`ensure` as a module taking and returning float tensors."""
    path = Path(path)
    if kind == "ts":
        return torch.jit.load(str(path), map_location=torch.device(device)).eval()
    if kind == "pt2":
        return ExportedNetwork(torch.export.load(str(path)).module()).to(torch.device(device))
    if kind in ("openvino", "openvino-int8"):
        if torch.device(device).type != "cpu":
            raise ValueError(f"runtime {kind!r} runs on the CPU; got device {device!r} (use runtime 'torch' there).")
        from medssl.openvino import OpenVINONetwork

        return OpenVINONetwork(path, threads=threads)
    raise ValueError(f"artefact: expected one of {', '.join(ARTEFACTS)}; got {kind!r}.")


def network(
    spec: Callable[[], nn.Module],
    bundle_root: os.PathLike | str,
    runtime: str = "torch",
    model_format: str = "pt",
    device: Any = "cpu",
) -> nn.Module:
    """``network_def`` of ``inference.json``: the eager network (``spec()``, weights loaded by the bundle's
    ``CheckpointLoader``) for ``torch``/``pt``; else the fresh artefact of ``runtime``/``model_format``, loaded."""
    kind = check_runtime(runtime, model_format)
    if kind == "pt":
        return spec()
    return load_artefact(ensure(bundle_root, kind, spec), kind, device)
