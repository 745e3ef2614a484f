"""The supervised segmentation loss of the LA benchmark (Dice + cross-entropy).

After UA-MT's ``train_LA.py`` (Yu et al., "Uncertainty-aware Self-ensembling Model for Semi-supervised 3D Left
Atrium Segmentation", MICCAI 2019); the supervised term of :class:`medssl.losses.CVRLLoss` and
:class:`medssl.losses.SimCVDLoss`.
"""

from __future__ import annotations

from monai.losses import DiceCELoss

__all__ = ["supervised_loss"]


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
