"""DICOM in: an MR or CT series (a folder, a study folder, a ``.zip``) read into a volume with its RAS affine (CT in
Hounsfield units). See :mod:`medssl.clinic.dicom` (which re-exports these names) for the reader's design."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from medssl.data import DataError

__all__ = [
    "DicomError",
    "DicomVolume",
    "SeriesInfo",
    "is_dicom_source",
    "find_series",
    "choose_series",
    "read_series",
    "LPS_TO_RAS",
    "MR_IMAGE_STORAGE",
    "CT_IMAGE_STORAGE",
]

logger = logging.getLogger("medssl.clinic.dicom")

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
# single-frame image storage classes whose geometry this reader understands (MR, CT, PET)
SINGLE_FRAME_IMAGES = {MR_IMAGE_STORAGE, CT_IMAGE_STORAGE, "1.2.840.10008.5.1.4.1.1.128"}
MULTI_FRAME_IMAGES = {ENHANCED_MR_STORAGE, "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.4.3"}
# tolerances of the geometry checks: direction cosines, and slice gaps relative to the series' spacing
COSINE_TOL = 1e-3
GAP_TOL = 0.05


class DicomError(DataError):
    """A DICOM input that cannot be read as one 3D series; the message names the file or series."""


@dataclass
class SeriesInfo:
    """One series found in a folder: its files and what the choice of series needs to know."""

    uid: str
    files: List[Path] = field(default_factory=list)
    modality: str = ""
    description: str = ""
    sop_classes: set = field(default_factory=set)
    image_types: set = field(default_factory=set)
    frames: int = 0

    @property
    def is_image(self) -> bool:
        return bool(self.sop_classes & (SINGLE_FRAME_IMAGES | MULTI_FRAME_IMAGES))

    @property
    def is_localizer(self) -> bool:
        # by ImageType only: a series of several orientations that is not marked so is read, and refused by name
        return "LOCALIZER" in self.image_types

    def label(self) -> str:
        desc = f" '{self.description}'" if self.description else ""
        return f"series {self.uid}{desc} ({self.modality or '?'}, {self.frames} slices)"


@dataclass
class DicomVolume:
    """A series read into a volume: ``array[i, j, k]`` (column, row, slice along the normal), its RAS ``affine``,
    and the source datasets and files in slice order (what the SEG references)."""

    array: np.ndarray
    affine: np.ndarray
    datasets: list
    files: List[Path]
    series_uid: str
    description: str
    source: str


# -- finding series --------------------------------------------------------------------------------------------


def _read_header(path: Path):
    """The dataset of a DICOM file without its pixel data, or None for anything that is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None


def _sop_class(ds) -> str:
    """The SOP Class UID of a dataset, from its file meta where the data set's own is empty (anonymisers blank it:
    TotalSegmentator's example CT series)."""
    meta = getattr(ds, "file_meta", None)
    return str(ds.get("SOPClassUID") or getattr(meta, "MediaStorageSOPClassUID", "") or "")


def is_dicom_source(path: os.PathLike | str) -> bool:
    """Whether ``path`` is a ``.zip`` or a folder holding at least one DICOM file (anywhere below it)."""
    p = Path(path)
    if p.is_file():
        return p.suffix.lower() == ".zip"
    if not p.is_dir():
        return False
    return any(_read_header(f) is not None for f in _walk(p))


def _walk(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def find_series(folder: os.PathLike | str) -> Dict[str, SeriesInfo]:
    """Every DICOM series under ``folder`` (headers only), by SeriesInstanceUID; files that are not DICOM are
    skipped.

    Raises:
        DicomError: the folder holds no DICOM file.
    """
    folder = Path(folder)
    series: Dict[str, SeriesInfo] = {}
    for f in _walk(folder):
        ds = _read_header(f)
        if ds is None or "SeriesInstanceUID" not in ds:
            continue
        uid = str(ds.SeriesInstanceUID)
        info = series.setdefault(uid, SeriesInfo(uid=uid))
        info.files.append(f)
        info.modality = str(ds.get("Modality", info.modality))
        info.description = str(ds.get("SeriesDescription", info.description) or "")
        info.sop_classes.add(_sop_class(ds))
        info.image_types.update(str(v).upper() for v in (ds.get("ImageType") or []))
        info.frames += int(ds.get("NumberOfFrames", 1) or 1) if "PixelData" in ds or "Rows" in ds else 0
    if not series:
        raise DicomError(f"{folder}: holds no DICOM files (looked for DICOM in every file below it).")
    return series


def choose_series(
    series: Dict[str, SeriesInfo],
    uid: Optional[str] = None,
    source: str = "",
    modalities: Sequence[str] = ("MR",),
    bundle: str = "this bundle",
) -> SeriesInfo:
    """The series to segment: ``uid`` if given, else the 3D image series of one of ``modalities`` (the bundle's:
    MR, or CT) with the most slices (localizers and non-image objects such as SEG, SR or presentation states are
    skipped).

    Raises:
        DicomError: ``uid`` not among them or of another modality, or no image series of ``modalities`` (the series
            found are listed).
    """
    found = "; ".join(s.label() for s in series.values())
    wanted = "/".join(modalities)
    if uid is not None:
        if str(uid) not in series:
            raise DicomError(f"{source}: no series {uid}; found: {found}.")
        chosen = series[str(uid)]
        if chosen.modality and chosen.modality not in modalities:
            raise DicomError(f"{source}: {chosen.label()} is {chosen.modality}; {bundle} segments {wanted} images.")
        return chosen
    candidates = [s for s in series.values() if s.is_image and not s.is_localizer and s.modality in modalities]
    if not candidates:
        raise DicomError(
            f"{source}: no 3D {wanted} image series found (localizers and non-image objects skipped; {bundle} "
            f"segments {wanted} images); {found}."
        )
    return max(candidates, key=lambda s: (s.frames, s.uid))


class _Unzipped:
    """A ``.zip`` extracted into a temporary folder (members that would land outside it are refused)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Path:
        self.tmp = Path(tempfile.mkdtemp(prefix="medssl-dicom-"))
        try:
            with zipfile.ZipFile(self.path) as zf:
                for member in zf.infolist():
                    target = (self.tmp / member.filename).resolve()
                    if not str(target).startswith(str(self.tmp.resolve()) + os.sep) and not member.is_dir():
                        raise DicomError(f"{self.path}: member {member.filename!r} would land outside the folder.")
                zf.extractall(self.tmp)
        except zipfile.BadZipFile as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise DicomError(f"{self.path}: not a readable zip file ({e}).") from e
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        return self.tmp

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# -- reading a series ------------------------------------------------------------------------------------------


def read_series(
    source: os.PathLike | str,
    series_uid: Optional[str] = None,
    announce=None,
    dtype=np.float32,
    modalities: Sequence[str] = ("MR",),
    bundle: str = "this bundle",
) -> DicomVolume:
    """Read the series of ``source`` (a folder of one series, a study folder, or a ``.zip`` of either) into a
    volume with its RAS affine.

    Args:
        source: the folder or zip.
        series_uid: the series to read; default the 3D series of ``modalities`` with the most slices (see
            :func:`choose_series`).
        announce: called with one line naming the chosen series when the source holds several.
        dtype: the voxel type of the returned array (after the Modality LUT: Hounsfield units for CT).
        modalities: the modalities a series may have (the bundle's, from its metadata).
        bundle: how the errors name the bundle.

    Raises:
        DicomError: naming the file or series: no DICOM, no MR image series, an Enhanced (multi-frame) object, a
            file without pixel data or that cannot be decoded, a single slice, slices of different size, spacing or
            orientation, duplicate or missing slices, positions not along the slice normal.
    """
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".zip":
        with _Unzipped(source) as folder:
            # what is said about the extracted files names them inside the zip, not in the temporary folder
            def inside(text: str) -> str:
                return text.replace(str(folder), str(source))

            try:
                vol = read_series(
                    folder, series_uid, announce and (lambda text: announce(inside(text))), dtype, modalities, bundle
                )
            except DicomError as e:
                raise DicomError(inside(str(e))) from e
        vol.source = str(source)
        vol.files = [source / f.relative_to(folder) for f in vol.files]
        return vol
    if not source.is_dir():
        raise DicomError(f"{source}: not a folder or .zip of DICOM files.")
    series = find_series(source)
    chosen = choose_series(series, series_uid, str(source), modalities, bundle)
    if len(series) > 1 and announce is not None:
        skipped = [s.label() for s in series.values() if s is not chosen]
        announce(f"{source}: {chosen.label()} chosen; skipped {len(skipped)}: " + "; ".join(skipped))
    if chosen.sop_classes & MULTI_FRAME_IMAGES:
        raise DicomError(
            f"{source}: {chosen.label()} is an Enhanced (multi-frame) image object, which this reader does not "
            "read; export the series as classic MR Image Storage (one file per slice)."
        )
    return _read_classic(chosen, str(source), dtype)


def _load_slice(path: Path):
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
    except Exception as e:  # pydicom raises many types for damaged files
        raise DicomError(f"{path}: unreadable DICOM file ({type(e).__name__}: {e}).") from e
    if "PixelData" not in ds:
        raise DicomError(f"{path}: no pixel data (a non-image object in an image series).")
    for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        if key not in ds:
            raise DicomError(f"{path}: no {key}; the slice's position in the patient cannot be known.")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DicomError(f"{path}: {ds.SamplesPerPixel} samples per pixel; expected a greyscale image.")
    # anonymisers may blank the data set's SOP UIDs; the file meta of the same file keeps them (the SEG references
    # each source image by both)
    meta = getattr(ds, "file_meta", None)
    if not ds.get("SOPClassUID") and _sop_class(ds):
        ds.SOPClassUID = _sop_class(ds)
    if not ds.get("SOPInstanceUID") and getattr(meta, "MediaStorageSOPInstanceUID", ""):
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    return ds


def _pixels(ds, path: Path) -> np.ndarray:
    try:
        from pydicom.pixels import apply_modality_lut
    except ImportError:  # pydicom 2
        from pydicom.pixel_data_handlers.util import apply_modality_lut
    try:
        frame = ds.pixel_array
    except Exception as e:  # truncated data, a transfer syntax without a decoder...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
        raise DicomError(f"{path}: pixel data cannot be decoded (transfer syntax {syntax}; {e}).") from e
    if frame.ndim != 2:
        raise DicomError(f"{path}: pixel data of shape {frame.shape}; expected one 2D frame.")
    return apply_modality_lut(frame, ds)


def _read_classic(info: SeriesInfo, source: str, dtype) -> DicomVolume:
    datasets = [_load_slice(f) for f in info.files]
    files = list(info.files)
    name = f"{source}: {info.label()}"
    if len(datasets) < 2:
        raise DicomError(f"{name}: a single 2D slice ({files[0]}); a 3D series is needed.")
    first = datasets[0]
    cosines = np.asarray(first.ImageOrientationPatient, float)
    for ds, f in zip(datasets, files):
        if np.abs(np.asarray(ds.ImageOrientationPatient, float) - cosines).max() > COSINE_TOL:
            raise DicomError(
                f"{name}: two orientations in one series ({files[0].name}: {list(np.round(cosines, 4))}, "
                f"{f.name}: {list(np.round(np.asarray(ds.ImageOrientationPatient, float), 4))})."
            )
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise DicomError(
                f"{name}: {f.name} is {ds.Rows}x{ds.Columns}, {files[0].name} {first.Rows}x{first.Columns}."
            )
        if np.abs(np.asarray(ds.PixelSpacing, float) - np.asarray(first.PixelSpacing, float)).max() > 1e-4:
            raise DicomError(f"{name}: {f.name} and {files[0].name} have different PixelSpacing.")
    row_cos, col_cos = cosines[:3], cosines[3:]
    if (
        abs(np.linalg.norm(row_cos) - 1) > 1e-2
        or abs(np.linalg.norm(col_cos) - 1) > 1e-2
        or abs(row_cos @ col_cos) > 1e-2
    ):
        raise DicomError(f"{name}: ImageOrientationPatient {list(cosines)} is not two orthogonal unit vectors.")
    normal = np.cross(row_cos, col_cos)
    positions = np.array([np.asarray(ds.ImagePositionPatient, float) for ds in datasets])
    depth = positions @ normal
    order = np.argsort(depth, kind="stable")
    datasets, files, positions, depth = (
        [datasets[i] for i in order],
        [files[i] for i in order],
        positions[order],
        depth[order],
    )
    gaps = np.diff(depth)
    if (gaps < 1e-3).any():
        k = int(np.argmax(gaps < 1e-3))
        raise DicomError(
            f"{name}: {files[k].name} and {files[k + 1].name} lie at the same position (several echoes, phases or "
            "acquisitions in one series?); pick one with --series or split the series."
        )
    spacing = float(np.median(gaps))
    if np.abs(gaps - spacing).max() > GAP_TOL * spacing:
        k = int(np.argmax(np.abs(gaps - spacing)))
        raise DicomError(
            f"{name}: slices are not evenly spaced: {gaps[k]:.3f} mm between {files[k].name} and {files[k + 1].name}, "
            f"{spacing:.3f} mm elsewhere (a missing slice?)."
        )
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    off_axis = positions - positions[0] - np.outer(np.arange(len(positions)), step)
    if np.abs(step - normal * spacing).max() > GAP_TOL * spacing or np.abs(off_axis).max() > GAP_TOL * spacing:
        raise DicomError(
            f"{name}: slice positions do not advance along the slice normal (gantry tilt or sheared series), which "
            "this reader refuses rather than guess an affine."
        )
    dr, dc = (float(v) for v in first.PixelSpacing)  # between rows, between columns
    lps = np.eye(4)
    lps[:3, 0] = row_cos * dc  # i: along a row, column index increasing
    lps[:3, 1] = col_cos * dr  # j: down a column, row index increasing
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    array = np.stack([_pixels(ds, f) for ds, f in zip(datasets, files)], axis=-1).transpose(1, 0, 2)
    return DicomVolume(
        array=np.ascontiguousarray(array, dtype=dtype),
        affine=LPS_TO_RAS @ lps,
        datasets=datasets,
        files=files,
        series_uid=info.uid,
        description=info.description,
        source=source,
    )
