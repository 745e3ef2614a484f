"""Several classes through the semi-supervised bundles: cvrl_semisup and simcvd_distill train with a four-class
``--labels`` (num_classes follows) on a four-class set (the CT set of issue 29 crashed both: the contour term and the
SDM were class 1 only)."""

import json
import shutil
import subprocess
import sys

import nibabel as nib
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
        # the README's CT example: a Hounsfield window instead of the z-score (the synthetic set is not CT, but the
        # window path runs end to end)
        # and validation off with --val_interval 0 (ignite's "every should be ... greater than zero" before)
        ("la_seg_finetune", ["loss"], ["--intensity", json.dumps({"mode": "window", "range": [-175, 250]}),
                                       "--val_interval", 0]),
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
    assert inference["intensity"]["mode"] == ("window" if extra else "zscore")
    meta = json.loads((root / "configs" / "metadata.json").read_text())["network_data_format"]
    assert meta["outputs"]["pred"]["channel_def"] == LABELS and meta["outputs"]["pred"]["num_channels"] == 4
    assert meta["post_processed_outputs"]["pred"]["value_range"] == [0, 3]
    assert f"wrote the run's task (labels, spacing, intensity, patch) into {root}/configs/inference.json" in proc.stdout
    for term in terms:
        lines = [line for line in proc.stdout.splitlines() if f"{term}: " in line]
        values = [float(line.split(f"{term}: ")[1].split()[0]) for line in lines]
        assert values and all(np.isfinite(values)), (term, values)


def test_segment_uses_the_trained_bundle_as_it_describes_itself(four_class_dir, module_tmp):
    """``segment --bundle`` on a bundle trained with four labels: it builds the four-class network (a size mismatch
    before the task was written back) and prints and records one volume per label."""
    root = module_tmp("segment_bundle")
    shutil.copytree(REPO / "bundles" / "la_seg_finetune" / "configs", root / "configs")
    bundle_cmd(
        "run", "--config_file", configs("la_seg_finetune", "train"), "--bundle_root", root, "--dataset_dir",
        four_class_dir, "--num_labeled", 2, "--labels", json.dumps(LABELS), "--max_iterations", 1, *TINY,
    )  # fmt: skip
    scan = four_class_dir / json.loads((four_class_dir / "dataset.json").read_text())["training"][0]["image"]
    out = module_tmp("segment_out")
    proc = subprocess.run(
        [sys.executable, "-m", "medssl", "segment", str(scan), "--bundle", str(root), "--out", str(out),
         "--runtime", "torch"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.startswith("scan "))
    assert header.split()[1:7] == ["anterior", "part", "(mL)", "middle", "part", "(mL)"], header
    assert "posterior part (mL)" in header and "left atrium" not in proc.stdout
    stats = json.loads(next(out.glob("*_statistics.json")).read_text())
    assert [(name, v["value"]) for name, v in stats["labels"].items()] == [
        ("anterior part", 1), ("middle part", 2), ("posterior part", 3)]  # fmt: skip
