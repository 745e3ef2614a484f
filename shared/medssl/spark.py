"""SparK masked image modelling on the shared VNet encoder.

Tian, Jiang, Zhao, Wang, Ma, Yuan, "Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked
Modeling", ICLR 2023 (official code: keyu-tian/SparK, ``pretrain/``); for medical images, Wolf et al., "Self-Supervised
Pre-Training with Contrastive and Masked Autoencoder Methods for Dealing with Small Datasets in Deep Learning for
Medical Imaging", Scientific Reports 2023 (arXiv 2308.06534). Our implementation, for 3D and the VNet:

- The mask is drawn on the encoder's coarsest grid (the VNet downsamples by 16: one mask element per 16^3-voxel cell,
  a 7x7x5 grid for a 112x112x80 patch), ``mask_ratio`` of the cells hidden (0.6), and repeated up to every scale
  (:func:`draw_mask`, :func:`upsample_mask`).
- Sparse convolution is emulated as in the official code: the input is masked before the first convolution, every
  encoder convolution runs densely and its output is multiplied by its scale's mask, and BatchNorm statistics are
  computed over the visible voxels only (:func:`sparse_batch_norm`), so hidden zeros never reach a visible feature or
  a statistic.
- Densify at each scale: a sparse BatchNorm, a learnable mask token in the hidden positions, a projection conv (1x1x1
  at the coarsest scale, 3x3x3 elsewhere); a light decoder of the VNet decoder's shape (transposed-conv up, additive
  densified skip, conv stage) and a 1x1x1 conv to the image channels.
- Loss (:func:`medssl.losses.spark_loss`; objective :class:`medssl.losses.SparKLoss`): MSE on the hidden cells
  only, against the input normalised per cell (the cell's mean and unbiased variance, ``(x - mean) / sqrt(var +
  1e-6)``), averaged over hidden cells.

The encoder is the VNet's own ``encoder`` module list under the VNet's names, so ``models/model.pt`` initialises the
encoder of every other bundle through ``pretrained_ckpt``. The SparK decoder, densify layers and mask tokens are kept
under ``spark_*`` names, which the segmentation bundles report as unexpected and do not load: as in the paper, only
the encoder is transferred (the decoder learnt to fill mask tokens, not to segment).

``SparKNet`` compiles with ``torch.jit.script`` (the bundle's ``models/model.ts``, the zoo verifier's export): the
encoder stages are the VNet's own layers regrouped in sparse stages (:class:`_SparseConvs`, :class:`_SparseDownStage`)
that run them in order with their scale's mask, so the forward needs no module traversal, no module-level constant and
no module passed to a function; the operations and their order, and so the numbers, are unchanged.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from medssl.networks import DECODER_CONVS, VNet, _DownStage, _UpStage

__all__ = [
    "SparKNet",
    "SparKForward",
    "draw_mask",
    "upsample_mask",
    "sparse_batch_norm",
    "cell_stats",
    "cells_of",
]

STRIDE = 16  # the VNet's total downsampling: one mask element per 16^3 voxels


def draw_mask(
    batch: int,
    grid: List[int],
    mask_ratio: float,
    device: Optional[torch.device] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """A random visibility mask ``[batch, 1, *grid]`` (True = visible) hiding ``round(L * mask_ratio)`` of the
    ``L`` cells of each sample, the rest visible (at least one visible cell). ``grid`` is any sequence of ints."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
    shape = [batch, 1]
    for g in grid:
        shape.append(g)
    cells = int(torch.tensor(shape[2:]).prod())
    keep = max(1, cells - int(round(cells * mask_ratio)))  # round half to even in Python and TorchScript alike
    order = torch.rand(batch, cells, generator=generator).argsort(dim=1)
    visible = torch.zeros(batch, cells, dtype=torch.bool)
    visible.scatter_(1, order[:, :keep], True)
    visible = visible.view(shape)
    return visible.to(device) if device is not None else visible


def upsample_mask(visible: torch.Tensor, factor: int) -> torch.Tensor:
    """Repeat each mask element ``factor`` times along the three spatial axes."""
    for dim in (2, 3, 4):
        visible = visible.repeat_interleave(factor, dim=dim)
    return visible


def _bn_input(x: torch.Tensor, visible: torch.Tensor, sparse: bool) -> torch.Tensor:
    """What a BatchNorm3d sees in :func:`sparse_batch_norm`: the visible voxels as rows ``[N_visible, C, 1, 1, 1]``
    when ``sparse``, else ``x``."""
    if not sparse:
        return x
    return x.movedim(1, -1)[visible[:, 0]][:, :, None, None, None]


def _bn_output(y: torch.Tensor, x: torch.Tensor, visible: torch.Tensor, sparse: bool) -> torch.Tensor:
    """The BatchNorm3d's output ``y`` on :func:`_bn_input` back on ``x``'s grid, hidden voxels 0."""
    if not sparse:
        return y * visible
    normed = y[:, :, 0, 0, 0]
    out = x.new_zeros(x.movedim(1, -1).shape, dtype=normed.dtype)
    out[visible[:, 0]] = normed
    return out.movedim(-1, 1)


def sparse_batch_norm(bn: nn.BatchNorm3d, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """``bn`` applied as if only the visible voxels existed: in training, batch statistics (and the running
    statistics' update) over the visible voxels of the whole batch only; hidden voxels come out as 0.

    In evaluation with running statistics it is a per-voxel affine map, so it runs densely and is then masked.

    Args:
        bn: a BatchNorm3d (its weights, running statistics and momentum are used).
        x: features ``[B, C, h, w, d]``.
        visible: ``[B, 1, h, w, d]`` boolean mask.
    """
    sparse = bn.training or not bn.track_running_stats
    return _bn_output(bn(_bn_input(x, visible, sparse)), x, visible, sparse)


def cells_of(x: torch.Tensor, cell: int = STRIDE) -> torch.Tensor:
    """``x`` ``[B, C, H, W, D]`` as ``[B, H/cell, W/cell, D/cell, C * cell^3]`` (fp32): one row per cell."""
    b, c, h, w, d = x.shape
    if h % cell != 0 or w % cell != 0 or d % cell != 0:
        raise ValueError(f"spatial size {[h, w, d]} must be divisible by the cell size {cell}.")
    cells = x.reshape(b, c, h // cell, cell, w // cell, cell, d // cell, cell)
    return cells.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, h // cell, w // cell, d // cell, -1).float()


def cell_stats(x: torch.Tensor, cell: int = STRIDE, eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-cell mean and ``sqrt(var + eps)`` of ``x`` ``[B, C, H, W, D]`` over the ``cell^3`` voxels and all channels
    of each cell (unbiased variance, as the official code), each ``[B, 1, H/cell, W/cell, D/cell]``."""
    cells = cells_of(x, cell)
    mean, var = cells.mean(dim=-1), cells.var(dim=-1)
    return mean.unsqueeze(1), (var + eps).sqrt().unsqueeze(1)


class _SparseConvs(nn.ModuleList):
    """A VNet conv sequence (its own layers, under its own names) run on the visible voxels of one scale: each
    convolution's output is masked, each BatchNorm3d is :func:`sparse_batch_norm`, other layers run as they are."""

    def forward(self, h: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:  # told apart by attributes: TorchScript's isinstance misses a module type's variants
            if hasattr(layer, "running_mean"):  # BatchNorm3d
                sparse = layer.training or not layer.track_running_stats
                h = _bn_output(layer(_bn_input(h, visible, sparse)), h, visible, sparse)
            elif hasattr(layer, "padding_mode"):  # Conv3d
                h = layer(h) * visible
            else:
                h = layer(h)
        return h


class _SparseDownStage(nn.Module):
    """A VNet down stage (``down``, ``convs``: its own layers and names) run on the visible voxels of its scale."""

    def __init__(self, stage: _DownStage) -> None:
        super().__init__()
        self.down = _SparseConvs(stage.down)
        self.convs = _SparseConvs(stage.convs)

    def forward(self, h: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        return self.convs(self.down(h, visible), visible)


def _sparse_stage(stage: nn.Module) -> nn.Module:
    return _SparseDownStage(stage) if isinstance(stage, _DownStage) else _SparseConvs(stage)


class SparKNet(nn.Module):
    """The VNet encoder with SparK's sparse forward, densify layers and light decoder (see the module docstring).

    ``masked_forward(x, visible)`` is the training pass: the decoder's prediction ``[B, C, H, W, D]`` in per-cell
    normalised units. ``forward(x)`` is the bundle's reconstruction for inference and evaluation: ``x`` with a fixed
    pseudo-random ``mask_ratio`` of its cells hidden (the same pattern at every call, seeded by ``eval_seed``) and
    refilled by the prediction, de-normalised with the hidden cells' true mean and deviation (the official code's
    visualisation); visible cells are ``x`` itself.

    Args:
        in_channels, n_filters: as :class:`medssl.networks.VNet` (the encoder is built by it, under its names).
        norm: ``"batch"`` (sparse BatchNorm over visible voxels) or ``"none"``.
        mask_ratio: the fraction of coarsest-grid cells hidden (0.6).
        eval_seed: the seed of ``forward``'s mask.

    Input sides divisible by 16.
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_filters: int = 16,
        norm: str = "batch",
        mask_ratio: float = 0.6,
        eval_seed: int = 0,
    ) -> None:
        super().__init__()
        if norm not in ("batch", "none"):
            raise ValueError(f"SparKNet supports norm 'batch' (sparse BatchNorm) or 'none', got {norm!r}.")
        vnet = VNet(in_channels, 2, n_filters, norm, dropout=0.0)
        # the VNet's encoder layers (same objects, initialisation and names), regrouped to run sparsely
        self.encoder = nn.ModuleList(_sparse_stage(stage) for stage in vnet.encoder)
        # STRIDE as an attribute: compiled code (TorchScript) cannot read a module-level int
        self.widths, self.in_channels, self.cell_size = vnet.widths, in_channels, STRIDE
        self.mask_ratio, self.eval_seed = float(mask_ratio), int(eval_seed)
        last = len(self.widths) - 1
        self.spark_densify_norm = nn.ModuleList(
            nn.BatchNorm3d(w) if norm == "batch" else nn.Identity() for w in self.widths
        )
        self.spark_mask_token = nn.ParameterList(nn.Parameter(torch.zeros(1, w, 1, 1, 1)) for w in self.widths)
        for token in self.spark_mask_token:
            nn.init.trunc_normal_(token, std=0.02, a=-0.02, b=0.02)
        self.spark_densify_proj = nn.ModuleList(
            nn.Conv3d(w, w, kernel_size=1 if i == last else 3, padding=0 if i == last else 1)
            for i, w in enumerate(self.widths)
        )
        self.spark_decoder = nn.ModuleList(
            _UpStage(n, self.widths[-1 - i], self.widths[-2 - i], norm) for i, n in enumerate(DECODER_CONVS)
        )
        self.spark_recon = nn.Conv3d(self.widths[0], in_channels, kernel_size=1)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"SparKNet expects input [B, {self.in_channels}, H, W, D], got {list(x.shape)}.")
        if x.shape[2] % self.cell_size != 0 or x.shape[3] % self.cell_size != 0 or x.shape[4] % self.cell_size != 0:
            raise ValueError(f"SparKNet input sides must be divisible by {self.cell_size}, got {list(x.shape[2:])}.")

    def sparse_encode(self, x: torch.Tensor, visible: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Encoder features at the five scales computed on the visible cells only, and the five scale masks."""
        self._check(x)
        masks = [upsample_mask(visible, self.cell_size >> s) for s in range(len(self.widths))]
        h = x * masks[0]
        features: List[torch.Tensor] = []
        for s, stage in enumerate(self.encoder):  # stage s works at scale s throughout (its down conv included)
            h = stage(h, masks[s])
            features.append(h)
        return features, masks

    def densify(self, features: List[torch.Tensor], masks: List[torch.Tensor]) -> List[torch.Tensor]:
        """Per scale: sparse norm, mask token in the hidden positions, projection conv."""
        dense: List[torch.Tensor] = []
        layers = zip(self.spark_densify_norm, self.spark_mask_token, self.spark_densify_proj)
        for i, (norm, token, proj) in enumerate(layers):
            f, m = features[i], masks[i]
            if hasattr(norm, "running_mean"):  # BatchNorm3d (norm "batch"), else Identity
                sparse = norm.training or not norm.track_running_stats
                f = _bn_output(norm(_bn_input(f, m, sparse)), f, m, sparse)
            f = torch.where(m, f, token.to(f.dtype))
            dense.append(proj(f))
        return dense

    def masked_forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """The prediction ``[B, C, H, W, D]`` (per-cell normalised units) of ``x`` seen through ``visible``."""
        dense = self.densify(*self.sparse_encode(x, visible))
        h = dense[-1]
        for i, stage in enumerate(self.spark_decoder):
            h = stage(h, dense[-2 - i])
        return self.spark_recon(h)

    def eval_mask(self, x: torch.Tensor) -> torch.Tensor:
        """The fixed mask of :meth:`forward` for an input of ``x``'s shape."""
        grid = [s // self.cell_size for s in x.shape[2:]]
        gen = torch.Generator().manual_seed(self.eval_seed)
        return draw_mask(x.shape[0], grid, self.mask_ratio, x.device, generator=gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        visible = self.eval_mask(x)
        pred = self.masked_forward(x, visible).float()
        mean, std = cell_stats(x, self.cell_size)
        refilled = pred * upsample_mask(std, self.cell_size) + upsample_mask(mean, self.cell_size)
        return torch.where(upsample_mask(visible, self.cell_size), x.float(), refilled)


class SparKForward(nn.Module):
    """Adapter whose ``forward`` is ``net.masked_forward``, for DDP to wrap (as ``medssl.networks.HeadsForward``)."""

    def __init__(self, net: SparKNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        return self.net.masked_forward(x, visible)
