"""SimCVD: the boundary-aware contrast, the pair-wise similarity distillation and the objective.

You et al., "SimCVD: Simple Contrastive Voxel-Wise Representation Distillation for Semi-Supervised Medical Image
Segmentation", IEEE TMI 41(9), 2022 (arXiv:2108.06227).

- :class:`BoundaryAwareContrastLoss`, :class:`PairwiseSimilarityDistillationLoss`: SimCVD's two unsupervised terms.
- :class:`SimCVDLoss`: the objective (for :class:`medssl.engines.SemiSupervisedTrainer`).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from medssl.losses.mean_teacher import sigmoid_rampup, softmax_mse
from medssl.losses.segmentation import supervised_loss
from medssl.losses.voxel_sampling import _check_embeddings, _sample_voxels

__all__ = ["BoundaryAwareContrastLoss", "PairwiseSimilarityDistillationLoss", "SimCVDLoss"]


def _weighted_index(weights: torch.Tensor, num_voxels: int) -> torch.Tensor:
    """``[B, N]`` flat voxel indices drawn without replacement with probability proportional to ``weights [B, V]``."""
    n = min(num_voxels, weights.shape[1])
    return torch.multinomial(weights.float().clamp_min(1e-12), n, replacement=False)


def _per_class_index(weights: torch.Tensor, num_voxels: int) -> torch.Tensor:
    """``[B, N]`` distinct flat voxel indices, an equal share of ``N`` (the first classes take the remainder) drawn
    from each class's weights ``[B, K, V]`` in turn, without replacement and never a voxel drawn before. With one
    class it is :func:`_weighted_index` (the same draw from the same random state)."""
    k, v = weights.shape[1], weights.shape[2]
    n = min(int(num_voxels), v)
    if k == 1:
        return _weighted_index(weights[:, 0], n)
    shares = [n // k + (1 if c < n % k else 0) for c in range(k)]
    taken = torch.zeros(weights.shape[0], v, dtype=torch.bool, device=weights.device)
    parts = []
    for c, share in enumerate(shares):
        if share == 0:
            continue
        w = weights[:, c].float().clamp_min(1e-12).masked_fill(taken, 0.0)
        idx = torch.multinomial(w, share, replacement=False)
        taken.scatter_(1, idx, True)
        parts.append(idx)
    return torch.cat(parts, dim=1)


class BoundaryAwareContrastLoss(nn.Module):
    """SimCVD's contrast between two dropout views of one unlabeled volume, focused on the object boundary.

    You et al., "SimCVD: Simple Contrastive Voxel-Wise Representation Distillation for Semi-Supervised Medical
    Image Segmentation", IEEE TMI 41(9), 2022 (arXiv:2108.06227). The two views are two student passes over the
    same volume that differ only by their dropout masks (no other augmentation); the embeddings of a voxel in the
    two views are a positive pair, the other sampled voxels negatives (symmetric InfoNCE). Boundary awareness:
    voxels are sampled with probability ``exp(-|sdm| / band)`` from the student's (detached) signed-distance
    prediction, so most anchors lie near the predicted boundary, where the segmentation is uncertain. The
    sampling rule and its ``band`` are our reading of "boundary-aware" (SimCVD has no public code). With several
    foreground classes (one SDM channel each) every class's boundary band gets an equal share of the ``N`` anchors,
    so a small structure is not crowded out by a large one; the anchors are distinct voxels.

    Forward args:
        view1, view2: ``[B, D, *spatial]`` embeddings of the two views (both differentiated).
        sdm: ``[B, K, *spatial]`` predicted signed distance maps in [-1, 1], one per foreground class (only used
            for sampling).
        index: optional ``[B, N]`` flat voxel indices (then ``sdm`` is ignored).
    """

    def __init__(self, temperature: float = 0.1, num_voxels: int = 256, band: float = 0.1) -> None:
        super().__init__()
        self.temperature, self.num_voxels, self.band = float(temperature), int(num_voxels), float(band)

    def forward(
        self,
        view1: torch.Tensor,
        view2: torch.Tensor,
        sdm: Optional[torch.Tensor] = None,
        index: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        _check_embeddings(view1, view2, "BoundaryAwareContrastLoss")
        if index is None:
            if sdm is None:
                raise ValueError("BoundaryAwareContrastLoss: give the signed distance map (or the voxel index).")
            if sdm.ndim != view1.ndim or sdm.shape[0] != view1.shape[0] or sdm.shape[2:] != view1.shape[2:]:
                raise ValueError(
                    f"BoundaryAwareContrastLoss: sdm must be [B, K, *spatial] of the views' batch and spatial size "
                    f"{[view1.shape[0], 'K', *view1.shape[2:]]}, got {list(sdm.shape)}."
                )
            weights = torch.exp(-sdm.detach().abs().flatten(2) / self.band)  # [B, K, V]: one row per class
            index = _per_class_index(weights, self.num_voxels)
        a, b = _sample_voxels(view1, view2, self.num_voxels, index)
        target = torch.arange(a.shape[1], device=a.device).expand(a.shape[0], -1).flatten()
        logits = torch.bmm(a, b.transpose(1, 2)) / self.temperature
        return 0.5 * (
            F.cross_entropy(logits.flatten(0, 1), target)
            + F.cross_entropy(logits.transpose(1, 2).flatten(0, 1), target)
        )


class PairwiseSimilarityDistillationLoss(nn.Module):
    """SimCVD's structural distillation: the student reproduces the teacher's pair-wise voxel similarities.

    You et al., SimCVD, IEEE TMI 2022: for ``N`` sampled voxels the teacher and the student each give a similarity
    matrix of their unit embeddings, ``S = e e^T / t``; each row becomes a distribution by softmax, and the loss is
    ``KL(P_teacher || P_student)`` averaged over rows (and batch). It transfers the teacher's relational structure,
    not its individual embeddings.

    Forward args:
        student, teacher: ``[B, D, *spatial]`` embeddings (the teacher side is not differentiated).
        index: optional ``[B, N]`` flat voxel indices (random when None).
    """

    def __init__(self, temperature: float = 0.5, num_voxels: int = 256) -> None:
        super().__init__()
        self.temperature, self.num_voxels = float(temperature), int(num_voxels)

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, index: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        _check_embeddings(student, teacher, "PairwiseSimilarityDistillationLoss")
        s, t = _sample_voxels(student, teacher.detach(), self.num_voxels, index)
        log_p_s = torch.log_softmax(torch.bmm(s, s.transpose(1, 2)) / self.temperature, dim=-1)
        log_p_t = torch.log_softmax(torch.bmm(t, t.transpose(1, 2)) / self.temperature, dim=-1)
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()


class SimCVDLoss(nn.Module):
    """The SimCVD objective on the two-stream semi-supervised engine.

    You et al., "SimCVD: Simple Contrastive Voxel-Wise Representation Distillation for Semi-Supervised Medical
    Image Segmentation", IEEE TMI 2022. A mean teacher on the VNet with a segmentation head and a signed-distance
    head (``VNet(sdm_head=True, proj_dim=dim)``). Per iteration:

    - one student pass on ``[image_l, image_u, image_u]``: Dropout3d draws its mask per sample, so the two copies
      of each unlabeled volume are the two views, differing only by their dropout masks; a teacher pass on
      ``image_u``;
    - ``sup = seg + sdm_weight * mse(sdm_pred, sdm_label)`` on the labeled half (seg: the LA supervised loss; the
      label's normalised SDM, one channel per foreground class, comes from
      :class:`medssl.transforms.SignedDistanceMapd` with the bundle's ``num_classes`` as ``sdm``);
    - ``loss = sup + w(it) * (contrast_weight * contrast + distill_weight * distill
      + consistency_weight * mse)`` with ``contrast`` the boundary-aware contrast of the two student views,
      ``distill`` the pair-wise similarity distillation from teacher to student (view 1), ``mse`` the softmax
      mean-teacher consistency, ``w`` the sigmoid ramp-up.

    Args:
        dim: projection-head output size.
        sdm_weight: weight of the SDM regression (0.3 in DTC, on which SimCVD builds).
        contrast_weight, distill_weight, consistency_weight: unsupervised term weights.
        contrast_temperature, distill_temperature: softmax temperatures.
        num_voxels: voxels sampled per volume.
        band: width of the boundary band that the contrast samples from (SDM units).
        rampup_iterations: sigmoid ramp-up length.
    """

    def __init__(
        self,
        dim: int = 64,
        sdm_weight: float = 0.3,
        contrast_weight: float = 0.1,
        distill_weight: float = 0.1,
        consistency_weight: float = 0.1,
        contrast_temperature: float = 0.1,
        distill_temperature: float = 0.5,
        num_voxels: int = 256,
        band: float = 0.1,
        rampup_iterations: float = 6000,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.supervised = supervised_loss()
        self.contrast = BoundaryAwareContrastLoss(contrast_temperature, num_voxels, band)
        self.distill = PairwiseSimilarityDistillationLoss(distill_temperature, num_voxels)
        self.weights = dict(
            sdm=sdm_weight, contrast=contrast_weight, distill=distill_weight, consistency=consistency_weight
        )
        self.rampup_iterations = float(rampup_iterations)

    def forward(
        self,
        student: Callable,
        teacher: Optional[Callable],
        image_l: torch.Tensor,
        label_l: torch.Tensor,
        image_u: torch.Tensor,
        iteration: int,
        sdm: Optional[torch.Tensor] = None,
        **extras: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        if teacher is None:
            raise ValueError("SimCVDLoss needs a teacher (the mean teacher).")
        if sdm is None:
            raise ValueError("SimCVDLoss needs the labeled batch's 'sdm' (add medssl.transforms.SignedDistanceMapd).")
        n_l, n_u = image_l.shape[0], image_u.shape[0]
        # one pass over [labeled, unlabeled, unlabeled again]: Dropout3d draws a mask per sample, so the two copies
        # of each unlabeled volume are the two dropout views (one pass also keeps DDP to one forward per backward)
        out = student(torch.cat([image_l, image_u, image_u]))
        with torch.no_grad():
            tea = teacher(image_u)
        if "sdm" not in out or "proj" not in out:
            raise ValueError("SimCVDLoss needs a VNet with sdm_head=True and proj_dim > 0.")
        logits_l = out["logits"][:n_l]
        seg = self.supervised(logits_l, label_l)
        if sdm.shape != out["sdm"][:n_l].shape:
            raise ValueError(
                f"SimCVDLoss: the labeled batch's 'sdm' is {list(sdm.shape)}, the SDM head gives "
                f"{list(out['sdm'][:n_l].shape)} (one channel per foreground class: give SignedDistanceMapd the "
                "bundle's num_classes)."
            )
        sdm_loss = F.mse_loss(out["sdm"][:n_l].float(), sdm.float())
        emb1, emb2 = out["proj"][n_l : n_l + n_u].float(), out["proj"][n_l + n_u :].float()
        contrast = self.contrast(emb1, emb2, sdm=out["sdm"][n_l : n_l + n_u])
        distill = self.distill(emb1, tea["proj"].float())
        consistency = softmax_mse(out["logits"][n_l : n_l + n_u].float(), tea["logits"].float())
        w = sigmoid_rampup(iteration, self.rampup_iterations)
        wt = self.weights
        loss = (
            seg
            + wt["sdm"] * sdm_loss
            + w * (wt["contrast"] * contrast + wt["distill"] * distill + wt["consistency"] * consistency)
        )
        return {
            "loss": loss,
            "pred": logits_l,
            "loss_seg": seg,
            "loss_sdm": sdm_loss,
            "loss_contrast": contrast,
            "loss_distill": distill,
            "loss_consistency": consistency,
            "weight_rampup": torch.tensor(w),
        }
