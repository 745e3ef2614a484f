"""The shared backbone of every medssl bundle: the VNet of the semi-supervised LA benchmark.

Milletari, Navab and Ahmadi, "V-Net: Fully Convolutional Neural Networks for Volumetric Medical Image
Segmentation", 3DV 2016 (https://arxiv.org/abs/1606.04797), in the reduced form used by the LA
benchmark since Yu et al., "Uncertainty-aware Self-ensembling Model for Semi-supervised 3D Left
Atrium Segmentation", MICCAI 2019: 16-32-64-128-256 filters, Conv3d 3x3x3 + norm + ReLU blocks of
1, 2, 3, 3, 3 (encoder) and 3, 3, 2, 1 (decoder) convolutions, strided k2 s2 down and transposed k2 s2
up convolutions, additive skips, Dropout3d at the bottleneck and after the last decoder stage.

Every bundle builds the same class, so weights move between bundles by parameter name. The segmentation
``forward`` returns one logits tensor (what MONAI tools and TorchScript expect); the semi- and
self-supervised bundles reach the encoder features, the decoder features and the optional
signed-distance head through :meth:`VNet.encode`, :meth:`VNet.decode` and :meth:`VNet.forward_heads`.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

import torch
from torch import nn

__all__ = [
    "VNet",
    "PCRLNet",
    "BACKBONE_PREFIXES",
    "HeadsForward",
    "PCRLForward",
    "ema_copy",
    "backbone_state",
    "load_pretrained",
]

ENCODER_CONVS = (1, 2, 3, 3, 3)
DECODER_CONVS = (3, 3, 2, 1)

# parameter-name prefixes of the backbone (everything except optional heads); pretrained weights are
# exchanged between bundles on these names
BACKBONE_PREFIXES = ("encoder.", "decoder.", "out_conv.")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels)
    if kind == "group":
        return nn.GroupNorm(num_groups=min(16, channels), num_channels=channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of 'batch', 'instance', 'group', 'none'; got {kind!r}.")


def _conv_stage(n_convs: int, in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i in range(n_convs):
        layers += [
            nn.Conv3d(in_channels if i == 0 else out_channels, out_channels, kernel_size=3, padding=1),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


def _resample(transposed: bool, in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    conv = nn.ConvTranspose3d if transposed else nn.Conv3d
    return nn.Sequential(
        conv(in_channels, out_channels, kernel_size=2, stride=2), _norm(norm, out_channels), nn.ReLU(inplace=True)
    )


class _DownStage(nn.Module):
    """Strided k2 s2 convolution, then a conv stage."""

    def __init__(self, n_convs: int, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.down = _resample(False, in_channels, out_channels, norm)
        self.convs = _conv_stage(n_convs, out_channels, out_channels, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(self.down(x))


class _UpStage(nn.Module):
    """Transposed k2 s2 convolution, additive skip, then a conv stage."""

    def __init__(self, n_convs: int, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.up = _resample(True, in_channels, out_channels, norm)
        self.convs = _conv_stage(n_convs, out_channels, out_channels, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(self.up(x) + skip)


class VNet(nn.Module):
    """The LA-benchmark VNet (see the module docstring for the papers).

    With ``in_channels=1, out_channels=2, n_filters=16, norm="batch"`` it has 9,448,866 parameters, the
    count of the reference implementation.

    Args:
        in_channels: input channels (1 for LGE-MRI).
        out_channels: segmentation classes, background included.
        n_filters: filters of the first stage; stage ``i`` has ``n_filters * 2**i``.
        norm: ``"batch"`` (the benchmark's), ``"instance"``, ``"group"`` or ``"none"``.
        dropout: Dropout3d probability at the bottleneck and before the output convolution
            (0.5 in the benchmark); 0 disables it.
        sdm_head: add a signed-distance-map head (1x1x1 conv + tanh on the last decoder features, one
            channel per foreground class), as used by DTC and SimCVD.
        proj_dim: add a voxel-wise projection head with this many output channels (1x1x1 conv, ReLU,
            1x1x1 conv on the last decoder features), the embedding space of the contrastive losses of CVRL
            and SimCVD; 0 for none.

    Input: ``[B, in_channels, H, W, D]`` with H, W, D divisible by 16. ``forward`` returns logits
    ``[B, out_channels, H, W, D]``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        n_filters: int = 16,
        norm: str = "batch",
        dropout: float = 0.5,
        sdm_head: bool = False,
        proj_dim: int = 0,
    ) -> None:
        super().__init__()
        widths = [n_filters * 2**i for i in range(len(ENCODER_CONVS))]
        self.widths = widths
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.encoder = nn.ModuleList([_conv_stage(ENCODER_CONVS[0], in_channels, widths[0], norm)])
        self.encoder.extend(_DownStage(n, widths[i], widths[i + 1], norm) for i, n in enumerate(ENCODER_CONVS[1:]))
        self.decoder = nn.ModuleList(
            _UpStage(n, widths[-1 - i], widths[-2 - i], norm) for i, n in enumerate(DECODER_CONVS)
        )
        self.dropout = nn.Dropout3d(p=dropout) if dropout > 0 else nn.Identity()
        self.out_conv = nn.Conv3d(widths[0], out_channels, kernel_size=1)
        self.sdm_conv: Optional[nn.Module] = nn.Conv3d(widths[0], out_channels - 1, kernel_size=1) if sdm_head else None
        self.proj_head: Optional[nn.Module] = (
            nn.Sequential(
                nn.Conv3d(widths[0], widths[0], kernel_size=1), nn.ReLU(inplace=True), nn.Conv3d(widths[0], proj_dim, 1)
            )
            if proj_dim > 0
            else None
        )

    def encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Encoder features ``[x1, ..., x5]`` (full resolution to bottleneck); dropout applied to ``x5``."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"VNet expects input [B, {self.in_channels}, H, W, D], got {list(x.shape)}.")
        if x.shape[2] % 16 or x.shape[3] % 16 or x.shape[4] % 16:
            raise ValueError(f"VNet input sides must be divisible by 16, got {list(x.shape[2:])}.")
        features: List[torch.Tensor] = []
        for stage in self.encoder:
            x = stage(x)
            features.append(x)
        features[-1] = self.dropout(x)
        return features

    def decode(self, features: List[torch.Tensor]) -> torch.Tensor:
        """Last decoder features ``[B, n_filters, H, W, D]`` (after dropout), the input of every head."""
        x = features[-1]
        for i, stage in enumerate(self.decoder):
            x = stage(x, features[-2 - i])
        return self.dropout(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_conv(self.decode(self.encode(x)))

    def forward_heads(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One pass for the SSL bundles: ``{"logits", "features" (last decoder), "bottleneck"[, "sdm"][, "proj"]}``.

        ``"proj"`` is the projection head's output, not normalised (the losses normalise where they need to).
        """
        features = self.encode(x)
        decoded = self.decode(features)
        out = {"logits": self.out_conv(decoded), "features": decoded, "bottleneck": features[-1]}
        if self.sdm_conv is not None:
            out["sdm"] = torch.tanh(self.sdm_conv(decoded))
        if self.proj_head is not None:
            out["proj"] = self.proj_head(decoded)
        return out


def load_pretrained(
    network: nn.Module, path: Optional[str], min_matched: int = 1, key: Optional[str] = None
) -> nn.Module:
    """Initialise ``network`` from another bundle's weights, matching tensors by name and shape.

    Logs how many tensors matched, were missing from the file (kept at their initial values), were
    unexpected (in the file, not in the network) or had another shape (skipped). Loads with
    ``weights_only=True``: a weights file can hold tensors only, never code.

    Args:
        network: the network to initialise (changed in place and returned).
        path: a state-dict file (``models/model.pt`` of any medssl bundle) or a resume checkpoint holding
            one under ``key`` (default: ``"model"``, ``"network"`` or ``"state_dict"``); None/"" does nothing.
        min_matched: refuse (``DataError``) a file that matches fewer weight kernels (tensors of two or more
            dimensions: convolution and linear weights), so a wrong file cannot silently leave the network
            untrained; 0 allows anything.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError (a ValueError): the file is unreadable or not a state dict, or fewer than ``min_matched`` tensors
            matched; the bundles' runs repeat it as their last line (see ``medssl.data``).
    """
    if not path:
        return network
    import logging
    import os

    from medssl.data import DataError

    logger = logging.getLogger("medssl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained_ckpt {path!r}: file not found.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, or one holding code: name it
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise DataError(f"pretrained_ckpt {path!r}: not a readable weights file ({reason[:500]}).") from e
    for k in [key] if key else ["model", "network", "state_dict"]:
        if isinstance(state, dict) and isinstance(state.get(k), dict):
            state = state[k]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"pretrained_ckpt {path!r}: expected a state dict of tensors.")
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    own = network.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    reshaped = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    # count kernels (>= 2-D weights) only: scalars such as BatchNorm's num_batches_tracked match any file
    kernels = [k for k, v in own.items() if v.ndim >= 2]
    matched_kernels = [k for k in kernels if k in matched]
    if len(matched_kernels) < min_matched:
        raise DataError(
            f"pretrained_ckpt {path!r} matches {len(matched_kernels)} of the network's {len(kernels)} weight kernels "
            f"(shape mismatches: {reshaped[:5]}, unexpected: {unexpected[:5]}); is it a weights file of this "
            "architecture? Pass min_matched=0 (bundle key --pretrained_min_matched 0) to allow it."
        )
    network.load_state_dict(matched, strict=False)
    logger.info(
        "pretrained_ckpt %s: %d tensors matched, %d missing, %d unexpected, %d with another shape",
        path,
        len(matched),
        len(missing),
        len(unexpected),
        len(reshaped),
    )
    for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", reshaped)):
        if keys:
            logger.info("  %s: %s%s", name, ", ".join(keys[:8]), " ..." if len(keys) > 8 else "")
    return network


class HeadsForward(torch.nn.Module):
    """Adapter whose ``forward`` is ``net.forward_heads``: the student as DDP must wrap it (DDP only syncs
    gradients of passes through the wrapped module's ``forward``), while ``net`` keeps its one-tensor ``forward``
    for inference, TorchScript and MONAI tools."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.net.forward_heads(x)


def ema_copy(network: torch.nn.Module) -> torch.nn.Module:
    """A detached copy of ``network`` for a mean teacher: same weights, no gradients, train mode (as UA-MT)."""
    teacher = copy.deepcopy(network)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.train()


def backbone_state(network: nn.Module) -> Dict[str, torch.Tensor]:
    """The backbone tensors of a VNet (heads dropped; a DDP ``module.`` prefix removed), on the CPU.

    This is what a bundle's ``models/model.pt`` holds, so every bundle's plain VNet loads it strictly.
    """
    if isinstance(network, nn.parallel.DistributedDataParallel):
        network = network.module
    return {k: v.detach().cpu() for k, v in network.state_dict().items() if k.startswith(BACKBONE_PREFIXES)}


class PCRLNet(VNet):
    """The VNet with the heads of PCRL pre-training; its ``forward`` reconstructs the input.

    Zhou et al., "Preservational Learning Improves Self-supervised Medical Image Models by Reconstructing Diverse
    Contexts", ICCV 2021. Being a :class:`VNet`, its state dict holds every backbone tensor under the VNet's own
    names (so ``pretrained_ckpt`` of the other bundles matches all of them), plus the PCRL heads under ``pcrl_*``:

    - ``pcrl_proj``: global average pool of the bottleneck, Linear(C, hidden)-ReLU-Linear(hidden, proj_dim), the
      contrastive embedding (normalised by the loss);
    - ``pcrl_attention``: transformation-conditioned attention, Linear(code_dim, att_hidden)-ReLU-Linear(att_hidden,
      C)-Sigmoid of the 7-d spatial code, multiplied channel-wise into the bottleneck before decoding;
    - ``pcrl_recon``: 1x1x1 convolution from the last decoder features to the image channels (linear: the LA data
      is z-scored, where the official code's sigmoid output suits [0, 1] CT).

    ``forward(x)`` is the reconstruction under the identity transform (code ``[0, 0, 0, 1, 0, 0, 0]``): what
    ``inference.json``, ``verify_net_in_out`` and TorchScript export use. Training calls :meth:`pcrl_forward`.

    Args:
        in_channels, out_channels, n_filters, norm, dropout: as :class:`VNet` (dropout 0 by default: the
            reconstruction needs the whole bottleneck, and the official 3D U-Net has none).
        proj_dim: contrastive embedding size (128).
        hidden: projection hidden size (128).
        code_dim: spatial-transform code size (7: three flip bits, one-hot rot90 k).
        att_hidden: attention hidden size (256).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        n_filters: int = 16,
        norm: str = "batch",
        dropout: float = 0.0,
        proj_dim: int = 128,
        hidden: int = 128,
        code_dim: int = 7,
        att_hidden: int = 256,
    ) -> None:
        super().__init__(in_channels, out_channels, n_filters, norm, dropout)
        c = self.widths[-1]
        self.pcrl_proj = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, proj_dim))
        self.pcrl_attention = nn.Sequential(
            nn.Linear(code_dim, att_hidden), nn.ReLU(inplace=True), nn.Linear(att_hidden, c), nn.Sigmoid()
        )
        self.pcrl_recon = nn.Conv3d(n_filters, in_channels, kernel_size=1)
        identity = torch.zeros(code_dim)
        identity[3] = 1.0  # no flips, rot90 k = 0
        self.register_buffer("identity_code", identity, persistent=False)

    def embed(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """Contrastive embedding ``[B, proj_dim]`` of bottleneck features ``[B, C, h, w, d]`` (not normalised)."""
        return self.pcrl_proj(bottleneck.mean(dim=(2, 3, 4)))

    def attend(self, bottleneck: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """Bottleneck features re-weighted channel-wise by the attention of the spatial codes ``[B, code_dim]``."""
        return bottleneck * self.pcrl_attention(code)[:, :, None, None, None]

    def reconstruct(self, features: List[torch.Tensor]) -> torch.Tensor:
        """Image ``[B, in_channels, H, W, D]`` decoded from encoder features (bottleneck already conditioned)."""
        return self.pcrl_recon(self.decode(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encode(x)
        code = self.identity_code.unsqueeze(0).expand(x.shape[0], -1)
        features[-1] = self.attend(features[-1], code)
        return self.reconstruct(features)

    def pcrl_forward(
        self,
        view1: torch.Tensor,
        mixed_view1: torch.Tensor,
        key_features: List[torch.Tensor],
        mixed_key_features: List[torch.Tensor],
        code1: torch.Tensor,
        code2: torch.Tensor,
        alpha1: float,
        alpha2: float,
    ) -> Dict[str, torch.Tensor]:
        """The student's part of one PCRL iteration (one call, so DDP sees a single forward per backward).

        Given the key encoder's features of view 2 and of the mixed view 2 (computed without gradient by the
        objective), returns the student's embeddings of view 1 and of the mixed view 1 and the four
        reconstructions: plain (view 1 conditioned on ``code1``), hybrid (student and key features mixed by
        ``alpha1``, bottlenecks conditioned on ``code1`` / ``code2``), mixup (mixed view 1, unconditioned) and
        mixed-hybrid (mixed student and key features by ``alpha2``, unconditioned), as in the official code.
        """
        q = self.encode(view1)
        q_bottleneck = self.attend(q[-1], code1)
        k_bottleneck = self.attend(key_features[-1], code2)
        plain = self.reconstruct(q[:-1] + [q_bottleneck])
        hybrid_feats = [alpha1 * a + (1 - alpha1) * b for a, b in zip(q[:-1], key_features[:-1])]
        hybrid = self.reconstruct(hybrid_feats + [alpha1 * q_bottleneck + (1 - alpha1) * k_bottleneck])
        mq = self.encode(mixed_view1)
        mixed = self.reconstruct(mq)
        mixed_hybrid = self.reconstruct([alpha2 * a + (1 - alpha2) * b for a, b in zip(mq, mixed_key_features)])
        return {
            "embedding": self.embed(q[-1]),
            "mixed_embedding": self.embed(mq[-1]),
            "recon": plain,
            "recon_hybrid": hybrid,
            "recon_mixed": mixed,
            "recon_mixed_hybrid": mixed_hybrid,
        }


class PCRLForward(torch.nn.Module):
    """Adapter whose ``forward`` is ``net.pcrl_forward``, for DDP to wrap (see :class:`HeadsForward`)."""

    def __init__(self, net: PCRLNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, *args: Any) -> Dict[str, torch.Tensor]:
        return self.net.pcrl_forward(*args)
