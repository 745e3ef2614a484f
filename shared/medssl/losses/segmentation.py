"""The supervised segmentation loss of the LA benchmark (Dice + cross-entropy).

After UA-MT's ``train_LA.py`` (Yu et al., "Uncertainty-aware Self-ensembling Model for Semi-supervised 3D Left
Atrium Segmentation", MICCAI 2019); the supervised term of :class:`medssl.losses.CVRLLoss` and
:class:`medssl.losses.SimCVDLoss`.
"""

from __future__ import annotations

from monai.losses import DiceCELoss

import torch
import torch.nn.functional as F

__all__ = ["supervised_loss", "foreground_one_hot"]


def supervised_loss() -> DiceCELoss:
    """The LA benchmark's supervised loss: ``0.5 * (cross-entropy + soft Dice of the foreground)``, squared
    denominators, smooth 1e-5, over the whole batch (UA-MT ``train_LA.py``); labels ``[B, 1, ...]`` of class ids."""
    return DiceCELoss(
        include_background=False,
        to_onehot_y=True,
        softmax=True,
        squared_pred=True,
        batch=True,
        smooth_nr=1e-5,
        smooth_dr=1e-5,
        lambda_dice=0.5,
        lambda_ce=0.5,
    )


def foreground_one_hot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[B, num_classes - 1, *spatial]`` float one-hot of the foreground classes 1..num_classes-1 of a class-id
    label ``[B, 1, *spatial]`` (with two classes: ``label == 1``).

    Raises:
        ValueError: the label is not one channel of class ids, or holds values outside 0..num_classes-1.
    """
    if label.ndim < 3 or label.shape[1] != 1:
        raise ValueError(f"expected a class-id label [B, 1, *spatial], got {list(label.shape)}.")
    ids = label[:, 0].round().long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= int(num_classes)):
        found = sorted(int(v) for v in torch.unique(ids))
        raise ValueError(f"label values {found} are outside the {num_classes} classes 0..{int(num_classes) - 1}.")
    return F.one_hot(ids, int(num_classes)).movedim(-1, 1)[:, 1:].float()
