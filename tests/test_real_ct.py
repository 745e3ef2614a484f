"""The CT path on a real CT: TotalSegmentator's example scans (tests/data/totalsegmentator, Apache-2.0, see its
README): a CT DICOM series read in Hounsfield units onto the geometry TotalSegmentator's own conversion gives, the
window preprocessing on real Hounsfield units, and la_seg_finetune trained briefly on the real CT with four coded
labels, evaluated per organ in mm, then ``segment --bundle`` on the real series writing a SEG that dciodvfy accepts.
The reference masks are TotalSegmentator's output (a silver standard), used here as labels, not as truth."""

import csv
import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from helpers import REPO, bundle_cmd, configs

from medssl.clinic.dicom import DicomError, read_series

DATA = REPO / "tests" / "data" / "totalsegmentator"
SERIES = DATA / "example_ct_dicom"
# TotalSegmentator's "total" classes -> ours: liver 5, spleen 1, kidneys 2 (right) and 3 (left) as one label
TOTAL_TO_OURS = {5: 1, 1: 2, 2: 3, 3: 3}
LABELS = {
    "0": "background",
    "1": {"name": "liver", "code": ["10200004", "SCT", "Liver"]},
    "2": {"name": "spleen", "code": ["78961009", "SCT", "Spleen"]},
    "3": {"name": "kidney", "code": ["64033007", "SCT", "Kidney"], "largest_component": False},  # two kidneys
}
WINDOW = {"mode": "window", "range": [-175, 250]}


def our_labels(total: np.ndarray) -> np.ndarray:
    out = np.zeros(total.shape, np.uint8)
    for theirs, ours in TOTAL_TO_OURS.items():
        out[total == theirs] = ours
    return out


def on_our_grid(nifti: nib.Nifti1Image, affine: np.ndarray) -> np.ndarray:
    """A NIfTI's array reoriented (axis flips / permutations only) onto the voxel axes of ``affine``."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    transform = ornt_transform(io_orientation(nifti.affine), io_orientation(affine))
    np.testing.assert_allclose(nifti.affine @ inv_ornt_aff(transform, nifti.shape), affine, atol=1e-4)
    return apply_orientation(np.asarray(nifti.dataobj), transform)


def test_the_real_ct_series_reads_in_hounsfield_units():
    """20 JPEG 2000 slices whose SOP Class UID is blank (only the file meta names CT Image Storage): read as CT, on
    the grid of TotalSegmentator's own NIfTI of the series, with organ intensities where the literature puts them
    (contrast-enhanced liver and spleen 60-130 HU, air -1000 HU)."""
    volume = read_series(SERIES, modalities=("CT",))
    assert volume.array.shape == (512, 512, 20)
    np.testing.assert_allclose(np.abs(np.diag(volume.affine))[:3], [0.9765625, 0.9765625, 2.0])
    assert all(ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" for ds in volume.datasets)
    total = on_our_grid(nib.load(DATA / "example_seg_dicom.nii.gz"), volume.affine)  # asserts the same affine
    hu = volume.array
    assert 60 < np.median(hu[total == 5]) < 130 and 50 < np.median(hu[total == 1]) < 120  # liver, spleen
    assert np.percentile(hu[total == 0], 10) == -1024  # air outside the body (the scanner's padding value)
    with pytest.raises(DicomError, match=r"no 3D MR image series found .* 'CT Body 3.0' \(CT, 20 slices\)"):
        read_series(SERIES, bundle="la_seg_finetune")


def test_the_window_on_real_hounsfield_units():
    """Intensityd's window against numpy: clip to [-175, 250] HU, scale to [0, 1]; fat and air at 0, bone at 1."""
    from medssl.transforms import Intensityd

    hu = np.asarray(nib.load(DATA / "example_ct_sm.nii.gz").dataobj).astype(np.float32)
    out = Intensityd("image", intensity=WINDOW)({"image": torch.as_tensor(hu[None])})["image"][0].numpy()
    np.testing.assert_allclose(out, np.clip((hu + 175) / 425, 0, 1), atol=1e-6)
    total = np.asarray(nib.load(DATA / "example_seg.nii.gz").dataobj)
    liver = out[total == 5]
    assert 0.45 < np.median(liver) < 0.7 and (out[hu < -175] == 0).all() and (out[hu > 250] == 1).all()


@pytest.fixture(scope="module")
def trained(module_tmp):
    """spark_pretrain 2 iterations on the real CT (window), then la_seg_finetune 6 iterations from its encoder (4
    labels, window, modality CT, 2 mm grid) into a bare run folder, and evaluated; the scan is both the training and
    the evaluation case (a pipeline check, not a benchmark)."""
    data = module_tmp("real_ct")
    for sub in ("imagesTr", "labelsTr"):
        (data / sub).mkdir()
    shutil.copy(DATA / "example_ct_sm.nii.gz", data / "imagesTr" / "ct.nii.gz")
    total = nib.load(DATA / "example_seg.nii.gz")
    nib.save(nib.Nifti1Image(our_labels(np.asarray(total.dataobj)), total.affine), data / "labelsTr" / "ct.nii.gz")
    case = {"image": "imagesTr/ct.nii.gz", "label": "labelsTr/ct.nii.gz"}
    (data / "dataset.json").write_text(json.dumps({"training": [case], "test": [case]}))
    root = module_tmp("real_ct_bundle")  # a bare run folder: the training gives it the bundle's configs and its task
    args = [
        "--bundle_root", root, "--dataset_dir", data, "--labels", json.dumps(LABELS), "--modality", "CT",
        "--intensity", json.dumps(WINDOW), "--spacing", "[2,2,2]", "--patch_size", "[32,32,32]", "--num_workers", 0,
        "--sw_batch_size", 4, "--num_labeled", 1,
    ]  # fmt: skip
    # SparK pre-trains on the CT's Hounsfield units through the same window, then the fine-tuning starts from it
    spark = module_tmp("real_ct_spark")
    bundle_cmd(
        "run", "--config_file", configs("spark_pretrain", "train"), "--bundle_root", spark, "--dataset_dir", data,
        "--intensity", json.dumps(WINDOW), "--spacing", "[2,2,2]", "--patch_size", "[32,32,32]", "--num_workers", 0,
        "--max_iterations", 2, "--batch_size", 2, "--save_interval", 0,
    )  # fmt: skip
    proc = bundle_cmd(
        "run", "--config_file", configs("la_seg_finetune", "train"), *args, "--max_iterations", 6, "--batch_size", 2,
        "--val_interval", 0, "--pretrained_ckpt", spark / "models" / "model.pt",
    )  # fmt: skip
    assert "tensors matched, 0 missing" not in proc.stdout  # the encoder only: the decoder starts fresh
    assert f"pretrained_ckpt {spark / 'models' / 'model.pt'}:" in proc.stdout
    assert f"copied the configs of la_seg_finetune ({REPO / 'bundles' / 'la_seg_finetune' / 'configs'})" in proc.stdout
    bundle_cmd("run", "--config_file", configs("la_seg_finetune", "train", "evaluate"), *args)
    return root


def test_a_short_training_on_real_ct_evaluates_per_organ_in_mm(trained):
    rows = list(csv.DictReader(open(trained / "eval" / "metrics.csv")))
    assert rows[0]["case"] == "ct" and [r["case"] for r in rows[1:]] == ["mean", "std", "n_nan"]
    columns = list(rows[0])
    for metric in ("dice", "jaccard", "hd95_mm", "asd_mm"):
        assert [c for c in columns if c.startswith(metric + "_") and not c.startswith(metric + "_lcc")][:3] == [
            f"{metric}_liver", f"{metric}_spleen", f"{metric}_kidney"]  # fmt: skip
    per_class = [float(rows[0][f"dice_{n}"]) for n in ("liver", "spleen", "kidney")]
    assert all(0 <= d <= 1 for d in per_class) and float(rows[0]["dice"]) == pytest.approx(np.mean(per_class), 1e-5)
    inference = json.loads((trained / "configs" / "inference.json").read_text())
    assert inference["intensity"]["range"] == [-175.0, 250.0] and inference["spacing"] == [2.0, 2.0, 2.0]


def test_segment_the_real_ct_series_into_a_coded_seg(trained, tmp_path):
    """The example series is anonymised with blank Study, Series and SOP Instance UIDs: a SEG of it would reference
    nothing (highdicom wrote one that dciodvfy rejects), so it is refused naming the file; with the UIDs given back (the
    SOP Instance UIDs from each file's meta, new study and series UIDs) segment writes the coded SEG."""
    from medssl.clinic.dicom import write_seg
    from pydicom.uid import generate_uid

    raw = read_series(SERIES, modalities=("CT",))
    blank = r"CT\.1\.3\.12\S*: StudyInstanceUID, SeriesInstanceUID empty .* \(--output_type nifti\)"
    with pytest.raises(DicomError, match=blank):
        write_seg(np.zeros(raw.array.shape, np.uint8), raw, tmp_path / "x.dcm", "b", "1", {1: "liver"})
    assert not (tmp_path / "x.dcm").exists()
    series = tmp_path / "series"
    series.mkdir()
    study_uid, series_uid = generate_uid(), generate_uid()
    for f in sorted(SERIES.iterdir()):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.save_as(series / f"{f.name}.dcm")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "medssl", "segment", str(series), "--bundle", str(trained), "--out", str(out),
         "--runtime", "torch", "--output_type", "both"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.startswith("scan "))
    assert header.split()[1:7] == ["liver", "(mL)", "spleen", "(mL)", "kidney", "(mL)"], header
    stats = json.loads(next(out.glob("*_statistics.json")).read_text())
    assert list(stats["labels"]) == ["liver", "spleen", "kidney"]
    seg_file = next(out.glob("*_seg.dcm"))
    seg = pydicom.dcmread(seg_file)
    codes = [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence]
    assert codes == ["10200004", "78961009", "64033007"]  # one segment per label, empty or not
    source = read_series(series, modalities=("CT",))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.series_uid
    first = source.datasets[0]
    assert seg.PatientID == first.PatientID and seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    report = subprocess.run(["dciodvfy", str(seg_file)], capture_output=True, text=True).stderr
    assert not [ln for ln in report.splitlines() if ln.startswith("Error")], report
