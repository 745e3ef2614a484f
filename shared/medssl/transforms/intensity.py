"""The intensity normalisation of a bundle, built from its ``intensity`` key (see :mod:`medssl.task`).

:class:`Intensityd` is one transform for every mode, so a bundle's train, evaluate and inference pipelines (and with
inference.json ``segment``, the DICOM node, MONAI Label, the Deploy app and the int8 calibration) normalise the same
way. Each mode is MONAI's own transform: ``zscore`` is ``NormalizeIntensityd`` (exactly what the bundles ran before
the key existed), ``window`` ``ScaleIntensityRanged`` with ``clip=True`` (as MONAI's CT tutorials), ``percentile``
``ClipIntensityPercentilesd`` followed by ``NormalizeIntensityd``.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping

from monai.config import KeysCollection
from monai.transforms import (
    ClipIntensityPercentilesd,
    Compose,
    MapTransform,
    NormalizeIntensityd,
    ScaleIntensityRanged,
)

from medssl.task import check_intensity

__all__ = ["Intensityd"]


class Intensityd(MapTransform):
    """Normalise the intensities of ``keys`` as ``intensity`` says (:func:`medssl.task.check_intensity`).

    Args:
        keys: the image key(s).
        intensity: ``{"mode": "zscore"}`` (default), ``{"mode": "window", "range": [lo, hi]}`` or ``{"mode":
            "percentile", "range": [lower, upper]}``.

    Raises (at construction):
        medssl.data.DataError: a bad spec (the message names ``intensity`` and what was expected).
    """

    def __init__(self, keys: KeysCollection, intensity: Any = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spec = check_intensity(intensity)
        keys, missing = self.keys, allow_missing_keys
        mode = self.spec["mode"]
        if mode == "zscore":
            self.transform = NormalizeIntensityd(keys, allow_missing_keys=missing)
        elif mode == "window":
            (lo, hi), (b_min, b_max) = self.spec["range"], self.spec["output"]
            self.transform = ScaleIntensityRanged(
                keys, a_min=lo, a_max=hi, b_min=b_min, b_max=b_max, clip=True, allow_missing_keys=missing
            )
        else:
            lower, upper = self.spec["range"]
            self.transform = Compose(
                [
                    ClipIntensityPercentilesd(keys, lower=lower, upper=upper, allow_missing_keys=missing),
                    NormalizeIntensityd(keys, allow_missing_keys=missing),
                ]
            )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        return self.transform(data)
