"""Bad input through the data path and the bundles: a clear error naming the file and what was expected, nothing
half-written; and a bounded fuzz of corrupt NIfTI files that must give a clean error (never a crash or a hang)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import REPO, TINY, bundle_cmd, configs

from medssl.data import DataError, check_headers, write_nifti
from medssl.sample_data import sample_data
from medssl.transforms import CheckVolumed, LoadVolumed

AFFINE = np.diag([0.625, 0.625, 0.625, 1.0])


def test_truncated_voxel_data_is_named(tmp_path):
    write_nifti(np.random.default_rng(0).standard_normal((16, 16, 16)).astype(np.float32), AFFINE, tmp_path / "a.nii")
    raw = (tmp_path / "a.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[: len(raw) - 4000])  # the header is intact, the voxels are not
    check_headers(tmp_path / "cut.nii")  # the header alone looks fine...
    load = LoadVolumed(["image", "label"], ensure_channel_first=True)
    with pytest.raises(DataError, match=r"cut.nii: not a readable NIfTI volume"):  # ...the voxel read names the file
        load({"image": str(tmp_path / "a.nii"), "label": str(tmp_path / "cut.nii")})


def test_fuzzed_nifti_files_give_clean_errors(tmp_path):
    """300 corrupt variants of a valid volume (truncations, flipped bytes, mutated header fields, random bytes) run
    through the header check and the loading transforms in a child process: each gives a DataError or loads; the
    child never crashes and finishes within the time bound."""
    script = f"""
import json, time, numpy as np, nibabel as nib
from medssl.data import DataError, check_headers, write_nifti
from medssl.transforms import CheckVolumed, LoadVolumed
rng = np.random.default_rng(0)
root = {str(tmp_path)!r}
write_nifti(rng.standard_normal((12, 10, 8)).astype(np.float32), np.eye(4), root + "/base.nii")
base = open(root + "/base.nii", "rb").read()
load, check = LoadVolumed("image", ensure_channel_first=True), CheckVolumed("image")
outcomes, start = {{}}, time.time()
for i in range(300):
    data = bytearray(base)
    kind = i % 4
    if kind == 0:
        data = data[: int(rng.integers(0, len(data)))]
    elif kind == 1:
        for _ in range(int(rng.integers(1, 8))):
            data[int(rng.integers(0, 352))] = int(rng.integers(0, 256))
    elif kind == 2:
        img = nib.load(root + "/base.nii")
        hdr = img.header.copy()
        field = ["dim", "datatype", "vox_offset", "bitpix", "scl_slope", "pixdim"][int(rng.integers(0, 6))]
        value = np.array(hdr[field]).copy()
        try:
            value.flat[int(rng.integers(0, value.size))] = rng.choice([-1, 0, 3, 7, 255, 1e9, np.nan, 16384])
            hdr[field] = value
            data = bytearray(hdr.binaryblock) + bytearray(base[352:])
        except Exception:
            data = data[:100]
    else:
        data = bytearray(rng.integers(0, 256, int(rng.integers(1, 2000)), dtype=np.uint8).tobytes())
    path = f"{{root}}/f{{i}}.nii"
    open(path, "wb").write(bytes(data))
    try:
        check_headers(path)
        check(load({{"image": path}}))
        outcome = "ok"
    except DataError:
        outcome = "DataError"
    except Exception as e:
        outcome = f"{{type(e).__name__}}: {{e}}"[:200]
    outcomes[outcome] = outcomes.get(outcome, 0) + 1
print(json.dumps({{"outcomes": outcomes, "seconds": time.time() - start}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["outcomes"]) <= {"ok", "DataError"}, result["outcomes"]
    assert result["outcomes"].get("DataError", 0) >= 150 and sum(result["outcomes"].values()) == 300
    assert result["seconds"] < 120


@pytest.fixture
def data(tmp_path):
    return sample_data(tmp_path / "data", num_cases=4, shape=(32, 32, 32), num_test=1)


def _set(path, array, dtype=np.float32):
    write_nifti(np.asarray(array, dtype=dtype), AFFINE, path)


@pytest.mark.parametrize(
    "case",
    [
        "truncated_image",
        "nan_voxels",
        "label_values",
        "4d_image",
        "shape_mismatch",
        "missing_label",
        "wrong_architecture_ckpt",
        "unrelated_ckpt",
    ],
)
def test_bundle_stops_with_named_file(case, data, tmp_path):
    img0, lab0 = data / "imagesTr" / "sample_000.nii.gz", data / "labelsTr" / "sample_000.nii.gz"
    extra = []
    if case == "truncated_image":
        raw = img0.read_bytes()
        img0.write_bytes(raw[: len(raw) // 2])
        expected = f"{img0}: not a readable NIfTI volume"
    elif case == "nan_voxels":
        arr = np.zeros((32, 32, 32))
        arr[3, 4, 5] = np.nan
        _set(img0, arr)
        expected = f"{img0}: 1 NaN/Inf voxels; expected finite intensities"
    elif case == "label_values":
        _set(lab0, np.full((32, 32, 32), 2), np.uint8)
        expected = f"{lab0}: label values [2.0] outside the expected classes [0, 1]"
    elif case == "4d_image":
        _set(img0, np.zeros((32, 32, 32, 2)))
        expected = f"{img0}: expected a 3D volume (H, W, D), got shape (32, 32, 32, 2)"
    elif case == "shape_mismatch":
        _set(lab0, np.zeros((32, 32, 31)), np.uint8)
        expected = f"{lab0}: label shape (32, 32, 31) differs from image shape (32, 32, 32)"
    elif case == "missing_label":
        lab0.unlink()
        expected = f"{lab0}: file not found"
    elif case == "wrong_architecture_ckpt":
        from medssl.networks import VNet

        torch.save(VNet(n_filters=8).state_dict(), tmp_path / "small.pt")  # same names, other shapes
        extra, expected = ["--pretrained_ckpt", tmp_path / "small.pt"], "matches 0 of the network's 30 weight kernels"
    else:
        torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
        extra, expected = ["--pretrained_ckpt", tmp_path / "other.pt"], "matches 0 of the network's 30 weight kernels"
    root = tmp_path / "bundle"
    proc = bundle_cmd(
        "run",
        "--config_file",
        configs("la_seg_finetune", "train"),
        "--bundle_root",
        root,
        "--dataset_dir",
        data,
        "--num_labeled",
        2,
        "--max_iterations",
        1,
        *TINY,
        *extra,
        check=False,
    )
    assert proc.returncode != 0
    assert expected in proc.stdout, proc.stdout[-3000:]
    assert not (root / "models" / "model.pt").exists()


def test_unrelated_ckpt_allowed_explicitly(data, tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    proc = bundle_cmd(
        "run",
        "--config_file",
        configs("la_seg_finetune", "train"),
        "--bundle_root",
        tmp_path / "b",
        "--dataset_dir",
        data,
        "--num_labeled",
        2,
        "--max_iterations",
        1,
        "--pretrained_ckpt",
        tmp_path / "other.pt",
        "--pretrained_min_matched",
        0,
        *TINY,
    )
    assert "0 tensors matched, 205 missing, 1 unexpected" in proc.stdout


def test_volume_smaller_than_patch_is_padded_when_asked(data, tmp_path):
    proc = bundle_cmd(
        "run",
        "--config_file",
        configs("la_seg_finetune", "train"),
        "--bundle_root",
        tmp_path / "b",
        "--dataset_dir",
        data,
        "--num_labeled",
        2,
        "--max_iterations",
        2,
        "--patch_size",
        "[48,32,32]",
        "--pad_small_volumes",
        "true",
        "--num_workers",
        0,
        "--batch_size",
        2,
    )
    assert "Iter: 2/2" in proc.stdout and (tmp_path / "b" / "models" / "model.pt").is_file()


def test_check_volumed_reports_inf_too():
    img = torch.zeros(1, 4, 4, 4)
    img[0, 0, 0, 0] = float("inf")
    with pytest.raises(DataError, match="1 NaN/Inf voxels"):
        CheckVolumed("image")({"image": img})
