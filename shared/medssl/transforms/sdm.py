"""Normalised signed distance maps of labels, the regression target of SimCVD's signed-distance head.

The form of DTC (Luo et al., "Semi-supervised Medical Image Segmentation through Dual-task Consistency", AAAI 2021)
used by SimCVD (You et al., IEEE TMI 2022): :func:`signed_distance_map` and its dictionary transform
:class:`SignedDistanceMapd`.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Optional

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage

__all__ = ["signed_distance_map", "SignedDistanceMapd"]


def signed_distance_map(mask: np.ndarray) -> np.ndarray:
    """Normalised signed distance map of a binary mask: negative inside, positive outside, 0 on the boundary.

    The form of DTC (Luo et al., "Semi-supervised Medical Image Segmentation through Dual-task Consistency",
    AAAI 2021) used by SimCVD: with ``d_in`` the Euclidean distance of a foreground voxel to the background and
    ``d_out`` that of a background voxel to the foreground,
    ``sdm = (d_out - min d_out) / (max d_out - min d_out) - (d_in - min d_in) / (max d_in - min d_in)``, in [-1, 1],
    then 0 on the inner boundary (foreground voxels with a face-neighbour in the background; the array edge is not
    a boundary). An empty mask gives all zeros (DTC's choice); a full mask gives -1 everywhere (no boundary in view;
    DTC divides by zero there).

    Args:
        mask: binary array, any number of spatial dims (no channel).
    """
    pos = np.asarray(mask) > 0
    if not pos.any():
        return np.zeros(pos.shape, np.float32)
    neg = ~pos
    if not neg.any():  # no boundary in view: everything is deep inside
        return -np.ones(pos.shape, np.float32)
    d_in = ndimage.distance_transform_edt(pos)
    d_out = ndimage.distance_transform_edt(neg)

    def _unit(d: np.ndarray) -> np.ndarray:
        lo, hi = d.min(), d.max()
        return (d - lo) / (hi - lo) if hi > lo else np.zeros_like(d)

    sdm = _unit(d_out) - _unit(d_in)
    boundary = pos & ~ndimage.binary_erosion(pos, ndimage.generate_binary_structure(pos.ndim, 1), border_value=1)
    sdm[boundary] = 0.0
    return sdm.astype(np.float32)


class SignedDistanceMapd(MapTransform):
    """Add the normalised signed distance map of a label (see :func:`signed_distance_map`) under ``output_key``.

    Placed after the random crop, it measures distances within the training patch, as DTC and SimCVD do. Absent
    label keys are skipped, so one pipeline serves labeled and unlabeled entries.

    Args:
        keys: the label key(s) (channel-first, one channel per foreground class, or class ids with one channel).
        output_key: key of the map; with several keys, ``f"{key}_{output_key}"``.
        num_classes: with a class-id label (one channel), the number of classes background included: one map per
            foreground class 1..num_classes-1 (SimCVD's SDM head has that many channels). None: one map of
            ``label == 1`` (two classes).

    Raises (at call):
        ValueError: a class-id label with values outside 0..num_classes-1 (the message names the values).
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_key: str = "sdm",
        allow_missing_keys: bool = True,
        num_classes: Optional[int] = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_key = output_key
        if num_classes is not None and int(num_classes) < 2:
            raise ValueError(f"SignedDistanceMapd: num_classes must be at least 2 (background and one class), got "
                             f"{num_classes}.")  # fmt: skip
        self.num_classes = None if num_classes is None else int(num_classes)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        for key in keys:
            label = d[key]
            arr = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
            if arr.shape[0] == 1:  # class ids
                classes = range(1, self.num_classes or 2)
                if self.num_classes is not None:
                    found = np.unique(arr)
                    bad = found[(found < 0) | (found >= self.num_classes) | (found != np.round(found))]
                    if bad.size:
                        raise ValueError(
                            f"SignedDistanceMapd: {key!r} holds values {sorted(float(v) for v in found)}; expected "
                            f"class ids 0..{self.num_classes - 1}."
                        )
                sdm = np.stack([signed_distance_map(arr[0] == c) for c in classes])
            else:  # one channel per foreground class
                sdm = np.stack([signed_distance_map(c > 0) for c in arr])
            out = torch.as_tensor(sdm)
            d[self.output_key if len(keys) == 1 else f"{key}_{self.output_key}"] = out
        return d
