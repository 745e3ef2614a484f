"""Bad input through the data path and the bundles: a clear error naming the file and what was expected, nothing
half-written; and a bounded fuzz of corrupt NIfTI files that must give a clean error (never a crash or a hang)."""

import gzip
import hashlib
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import REPO, TINY, bundle_cmd, configs

from medssl.data import DataError, check_headers, write_dev_split, write_nifti
from medssl.networks import VNet
from medssl.lab.sample_data import sample_data
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
from medssl.data import DataError, check_headers, write_dev_split, write_nifti
from medssl.networks import VNet
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
    last = proc.stdout.strip().splitlines()[-1]  # the reason, not MONAI's "Failed to evaluate ConfigExpression"
    assert last.startswith("error: ") and expected in last, proc.stdout[-3000:]
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


# -- a file whose voxels do not match its header, through every bundle entry point -------------------------------

EOF_REASON = "EOFError: Compressed file ended before the end-of-stream marker was reached"


@pytest.fixture(scope="module")
def unreadable(module_tmp):
    """Sample data, the same case made unreadable twice (``cut.nii.gz``: the gzip stream cut in half;
    ``short.nii``: uncompressed, 1000 voxel bytes fewer than its header says), a datalist for each with the bad file
    first in "training" and as the one "test" case, and a bundle root with random weights."""
    root = module_tmp("unreadable")
    data = sample_data(root / "data", num_cases=4, shape=(32, 32, 32), num_test=1)
    raw = (data / "imagesTr" / "sample_000.nii.gz").read_bytes()
    (root / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    plain = gzip.decompress(raw)
    (root / "short.nii").write_bytes(plain[:-1000])
    for name in ("cut.nii.gz", "short.nii"):
        cases = [{"image": str(data / "imagesTr" / f"sample_00{i}.nii.gz")} for i in range(3)]
        for i, case in enumerate(cases):
            case["label"] = str(data / "labelsTr" / f"sample_00{i}.nii.gz")
        cases[0]["image"] = str(root / name)
        (root / f"ds_{name}").mkdir()
        (root / f"ds_{name}" / "dataset.json").write_text(json.dumps({"training": cases, "test": cases[:1]}))
    (root / "bundle" / "models").mkdir(parents=True)
    torch.save(VNet().state_dict(), root / "bundle" / "models" / "model.pt")
    return root


def _reason(bad):
    if bad.name == "cut.nii.gz":
        return EOF_REASON
    return f"OSError: Expected 131072 bytes, got 130072 bytes from {bad} - could the file be damaged?"


def _last_line(proc):
    assert proc.returncode != 0, proc.stdout[-3000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("name", ["cut.nii.gz", "short.nii"])
def test_unreadable_file_is_the_last_line_of_inference_evaluate_and_training(name, unreadable, tmp_path):
    """inference.json on the file, evaluate.json on a test list holding it, train.json with it among the labeled
    cases: each run's last line names the file and says it is unreadable (MONAI's "applying transform
    <...LoadVolumed object ...>" and "Failed to evaluate ConfigExpression" come before it); training stops while
    the cache is filled, before its first iteration."""
    bad, bundle = unreadable / name, unreadable / "bundle"
    expected = f"error: {bad}: not a readable NIfTI volume ({_reason(bad)})."
    tiny = [*TINY, "--bundle_root", bundle]
    inference = bundle_cmd("run", "--config_file", configs("la_seg_finetune", "inference"), "--dataset_dir", bad,
                           *tiny, check=False)  # fmt: skip
    assert _last_line(inference) == expected, inference.stdout[-3000:]
    evaluate = bundle_cmd("run", "--config_file", configs("la_seg_finetune", "train", "evaluate"), "--dataset_dir",
                          unreadable / f"ds_{name}", *tiny, check=False)  # fmt: skip
    assert _last_line(evaluate) == expected, evaluate.stdout[-3000:]
    train = bundle_cmd("run", "--config_file", configs("la_seg_finetune", "train"), "--dataset_dir",
                       unreadable / f"ds_{name}", "--num_labeled", 3, "--max_iterations", 2, *TINY, "--bundle_root",
                       tmp_path / "b", check=False)  # fmt: skip
    assert _last_line(train) == expected, train.stdout[-3000:]
    assert "Iter: 1/2" not in train.stdout and not (tmp_path / "b" / "models" / "model.pt").exists()


def test_unreadable_unlabeled_image_is_the_last_line_of_semi_supervised_training(unreadable, tmp_path):
    bad = unreadable / "cut.nii.gz"
    data = unreadable / "data"
    images, labels = data / "imagesTr", data / "labelsTr"
    names = [f"sample_00{i}.nii.gz" for i in (1, 2)]
    labeled = [{"image": str(images / n), "label": str(labels / n)} for n in names]
    unlabeled = [{"image": str(bad)}, {"image": str(images / "sample_003.nii.gz")}]
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps({"training": labeled + unlabeled}))
    proc = bundle_cmd("run", "--config_file", configs("cvrl_semisup", "train"), "--dataset_dir", tmp_path / "ds",
                      "--num_labeled", 2, "--batch_size", 2, "--max_iterations", 2, *TINY, "--bundle_root",
                      tmp_path / "b", check=False)  # fmt: skip
    assert _last_line(proc) == f"error: {bad}: not a readable NIfTI volume ({EOF_REASON}).", proc.stdout[-3000:]
    assert "Iter: 1/2" not in proc.stdout


def test_unreadable_file_met_by_a_loader_worker_keeps_the_checkpoints(unreadable, tmp_path):
    """Uncached (--cache_rate 0) with DataLoader worker processes, in the models folder of an earlier run: the
    worker's error reaches the main process as text only, and the last line still names the file; the earlier run's
    checkpoints and weights are left as they were, and nothing is added."""
    root = tmp_path / "b"
    common = ["--config_file", configs("la_seg_finetune", "train"), "--bundle_root", root, "--num_labeled", 3,
              "--max_iterations", 2, "--patch_size", "[32,32,32]", "--sw_batch_size", 2]  # fmt: skip
    bundle_cmd("run", *common, "--dataset_dir", unreadable / "data", "--save_interval", 1, "--num_workers", 0)
    files = sorted((root / "models").iterdir())
    assert [f.name for f in files] == ["checkpoint_1.pt", "checkpoint_2.pt", "model.pt"]
    digests = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    bad = unreadable / "short.nii"
    proc = bundle_cmd("run", *common, "--dataset_dir", unreadable / "ds_short.nii", "--save_interval", 0,
                      "--cache_rate", 0, "--num_workers", 2, check=False)  # fmt: skip
    assert "in DataLoader worker process" in proc.stdout and "Iter: 1/2" not in proc.stdout
    assert _last_line(proc) == f"error: {bad}: not a readable NIfTI volume ({_reason(bad)}).", proc.stdout[-3000:]
    after = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted((root / "models").iterdir())}
    assert after == digests


def test_nan_image_is_the_last_line_of_inference(unreadable, tmp_path):
    arr = np.zeros((32, 32, 32))
    arr[3, 4, 5] = np.inf
    _set(tmp_path / "inf.nii.gz", arr)
    proc = bundle_cmd("run", "--config_file", configs("la_seg_finetune", "inference"), "--dataset_dir",
                      tmp_path / "inf.nii.gz", *TINY, "--bundle_root", unreadable / "bundle", check=False)  # fmt: skip
    assert _last_line(proc) == f"error: {tmp_path / 'inf.nii.gz'}: 1 NaN/Inf voxels; expected finite intensities."


def test_dev_split_names_an_unreadable_file(unreadable, tmp_path):
    expected = f"{unreadable / 'short.nii'}: not a readable NIfTI volume (OSError: Expected 131072 bytes"
    with pytest.raises(DataError, match=re.escape(expected)):
        write_dev_split(unreadable / "ds_short.nii", tmp_path / "split", num_train=2, downsample=2)
