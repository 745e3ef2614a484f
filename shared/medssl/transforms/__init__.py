"""MONAI dictionary transforms shared by the medssl bundles, one module per purpose; every name is re-exported
here, so ``medssl.transforms.<name>`` (bundle configs, imports) keeps working.

- :mod:`medssl.transforms.io`: :class:`LoadVolumed`, :class:`CheckVolumed` (loading and checking volumes).
- :mod:`medssl.transforms.intensity`: :class:`Intensityd` (the bundle's ``intensity`` key: z-score, CT window,
  percentile clip).
- :mod:`medssl.transforms.sdm`: :func:`signed_distance_map`, :class:`SignedDistanceMapd` (DTC / SimCVD).
- :mod:`medssl.transforms.pcrl`: :class:`RandOverlappingCropsd`, :class:`RandLocalPixelShuffled`,
  :class:`RandPaintingd`, :class:`RandSpatialCoded`, :func:`box_iou`, :func:`apply_spatial_code` (PCRL, Zhou et
  al., ICCV 2021).
"""

from medssl.transforms.intensity import Intensityd
from medssl.transforms.io import CheckVolumed, LoadVolumed
from medssl.transforms.pcrl import (
    RandLocalPixelShuffled,
    RandOverlappingCropsd,
    RandPaintingd,
    RandSpatialCoded,
    apply_spatial_code,
    box_iou,
)
from medssl.transforms.sdm import SignedDistanceMapd, signed_distance_map

__all__ = [
    "CheckVolumed",
    "Intensityd",
    "SignedDistanceMapd",
    "signed_distance_map",
    "RandOverlappingCropsd",
    "RandLocalPixelShuffled",
    "RandPaintingd",
    "RandSpatialCoded",
    "box_iou",
    "apply_spatial_code",
    "LoadVolumed",
]
