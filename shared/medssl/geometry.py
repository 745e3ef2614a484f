"""The same scan as a clinic hands it over: other intensity units, axis order and direction, voxel spacing.

Every bundle's preprocessing (orientation RAS, resampling to ``spacing``, per-volume z-score) and its inverted
postprocessing make a segmentation independent of these. :func:`write_variant` writes a case (image and label)
as one of :data:`VARIANTS`, with the affine adjusted so that the physical scan is unchanged; the resampled
variants use nibabel's own resampler (``nibabel.processing``, independent of MONAI's), trilinear for the image and
nearest neighbour for the label. ``python benchmarks/geometry_variants.py`` scores a bundle on every variant.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Tuple

import nibabel as nib
import numpy as np

from medssl.data import DataError, write_nifti

__all__ = ["VARIANTS", "variant_arrays", "write_variant"]

# name -> what it does (for tables and errors)
VARIANTS: Dict[str, str] = {
    "release": "the release's format (z-scored, 0.625 mm, axes as stored)",
    "scanner_units": "intensity x 250 + 400, stored as int16 (scanner-like units)",
    "flip_xy": "axes x and y reversed, affine adjusted",
    "permute_flip": "axes permuted (z, x, y) and x reversed, affine adjusted",
    "spacing_1mm": "resampled to 1.0 mm isotropic",
    "spacing_aniso": "resampled to 0.625 x 0.625 x 1.25 mm",
}


def _reorder(image: np.ndarray, affine: np.ndarray, perm: Tuple[int, int, int], flips: Tuple[bool, ...]):
    """``image`` with its axes permuted then flipped, and the affine that keeps every voxel where it was."""
    out = np.transpose(image, perm)
    new_affine = affine.copy()
    new_affine[:, :3] = affine[:, list(perm)]
    for axis, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis)
            # new voxel i sits where voxel (n - 1 - i) was: column negated, origin moved to the old far end
            new_affine[:3, 3] += new_affine[:3, axis] * (out.shape[axis] - 1)
            new_affine[:3, axis] = -new_affine[:3, axis]
    return np.ascontiguousarray(out), new_affine


def _resample(img: nib.Nifti1Image, voxel_sizes, order: int) -> nib.Nifti1Image:
    from nibabel.processing import resample_to_output

    return resample_to_output(img, voxel_sizes=voxel_sizes, order=order, mode="nearest")


def variant_arrays(
    image: nib.Nifti1Image, label: nib.Nifti1Image, variant: str
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, type]:
    """``(image, label, affine, image dtype)`` of ``variant`` (see :data:`VARIANTS`) for a loaded case."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}.")
    img = np.asarray(image.dataobj, dtype=np.float32)
    lab = np.asarray(label.dataobj).astype(np.uint8)
    affine = image.affine.copy()
    if variant == "release":
        return img, lab, affine, np.float32
    if variant == "scanner_units":
        return np.round(img * 250.0 + 400.0), lab, affine, np.int16
    if variant in ("flip_xy", "permute_flip"):
        perm, flips = ((0, 1, 2), (True, True, False)) if variant == "flip_xy" else ((2, 0, 1), (False, True, False))
        img2, new_affine = _reorder(img, affine, perm, flips)
        lab2, _ = _reorder(lab, affine, perm, flips)
        return img2, lab2, new_affine, np.float32
    sizes = (1.0, 1.0, 1.0) if variant == "spacing_1mm" else (0.625, 0.625, 1.25)
    r_img = _resample(nib.Nifti1Image(img, affine), sizes, order=1)
    r_lab = _resample(nib.Nifti1Image(lab.astype(np.float32), affine), sizes, order=0)
    return (
        np.asarray(r_img.dataobj, dtype=np.float32),
        np.asarray(r_lab.dataobj).round().astype(np.uint8),
        r_img.affine,
        np.float32,
    )


def write_variant(
    image_path: os.PathLike | str, label_path: os.PathLike | str, out_dir: os.PathLike | str, variant: str
) -> Tuple[Path, Path]:
    """Write ``<out_dir>/imagesTr/<name>`` and ``<out_dir>/labelsTr/<name>`` of ``variant``; returns both paths.

    Raises:
        DataError: an unreadable image or label.
    """
    name = Path(image_path).name
    try:
        image, label = nib.load(str(image_path)), nib.load(str(label_path))
    except Exception as e:  # nibabel raises several types
        raise DataError(f"{image_path} / {label_path}: not a readable NIfTI pair ({e}).") from e
    img, lab, affine, dtype = variant_arrays(image, label, variant)
    out_dir = Path(out_dir)
    return (
        write_nifti(img, affine, out_dir / "imagesTr" / name, dtype=dtype),
        write_nifti(lab, affine, out_dir / "labelsTr" / name, dtype=np.uint8),
    )
