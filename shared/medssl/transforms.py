"""MONAI dictionary transforms shared by the medssl bundles."""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from medssl.data import DataError
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["CheckVolumed"]


def _source(data: Mapping, key: Hashable) -> str:
    meta = getattr(data[key], "meta", None) or data.get(f"{key}_meta_dict", {})
    return str(meta.get("filename_or_obj", f"<{key}>"))


class CheckVolumed(MapTransform):
    """Check loaded volumes before they reach a network: finite intensities, label values in ``classes``.

    Placed right after ``LoadImaged`` (channel first) in the deterministic part of a pipeline, so a
    ``CacheDataset`` finds bad voxels once, at start-up, and the error names the file.

    Args:
        keys: the image keys to check for NaN/Inf.
        label_keys: the label keys to check for values outside ``classes`` (absent keys are skipped,
            so one pipeline serves labeled and unlabeled entries).
        classes: the allowed label values.

    Raises:
        DataError: a NaN/Inf voxel, or a label value outside ``classes``, with the file name.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_keys: KeysCollection = (),
        classes: Sequence[int] = (0, 1),
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_keys = [label_keys] if isinstance(label_keys, str) else list(label_keys)
        self.classes = torch.as_tensor(list(classes))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            if not torch.isfinite(img).all():
                bad = int((~torch.isfinite(img)).sum())
                raise DataError(f"{_source(d, key)}: {bad} NaN/Inf voxels; expected finite intensities.")
        for key in self.label_keys:
            if key not in d:
                continue
            values = torch.unique(torch.as_tensor(d[key]))
            extra = values[~torch.isin(values, self.classes.to(values.dtype))]
            if extra.numel():
                raise DataError(
                    f"{_source(d, key)}: label values {np.round(extra.cpu().numpy()[:10], 4).tolist()} outside the "
                    f"expected classes {self.classes.tolist()}."
                )
        return d
