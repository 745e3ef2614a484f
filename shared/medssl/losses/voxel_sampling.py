"""Voxel-embedding helpers shared by the voxel-wise contrasts of CVRL and SimCVD (no paper of their own).

:func:`_check_embeddings` checks a pair of ``[B, D, *spatial]`` embedding maps; :func:`_sample_voxels` takes the
same voxel locations of both, L2-normalised. Used by :mod:`medssl.losses.cvrl` and :mod:`medssl.losses.simcvd`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


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
