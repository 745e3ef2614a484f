"""Weights files: half-precision copies for releases, split copies for size-limited transfers, and the final weights
of a training that was stopped before it completed.

A released ``models/model.pt`` stores floating-point tensors in float16 (half the bytes; every bundle loads it into
its float32 network, ``load_state_dict`` casts); integer buffers (BatchNorm's ``num_batches_tracked``) stay as they
are. Rounding a VNet's weights to float16 moves its logits by about 1e-3 of their range; the release tests check
that the label maps agree with the float32 weights'.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from medssl.data import atomic_path

__all__ = [
    "half_state",
    "save_split_state",
    "load_split_state",
    "finish_from_checkpoint",
    "load_state",
    "eager_network",
]


def load_state(path: os.PathLike | str) -> Dict[str, torch.Tensor]:
    """A state dict of tensors from ``path`` (``weights_only=True``; a resume checkpoint's ``"model"`` entry too).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds no state dict of tensors.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: weights file not found.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a weights file that loads with weights_only=True ({e}).") from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (a bundle's models/model.pt).")
    return state


def half_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Floating-point tensors as contiguous float16 CPU tensors, the others unchanged."""
    return {
        k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in state.items()
    }


def save_split_state(path: os.PathLike | str, prefix: os.PathLike | str, max_bytes: int = 15 << 20) -> List[Path]:
    """Write the weights at ``path`` in float16 as ``prefix.0.pt``, ``prefix.1.pt``, ... each under ``max_bytes``
    of tensor data (for transfers that limit a file's size). :func:`load_split_state` joins them."""
    state = half_state(load_state(path))
    parts: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if parts[-1] and size + nbytes > max_bytes:
            parts.append({})
            size = 0
        parts[-1][k] = v
        size += nbytes
    files = []
    for i, part in enumerate(parts):
        target = Path(f"{prefix}.{i}.pt")
        with atomic_path(target) as tmp:
            torch.save(part, tmp)
        files.append(target)
    return files


def load_split_state(prefix: os.PathLike | str) -> Dict[str, torch.Tensor]:
    """The state dict written by :func:`save_split_state` (float16 tensors; load into a network to get float32).

    Raises:
        FileNotFoundError: ``prefix.0.pt`` does not exist.
    """
    state: Dict[str, torch.Tensor] = {}
    i = 0
    while Path(f"{prefix}.{i}.pt").is_file():
        state.update(load_state(f"{prefix}.{i}.pt"))
        i += 1
    if not i:
        raise FileNotFoundError(f"{prefix}.0.pt: no split weights file.")
    return state


def finish_from_checkpoint(models_dir: os.PathLike | str) -> str:
    """Make sure ``models_dir/model.pt`` exists: a completed training wrote it; for one stopped early the network of
    its newest resume checkpoint is written there. Returns a line saying which (for logs).

    Raises:
        FileNotFoundError: neither ``model.pt`` nor a ``checkpoint_<iteration>.pt`` is in ``models_dir``.
    """
    from medssl.handlers import latest_checkpoint

    models_dir = Path(models_dir)
    final = models_dir / "model.pt"
    if final.is_file():
        return f"{final}: the training completed"
    newest = latest_checkpoint(str(models_dir))
    if newest is None:
        raise FileNotFoundError(f"{models_dir}: no model.pt and no checkpoint_<iteration>.pt to take weights from.")
    name = Path(newest).name
    with atomic_path(final) as tmp:
        torch.save(load_state(newest), tmp)
    return f"{final}: the training stopped early; weights of {name} (iteration {name[len('checkpoint_'):-3]})"


def eager_network(root: Path, spec: Optional[Callable[[], nn.Module]] = None) -> nn.Module:
    """The bundle's eager network in eval mode with ``models/model.pt`` loaded strictly (``spec`` builds it; default:
    ``network_spec`` of the bundle's ``inference.json``, or ``network_def`` in bundles made before it)."""
    if spec is None:
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(root / "configs" / "inference.json"))
        parser["bundle_root"] = str(root)
        if "network_spec" in parser:
            spec = parser.get_parsed_content("network_spec")
        else:  # a bundle released before network_spec: its network_def is the eager network
            net_def = parser.get_parsed_content("network_def")
            spec = lambda: net_def  # noqa: E731
    net = spec()
    net.load_state_dict(load_state(root / "models" / "model.pt"))
    return net.eval()
