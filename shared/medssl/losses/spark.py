"""SparK's reconstruction loss and its pre-training objective (Tian et al., ICLR 2023; official code keyu-tian/SparK,
``pretrain/``): MSE against the input normalised per 16^3 cell, on the hidden cells only. The network, the mask and
the sparse BatchNorm are in :mod:`medssl.spark`."""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from medssl.spark import STRIDE, cells_of, draw_mask

__all__ = ["spark_loss", "SparKLoss"]


def spark_loss(
    pred: torch.Tensor, image: torch.Tensor, visible: torch.Tensor, cell: int = STRIDE, eps: float = 1e-6
) -> torch.Tensor:
    """SparK's reconstruction loss: mean squared error between ``pred`` and the per-cell normalised ``image``,
    averaged over the voxels of each cell, then over the hidden cells only (visible cells count for nothing).

    Args:
        pred: the decoder's output ``[B, C, H, W, D]`` (in per-cell normalised units).
        image: the unmasked input ``[B, C, H, W, D]``.
        visible: ``[B, 1, H/cell, W/cell, D/cell]`` boolean mask (True = visible).
    """
    cells = cells_of(image, cell)  # one row per cell: the target normalised in the cell's own statistics
    target = (cells - cells.mean(dim=-1, keepdim=True)) / (cells.var(dim=-1, keepdim=True) + eps).sqrt()
    per_cell = ((cells_of(pred, cell) - target) ** 2).mean(dim=-1)
    hidden = (~visible[:, 0]).float()
    return (per_cell * hidden).sum() / (hidden.sum() + 1e-8)


class SparKLoss(nn.Module):
    """The SparK objective for :class:`medssl.engines.SelfSupervisedTrainer`: draws a mask per sample (torch's global
    generator, seeded by the bundle), runs the student's masked forward on ``batch[image_key]`` and returns
    ``{"loss", "loss_masked_mse"}`` (:func:`spark_loss`).

    Args:
        mask_ratio: fraction of the 16^3 cells hidden (0.6).
        image_key: the batch entry holding the images.
    """

    def __init__(self, mask_ratio: float = 0.6, image_key: str = "image") -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}.")
        self.mask_ratio, self.image_key = float(mask_ratio), image_key

    def forward(self, student, teacher, batch: Dict[str, torch.Tensor], iteration: int) -> Dict[str, torch.Tensor]:
        if self.image_key not in batch:
            raise KeyError(f"SparKLoss: the batch has no {self.image_key!r}; keys: {sorted(batch)}.")
        image = batch[self.image_key]
        grid = [s // STRIDE for s in image.shape[2:]]
        visible = draw_mask(image.shape[0], grid, self.mask_ratio, image.device)
        loss = spark_loss(student(image, visible), image, visible)
        return {"loss": loss, "loss_masked_mse": loss.detach()}
