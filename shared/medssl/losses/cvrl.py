"""CVRL: the local and global voxel-wise contrasts and the objective.

You et al., "Momentum Contrastive Voxel-wise Representation Learning for Semi-supervised Volumetric Medical Image
Segmentation", MICCAI 2022 (arXiv:2105.07059).

- :class:`VoxelToVoxelContrastLoss`, :class:`VoxelToVolumeContrastLoss`: CVRL's local and global contrast.
- :class:`CVRLLoss`: the objective (for :class:`medssl.engines.SemiSupervisedTrainer`), with the supervised loss
  (:mod:`medssl.losses.segmentation`), the mean-teacher consistency (:mod:`medssl.losses.mean_teacher`) and the
  elastic-interaction regulariser (:mod:`medssl.losses.elastic`).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from medssl.losses.elastic import ElasticInteractionLoss
from medssl.losses.mean_teacher import sigmoid_rampup, softmax_mse
from medssl.losses.segmentation import foreground_one_hot, supervised_loss
from medssl.losses.voxel_sampling import _check_embeddings, _sample_voxels

__all__ = ["VoxelToVoxelContrastLoss", "VoxelToVolumeContrastLoss", "CVRLLoss"]


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
      student's probability of each foreground class and that class's one-hot label (labeled batch; averaged over
      the classes, so with one foreground class it is the energy of the foreground), ``mse`` the softmax
      mean-teacher consistency on the unlabeled batch, and ``w`` the sigmoid ramp-up over ``rampup_iterations``.
      The contrasts sample voxels uniformly over the whole volume, whatever their class (CVRL's rule: the unlabeled
      batch has no classes to sample by).

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
        contour_target = foreground_one_hot(label_l, logits_l.shape[1])  # checks the label's values first
        sup = self.supervised(logits_l, label_l)
        contour = self.contour(logits_l.float().softmax(1)[:, 1:], contour_target)
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
