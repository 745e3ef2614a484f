"""DICOM in, DICOM SEG out: a real LA case written as MR series in five geometries reads back to the NIfTI it came
from (checked against SimpleITK/GDCM as a second reader), ``segment`` writes a SEG that validates with dciodvfy and
decodes (highdicom, and by hand with pydicom) to the NIfTI output of the same run; study folders, zips and bad
series."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medssl.clinic.dicom import LPS_TO_RAS, DicomError, nifti_to_series, read_seg, read_series, write_series
from medssl.metrics import dice
from medssl.clinic.segment import Segmenter

CASE_ROW = 0  # a training case of the release: these tests check geometry, not accuracy


def _rotation(degrees_x, degrees_y):
    ax, ay = np.deg2rad(degrees_x), np.deg2rad(degrees_y)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    return ry @ rx


def _variant(img: nib.Nifti1Image, geometry: str) -> nib.Nifti1Image:
    """The same voxels in another acquisition geometry (same stored integers and scaling)."""
    stored = np.asarray(img.dataobj.get_unscaled())
    affine = img.affine.copy()
    if geometry == "reversed":  # slices stored top to bottom
        stored = stored[:, :, ::-1]
        affine = affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, stored.shape[2] - 1], [0, 0, 0, 1.0]])
    elif geometry == "coronal":  # slices along y: the same physical image
        stored = stored.transpose(0, 2, 1)
        affine[:, :3] = affine[:, [0, 2, 1]]
    elif geometry == "sagittal":  # slices along x: the same physical image
        stored = stored.transpose(1, 2, 0)
        affine[:, :3] = affine[:, [1, 2, 0]]
    elif geometry == "oblique":  # rotated 20 degrees about two axes
        rot = np.eye(4)
        rot[:3, :3] = _rotation(20, 20)
        affine = rot @ affine
    out = nib.Nifti1Image(np.ascontiguousarray(stored), affine)
    out.header.set_slope_inter(img.dataobj.slope, img.dataobj.inter)
    return out


def _sitk_read(folder: Path):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    affine = np.eye(4)
    affine[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0), LPS_TO_RAS @ affine


GEOMETRIES = ("axial", "reversed", "coronal", "sagittal", "oblique")


@pytest.fixture(scope="module")
def series(la_dir, module_tmp):
    """The case in five geometries: NIfTI image + label, and the image as a DICOM series."""
    root = module_tmp("dicom")
    case_id = (la_dir / "train.list").read_text().split()[CASE_ROW]
    img = nib.load(la_dir / "imagesTr" / f"{case_id}.nii.gz")
    lab = nib.load(la_dir / "labelsTr" / f"{case_id}.nii.gz")
    made = {}
    for g in GEOMETRIES:
        vimg, vlab = _variant(img, g), _variant(lab, g)
        nib.save(vimg, root / f"{g}.nii.gz")
        nib.save(vlab, root / f"{g}_label.nii.gz")
        names = "shuffled" if g == "reversed" else "uid"
        nifti_to_series(root / f"{g}.nii.gz", root / g, file_names=names, patient_id=f"LA-{g}", series_number=7)
        made[g] = (root / g, root / f"{g}.nii.gz", root / f"{g}_label.nii.gz")
    return made


@pytest.fixture(scope="module")
def segmenter(module_tmp):
    """The release pulled once into this module's own cache (MEDSSL_HOME, restored after: the CLI test inherits it)."""
    before = os.environ.get("MEDSSL_HOME")
    os.environ["MEDSSL_HOME"] = str(module_tmp("medssl_home"))
    try:
        with Segmenter(progress=False) as s:
            yield s
    finally:
        if before is None:
            os.environ.pop("MEDSSL_HOME", None)
        else:
            os.environ["MEDSSL_HOME"] = before


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_series_reads_to_the_nifti_it_came_from(series, geometry):
    folder, image, _ = series[geometry]
    # the same voxels at the same places: compared in the closest RAS voxel order (the reader orders slices along
    # the normal, so a series stored top to bottom comes back bottom to top, with its affine saying so)
    nifti = nib.as_closest_canonical(nib.load(image))
    expected = np.asarray(nifti.dataobj, np.float32)
    vol = read_series(folder)
    for array, affine in ((vol.array, vol.affine), _sitk_read(folder)):  # ours, then GDCM's as a second reader
        read = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array, np.float32), affine))
        assert read.shape == expected.shape
        np.testing.assert_allclose(np.asarray(read.dataobj), expected, atol=1e-3)
        np.testing.assert_allclose(read.affine, nifti.affine, atol=1e-3)
    if np.linalg.det(nib.load(image).affine[:3, :3]) > 0:  # a right-handed NIfTI: its slices follow the normal
        np.testing.assert_allclose(vol.affine, nib.load(image).affine, atol=1e-3)
    if geometry == "reversed":  # neither file names nor InstanceNumber follow the slices
        names = [f.name for f in vol.files]
        assert names != sorted(names) and names != sorted(names, reverse=True)
        numbers = [int(ds.InstanceNumber) for ds in vol.datasets]
        assert numbers != sorted(numbers) and numbers != sorted(numbers, reverse=True)


def _seg_mask_by_hand(seg_path: Path, source_files):
    """The SEG's frames put on the source grid with pydicom alone, by each frame's referenced source instance."""
    seg = pydicom.dcmread(str(seg_path))
    sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in source_files]
    uid_to_slice = {}
    for f, ds in zip(source_files, sources):
        uid_to_slice[str(ds.SOPInstanceUID)] = ds
    first = sources[0]
    normal = np.cross(*np.asarray(first.ImageOrientationPatient, float).reshape(2, 3))
    order = sorted(uid_to_slice, key=lambda u: np.asarray(uid_to_slice[u].ImagePositionPatient, float) @ normal)
    mask = np.zeros((first.Columns, first.Rows, len(order)), np.uint8)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        ref = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        mask[:, :, order.index(str(ref))] |= frame.T.astype(np.uint8)
    return seg, sources, mask


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_segment_writes_a_seg_on_the_source_grid(series, segmenter, geometry, tmp_path):
    folder, _, label = series[geometry]
    (r,) = segmenter.segment([folder], out=tmp_path / "out")
    assert r["status"] == "ok", r
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [f"{geometry}_seg.nii.gz", f"{geometry}_seg.dcm", f"{geometry}_statistics.json", "summary.json"]
    )
    nifti_out = nib.load(r["segmentation"])
    pred = np.asarray(nifti_out.dataobj)
    out_ras, ref_ras = nib.as_closest_canonical(nifti_out), nib.as_closest_canonical(nib.load(label))
    np.testing.assert_allclose(out_ras.affine, ref_ras.affine, atol=1e-3)
    assert dice(out_ras.dataobj, ref_ras.dataobj) > 0.85
    vol = read_series(folder)
    assert dice(read_seg(r["dicom_seg"], vol), pred) >= 0.999  # highdicom's reading
    seg, sources, by_hand = _seg_mask_by_hand(Path(r["dicom_seg"]), vol.files)  # pydicom alone
    assert dice(by_hand, pred) >= 0.999
    # the SEG belongs to the source study, has its own series, references every source instance, codes the segment
    src = sources[0]
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.PatientID == src.PatientID == f"LA-{geometry}"
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID and seg.SeriesInstanceUID != src.SeriesInstanceUID
    assert "la_seg_finetune" in seg.SeriesDescription and "0.5.0" in seg.SeriesDescription
    referenced = {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {str(ds.SOPInstanceUID) for ds in sources}
    segment_item = seg.SegmentSequence[0]
    assert segment_item.SegmentedPropertyTypeCodeSequence[0].CodeValue == "82471001"
    assert segment_item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    assert segment_item.SegmentAlgorithmName == "la_seg_finetune"
    slices_with_label = int((pred.reshape(-1, pred.shape[2]) > 0).any(0).sum())
    assert int(seg.NumberOfFrames) == slices_with_label < len(sources)  # empty frames omitted
    if shutil.which("dciodvfy"):
        report = subprocess.run(["dciodvfy", r["dicom_seg"]], capture_output=True, text=True).stderr
        assert not [ln for ln in report.splitlines() if ln.startswith("Error")], report
    else:
        pytest.fail("dciodvfy (Debian dicom3tools) is not installed; .ci/run installs it")


def test_study_zip_with_localizer_and_non_image_picks_the_mr_series(series, segmenter, tmp_path):
    folder, _, label = series["axial"]
    study = tmp_path / "study"
    shutil.copytree(folder, study / "mr")
    first = pydicom.dcmread(str(next(folder.iterdir())))
    study_uid = first.StudyInstanceUID
    loc = np.zeros((64, 64, 1), np.int16)
    for k, (affine, n) in enumerate(
        [(np.diag([2.0, 2, 2, 1]), 1), (np.array([[0, 0, 2, 0], [2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1.0]]), 1)]
    ):
        files = write_series(np.repeat(loc, 2, axis=2), affine, study / f"loc{k}", study_uid=study_uid,
                             series_uid=f"1.2.826.0.1.3680043.10.1{k}", series_description="localizer")  # fmt: skip
        for f in files:  # a localizer: two slices in each of two orientations, one series
            ds = pydicom.dcmread(str(f))
            ds.ImageType, ds.SeriesInstanceUID = ["ORIGINAL", "PRIMARY", "LOCALIZER"], "1.2.826.0.1.3680043.10.99"
            ds.save_as(str(f))
    (r_seg,) = segmenter.segment([folder], out=tmp_path / "first")  # a SEG as the study's non-image object
    shutil.copy(r_seg["dicom_seg"], study / "seg.dcm")
    (study / "README.txt").write_text("not DICOM")
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in study.rglob("*"):
            zf.write(f, f.relative_to(study))
    said = []
    (r,) = segmenter.segment([archive], out=tmp_path / "out", announce=said.append)
    assert r["status"] == "ok" and r["series_uid"] == str(first.SeriesInstanceUID)
    assert len(said) == 1 and f"series {first.SeriesInstanceUID}" in said[0] and "chosen" in said[0]
    assert said[0].startswith(f"{archive}: ")  # named by the zip, not by the folder it was extracted to
    assert "localizer" in said[0] and "SEG" in said[0]
    assert dice(nib.load(r["segmentation"]).dataobj, nib.load(label).dataobj) > 0.85
    assert Path(r["dicom_seg"]).name == "study_seg.dcm"
    (bad,) = segmenter.segment([archive], out=tmp_path / "pick", series="1.2.3.4")
    assert (
        bad["status"] == "failed"
        and bad["error"].startswith(f"{archive}: no series 1.2.3.4")
        and str(first.SeriesInstanceUID) in bad["error"]
    )


def _small_series(folder, n=6, **kwargs):
    array = np.arange(16 * 12 * n, dtype=np.int16).reshape(16, 12, n)
    return write_series(array, np.diag([0.8, 0.8, 1.5, 1.0]), folder, **kwargs)


def test_bad_series_are_refused_with_the_file_named(segmenter, tmp_path):
    bad = tmp_path / "bad"
    cases = {}
    (bad / "text").mkdir(parents=True)
    (bad / "text" / "a.txt").write_text("hello")
    cases["text"] = "holds no NIfTI files (*.nii, *.nii.gz) and no DICOM"
    files = _small_series(bad / "nopixels")
    ds = pydicom.dcmread(str(files[2]))
    del ds.PixelData
    ds.save_as(str(files[2]))
    cases["nopixels"] = f"{files[2]}: no pixel data"
    _small_series(bad / "single", n=1)
    cases["single"] = "a single 2D slice"
    files = _small_series(bad / "missing", n=8)
    files[4].unlink()
    cases["missing"] = "not evenly spaced"
    files = _small_series(bad / "orient")
    ds = pydicom.dcmread(str(files[3]))
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(str(files[3]))
    cases["orient"] = "two orientations in one series"
    files = _small_series(bad / "truncated")
    raw = files[1].read_bytes()
    files[1].write_bytes(raw[: len(raw) - 100])
    cases["truncated"] = f"{files[1]}"
    files = _small_series(bad / "enhanced", n=2)
    for f in files:
        ds = pydicom.dcmread(str(f))
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
        ds.NumberOfFrames = 1
        ds.save_as(str(f))
    cases["enhanced"] = "Enhanced (multi-frame)"
    out = tmp_path / "out"
    results = segmenter.segment([bad / name for name in cases], out=out)
    for r, (name, message) in zip(results, cases.items()):
        assert r["status"] == "failed" and message in r["error"] and "\n" not in r["error"], (name, r["error"])
        assert str(bad / name) in r["error"] or name == "truncated", r["error"]
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]  # nothing half-written
    with pytest.raises(DicomError, match="sheared"):
        write_series(
            np.zeros((4, 4, 4), np.int16),
            np.array([[1, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]),
            tmp_path / "s",
        )


def test_segment_cli_on_a_dicom_folder(series, segmenter, tmp_path):
    folder, _, _ = series["axial"]
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "medssl", "segment", str(folder), "--out", str(out), "--preview", "true",
         "--output_type", "dicom_seg"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "axial_preview.png", "axial_seg.dcm", "axial_statistics.json", "summary.json"
    ]  # fmt: skip
    assert proc.stdout.strip().splitlines()[-1] == "1 segmented, 0 failed"
    assert "axial_seg.dcm" in proc.stdout
    stats = json.loads((out / "axial_statistics.json").read_text())
    assert stats["bundle"] == "la_seg_finetune" and stats["version"] == "0.5.0" and stats["device"] == "cpu"
    atrium = stats["labels"]["left atrium"]
    assert 10 < atrium["volume_ml"] < 300 and atrium["voxels"] * 0.625**3 / 1000 == pytest.approx(
        atrium["volume_ml"], abs=1e-3
    )
    assert (out / "axial_preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_series_of_another_body_part_is_flagged_and_still_written(series, segmenter, tmp_path):
    """The LA release on a series whose BodyPartExamined says HEAD: flagged before the model runs, written all the
    same, the warning in statistics.json, the result and the SEG's series description; the same series saying CHEST
    (a heart region) passes. statistics.json also says what the model was trained on."""
    folder, _, _ = series["axial"]
    for value, verdict in (("HEAD", "warning"), ("CHEST", "ok")):
        copy = tmp_path / value
        shutil.copytree(folder, copy)
        for f in copy.iterdir():
            ds = pydicom.dcmread(f)
            ds.BodyPartExamined = value
            ds.save_as(f)
        (r,) = segmenter.segment([copy], out=tmp_path / f"out_{value}")
        assert r["status"] == "ok" and r["quality"]["verdict"] == verdict, r["quality"]
        assert r["quality"]["checks"]["body_part_examined"] == value
        stats = json.loads(Path(r["statistics"]).read_text())
        assert stats["quality"] == r["quality"] and "LGE" in stats["model"]["task"]
        assert "Research only" in stats["model"]["intended_use"] and "Atrial" in stats["model"]["data_source"]
        description = pydicom.dcmread(r["dicom_seg"]).SeriesDescription
        if verdict == "warning":
            assert r["quality"]["reasons"][0].startswith("BodyPartExamined is 'HEAD', not a region this model")
            assert description == "CHECK body part HEAD - la_seg_finetune 0.5.0"
        else:
            assert r["quality"]["reasons"] == [] and description == "la_seg_finetune 0.5.0 segmentation"


def test_seg_codes_each_label_from_the_bundle_labels(tmp_path, caplog):
    """Three labels: two coded by the bundle's labels (liver with its own category), one without a code, which gets
    the generic code and a warning naming it; dciodvfy accepts the SEG."""
    from medssl.clinic.dicom import write_seg
    from medssl.task import parse_labels

    rng = np.random.default_rng(0)
    files = write_series(rng.integers(0, 400, (16, 16, 6)).astype(np.int16), np.diag([1.5, 1.5, 3.0, 1.0]),
                         tmp_path / "series", series_description="synthetic")  # fmt: skip
    assert len(files) == 6
    vol = read_series(tmp_path / "series")
    labels_map = np.zeros(vol.array.shape, np.uint8)
    labels_map[2:6, 2:6, 1:3], labels_map[8:12, 8:12, 2:5], labels_map[3:5, 10:14, 4] = 1, 2, 3
    labels = parse_labels({
        "0": "background",
        "1": {"name": "liver", "code": ["10200004", "SCT", "Liver"],
              "category": ["123037004", "SCT", "Anatomical Structure"]},
        "2": {"name": "spleen", "code": ["78961009", "SCT", "Spleen"]},
        "3": "lesion",
    })  # fmt: skip
    caplog.set_level("WARNING")
    names = {v: lab.name for v, lab in labels.items()}
    codes = {v: (lab.code, lab.category) for v, lab in labels.items() if v}
    path = write_seg(labels_map, vol, tmp_path / "seg.dcm", "ct_seg", "0.1.0", names, label_codes=codes)
    seg = pydicom.dcmread(path)
    coded = [(s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
              s.SegmentedPropertyCategoryCodeSequence[0].CodeValue) for s in seg.SegmentSequence]  # fmt: skip
    assert coded == [("Liver", "10200004", "123037004"), ("Spleen", "78961009", "91723000"),
                     ("Lesion", "85756007", "91723000")]  # fmt: skip
    assert "'lesion' has no code" in caplog.text and "'liver'" not in caplog.text
    np.testing.assert_array_equal(read_seg(path, vol), labels_map)
    report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True).stderr
    assert not [ln for ln in report.splitlines() if ln.startswith("Error")], report
