"""PCRL pre-training: the queue InfoNCE, the one-device shuffle-BN and the objective.

Zhou et al., "Preservational Learning Improves Self-supervised Medical Image Models by Reconstructing Diverse
Contexts", ICCV 2021 (official code: Luchixiang/PCRL, ``pcrl_3d.py``).

- :class:`QueueInfoNCELoss`: InfoNCE against a queue of keys (MoCo; He et al., CVPR 2020).
- :class:`PCRLLoss`: the objective (for :class:`medssl.engines.SelfSupervisedTrainer`).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QueueInfoNCELoss", "PCRLLoss"]


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
