"""DICOM in and out: read an MR or CT series (a folder, a study folder, a ``.zip``) into a volume with its RAS affine
(CT in Hounsfield units), write the label map back as a DICOM SEG on the source slices, and write a volume as a
classic MR or CT series.

Reader: pydicom for the attributes and pixel data, the geometry assembled here from the DICOM attributes alone:
slices ordered by ImagePositionPatient projected on the slice normal (never file names or InstanceNumber), the
in-plane axes from ImageOrientationPatient and PixelSpacing, the slice step from the first and last positions,
LPS -> RAS, the Modality LUT (RescaleSlope / RescaleIntercept) applied slice by slice. pydicom is the well-kept base
of highdicom and pynetdicom (both used here too), it reads every transfer syntax its pixel handlers know, and doing
the geometry ourselves lets every inconsistency (a missing slice, two orientations, a tilt, duplicate positions) be
refused with the file named instead of becoming a wrong affine. The tests check it against SimpleITK/GDCM.

Writer: highdicom's ``Segmentation`` (BINARY, frames on the source slices' own grid, empty frames omitted), which
references every source instance and copies patient, study and frame of reference from them.

Voxel order of a volume read here: ``array[i, j, k]`` = column ``i``, row ``j`` of the ``k``-th slice in the order
of the slice normal; ``affine`` maps ``(i, j, k, 1)`` to RAS millimetres (the NIfTI convention).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from medssl.data import DataError, atomic_path

__all__ = [
    "DicomError",
    "DicomVolume",
    "SeriesInfo",
    "is_dicom_source",
    "find_series",
    "choose_series",
    "read_series",
    "write_seg",
    "read_seg",
    "write_series",
    "nifti_to_series",
    "LPS_TO_RAS",
]

logger = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
# single-frame image storage classes whose geometry this reader understands (MR, CT, PET)
SINGLE_FRAME_IMAGES = {MR_IMAGE_STORAGE, CT_IMAGE_STORAGE, "1.2.840.10008.5.1.4.1.1.128"}
MULTI_FRAME_IMAGES = {ENHANCED_MR_STORAGE, "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.4.3"}
# SNOMED CT codes of the labels the bundles segment: name -> (property type, property category)
SEGMENT_CODES = {
    "left atrium": (("82471001", "SCT", "Left atrium"), ("123037004", "SCT", "Anatomical Structure")),
}
GENERIC_CODE = ("85756007", "SCT", "Tissue")
GENERIC_CATEGORY = ("91723000", "SCT", "Anatomical Structure")
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
        info.sop_classes.add(str(ds.get("SOPClassUID", "")))
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


# -- DICOM SEG -------------------------------------------------------------------------------------------------


def segment_codes(label: str, code: Optional[Sequence[str]] = None, category: Optional[Sequence[str]] = None):
    """``(property type, property category)`` of a segment named ``label``: the bundle's own codes (its ``labels``
    key) where given, else :data:`SEGMENT_CODES` by name, else the generic 85756007 "Tissue" / 91723000 "Anatomical
    Structure" with a warning that names the label (so an uncoded structure is never coded silently)."""
    known = SEGMENT_CODES.get(label.lower())
    if code is not None:
        return tuple(code), tuple(category) if category is not None else (known[1] if known else GENERIC_CATEGORY)
    if known is not None:
        return known
    logger.warning(
        "DICOM SEG: the label %r has no code (give it one in the bundle's labels: \"code\": [value, scheme, meaning]); "
        "coded with the generic 85756007 'Tissue'",
        label,
    )
    return GENERIC_CODE, tuple(category) if category is not None else GENERIC_CATEGORY


def _segment_description(
    number: int,
    label: str,
    bundle: str,
    version: str,
    algorithm_type: str = "AUTOMATIC",
    code: Optional[Sequence[str]] = None,
    category: Optional[Sequence[str]] = None,
):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    prop, category = segment_codes(label, code, category)
    kind = hd.seg.SegmentAlgorithmTypeValues[algorithm_type]
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label[:64].capitalize(),
        segmented_property_category=hd.sr.CodedConcept(*category),
        segmented_property_type=hd.sr.CodedConcept(*prop),
        algorithm_type=kind,
        # a MANUAL segment names no algorithm (the standard forbids it); AUTOMATIC and SEMIAUTOMATIC ones must
        algorithm_identification=(
            None
            if kind == hd.seg.SegmentAlgorithmTypeValues.MANUAL
            else hd.AlgorithmIdentificationSequence(
                name=bundle, version=version, family=codes.cid7162.ArtificialIntelligence
            )
        ),
    )


def write_seg(
    labels: np.ndarray,
    volume: DicomVolume,
    path: os.PathLike | str,
    bundle: str,
    version: str,
    label_names: Dict[int, str],
    *,
    algorithm_type: str = "AUTOMATIC",
    content_creator: str = "medssl^automatic",
    series_description: Optional[str] = None,
    label_codes: Optional[Mapping[int, Tuple[Optional[Sequence[str]], Optional[Sequence[str]]]]] = None,
) -> Path:
    """Write the label map ``labels`` (on ``volume``'s grid, ``[i, j, k]``) as a BINARY DICOM SEG of the source
    series: one segment per label value in ``label_names`` (SNOMED CT coded where known), frames on the source
    slices, empty frames omitted, the bundle name and version as the algorithm. The file appears complete or not
    at all.

    ``algorithm_type`` (``AUTOMATIC``, ``SEMIAUTOMATIC`` for a label a person saved from the bundle's output, or
    ``MANUAL``), ``content_creator`` (a DICOM person name) and ``series_description`` (default ``"<bundle> <version>
    segmentation"``) describe who made it. ``label_codes`` (label value -> ``(code, category)`` triples, e.g. from the
    bundle's ``labels``) code the segments; a label without one is coded by :func:`segment_codes`.

    Raises:
        DicomError: ``labels`` is not on the volume's grid.
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    labels = np.asarray(labels)
    if labels.shape != volume.array.shape:
        raise DicomError(f"{path}: label map of shape {labels.shape} is not on the series' grid {volume.array.shape}.")
    numbers = sorted(int(v) for v in label_names if int(v) > 0)
    codes = {int(k): v for k, v in (label_codes or {}).items()}
    frames = np.stack([labels.transpose(2, 1, 0) == v for v in numbers], axis=-1)  # (slice, row, column, segment)
    source = volume.datasets[0]
    series_number = int(source.get("SeriesNumber", 0) or 0) + 1000
    description = (series_description or f"{bundle} {version} segmentation")[:64]
    seg = hd.seg.Segmentation(
        source_images=volume.datasets,
        pixel_array=frames.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            _segment_description(i + 1, label_names[v], bundle, version, algorithm_type, *codes.get(v, (None, None)))
            for i, v in enumerate(numbers)
        ],
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="medssl",
        manufacturer_model_name=bundle[:64],
        software_versions=str(version),
        device_serial_number="0",
        series_description=description,
        content_label="SEGMENTATION",
        content_description=description,
        content_creator_name=content_creator,
        omit_empty_frames=True,
    )
    path = Path(path)
    with atomic_path(path) as tmp:
        seg.save_as(str(tmp))
    return path


def read_seg(path: os.PathLike | str, volume: DicomVolume) -> np.ndarray:
    """A DICOM SEG of ``volume``'s series back on its grid ``[i, j, k]`` (segment numbers as label values), mapping
    each frame to its source slice by the referenced SOP Instance UID (not by position in the file)."""
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    uids = [str(ds.SOPInstanceUID) for ds in volume.datasets]
    out = np.zeros(volume.array.shape, np.uint8)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, skip_overlap_checks=True, ignore_spatial_locations=True
    )
    return np.maximum(out, np.asarray(pixels).transpose(2, 1, 0).astype(np.uint8))


# -- writing a volume as a classic MR series (test data, PACS try-outs) -----------------------------------------


def write_series(
    array: np.ndarray,
    affine: np.ndarray,
    folder: os.PathLike | str,
    *,
    patient_id: str = "LA001",
    patient_name: str = "Anon^LA",
    study_uid: Optional[str] = None,
    series_uid: Optional[str] = None,
    series_number: int = 1,
    series_description: str = "LA LGE-MRI",
    modality: str = "MR",
    slope: float = 1.0,
    intercept: float = 0.0,
    file_names: str = "uid",
    seed: int = 0,
) -> List[Path]:
    """Write ``array[i, j, k]`` with RAS ``affine`` as a classic MR Image Storage series (CT Image Storage with
    ``modality="CT"``, its values then Hounsfield units through ``slope``/``intercept``), one file per slice ``k``.

    Stored values are ``array`` (integers fitting int16) with the Modality LUT ``slope``/``intercept``; the geometry
    (ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness) comes from the affine.
    ``file_names``: ``"uid"`` (``<SOPInstanceUID>.dcm``), ``"index"`` (``IM0001.dcm`` in slice order) or
    ``"shuffled"`` (index names in a random order, so that neither names nor InstanceNumber follow the slices).

    Raises:
        DicomError: a non-3D array, values that are not int16 integers, or an affine whose in-plane axes are not
            orthogonal or whose slice axis is not along their normal.
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    array = np.asarray(array)
    folder = Path(folder)
    if array.ndim != 3:
        raise DicomError(f"{folder}: expected a 3D array, got shape {array.shape}.")
    if not np.array_equal(array, np.round(array)) or array.min() < -32768 or array.max() > 32767:
        raise DicomError(f"{folder}: stored values must be integers within int16; pass slope/intercept for the rest.")
    lps = LPS_TO_RAS @ np.asarray(affine, float)
    di, dj = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    row_cos, col_cos = lps[:3, 0] / di, lps[:3, 1] / dj
    step = lps[:3, 2]
    normal = np.cross(row_cos, col_cos)
    if abs(row_cos @ col_cos) > 1e-4 or np.linalg.norm(np.cross(normal, step)) > 1e-4 * np.linalg.norm(step):
        raise DicomError(f"{folder}: the affine's axes are sheared; classic DICOM needs orthogonal axes.")
    study_uid, series_uid, frame_uid = study_uid or generate_uid(), series_uid or generate_uid(), generate_uid()
    names = [f"IM{k + 1:04d}.dcm" for k in range(array.shape[2])]
    if file_names == "shuffled":
        names = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for k in range(array.shape[2]):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        sop_class = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study_uid, "20260101", "120000", "1"
        ds.ReferringPhysicianName, ds.AccessionNumber, ds.StudyDescription = "", "", "LA MRI"
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = modality, series_uid, int(series_number)
        ds.SeriesDescription, ds.PatientPosition, ds.Laterality = series_description, "HFS", ""
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.Manufacturer = "medssl"
        ds.InstanceNumber = (k + 1) if file_names != "shuffled" else int(names[k][2:6])
        if modality == "CT":
            ds.ImageType, ds.KVP = ["ORIGINAL", "PRIMARY", "AXIAL"], "120"
            ds.SliceThickness = float(np.linalg.norm(step))
        else:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "GR", "SP", "", "3D"
            ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = 3.1, 1.4, 1
            ds.SliceThickness = float(np.linalg.norm(step))
        ds.ImagePositionPatient = [float(v) for v in np.round(lps[:3, 3] + k * step, 6)]
        ds.ImageOrientationPatient = [float(v) for v in np.round(np.concatenate([row_cos, col_cos]), 8)]
        ds.PixelSpacing = [float(round(dj, 6)), float(round(di, 6))]  # between rows, between columns
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(array.shape[1]), int(array.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        if slope != 1.0 or intercept != 0.0 or modality == "CT":  # CT Image Storage requires the rescale
            ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}"[:16], f"{intercept:.10g}"[:16]
            ds.RescaleType = "HU" if modality == "CT" else "US"
        ds.PixelData = np.ascontiguousarray(array[:, :, k].T, dtype="<i2").tobytes()
        path = folder / (f"{sop_uid}.dcm" if file_names == "uid" else names[k])
        with atomic_path(path) as tmp:
            try:
                pydicom.dcmwrite(str(tmp), ds, enforce_file_format=True)
            except TypeError:  # pydicom 2
                ds.is_little_endian, ds.is_implicit_VR = True, False
                ds.save_as(str(tmp), write_like_original=False)
        written.append(path)
    return written


def nifti_to_series(nifti: os.PathLike | str, folder: os.PathLike | str, **kwargs) -> Tuple[List[Path], np.ndarray]:
    """Write a NIfTI volume as a classic MR series (its stored integers with its scl_slope / scl_inter as the
    Modality LUT, so the series reads back to exactly the NIfTI's values); returns the files and the affine."""
    import nibabel as nib

    img = nib.load(str(nifti))
    stored = np.asarray(img.dataobj.get_unscaled())
    slope, inter = img.dataobj.slope, img.dataobj.inter
    if not np.array_equal(stored, np.round(stored)) or stored.min() < -32768 or stored.max() > 32767:
        raise DicomError(f"{nifti}: stored values are not int16 integers; scale them first.")
    files = write_series(
        stored.astype(np.int16), img.affine, folder, slope=float(slope), intercept=float(inter), **kwargs
    )
    return files, img.affine
