"""OpenVINO on the CPU: the segmentation network converted to an OpenVINO IR in fp32, and any IR (fp32, or the int8
one that :mod:`medssl.openvino_int8` rebuilds from a bundle's calibration record) run as a torch module.

fp32: :func:`export_fp32` converts the eval-mode network with OpenVINO's PyTorch frontend (``ov.convert_model``,
which traces the module; no ONNX file and no ``onnx`` package in between) into an IR whose input ``image`` is
``[?, C, ?, ?, ?]`` (batch and spatial sizes dynamic; the VNet needs multiples of 16) and whose output is ``pred``,
the logits. Dynamic shapes cost nothing here: a 112x112x80 window takes the same time as with a static IR, and
per window one at a time as four in one call. :func:`model_fingerprint` hashes what an IR computes (op types,
attributes, connections and every constant's bytes; not the generated node names), which the int8 record binds to.

Running it: :class:`OpenVINONetwork` is a ``torch.nn.Module`` around a compiled IR, so MONAI's
``SlidingWindowInferer`` and a bundle's pre/postprocessing use it as they use the PyTorch network.

OpenVINO's converter and NNCF send usage telemetry unless the user has opted out; :func:`decline_telemetry` declines
it for the process before anything converts or quantises, so a pull never reaches out.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from medssl.data import file_sha256  # part of this module's API, as before

__all__ = [
    "require_openvino",
    "decline_telemetry",
    "convert",
    "export_fp32",
    "save_ir",
    "ir_info",
    "read_model",
    "model_fingerprint",
    "file_sha256",
    "tool_versions",
    "OpenVINONetwork",
]

_INPUT, _OUTPUT = "image", "pred"
_INSTALL = 'pip install "medssl[openvino]" (with -c constraints.txt for the tested versions)'


def require_openvino():
    """The ``openvino`` module.

    Raises:
        ImportError: OpenVINO is not installed (the message says how to install the extra).
    """
    try:
        import openvino
    except ImportError as e:
        raise ImportError(f"the OpenVINO runtime needs the openvino package: {_INSTALL}.") from e
    return openvino


def tool_versions(int8: bool = False) -> Dict[str, str]:
    """Installed versions of ``openvino`` (and ``nncf`` with ``int8``), read from the package metadata (importing NNCF
    would start its telemetry)."""
    from importlib.metadata import PackageNotFoundError, version

    names = ("openvino", "nncf") if int8 else ("openvino",)
    try:
        return {name: version(name) for name in names}
    except PackageNotFoundError as e:
        raise ImportError(f"{e.name} is not installed: {_INSTALL}.") from e


_telemetry_lock = threading.Lock()
_telemetry_off = False


def decline_telemetry() -> None:
    """Make OpenVINO's and NNCF's usage telemetry (``openvino_telemetry``: on unless the user opted out) find consent
    declined in this process, as it does in a CI job, so nothing is sent; the user's consent file is neither read nor
    changed. Called before this module imports NNCF or converts a model; idempotent."""
    global _telemetry_off
    with _telemetry_lock:
        if _telemetry_off:
            return
        try:
            from openvino_telemetry import Telemetry
            from openvino_telemetry.utils.opt_in_checker import OptInChecker
        except ImportError:  # no telemetry package: nothing to send with
            _telemetry_off = True
            return
        OptInChecker._run_in_ci = staticmethod(lambda: True)  # every later consent check declines
        existing = getattr(Telemetry, "_SingletonMetaClass__single_instance", None)
        if existing is not None:  # already set up (NNCF sets it up when imported): decline it too
            existing.consent = False
        _telemetry_off = True

# -- fp32 ---------------------------------------------------------------------------------------------------------


def convert(network: nn.Module, example_size: Sequence[int] = (1, 1, 32, 32, 32)):
    """``network`` (eval mode, fp32, ``[B, C, D, H, W]`` in, logits out) as an ``openvino.Model`` with input
    ``image`` of shape ``[?, C, ?, ?, ?]`` and output ``pred``.

    The module is traced (``torch.jit.trace`` on zeros of ``example_size``, without the trace check that would run it
    twice more; 2 s instead of 11 s here) and the trace converted by OpenVINO's PyTorch frontend. The graph does not
    depend on ``example_size`` (the same fingerprint from 32^3 and 112x112x80).

    Raises:
        ValueError: ``network`` is in training mode (dropout and batch statistics would be traced).
    """
    ov = require_openvino()
    if network.training:
        raise ValueError("convert: the network is in training mode; call .eval() first (dropout would be traced).")
    example = torch.zeros(tuple(int(s) for s in example_size))
    decline_telemetry()
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export, but OpenVINO's converter of exported programs takes 4x
        # longer here for the same ops; the VNet's input checks become constants of the trace (TracerWarning) and
        # pass for every 16*n input
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(network, example, check_trace=False)
        model = ov.convert_model(traced, example_input=example)
    model.reshape({model.inputs[0]: ov.PartialShape([-1, int(example_size[1]), -1, -1, -1])})
    model.inputs[0].get_tensor().set_names({_INPUT})
    model.outputs[0].get_tensor().set_names({_OUTPUT})
    return model


def save_ir(model, target: os.PathLike | str, info: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``model`` as ``target`` (``.xml``) and its ``.bin`` beside it, constants uncompressed; ``info`` goes into
    the IR's runtime info under ``medssl`` (read back with :func:`ir_info`). The ``.bin`` is put
    in place before the ``.xml``, each atomically, so a reader that finds the new ``.xml`` finds its ``.bin``."""
    ov = require_openvino()
    target = Path(target)
    if target.suffix != ".xml":
        raise ValueError(f"{target}: an OpenVINO IR is named *.xml.")
    for key, value in (info or {}).items():
        model.set_rt_info(str(value), ["medssl", str(key)])
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.stem}.", dir=target.parent) as tmp:
        ov.save_model(model, str(Path(tmp) / target.name), compress_to_fp16=False)
        os.replace(Path(tmp) / target.with_suffix(".bin").name, target.with_suffix(".bin"))
        os.replace(Path(tmp) / target.name, target)
    return target


def ir_info(path: os.PathLike | str) -> Dict[str, str]:
    """What :func:`save_ir` recorded in an IR's runtime info (``precision``, ``weights_sha256``,
    ``int8_fingerprint``), read from the ``.xml`` alone (the weights are not loaded)."""
    import xml.etree.ElementTree as ET

    node = ET.parse(str(path)).getroot().find("rt_info/medssl")
    return {} if node is None else {child.tag: child.get("value", "") for child in node}


def export_fp32(
    network: nn.Module,
    target: os.PathLike | str,
    example_size: Sequence[int] = (1, 1, 32, 32, 32),
    weights_sha256: Optional[str] = None,
) -> Path:
    """:func:`convert` ``network`` and write it as the fp32 IR ``target`` (``.xml`` + ``.bin``); ``weights_sha256``
    (of the ``model.pt`` it was made from), if given, is kept in the IR's runtime info."""
    info = {"precision": "fp32", **({"weights_sha256": weights_sha256} if weights_sha256 else {})}
    return save_ir(convert(network.eval(), example_size), target, info)


def model_fingerprint(model) -> str:
    """sha256 of what ``model`` computes: in topological order each op's type, version, attributes, output types and
    shapes, where its inputs come from, and every constant's bytes. Node names are left out (OpenVINO numbers the
    nodes it creates per process), so the same graph made twice has one fingerprint."""
    h = hashlib.sha256()
    ops = model.get_ordered_ops()
    position = {op: i for i, op in enumerate(ops)}  # openvino Nodes hash and compare by the node they wrap
    for op in ops:
        kind = op.get_type_name()
        parts = [kind, str(op.get_type_info().version_id)]
        for inp in op.inputs():
            src = inp.get_source_output()
            parts.append(f"in:{position[src.get_node()]}.{src.get_index()}")
        for out in op.outputs():
            parts.append(f"out:{out.get_element_type()}{out.get_partial_shape()}")
        if kind == "Constant":
            data = np.asarray(op.get_data())
            parts.append(f"const:{data.dtype}{list(data.shape)}")
            h.update("|".join(parts).encode())
            h.update(data.tobytes())
        else:
            parts.append(repr(sorted((k, repr(v)) for k, v in op.get_attributes().items())))
            h.update("|".join(parts).encode())
        h.update(b"\n")
    return h.hexdigest()


def read_model(model):
    """``model`` as an ``openvino.Model``: read from its ``.xml`` when given a path, else returned as it is."""
    ov = require_openvino()
    if isinstance(model, (str, os.PathLike)):
        return ov.Core().read_model(str(model))
    return model


# -- running it -----------------------------------------------------------------------------------------------------

_core = None
_core_lock = threading.Lock()
_compiled: Dict[Tuple, Any] = {}


def _get_core():
    global _core
    with _core_lock:
        if _core is None:
            _core = require_openvino().Core()
        return _core


def _compile(xml: Path, threads: int, precision: str):
    """The compiled model of ``xml`` for these settings, compiled once per process (and per file version)."""
    ov = require_openvino()
    import openvino.properties as props
    import openvino.properties.hint as hints

    stat = xml.stat(), xml.with_suffix(".bin").stat()
    key = (str(xml.resolve()), stat[0].st_mtime_ns, stat[0].st_size, stat[1].st_mtime_ns, stat[1].st_size, threads,
           precision)  # fmt: skip
    with _core_lock:
        compiled = _compiled.get(key)
    if compiled is not None:
        return compiled
    core = _get_core()
    config = {hints.performance_mode: hints.PerformanceMode.LATENCY, props.inference_num_threads: int(threads)}
    if precision != "auto":
        config[hints.inference_precision] = {"f32": ov.Type.f32, "bf16": ov.Type.bf16}[precision]
    compiled = core.compile_model(core.read_model(str(xml)), "CPU", config)
    with _core_lock:
        for old in [k for k in _compiled if k[0] == key[0] and k[1:5] != key[1:5]]:
            del _compiled[old]  # the file was rewritten (a rebuilt export): drop the old compilation
        return _compiled.setdefault(key, compiled)


class OpenVINONetwork(nn.Module):
    """An OpenVINO IR (from :func:`export_fp32` or :func:`quantize_from_record`) run on the CPU as a torch module:
    ``forward`` takes ``[B, C, D, H, W]`` (a tensor on any device, any float dtype and memory layout; spatial sizes
    the IR accepts, multiples of 16 for the VNet) and returns float32 logits ``[B, classes, D, H, W]`` on the input's
    device. It has no parameters; ``train()``/``eval()``/``.to()`` change nothing it computes.

    The IR is compiled on first use, once per process for each file, thread count and precision (a rewritten file is
    compiled again). Safe to call from several threads at once: each call takes an idle inference request from a pool
    (or makes one); with OpenVINO's latency mode the compiled model runs one request at a time on ``threads`` threads,
    so concurrent calls queue rather than oversubscribe the CPU.

    Args:
        xml_path: the IR's ``.xml`` (its ``.bin`` beside it).
        threads: CPU threads for inference; default ``torch.get_num_threads()`` when first compiled.
        precision: ``"f32"`` (default: fp32 arithmetic wherever the IR is not int8, matching PyTorch fp32),
            ``"bf16"`` (faster on CPUs with native bf16, like PyTorch's bf16 autocast), or ``"auto"`` (OpenVINO's
            choice for the CPU: bf16 where it is native).
        max_batch: windows per inference call; a larger batch is run in chunks (per window one at a time is as
            fast as four in one call, with a quarter of the activation memory: benchmarks/results/openvino_*).

    Raises:
        FileNotFoundError: ``xml_path`` or its ``.bin`` is missing.
        ValueError: an unknown ``precision`` or a ``max_batch`` below 1.
        ImportError: OpenVINO is not installed.
    """

    PRECISIONS = ("f32", "bf16", "auto")

    def __init__(
        self, xml_path: os.PathLike | str, threads: Optional[int] = None, precision: str = "f32", max_batch: int = 1
    ) -> None:
        super().__init__()
        require_openvino()
        self.xml_path = Path(xml_path)
        for path in (self.xml_path, self.xml_path.with_suffix(".bin")):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: OpenVINO IR file not found.")
        if precision not in self.PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(self.PRECISIONS)}; got {precision!r}.")
        if int(max_batch) < 1:
            raise ValueError(f"max_batch must be at least 1; got {max_batch}.")
        self.threads = None if threads is None else int(threads)
        self.precision = precision
        self.max_batch = int(max_batch)
        self._pool_lock = threading.Lock()
        self._idle: List[Any] = []
        self._compiled_model = None

    def extra_repr(self) -> str:
        return f"{self.xml_path}, threads={self.threads}, precision={self.precision}, max_batch={self.max_batch}"

    def compiled_model(self):
        """The compiled model (compiled now if it was not)."""
        with self._pool_lock:
            if self._compiled_model is None:
                threads = self.threads or torch.get_num_threads()
                self._compiled_model = _compile(self.xml_path, threads, self.precision)
            return self._compiled_model

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        compiled = self.compiled_model()
        with self._pool_lock:
            request = self._idle.pop() if self._idle else compiled.create_infer_request()
        try:
            # the output is copied out of the request (share_outputs=False), so the request can serve another call
            result = request.infer({0: batch}, share_inputs=True, share_outputs=False)
            return np.asarray(result[0], dtype=np.float32)
        finally:
            with self._pool_lock:
                self._idle.append(request)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"OpenVINONetwork expects input [B, C, D, H, W], got {list(x.shape)}.")
        device = x.device
        x = x.as_tensor() if hasattr(x, "as_tensor") else x  # a MetaTensor's plain data
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        outputs = [self._infer(array[i : i + self.max_batch]) for i in range(0, array.shape[0], self.max_batch)]
        out = torch.from_numpy(outputs[0] if len(outputs) == 1 else np.concatenate(outputs))
        return out.to(device)

    def __getstate__(self) -> Dict[str, Any]:
        # a compiled model and its requests do not pickle or deep-copy: a copy compiles again on first use
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        for key in ("_pool_lock", "_idle", "_compiled_model"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._pool_lock = threading.Lock()
        self._idle = []
        self._compiled_model = None
