"""The ACDC release (acdc_seg_finetune, built by benchmarks/acdc_release.py): pulled offline from the committed index,
`segment` on real ACDC validation frames reproduces the release's recorded per-frame Dice with the three structures
named, a DICOM series of a frame gets a SEG with the three SNOMED CT codes, and the MONAI Label pieces serve it with
its names and codes."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers import REPO

from medssl.clinic.release import pull

NAME = "acdc_seg_finetune"
INDEX = REPO / "bundle_index.json"
RESULTS = REPO / "benchmarks" / "results" / "acdc_release_cpu" / "results.json"
NAMES = ["right ventricle", "myocardium", "left ventricle"]
CODES = ["53085002", "74281007", "87878005"]
FRAMES = ["patient028_frame01", "patient028_frame02"]  # one validation patient's ED and ES frames


@pytest.fixture(scope="module")
def released(module_tmp):
    return pull(NAME, bundle_dir=str(module_tmp("pulled_acdc")), index=str(INDEX), torchscript=False)


def _recorded_case(frame):
    run = json.loads(RESULTS.read_text())["runs"][0]
    return next(c for c in run["cases"] if c["case"] == frame)


def _dice(pred, label, value):
    p, t = pred == value, label == value
    return 2 * np.logical_and(p, t).sum() / (p.sum() + t.sum())


def test_release_states_its_task_and_validation_figures(released):
    meta = json.loads((released / "configs" / "metadata.json").read_text())
    post = meta["network_data_format"]["post_processed_outputs"]["pred"]
    assert post["channel_def"] == {"0": "background", **{str(i + 1): n for i, n in enumerate(NAMES)}}
    assert "ACDC" in meta["data_source"] and "openvino_int8_calibration" not in meta
    assert 0 < meta["eval_metrics"]["mean_dice"] <= 1 and set(meta["eval_metrics"]["per_class"]) == set(NAMES)
    # the figures are the recorded evaluation's; the recipe names both stages; the volume checks have their record
    run = json.loads(RESULTS.read_text())["runs"][0]
    assert meta["eval_metrics"]["mean_dice"] == pytest.approx(run["summary"]["dice"]["mean"], abs=1e-4)
    recipe = meta["release_recipe"]
    assert recipe["max_iterations"] + recipe["warm_start"]["max_iterations"] == 2200
    assert set(meta["training_label_volumes_ml"]) == set(NAMES)
    # the LA release's records hold for its own weights only: not shipped here
    assert not (released / "configs" / "runtime_accuracy.json").exists()
    assert not (released / "configs" / "openvino_int8.json").exists()
    inference = json.loads((released / "configs" / "inference.json").read_text())
    train = json.loads((released / "configs" / "train.json").read_text())
    assert inference["labels"] == train["labels"] and train["pad_small_volumes"] is True
    assert [inference["labels"][str(i + 1)]["code"][0] for i in range(3)] == CODES


def test_segment_reproduces_the_recorded_validation_dice(released, acdc_dir, tmp_path):
    """`python -m medssl segment` on two validation frames: one volume column per structure, statistics.json names
    the three, and each structure's Dice against the reference label is the release's evaluation record for that
    frame (its largest-component column: segment keeps each structure's largest component, as evaluate's _lcc)."""
    scans = [acdc_dir / "imagesTr" / f"{f}.nii.gz" for f in FRAMES]
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "medssl", "segment", *map(str, scans), "--bundle", str(released), "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.startswith("scan "))
    assert " ".join(header.split()[1:9]) == "right ventricle (mL) myocardium (mL) left ventricle (mL)", header
    for frame in FRAMES:
        stats = json.loads((out / f"{frame}_statistics.json").read_text())
        assert list(stats["labels"]) == NAMES
        assert stats["quality"]["verdict"] == "ok", stats["quality"]  # within the training labels' volumes
        pred = np.asarray(nib.load(out / f"{frame}_seg.nii.gz").dataobj)
        label = np.asarray(nib.load(acdc_dir / "labelsTr" / f"{frame}.nii.gz").dataobj)
        recorded = _recorded_case(frame)
        for value, name in enumerate(NAMES, start=1):
            slug = name.replace(" ", "_")
            assert _dice(pred, label, value) == pytest.approx(recorded[f"dice_lcc_{slug}"], abs=0.01), (frame, name)


def test_segment_a_frame_as_dicom_writes_three_coded_segments(released, acdc_dir, tmp_path):
    from medssl.clinic.dicom import write_series

    image = nib.load(acdc_dir / "imagesTr" / f"{FRAMES[0]}.nii.gz")
    levels = np.rint(np.asarray(image.dataobj, dtype=np.float64) * 4095).astype(np.int16)  # the [0, 1] values
    series = tmp_path / "series"
    write_series(levels, image.affine, series, patient_id="ACDC028", series_description="cine SAX", slope=1 / 4095)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "medssl", "segment", str(series), "--bundle", str(released), "--out", str(out),
         "--output_type", "dicom_seg"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seg_file = next(out.glob("*_seg.dcm"))
    seg = pydicom.dcmread(seg_file)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Right ventricle", "Myocardium", "Left ventricle"]
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence] == CODES
    report = subprocess.run(["dciodvfy", str(seg_file)], capture_output=True, text=True).stderr
    assert not [ln for ln in report.splitlines() if ln.startswith("Error")], report


def test_monai_label_serves_it_with_its_names_and_codes(tmp_path):
    """The MONAI Label app's pieces: prepare_models pulls it by name (checksum verified), and the app's label names
    and SEG codes come from it (what MedsslApp reads for each served bundle)."""
    from medssl.clinic.label import bundle_label_names, prepare_models
    from medssl.task import read_task

    models = prepare_models(str(tmp_path / "model"), [NAME], index=str(INDEX))
    path = models[NAME]
    assert bundle_label_names(path) == {1: NAMES[0], 2: NAMES[1], 3: NAMES[2]}
    task = read_task(path)
    assert task.modality == "MR" and [task.codes[v][0][0] for v in (1, 2, 3)] == CODES
