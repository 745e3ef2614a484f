"""la_seg_finetune end to end through ``python -m monai.bundle`` subprocesses, as a user runs it."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from helpers import BUNDLES, TINY, bundle_cmd, configs, real_subset
from medssl.networks import VNet
from medssl.lab.sample_data import sample_data

NAME = "la_seg_finetune"
META = BUNDLES / NAME / "configs" / "metadata.json"
LA_IDS = ["06SR5RBREL16DQ6M8LWS", "0RZDK210BSMWAA6467LU"]


@pytest.fixture(scope="module")
def sample_dir(module_tmp):
    out = sample_data(module_tmp("sample"), num_cases=5, shape=(48, 48, 32), num_test=2)
    d = json.loads((out / "dataset.json").read_text())
    d["validation"] = d["test"][:1]
    (out / "dataset.json").write_text(json.dumps(d))
    return out


@pytest.fixture(scope="module")
def trained(sample_dir, module_tmp):
    """2 iterations on the sample set with validation every iteration and a resume checkpoint each one."""
    root = module_tmp("bundle")
    proc = bundle_cmd(
        "run",
        "--config_file",
        configs(NAME, "train"),
        "--bundle_root",
        root,
        "--dataset_dir",
        sample_dir,
        "--num_labeled",
        3,
        "--max_iterations",
        2,
        "--val_interval",
        1,
        "--save_interval",
        1,
        "--batch_size",
        2,
        *TINY,
    )
    return root, proc.stdout


def _metrics_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_paper_sliding_window_option(trained, sample_dir):
    """--sw_stride [18,18,4] reproduces the UA-MT window grid: ceil((size - patch) / stride) + 1 windows per axis."""
    root, _ = trained
    out = root / "eval_paper"
    proc = bundle_cmd(
        "run",
        "--config_file",
        configs(NAME, "train", "evaluate"),
        "--bundle_root",
        root,
        "--dataset_dir",
        sample_dir,
        "--output_dir",
        out,
        "--sw_stride",
        "[8,8,4]",
        *TINY,
    )
    assert proc.returncode == 0 and (out / "metrics.csv").is_file()
    from monai.inferers.utils import _get_scan_interval, dense_patch_slices

    for patch, stride, size in [((112, 112, 80), (18, 18, 4), (244, 160, 88)), ((32, 32, 32), (8, 8, 4), (48, 48, 32))]:
        overlap = [1 - (s + 0.5) / p for s, p in zip(stride, patch)]
        interval = _get_scan_interval(size, patch, 3, overlap)
        assert [i for i, n, p in zip(interval, size, patch) if n > p] == [
            s for s, n, p in zip(stride, size, patch) if n > p
        ]
        starts = sorted({tuple(s.start for s in sl) for sl in dense_patch_slices(size, patch, interval)})
        expected = [int(np.ceil((n - p) / s)) + 1 for n, p, s in zip(size, patch, stride)]
        assert len(starts) == int(np.prod(expected))


def test_pretrained_ckpt_logs_counts(trained, sample_dir, tmp_path):
    root, _ = trained
    proc = bundle_cmd(
        "run",
        "--config_file",
        configs(NAME, "train"),
        "--bundle_root",
        tmp_path,
        "--dataset_dir",
        sample_dir,
        "--num_labeled",
        2,
        "--max_iterations",
        1,
        "--save_interval",
        0,
        "--pretrained_ckpt",
        root / "models" / "model.pt",
        *TINY,
    )
    n = len(VNet().state_dict())
    assert f"{n} tensors matched, 0 missing, 0 unexpected, 0 with another shape" in proc.stdout
    assert "CPU allocator: freed memory is kept for reuse" in proc.stdout  # initialize ran medssl.runtime


def test_train_evaluate_infer_two_real_cases(la_dir, tmp_path):
    data = real_subset(la_dir, tmp_path / "data", LA_IDS[:1], test_ids=LA_IDS[1:])
    root = tmp_path / "bundle"
    args = ["--bundle_root", root, "--dataset_dir", data, *TINY]
    bundle_cmd(
        "run",
        "--config_file",
        configs(NAME, "train"),
        "--num_labeled",
        1,
        "--max_iterations",
        2,
        "--batch_size",
        2,
        *args,
    )
    bundle_cmd("run", "--config_file", configs(NAME, "train", "evaluate"), *args)
    rows = _metrics_rows(root / "eval" / "metrics.csv")
    assert rows[0]["case"] == LA_IDS[1] and 0 <= float(rows[0]["dice"]) <= 1
    bundle_cmd("run", "--config_file", configs(NAME, "inference"), *args)
    image = nib.load(la_dir / "imagesTr" / f"{LA_IDS[1]}.nii.gz")
    pred = nib.load(root / "eval" / f"{LA_IDS[1]}_seg.nii.gz")
    assert pred.shape == image.shape == (199, 143, 88)
    np.testing.assert_allclose(pred.affine, image.affine)


@pytest.mark.parametrize("case", ["no_dataset_json", "patch_too_large", "num_labeled_too_large"])
def test_bad_input_stops_with_named_file(case, sample_dir, tmp_path):
    data, extra, expected = sample_dir, [], ""
    if case == "no_dataset_json":
        data, expected = tmp_path, f"{tmp_path}/dataset.json: file not found"
    elif case == "patch_too_large":
        extra = ["--patch_size", "[64,32,32]", "--num_labeled", 3]
        expected = (
            "sample_000.nii.gz: volume shape (48, 48, 32) on the [0.625, 0.625, 0.625] mm grid is smaller than "
            "patch_size [64, 32, 32]"
        )
    else:
        extra, expected = ["--num_labeled", 9], "num_labeled=9 is out of range"
    proc = bundle_cmd(
        "run",
        "--config_file",
        configs(NAME, "train"),
        "--bundle_root",
        tmp_path / "b",
        "--dataset_dir",
        data,
        "--max_iterations",
        1,
        "--num_workers",
        0,
        *extra,
        check=False,
    )
    assert proc.returncode != 0
    assert proc.stdout.rstrip().splitlines()[-1].startswith("error: ")  # the reason comes last
    assert expected in proc.stdout.rstrip().splitlines()[-1]
    assert not (tmp_path / "b" / "models" / "model.pt").exists()
