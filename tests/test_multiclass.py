"""Several classes through the semi-supervised bundles: cvrl_semisup and simcvd_distill train with a four-class
``--labels`` (num_classes follows) on a four-class set (the CT set of issue 29 crashed both: the contour term and the
SDM were class 1 only)."""

import json
import shutil
import subprocess
import sys

import nibabel as nib
import pydicom
import numpy as np
import pytest
import torch
from helpers import REPO, TINY, bundle_cmd, configs

from medssl.lab.sample_data import sample_data


LABELS = {"0": "background", "1": "anterior part", "2": "middle part", "3": "posterior part"}


@pytest.fixture(scope="module")
def four_class_dir(module_tmp):
    """The synthetic atrium set with its structure cut into three classes along x (1, 2, 3 from left to right);
    the last two training cases are unlabeled; the test case is also the validation list."""
    out = sample_data(module_tmp("four"), num_cases=5, shape=(48, 48, 32), num_test=1)
    d = json.loads((out / "dataset.json").read_text())
    for entry in d["training"] + d.get("test", []):
        path = out / entry["label"]
        img = nib.load(path)
        label = np.asarray(img.dataobj).astype(np.uint8)
        xs = np.nonzero(label.any(axis=(1, 2)))[0]
        cuts = np.linspace(xs.min(), xs.max() + 1, 4).astype(int)
        for c in (2, 3):
            label[cuts[c - 1] :][label[cuts[c - 1] :] > 0] = c
        assert set(np.unique(label)) == {0, 1, 2, 3}, path
        nib.save(nib.Nifti1Image(label, img.affine, img.header), path)
    for entry in d["training"][2:]:
        entry["label"] = "labelsTr/no_such_label.nii.gz"
    d["validation"] = d["test"]  # so that validation is attached (and --val_interval 0 means something)
    (out / "dataset.json").write_text(json.dumps(d))
    return out


@pytest.mark.parametrize(
    "bundle, terms, extra",
    [
        ("cvrl_semisup", ["loss_sup", "loss_contour", "loss_global", "loss_local", "loss_consistency"], []),
        ("simcvd_distill", ["loss_seg", "loss_sdm", "loss_contrast", "loss_distill", "loss_consistency"], []),
        # validation off with --val_interval 0 (ignite's "every should be ... greater than zero" before)
        ("la_seg_finetune", ["loss"], ["--val_interval", 0]),
    ],
)
def test_bundles_train_four_classes(bundle, terms, extra, four_class_dir, module_tmp):
    root = module_tmp(bundle)
    shutil.copytree(REPO / "bundles" / bundle / "configs", root / "configs")  # a bundle folder of its own
    proc = bundle_cmd(
        "run", "--config_file", configs(bundle, "train"), "--bundle_root", root, "--dataset_dir", four_class_dir,
        "--num_labeled", 2, "--labels", json.dumps(LABELS), "--max_iterations", 2, "--save_interval", 1, *TINY,
        *extra,
    )  # fmt: skip
    assert (root / "models" / "model.pt").is_file()
    weights = torch.load(root / "models" / "model.pt", weights_only=True)
    assert weights["out_conv.weight"].shape[0] == 4  # num_classes followed the labels
    # the trained bundle describes its task: inference.json and metadata.json say what the run trained
    inference = json.loads((root / "configs" / "inference.json").read_text())
    assert inference["labels"] == LABELS and inference["patch_size"] == [32, 32, 32]
    assert inference["intensity"] == {"mode": "zscore"} and inference["modality"] == "MR"
    meta = json.loads((root / "configs" / "metadata.json").read_text())["network_data_format"]
    assert meta["outputs"]["pred"]["channel_def"] == LABELS and meta["outputs"]["pred"]["num_channels"] == 4
    assert meta["post_processed_outputs"]["pred"]["value_range"] == [0, 3]
    assert f"wrote the run's task (labels, spacing, intensity, patch) into {root}/configs/inference.json" in proc.stdout
    for term in terms:
        lines = [line for line in proc.stdout.splitlines() if f"{term}: " in line]
        values = [float(line.split(f"{term}: ")[1].split()[0]) for line in lines]
        assert values and all(np.isfinite(values)), (term, values)


CT_LABELS = {
    "0": "background",
    "1": {"name": "liver", "code": ["10200004", "SCT", "Liver"],
          "category": ["123037004", "SCT", "Anatomical Structure"]},
    "2": {"name": "spleen", "code": ["78961009", "SCT", "Spleen"]},
    "3": {"name": "kidney", "code": ["64033007", "SCT", "Kidney"]},
}


@pytest.fixture(scope="module")
def ct_dir(four_class_dir, module_tmp):
    """The four-class set as CT: int16 Hounsfield units (the synthetic intensities x 100), 0.625 x 0.625 x 1.25 mm."""
    out = module_tmp("ct")
    shutil.copytree(four_class_dir, out, dirs_exist_ok=True)
    for path in sorted((out / "imagesTr").glob("*.nii.gz")) + sorted((out / "imagesTs").glob("*.nii.gz")):
        img = nib.load(path)
        hu = np.round(np.asarray(img.dataobj) * 100).astype(np.int16)
        nib.save(nib.Nifti1Image(hu, img.affine), path)
    return out


def test_a_ct_bundle_from_training_to_the_dicom_seg(ct_dir, module_tmp, tmp_path):
    """The issue's acceptance path at test size: la_seg_finetune trained on CT with a Hounsfield window, four coded
    labels and modality CT; the trained bundle describes itself, so ``segment --bundle`` on a NIfTI prints one volume
    per organ and on a CT DICOM series writes a SEG with three coded segments that dciodvfy accepts; an MR series is
    refused, naming the series and the bundle."""
    from medssl.clinic.dicom import write_series

    root = module_tmp("ct_bundle")
    shutil.copytree(REPO / "bundles" / "la_seg_finetune" / "configs", root / "configs")
    bundle_cmd(
        "run", "--config_file", configs("la_seg_finetune", "train"), "--bundle_root", root, "--dataset_dir", ct_dir,
        "--num_labeled", 2, "--labels", json.dumps(CT_LABELS), "--modality", "CT", "--max_iterations", 1,
        "--intensity", json.dumps({"mode": "window", "range": [-175, 250]}), *TINY,
    )  # fmt: skip
    meta = json.loads((root / "configs" / "metadata.json").read_text())["network_data_format"]["inputs"]["image"]
    assert meta["modality"] == "CT" and meta["intensity"].startswith("clipped to the window [-175, 250]")
    scan = ct_dir / json.loads((ct_dir / "dataset.json").read_text())["training"][0]["image"]
    img = nib.load(scan)
    hu = np.asarray(img.dataobj).astype(np.int16)
    write_series(hu + 1024, img.affine, tmp_path / "ct", modality="CT", intercept=-1024, series_description="CT")
    write_series(hu + 1024, img.affine, tmp_path / "mr", modality="MR", series_description="MR")

    def segment(source, out, *extra):
        return subprocess.run(
            [sys.executable, "-m", "medssl", "segment", str(source), "--bundle", str(root), "--out", str(out),
             "--runtime", "torch", *extra],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    proc = segment(scan, tmp_path / "nifti_out")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.startswith("scan "))
    assert header.split()[1:7] == ["liver", "(mL)", "spleen", "(mL)", "kidney", "(mL)"], header
    proc = segment(tmp_path / "ct", tmp_path / "dicom_out", "--output_type", "both")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seg_file = next((tmp_path / "dicom_out").glob("*_seg.dcm"))
    seg = pydicom.dcmread(seg_file)
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence] == [
        "10200004", "78961009", "64033007"]  # fmt: skip
    stats = json.loads(next((tmp_path / "dicom_out").glob("*_statistics.json")).read_text())
    assert list(stats["labels"]) == ["liver", "spleen", "kidney"]
    report = subprocess.run(["dciodvfy", str(seg_file)], capture_output=True, text=True).stderr
    assert not [ln for ln in report.splitlines() if ln.startswith("Error")], report
    proc = segment(tmp_path / "mr", tmp_path / "mr_out")
    assert proc.returncode != 0
    last = (proc.stdout + proc.stderr).strip().splitlines()[-1]
    assert "no 3D CT image series found" in last and f"{root.name} segments CT images" in last, last
