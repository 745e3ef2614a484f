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

The reader lives in :mod:`medssl.clinic.dicom_read`, the writers in :mod:`medssl.clinic.dicom_write`; this module
is their one public face (import from here).

Writer: highdicom's ``Segmentation`` (BINARY, frames on the source slices' own grid, empty frames omitted), which
references every source instance and copies patient, study and frame of reference from them.

Voxel order of a volume read here: ``array[i, j, k]`` = column ``i``, row ``j`` of the ``k``-th slice in the order
of the slice normal; ``affine`` maps ``(i, j, k, 1)`` to RAS millimetres (the NIfTI convention).
"""

from medssl.clinic.dicom_read import (
    CT_IMAGE_STORAGE,
    LPS_TO_RAS,
    MR_IMAGE_STORAGE,
    DicomError,
    DicomVolume,
    SeriesInfo,
    choose_series,
    find_series,
    is_dicom_source,
    read_series,
)
from medssl.clinic.dicom_write import SEGMENT_CODES, nifti_to_series, read_seg, segment_codes, write_seg, write_series

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
    "segment_codes",
    "SEGMENT_CODES",
    "LPS_TO_RAS",
    "MR_IMAGE_STORAGE",
    "CT_IMAGE_STORAGE",
]
