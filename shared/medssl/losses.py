"""Losses and objectives of the medssl methods.

Building blocks (each a small module or function with its math pinned by tests on tiny tensors):

- :func:`sigmoid_rampup`, :func:`softmax_mse`: the mean-teacher weight schedule and consistency of UA-MT.
- :class:`VoxelToVoxelContrastLoss`, :class:`VoxelToVolumeContrastLoss`: CVRL's local and global contrast.
- :class:`ElasticInteractionLoss`: the elastic-interaction active-contour energy CVRL uses as geometric regulariser.
- :class:`BoundaryAwareContrastLoss`, :class:`PairwiseSimilarityDistillationLoss`: SimCVD's two unsupervised terms.

Objectives (what :class:`medssl.engines.SemiSupervisedTrainer` calls each iteration):

- :class:`CVRLLoss`: CVRL (You et al., MICCAI 2022).
- :class:`SimCVDLoss`: SimCVD (You et al., IEEE TMI 2022), with :class:`BoundaryAwareContrastLoss` and
  :class:`PairwiseSimilarityDistillationLoss`.
- :class:`PCRLLoss`: PCRL pre-training (Zhou et al., ICCV 2021), with :class:`QueueInfoNCELoss`
  (for :class:`medssl.engines.SelfSupervisedTrainer`).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

__all__ = [
    "sigmoid_rampup",
    "softmax_mse",
    "supervised_loss",
    "VoxelToVoxelContrastLoss",
    "VoxelToVolumeContrastLoss",
    "ElasticInteractionLoss",
    "CVRLLoss",
    "BoundaryAwareContrastLoss",
    "PairwiseSimilarityDistillationLoss",
    "SimCVDLoss",
    "QueueInfoNCELoss",
    "PCRLLoss",
]


def sigmoid_rampup(current: float, length: float) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = clip(current / length, 0, 1)``; 1 when ``length`` is 0.

    Laine and Aila, "Temporal Ensembling for Semi-Supervised Learning", ICLR 2017; the consistency ramp-up of
    Mean Teacher and UA-MT (which ramps over 40 x 150 = 6000 iterations, the whole training).
    """
    if length <= 0:
        return 1.0
    t = min(max(float(current) / float(length), 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def softmax_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the two softmax maps (the mean-teacher consistency of UA-MT / DTC).

    Args:
        student_logits, teacher_logits: ``[B, C, H, W, D]`` logits; the teacher side is not differentiated.

    Raises:
        ValueError: the shapes differ.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"softmax_mse: shapes differ: {list(student_logits.shape)} vs {list(teacher_logits.shape)}.")
    return ((student_logits.softmax(1) - teacher_logits.detach().softmax(1)) ** 2).mean()


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


def _check_embeddings(query: torch.Tensor, key: torch.Tensor, name: str) -> None:
    if query.shape != key.shape or query.ndim < 3:
        raise ValueError(
            f"{name}: query and key must be [B, D, *spatial] of one shape, got {list(query.shape)} and "
            f"{list(key.shape)}."
        )


def _sample_voxels(query: torch.Tensor, key: torch.Tensor, num_voxels: int, index: Optional[torch.Tensor]) -> tuple:
    """The same voxel locations of both maps: ``[B, N, D]`` each, L2-normalised over D."""
    b, d = query.shape[:2]
    q, k = query.reshape(b, d, -1), key.reshape(b, d, -1)
    if index is None:
        n = min(num_voxels, q.shape[-1])
        index = torch.stack([torch.randperm(q.shape[-1], device=q.device)[:n] for _ in range(b)])
    idx = index.to(q.device).unsqueeze(1).expand(b, d, index.shape[-1])
    q = F.normalize(q.gather(2, idx).transpose(1, 2), dim=-1)
    k = F.normalize(k.gather(2, idx).transpose(1, 2), dim=-1)
    return q, k


class VoxelToVoxelContrastLoss(nn.Module):
    """Local (voxel-to-voxel) contrast of CVRL: InfoNCE between the voxel embeddings of two views.

    You et al., "Momentum Contrastive Voxel-wise Representation Learning for Semi-supervised Volumetric Medical
    Image Segmentation", MICCAI 2022 (arXiv:2105.07059). ``N`` voxel locations are sampled per volume; the anchor is
    the student's embedding ``q_i`` at location ``i``, its positive the teacher's ``k_i`` at the same location of
    the other view, the negatives the teacher's embeddings at the other sampled locations of that volume:
    ``L = -1/(BN) sum_b sum_i log( exp(q_i.k_i / t) / sum_j exp(q_i.k_j / t) )`` with unit vectors.
    The paper gives no code; the sampling count and temperature are our choices (see the bundle docs).

    Args:
        temperature: ``t``.
        num_voxels: ``N`` locations sampled per volume.

    Forward args:
        query: ``[B, D, *spatial]`` student embeddings (differentiated).
        key: ``[B, D, *spatial]`` teacher embeddings of the other view, spatially aligned (not differentiated).
        index: optional ``[B, N]`` flat voxel indices (random when None).
    """

    def __init__(self, temperature: float = 0.1, num_voxels: int = 256) -> None:
        super().__init__()
        self.temperature, self.num_voxels = float(temperature), int(num_voxels)

    def forward(self, query: torch.Tensor, key: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_embeddings(query, key, "VoxelToVoxelContrastLoss")
        q, k = _sample_voxels(query, key.detach(), self.num_voxels, index)
        logits = torch.bmm(q, k.transpose(1, 2)) / self.temperature  # [B, N, N]
        target = torch.arange(q.shape[1], device=q.device).expand(q.shape[0], -1)
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())


class VoxelToVolumeContrastLoss(nn.Module):
    """Global (voxel-to-volume) contrast of CVRL: voxels against pooled volume embeddings, with a queue.

    You et al. (arXiv:2105.07059): each sampled student voxel embedding ``q_i`` of volume ``b`` is pulled to the
    teacher's pooled embedding of its own volume ``g_b = normalise(mean_voxels k_b)`` and pushed from the pooled
    embeddings of the other volumes of the batch and of a first-in-first-out queue of earlier volumes (MoCo, He et
    al. CVPR 2020): ``L = -mean log( exp(q_i.g_b / t) / (exp(q_i.g_b / t) + sum_n exp(q_i.n / t)) )``. The
    current batch's ``g`` enter the queue after the loss. The queue is a buffer, so it is saved for resume.

    Args:
        dim: embedding size ``D``.
        temperature: ``t``.
        num_voxels: anchors sampled per volume.
        queue_size: pooled embeddings kept (0 for in-batch negatives only).
    """

    def __init__(self, dim: int, temperature: float = 0.1, num_voxels: int = 256, queue_size: int = 256) -> None:
        super().__init__()
        self.temperature, self.num_voxels = float(temperature), int(num_voxels)
        self.register_buffer("queue", F.normalize(torch.randn(int(queue_size), int(dim)), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, query: torch.Tensor, key: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_embeddings(query, key, "VoxelToVolumeContrastLoss")
        b = query.shape[0]
        key = key.detach()
        g = F.normalize(key.flatten(2).mean(-1), dim=1)  # [B, D]
        q, _ = _sample_voxels(query, key, self.num_voxels, index)  # [B, N, D]
        sim = torch.einsum("bnd,cd->bnc", q, g)  # every anchor against every volume of the batch
        pos = sim.diagonal(dim1=0, dim2=2).transpose(0, 1).unsqueeze(-1)  # [B, N, 1]
        not_own = ~torch.eye(b, dtype=torch.bool, device=q.device).unsqueeze(1)
        others = sim.masked_select(not_own).view(b, q.shape[1], b - 1)  # [B, N, B-1]
        parts = [pos, others]
        if self.queue.shape[0]:
            parts.append(torch.einsum("bnd,kd->bnk", q, self.queue.clone().to(q.dtype)))
        logits = torch.cat(parts, dim=-1) / self.temperature
        loss = F.cross_entropy(
            logits.flatten(0, 1), torch.zeros(logits.shape[0] * logits.shape[1], dtype=torch.long, device=q.device)
        )
        if self.training:
            self._enqueue(g)
        return loss

    @torch.no_grad()
    def _enqueue(self, g: torch.Tensor) -> None:
        size = self.queue.shape[0]
        if not size:
            return
        ptr = int(self.queue_ptr)
        idx = (torch.arange(g.shape[0], device=g.device) + ptr) % size
        self.queue[idx] = g.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + g.shape[0]) % size)


class ElasticInteractionLoss(nn.Module):
    """Elastic-interaction active-contour energy between a probability map and its target.

    Lan, Xiang, Zhang, "An Elastic Interaction-Based Loss Function for Medical Image Segmentation", MICCAI 2020;
    the geometric regulariser of CVRL. The predicted and target boundaries interact like dislocation lines with a
    long-range ``1/r`` kernel; for ``d = p - y`` the energy ``(1/8pi) int int grad d(x) . grad d(x') / |x - x'|``
    is, in Fourier space, ``sum_k |k| |d^(k)|^2`` (the ``H^(1/2)`` seminorm of ``d``), which is what we compute:
    ``E = 1/N^2 sum_k |k| |FFT(d)(k)|^2`` with ``k`` in radians per voxel and ``N`` voxels, averaged over batch and
    channels. Unlike a voxel-wise loss it sees how far a wrong boundary is from the right one (the long-range term).
    The 3D form with the ``|k|`` weight of the 2D kernel is our choice (CVRL gives no code).

    Forward args:
        prob: ``[B, C, *spatial]`` predicted foreground probabilities.
        target: ``[B, C, *spatial]`` target in [0, 1] (binary label or a teacher's probabilities).
    """

    def forward(self, prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if prob.shape != target.shape:
            raise ValueError(f"ElasticInteractionLoss: shapes differ: {list(prob.shape)} vs {list(target.shape)}.")
        dims = tuple(range(2, prob.ndim))
        spectrum = torch.fft.fftn((prob - target).float(), dim=dims)
        freqs = torch.meshgrid(
            *[torch.fft.fftfreq(prob.shape[d], device=prob.device) * 2 * math.pi for d in dims], indexing="ij"
        )
        k = torch.sqrt(sum(f**2 for f in freqs))
        n = math.prod(prob.shape[d] for d in dims)
        return (k * spectrum.abs() ** 2).sum(dim=dims).mean() / n**2


class CVRLLoss(nn.Module):
    """The CVRL objective on the two-stream semi-supervised engine.

    You et al., "Momentum Contrastive Voxel-wise Representation Learning for Semi-supervised Volumetric Medical
    Image Segmentation", MICCAI 2022 (arXiv:2105.07059): a mean teacher on the VNet; a supervised loss on the
    labeled batch; voxel-to-volume (global) and voxel-to-voxel (local) contrast between the student's and the
    momentum teacher's projection-head embeddings of two views of the unlabeled batch; an elastic-interaction
    active-contour term on the predicted probability map as geometric regulariser. Per iteration:

    - student on ``[image_l, image_u]`` (one pass, so BatchNorm sees both halves, as UA-MT);
      teacher on ``image_u + noise`` (noise ``clip(N(0, noise_std), -noise_clip, noise_clip)``, UA-MT's view);
    - ``loss = sup + contour_weight * contour + w(it) * (consistency_weight * mse + global_weight * global
      + local_weight * local)`` with ``sup`` the LA supervised loss, ``contour`` the elastic energy between the
      student's foreground probability and the label (labeled batch), ``mse`` the softmax mean-teacher consistency
      on the unlabeled batch, and ``w`` the sigmoid ramp-up over ``rampup_iterations``.

    The student passed in returns the VNet's heads dict (``medssl.networks.HeadsForward``), the teacher callable
    likewise (``teacher.forward_heads``); both need ``proj`` (``VNet(proj_dim=dim)``).

    Args:
        dim: projection-head output size.
        consistency_weight, global_weight, local_weight, contour_weight: term weights.
        temperature: of both contrasts.
        num_voxels: voxels sampled per volume for the contrasts.
        queue_size: pooled volume embeddings kept by the global contrast.
        rampup_iterations: length of the sigmoid ramp-up of the unsupervised weights.
        noise_std, noise_clip: the teacher view's Gaussian noise.
    """

    def __init__(
        self,
        dim: int = 64,
        consistency_weight: float = 0.1,
        global_weight: float = 0.1,
        local_weight: float = 0.1,
        contour_weight: float = 0.1,
        temperature: float = 0.1,
        num_voxels: int = 256,
        queue_size: int = 256,
        rampup_iterations: float = 6000,
        noise_std: float = 0.1,
        noise_clip: float = 0.2,
    ) -> None:
        super().__init__()
        self.supervised = supervised_loss()
        self.global_contrast = VoxelToVolumeContrastLoss(dim, temperature, num_voxels, queue_size)
        self.local_contrast = VoxelToVoxelContrastLoss(temperature, num_voxels)
        self.contour = ElasticInteractionLoss()
        self.weights = dict(
            consistency=consistency_weight, global_=global_weight, local=local_weight, contour=contour_weight
        )
        self.rampup_iterations, self.noise_std, self.noise_clip = float(rampup_iterations), noise_std, noise_clip

    def forward(
        self,
        student: Callable,
        teacher: Optional[Callable],
        image_l: torch.Tensor,
        label_l: torch.Tensor,
        image_u: torch.Tensor,
        iteration: int,
        **extras: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        if teacher is None:
            raise ValueError("CVRLLoss needs a teacher (the momentum encoder).")
        n_l = image_l.shape[0]
        out = student(torch.cat([image_l, image_u]))
        noise = torch.clamp(torch.randn_like(image_u) * self.noise_std, -self.noise_clip, self.noise_clip)
        with torch.no_grad():
            tea = teacher(image_u + noise)
        logits_l, logits_u = out["logits"][:n_l], out["logits"][n_l:]
        sup = self.supervised(logits_l, label_l)
        contour = self.contour(logits_l.float().softmax(1)[:, 1:], (label_l == 1).float())
        consistency = softmax_mse(logits_u.float(), tea["logits"].float())
        query, key = out["proj"][n_l:].float(), tea["proj"].float()
        global_ = self.global_contrast(query, key)
        local = self.local_contrast(query, key)
        w = sigmoid_rampup(iteration, self.rampup_iterations)
        wt = self.weights
        loss = (
            sup
            + wt["contour"] * contour
            + w * (wt["consistency"] * consistency + wt["global_"] * global_ + wt["local"] * local)
        )
        return {
            "loss": loss,
            "pred": logits_l,
            "loss_sup": sup,
            "loss_contour": contour,
            "loss_consistency": consistency,
            "loss_global": global_,
            "loss_local": local,
            "weight_rampup": torch.tensor(w),
        }


def _weighted_index(weights: torch.Tensor, num_voxels: int) -> torch.Tensor:
    """``[B, N]`` flat voxel indices drawn without replacement with probability proportional to ``weights [B, V]``."""
    n = min(num_voxels, weights.shape[1])
    return torch.multinomial(weights.float().clamp_min(1e-12), n, replacement=False)


class BoundaryAwareContrastLoss(nn.Module):
    """SimCVD's contrast between two dropout views of one unlabeled volume, focused on the object boundary.

    You et al., "SimCVD: Simple Contrastive Voxel-Wise Representation Distillation for Semi-Supervised Medical
    Image Segmentation", IEEE TMI 41(9), 2022 (arXiv:2108.06227). The two views are two student passes over the
    same volume that differ only by their dropout masks (no other augmentation); the embeddings of a voxel in the
    two views are a positive pair, the other sampled voxels negatives (symmetric InfoNCE). Boundary awareness:
    voxels are sampled with probability ``exp(-|sdm| / band)`` from the student's (detached) signed-distance
    prediction, so most anchors lie near the predicted boundary, where the segmentation is uncertain. The
    sampling rule and its ``band`` are our reading of "boundary-aware" (SimCVD has no public code).

    Forward args:
        view1, view2: ``[B, D, *spatial]`` embeddings of the two views (both differentiated).
        sdm: ``[B, 1, *spatial]`` predicted signed distance map in [-1, 1] (only used for sampling).
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
            weights = torch.exp(-sdm.detach().abs().flatten(1) / self.band)  # [B, V] (one SDM channel)
            index = _weighted_index(weights, self.num_voxels)
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
      label's normalised SDM comes from :class:`medssl.transforms.SignedDistanceMapd` as ``sdm``);
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


class QueueInfoNCELoss(nn.Module):
    """InfoNCE against a queue of keys (MoCo; He et al., CVPR 2020), the contrastive term of our PCRL.

    For unit embeddings ``q`` (query) and ``k`` (its positive key), ``logits = [q.k, q.n_1, ..., q.n_K] / t`` over the
    ``K`` queued keys ``n`` and ``L = CE(logits, 0)`` averaged over the batch; the keys then enter the queue
    (first in, first out). The official PCRL code uses the NCE criterion of instance discrimination (Wu et al.,
    CVPR 2018) on ``exp(logits)`` normalised by a constant estimated once; InfoNCE is the standard replacement
    (MoCo v1/v2) without that constant.

    Args:
        dim: embedding size.
        queue_size: number of queued keys (16384 in PCRL).
        temperature: ``t`` (0.2 in PCRL's runs).
    """

    def __init__(self, dim: int = 128, queue_size: int = 16384, temperature: float = 0.2) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.register_buffer("queue", F.normalize(torch.randn(int(queue_size), int(dim)), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        if query.shape != key.shape or query.ndim != 2 or query.shape[1] != self.queue.shape[1]:
            raise ValueError(
                f"QueueInfoNCELoss: query and key must be [B, {self.queue.shape[1]}], got "
                f"{list(query.shape)} and {list(key.shape)}."
            )
        q, k = F.normalize(query, dim=1), F.normalize(key.detach(), dim=1)
        pos = (q * k).sum(1, keepdim=True)
        neg = q @ self.queue.clone().to(q.dtype).T
        logits = torch.cat([pos, neg], 1) / self.temperature
        loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
        if self.training:
            self._enqueue(k)
        return loss

    @torch.no_grad()
    def _enqueue(self, k: torch.Tensor) -> None:
        size, ptr = self.queue.shape[0], int(self.queue_ptr)
        idx = (torch.arange(k.shape[0], device=k.device) + ptr) % size
        self.queue[idx] = k.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + k.shape[0]) % size)


def _split_bn_encode(encoder: nn.Module, x: torch.Tensor, splits: int, generator: Optional[torch.Generator] = None):
    """Key-encoder features with BatchNorm statistics of shuffled sub-batches (a one-device shuffle-BN).

    MoCo's shuffle-BN keeps a query and its key from sharing BatchNorm statistics (which leaks the pairing) by
    shuffling the keys across GPUs; on one device the same holds if the keys are encoded in ``splits`` groups of a
    random permutation, each group with its own statistics. Returns the encoder features in the original order.
    """
    b = x.shape[0]
    splits = max(1, min(int(splits), b))
    perm = torch.randperm(b, generator=generator, device="cpu").to(x.device)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(b, device=x.device)
    chunks = [encoder.encode(part) for part in x[perm].chunk(splits)]
    return [torch.cat(level)[inverse] for level in zip(*chunks)]


class PCRLLoss(nn.Module):
    """The PCRL objective (Zhou et al., ICCV 2021), after the official ``pcrl_3d.py``, on the self-supervised engine.

    The batch carries two augmented views (``view1``, ``view2``: crops with IoU > 0.25, each flipped / affine /
    blurred, locally shuffled, in- or out-painted), their un-augmented crops (``gt1``, ``gt2``), the spatially
    transformed originals (``target1``, ``target2``) and their 7-d codes (``target1_code``, ``target2_code``).
    Per iteration, with ``alpha1, alpha2, lam = max(u, 1 - u)``, ``u ~ U(0, 1)`` (Beta(1, 1)):

    - key (momentum) encoder on ``view2`` and on the mixed ``view2`` (input mixup ``lam * x + (1 - lam) * x[perm]``,
      the same ``lam`` and ``perm`` for both views), without gradient, BatchNorm on shuffled sub-batches;
    - student (:meth:`medssl.networks.PCRLNet.pcrl_forward`) on ``view1`` and the mixed ``view1``;
    - ``contrast = (c(q, k) + c(q_mix, k_mix) + c(q_mix, mixup(k))) / 3`` with :class:`QueueInfoNCELoss`;
    - ``recon = mean(mse(plain, target1), mse(mixed, mixup(gt1)), mse(hybrid, alpha1 * target1 + (1 - alpha1) *
      target2), mse(mixed_hybrid, alpha2 * mixup(gt1) + (1 - alpha2) * mixup(gt2)))``;
    - ``loss = contrast + recon`` (1:1).

    Args:
        dim: embedding size; queue_size, temperature: of the contrast.
        bn_splits: key-encoder BatchNorm groups (the one-device shuffle-BN guard); 1 disables it.
    """

    def __init__(self, dim: int = 128, queue_size: int = 16384, temperature: float = 0.2, bn_splits: int = 2) -> None:
        super().__init__()
        self.contrast = QueueInfoNCELoss(dim, queue_size, temperature)
        self.bn_splits = int(bn_splits)

    @staticmethod
    def _mix(x: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
        return lam * x + (1 - lam) * x[perm]

    def forward(
        self, student: Callable, teacher: Optional[nn.Module], batch: Dict[str, torch.Tensor], iteration: int
    ) -> Dict[str, torch.Tensor]:
        if teacher is None:
            raise ValueError("PCRLLoss needs the momentum (key) encoder as teacher.")
        missing = [
            k
            for k in ("view1", "view2", "gt1", "gt2", "target1", "target2", "target1_code", "target2_code")
            if k not in batch
        ]
        if missing:
            raise ValueError(
                f"PCRLLoss: the batch lacks {missing}; it has {sorted(batch)} (see the pcrl_pretrain " "transforms)."
            )
        view1, view2, gt1, gt2 = batch["view1"], batch["view2"], batch["gt1"], batch["gt2"]
        alpha1, alpha2, lam = (max(u, 1 - u) for u in torch.rand(3).tolist())
        perm = torch.randperm(view1.shape[0], device="cpu").to(view1.device)
        mixed_view1, mixed_view2 = self._mix(view1, lam, perm), self._mix(view2, lam, perm)
        with torch.no_grad():
            key_feats = _split_bn_encode(teacher, view2, self.bn_splits)
            mixed_key_feats = _split_bn_encode(teacher, mixed_view2, self.bn_splits)
            key, mixed_key = teacher.embed(key_feats[-1]), teacher.embed(mixed_key_feats[-1])
        out = student(
            view1, mixed_view1, key_feats, mixed_key_feats, batch["target1_code"], batch["target2_code"], alpha1, alpha2
        )
        contrast = (
            self.contrast(out["embedding"], key)
            + self.contrast(out["mixed_embedding"], mixed_key)
            + self.contrast(out["mixed_embedding"], self._mix(key, lam, perm))
        ) / 3
        t1, t2 = batch["target1"], batch["target2"]
        mixed_gt1, mixed_gt2 = self._mix(gt1, lam, perm), self._mix(gt2, lam, perm)
        recon_terms = {
            "loss_recon": F.mse_loss(out["recon"].float(), t1.float()),
            "loss_recon_mixed": F.mse_loss(out["recon_mixed"].float(), mixed_gt1.float()),
            "loss_recon_hybrid": F.mse_loss(out["recon_hybrid"].float(), (alpha1 * t1 + (1 - alpha1) * t2).float()),
            "loss_recon_mixed_hybrid": F.mse_loss(
                out["recon_mixed_hybrid"].float(), (alpha2 * mixed_gt1 + (1 - alpha2) * mixed_gt2).float()
            ),
        }
        recon = sum(recon_terms.values()) / 4
        return {"loss": contrast + recon, "loss_contrast": contrast, "loss_reconstruction": recon, **recon_terms}
