"""DICOM out: the label map as a DICOM SEG on the source slices (highdicom's ``Segmentation``: BINARY, frames on the
source slices' own grid, empty frames omitted, every source instance referenced, patient, study and frame of
reference copied from them), the SEG read back, and a volume written as a classic MR or CT series (test data, PACS
try-outs). :mod:`medssl.clinic.dicom` re-exports these names."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from medssl.clinic.dicom_read import CT_IMAGE_STORAGE, LPS_TO_RAS, MR_IMAGE_STORAGE, DicomError, DicomVolume
from medssl.data import atomic_path

__all__ = ["SEGMENT_CODES", "segment_codes", "write_seg", "read_seg", "write_series", "nifti_to_series"]

logger = logging.getLogger("medssl.clinic.dicom")

# SNOMED CT codes of the labels the bundles segment: name -> (property type, property category)
SEGMENT_CODES = {
    "left atrium": (("82471001", "SCT", "Left atrium"), ("123037004", "SCT", "Anatomical Structure")),
}
GENERIC_CODE = ("85756007", "SCT", "Tissue")
GENERIC_CATEGORY = ("91723000", "SCT", "Anatomical Structure")


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
        DicomError: ``labels`` is not on the volume's grid, or a source slice lacks a UID the SEG must reference
            (anonymisers blank them; a SEG without them is invalid and no PACS links it to its images).
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    labels = np.asarray(labels)
    if labels.shape != volume.array.shape:
        raise DicomError(f"{path}: label map of shape {labels.shape} is not on the series' grid {volume.array.shape}.")
    for ds, f in zip(volume.datasets, volume.files):
        blank = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if not str(ds.get(k) or "")]
        if blank:
            raise DicomError(
                f"{f}: {', '.join(blank)} empty (blanked by an anonymiser?); a DICOM SEG must reference the study, "
                "series and instance of each slice: give the series its UIDs, or write NIfTI only "
                "(--output_type nifti)."
            )
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
    body_part: str = "",
) -> List[Path]:
    """Write ``array[i, j, k]`` with RAS ``affine`` as a classic MR Image Storage series (CT Image Storage with
    ``modality="CT"``, its values then Hounsfield units through ``slope``/``intercept``), one file per slice ``k``.

    Stored values are ``array`` (integers fitting int16) with the Modality LUT ``slope``/``intercept``; the geometry
    (ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness) comes from the affine.
    ``file_names``: ``"uid"`` (``<SOPInstanceUID>.dcm``), ``"index"`` (``IM0001.dcm`` in slice order) or
    ``"shuffled"`` (index names in a random order, so that neither names nor InstanceNumber follow the slices).
    ``body_part``: a BodyPartExamined value (none by default).

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
        if body_part:
            ds.BodyPartExamined = body_part
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
