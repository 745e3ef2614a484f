"""Mixed precision and memory layout on any device: bf16 autocast and channels-last 3D convolutions on CPUs.

Every bundle's ``amp`` key means "mixed precision where this device has it" (default on):

- CUDA: fp16 autocast with gradient scaling (MONAI's AMP path, as before);
- a CPU with native bf16 (x86 ``avx512_bf16`` or ``amx_bf16``, aarch64 ``bf16``): bf16 autocast, no scaling (bf16
  has fp32's exponent range);
- any other CPU: fp32 (bf16 there is emulated and slower).

``--amp false`` always gives fp32. :func:`resolve_precision` makes that choice and logs it once per process with the
reason. What runs in bf16 is PyTorch's CPU autocast list, which for the VNet means the convolutions and transposed
convolutions (and the projection heads' linear layers); :class:`MixedPrecision` runs only the network's forward
under autocast and hands back fp32 outputs, so losses, softmax, metrics and sliding-window aggregation are
computed in fp32. Parameters, their gradients, optimizer state and the mean teachers' EMA stay fp32 (autocast
casts copies of the weights for each convolution), and BatchNorm keeps fp32 parameters and running statistics
(PyTorch's CPU batch norm takes the bf16 activations with fp32 statistics).

A oneDNN defect is worked around: in PyTorch 2.13's CPU build, the bf16 weight gradient of a 3x3x3 convolution
whose input has a depth (first spatial size) of 2 reads uninitialised memory (measured here: NaN or silently wrong
gradients, e.g. the VNet bottleneck at a 32^3 patch). :class:`MixedPrecision` runs such convolutions in fp32 while
gradients are being recorded (:func:`guard_bf16_convolutions`); their forward pass and every other layer keep bf16.

``channels_last`` (default on CPU): the network's weights and its inputs in the ``channels_last_3d`` layout, in
which oneDNN's 3D convolutions skip their layout reorders. Measured on this project's 2-core AVX512-BF16 machine
(VNet forward + DiceCE + backward + SGD step, batch 4): 64x64x32 fp32 0.63 s, fp32 channels-last 0.38 s, bf16
0.28 s, bf16 channels-last 0.26 s; 112x112x80 fp32 5.21 s, fp32 channels-last 3.76 s, bf16 2.08 s, bf16
channels-last 1.77 s. The layout changes no value beyond rounding and nothing on disk (weights load into either).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn as nn

from medssl.data import as_bool

__all__ = [
    "PRECISIONS",
    "cpu_bf16_support",
    "onednn_isa_cap",
    "resolve_precision",
    "autocast",
    "prepare_network",
    "guard_bf16_convolutions",
    "MixedPrecision",
    "precision_proxy",
]

logger = logging.getLogger("medssl")

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# the network methods a training objective calls (VNet, HeadsForward, PCRLNet); each runs under autocast
FORWARD_METHODS = ("forward", "forward_heads", "encode", "decode", "embed")
_logged: set = set()


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features"):  # x86 / aarch64
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# oneDNN instruction-set caps (ONEDNN_MAX_CPU_ISA) below its first bf16 level, AVX512_CORE_BF16
_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")


def onednn_isa_cap() -> Optional[str]:
    """The instruction-set cap set for oneDNN (``ONEDNN_MAX_CPU_ISA``, or the older ``DNNL_MAX_CPU_ISA``), if any.
    PyTorch's and OpenVINO's oneDNN both honour it; a cap below AVX512_CORE_BF16 makes bf16 emulated."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = os.environ.get(name, "").strip().upper()
        if value:
            return value
    return None


def cpu_bf16_support() -> Tuple[bool, str]:
    """Whether this CPU computes bf16 natively (and oneDNN, which runs the convolutions, is built in and not capped
    below bf16 by ``ONEDNN_MAX_CPU_ISA``), with why."""
    if not torch.backends.mkldnn.is_available():
        return False, "PyTorch is built without oneDNN"
    cap = onednn_isa_cap()
    if cap in _ISAS_WITHOUT_BF16:
        return False, f"oneDNN is capped at {cap} (ONEDNN_MAX_CPU_ISA), below its bf16 instructions"
    flags = _cpu_flags()
    native = sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    if native:
        return True, f"the CPU has {'/'.join(native)}"
    return False, f"the CPU ({platform.machine() or 'unknown'}) has no native bf16 (avx512_bf16, amx_bf16 or bf16)"


def resolve_precision(amp: Any, device: Any) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"`` for the ``amp`` switch on ``device`` (see the module docstring).

    Logs the choice and its reason once per process and choice. ``amp`` is parsed strictly (``"false"`` is false).

    Raises:
        ValueError: ``amp`` is not a boolean.
    """
    device = torch.device(device)
    if not as_bool(amp, "amp"):
        precision, why = "fp32", "amp is off"
    elif device.type == "cuda":
        precision, why = "fp16", "CUDA autocast with gradient scaling"
    elif device.type == "cpu":
        native, why = cpu_bf16_support()
        precision = "bf16" if native else "fp32"
        why = f"{why}; bf16 autocast for convolutions, fp32 for losses and weights" if native else why
    else:
        precision, why = "fp32", f"no mixed precision on {device.type}"
    message = (
        f"Precision: {precision} on {device.type} ({why}){'; --amp false for fp32' if precision != 'fp32' else ''}."
    )
    if message not in _logged:
        _logged.add(message)
        logger.info(message)
    return precision


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    return precision


def autocast(device_type: str, precision: str):
    """``torch.autocast`` for ``precision`` on ``device_type`` (a null context for fp32)."""
    if _check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=_DTYPES[precision])


def _memory_format(channels_last: Any) -> torch.memory_format:
    return torch.channels_last_3d if as_bool(channels_last, "channels_last") else torch.contiguous_format


def prepare_network(network: nn.Module, device: Any, channels_last: Any = False) -> nn.Module:
    """``network`` moved to ``device``, its 5D weights in the ``channels_last_3d`` layout if asked (in place)."""
    return network.to(device=torch.device(device), memory_format=_memory_format(channels_last))


def _fp32_pre_hook(module: nn.Module, args: tuple) -> Optional[tuple]:
    x = args[0] if args else None
    if (
        isinstance(x, torch.Tensor)
        and x.ndim == 5
        and x.shape[2] == 2
        and x.device.type == "cpu"
        and torch.is_grad_enabled()
        and torch.is_autocast_enabled("cpu")
    ):
        off = torch.autocast("cpu", enabled=False)
        off.__enter__()
        module._medssl_autocast_off = off
        return (x.float(), *args[1:])
    return None


def _fp32_post_hook(module: nn.Module, args: tuple, output: Any) -> None:
    off = module.__dict__.pop("_medssl_autocast_off", None)
    if off is not None:
        off.__exit__(None, None, None)


def guard_bf16_convolutions(network: Any) -> None:
    """Run every 3x3x3 convolution of ``network`` in fp32 when, training under CPU autocast, its input has depth 2:
    oneDNN's bf16 weight gradient is wrong there (see the module docstring). Idempotent; changes no weights."""
    modules = network.modules() if isinstance(network, nn.Module) else ()
    for m in modules:
        if isinstance(m, nn.Conv3d) and m.kernel_size[0] > 2 and not getattr(m, "_medssl_bf16_guard", False):
            m.register_forward_pre_hook(_fp32_pre_hook)
            m.register_forward_hook(_fp32_post_hook, always_call=True)
            m._medssl_bf16_guard = True


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, _map_tensors(v, fn)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _device_type(args: Any) -> str:
    found = []
    _map_tensors(args, lambda t: found.append(t.device.type) or t)
    return found[0] if found else "cpu"


def _run(fn: Callable, precision: str, channels_last: bool, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with 5D inputs in ``channels_last_3d`` (if asked), under autocast for ``precision``;
    floating outputs come back fp32 and contiguous (what the fp32 code downstream expects)."""
    if channels_last:

        def to_layout(t: torch.Tensor) -> torch.Tensor:
            return t.contiguous(memory_format=torch.channels_last_3d) if t.ndim == 5 else t

        args, kwargs = _map_tensors(args, to_layout), _map_tensors(kwargs, to_layout)
    with autocast(_device_type((args, kwargs)), precision):
        out = fn(*args, **kwargs)
    if precision == "fp32" and not channels_last:
        return out

    def to_fp32(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        return t.to(dtype=torch.float32, memory_format=torch.contiguous_format)

    return _map_tensors(out, to_fp32)


class MixedPrecision(nn.Module):
    """A network whose forward runs in ``precision`` (and channels-last layout) and returns fp32 tensors.

    Use it where a MONAI engine calls the network (the trainer's ``network``, ``prob_network`` of evaluation and
    inference); keep handlers (checkpoints, EMA) on the wrapped network, whose state dict is unchanged.

    Args:
        network: the module to run.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see :func:`resolve_precision`).
        channels_last: put 5D inputs in the ``channels_last_3d`` layout (use with :func:`prepare_network`).

    Raises:
        ValueError: an unknown ``precision``, a non-boolean ``channels_last``.
    """

    def __init__(self, network: nn.Module, precision: str = "fp32", channels_last: Any = False) -> None:
        super().__init__()
        self.network = network
        self.precision = _check_precision(precision)
        self.channels_last = as_bool(channels_last, "channels_last")
        if self.precision == "bf16":
            guard_bf16_convolutions(network)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return _run(self.network, self.precision, self.channels_last, *args, **kwargs)


class _PrecisionProxy:
    """Stands for a network (or a bound forward method) inside a training objective: calls to it and to its
    :data:`FORWARD_METHODS` run as :class:`MixedPrecision` does; every other attribute is the network's own."""

    def __init__(self, target: Any, precision: str, channels_last: bool) -> None:
        self._target, self._precision, self._channels_last = target, precision, channels_last
        if precision == "bf16":
            guard_bf16_convolutions(getattr(target, "__self__", target))  # a module, or a bound method's module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _run(self._target, self._precision, self._channels_last, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if name in FORWARD_METHODS:
            return functools.partial(_run, attr, self._precision, self._channels_last)
        return attr


def precision_proxy(target: Optional[Any], precision: str = "fp32", channels_last: Any = False) -> Optional[Any]:
    """``target`` (a network or a callable) made to run in ``precision``; itself when there is nothing to change."""
    channels_last = as_bool(channels_last, "channels_last")
    if target is None or (_check_precision(precision) == "fp32" and not channels_last):
        return target
    return _PrecisionProxy(target, precision, channels_last)
