"""The mean-teacher weight schedule and consistency of UA-MT, shared by the CVRL and SimCVD objectives.

- :func:`sigmoid_rampup`: the consistency ramp-up (Laine and Aila, "Temporal Ensembling for Semi-Supervised
  Learning", ICLR 2017), as Mean Teacher and UA-MT use it.
- :func:`softmax_mse`: the softmax mean-teacher consistency of UA-MT (Yu et al., MICCAI 2019) / DTC.
"""

from __future__ import annotations

import math

import torch

__all__ = ["sigmoid_rampup", "softmax_mse"]


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
