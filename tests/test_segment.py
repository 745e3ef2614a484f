"""``python -m medssl segment``: the released la_seg_finetune on real LA scans handed over as a clinic would, a folder,
bad inputs; and the one-line error of inference without weights."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import REPO, bundle_cmd

from medssl.data import DataError, write_nifti
from medssl.geometry import write_variant
from medssl.metrics import dice
from medssl.clinic.segment import collect_inputs, segment, segmentation_volume_ml

CASES = (60, 61)  # 0-based rows of train.list: dev test cases 61 and 62


def _case(la_dir, row):
    case_id = (la_dir / "train.list").read_text().split()[row]
    return la_dir / "imagesTr" / f"{case_id}.nii.gz", la_dir / "labelsTr" / f"{case_id}.nii.gz"


@pytest.fixture(scope="module")
def pulled(module_tmp):
    """The committed release pulled once (checksum verified, TorchScript exported) into a private cache."""
    home = module_tmp("medssl_home")
    return {**os.environ, "MEDSSL_HOME": str(home)}


def test_segment_cli_scanner_units_and_a_folder(la_dir, tmp_path, pulled):
    image, label = _case(la_dir, CASES[0])
    clinic = tmp_path / "clinic"
    scanner_image, scanner_label = write_variant(image, label, clinic, "scanner_units")
    flipped_image, flipped_label = write_variant(*_case(la_dir, CASES[1]), tmp_path / "flipped", "permute_flip")
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(flipped_image, folder / "other.nii.gz")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "medssl", "segment", str(scanner_image), str(folder), "--out", str(out)],
        cwd=tmp_path, env=pulled, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stem = scanner_image.name.replace(".nii.gz", "")
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{stem}_seg.nii.gz", f"{stem}_statistics.json",
                                                            "other_seg.nii.gz", "other_statistics.json",
                                                            "summary.json"])  # fmt: skip
    for seg_name, img_path, lab_path in (
        (scanner_image.name.replace(".nii.gz", "_seg.nii.gz"), scanner_image, scanner_label),
        ("other_seg.nii.gz", flipped_image, flipped_label),
    ):
        seg, img, lab = nib.load(out / seg_name), nib.load(img_path), nib.load(lab_path)
        assert seg.shape == img.shape and seg.get_data_dtype() == np.uint8
        np.testing.assert_allclose(seg.affine, img.affine, atol=1e-4)
        # the release saw these cases in training (all 80 are its training set): a functional check, not a score
        assert dice(seg.dataobj, lab.dataobj) > 0.88, seg_name
        volume = segmentation_volume_ml(out / seg_name)
        expected = (np.asanyarray(seg.dataobj) == 1).sum() * 0.625**3 / 1000
        assert volume == pytest.approx(expected, rel=1e-4) and 10 < volume < 300
        line = next(
            ln
            for ln in proc.stdout.splitlines()
            if ln.startswith(img_path.name if seg_name != "other_seg.nii.gz" else "other")
        )
        assert f"{volume:.1f}" in line
    assert "left atrium (mL)" in proc.stdout and proc.stdout.strip().splitlines()[-1] == "2 segmented, 0 failed"


def test_segment_keeps_every_component_on_request_and_reuses_the_pull(la_dir, tmp_path, pulled, monkeypatch):
    monkeypatch.setenv("MEDSSL_HOME", pulled["MEDSSL_HOME"])
    image, label = _case(la_dir, CASES[0])
    results = segment([image], out=tmp_path / "a", largest_component=False, progress=False)
    (r,) = results
    assert r["scan"] == str(image) and r["seconds"] > 0
    lab = np.asanyarray(nib.load(label).dataobj)
    assert dice(nib.load(r["segmentation"]).dataobj, lab) > 0.88
    assert r["status"] == "ok" and r["error"] is None and r["dicom_seg"] is None
    written = sorted(p.name for p in (tmp_path / "a").iterdir())  # no temporary files left
    assert written == sorted([os.path.basename(r["segmentation"]), os.path.basename(r["statistics"]), "summary.json"])
    bundles = sorted(p.name for p in (Path(pulled["MEDSSL_HOME"]) / "bundles").iterdir())
    assert bundles == ["la_seg_finetune_v0.5.0"]  # pulled once, reused


def test_segment_bad_inputs_name_the_file(tmp_path, pulled):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.txt").write_text("not an image")
    write_nifti(np.zeros((8, 8, 4, 2), np.float32), np.eye(4), bad / "fourd.nii.gz")
    write_nifti(np.zeros((8, 8), np.float32), np.eye(4), bad / "flat.nii.gz")
    (bad / "broken.nii.gz").write_bytes(b"garbage")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        str(tmp_path / "missing.nii.gz"): "missing.nii.gz: file not found",
        str(bad / "notes.txt"): "notes.txt: not a NIfTI file",
        str(bad / "fourd.nii.gz"): "fourd.nii.gz",
        str(bad / "flat.nii.gz"): "flat.nii.gz",
        str(bad / "broken.nii.gz"): "broken.nii.gz",
        str(empty): "folder holds no NIfTI files",
    }
    # all at once: each reported on its own error line, the run ends with status 1 (some scans failed) and loads no
    # model (every input is known bad from its path or header)
    proc = subprocess.run([sys.executable, "-m", "medssl", "segment", *cases, "--out", str(tmp_path / "o")],
                          cwd=tmp_path, env=pulled, capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 1 and lines[-7] == "0 segmented, 6 failed", proc.stdout[-3000:] + proc.stderr[-3000:]
    for line, (scan, message) in zip(lines[-6:], cases.items()):
        assert line.startswith(f"error: {scan}") and message in line, (scan, line)
    assert "Segmenter" not in proc.stderr and "pull" not in proc.stderr.lower()
    fourd, folder = collect_inputs([bad / "fourd.nii.gz", empty])
    assert "3D" in fourd.error and "folder holds no NIfTI files" in folder.error
    with pytest.raises(DataError, match="no scans given"):
        collect_inputs([])
    a, b = tmp_path / "x" / "s.nii.gz", tmp_path / "y" / "s.nii.gz"
    for p in (a, b):
        write_nifti(np.zeros((8, 8, 8), np.float32), np.eye(4), p)
    with pytest.raises(DataError, match="would both be written as s_seg.nii.gz"):
        collect_inputs([a, b])
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["summary.json"]  # nothing half-written


def _truncated_copies(image, folder):
    """A gzip cut short (header intact, voxels end early) and an uncompressed .nii whose voxel bytes are fewer than
    its header says."""
    raw = image.read_bytes()
    (folder / "b_trunc.nii.gz").write_bytes(raw[: len(raw) // 2])
    img = nib.load(image)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32), img.affine), folder / "short.nii")
    data = (folder / "short.nii").read_bytes()
    (folder / "b_short.nii").write_bytes(data[: len(data) - 100_000])
    (folder / "short.nii").unlink()


def test_one_bad_scan_never_costs_the_others(la_dir, tmp_path, pulled):
    """Issue 23: three scans, the middle one truncated: two segmentations, the failure named, the summary line,
    exit status 1; with --fail_fast, status 2, the same clear last line, and what was written before kept."""
    good_a, _ = _case(la_dir, CASES[0])
    good_c, _ = _case(la_dir, CASES[1])
    for middle in ("b_trunc.nii.gz", "b_short.nii"):
        folder = tmp_path / middle.split(".")[0]
        folder.mkdir()
        shutil.copy(good_a, folder / "a.nii.gz")
        shutil.copy(good_c, folder / "c.nii.gz")
        _truncated_copies(good_a, folder)
        (folder / ("b_short.nii" if middle == "b_trunc.nii.gz" else "b_trunc.nii.gz")).unlink()
        out = tmp_path / f"out_{folder.name}"
        proc = subprocess.run([sys.executable, "-m", "medssl", "segment", str(folder), "--out", str(out)],
                              cwd=tmp_path, env=pulled, capture_output=True, text=True, timeout=900)  # fmt: skip
        lines = proc.stdout.strip().splitlines()
        assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert lines[-2] == "2 segmented, 1 failed"
        assert lines[-1].startswith(f"error: {folder / middle}: not a readable NIfTI volume ("), lines[-1]
        assert sorted(p.name for p in out.glob("*_seg.nii.gz")) == ["a_seg.nii.gz", "c_seg.nii.gz"]
        summary = json.loads((out / "summary.json").read_text())["scans"]
        assert [s["status"] for s in summary] == ["ok", "failed", "ok"]
        assert summary[1]["error"] == lines[-1][len("error: ") :]
        if middle == "b_trunc.nii.gz":
            fast = tmp_path / "fast"
            proc = subprocess.run([sys.executable, "-m", "medssl", "segment", str(folder), "--out", str(fast),
                                   "--fail_fast", "true"], cwd=tmp_path, env=pulled, capture_output=True, text=True,
                                  timeout=900)  # fmt: skip
            assert proc.returncode == 2
            assert proc.stderr.strip().splitlines()[-1] == lines[-1], proc.stderr[-2000:]
            assert sorted(p.name for p in fast.glob("*_seg.nii.gz")) == ["a_seg.nii.gz"]  # written before: kept


def test_inference_without_weights_names_the_file_and_the_two_ways(tmp_path):
    root = tmp_path / "la_seg_finetune"
    shutil.copytree(REPO / "bundles" / "la_seg_finetune", root, ignore=shutil.ignore_patterns("models", "eval"))
    scan = tmp_path / "scan.nii.gz"
    write_nifti(np.random.default_rng(0).normal(size=(32, 32, 32)).astype(np.float32), np.eye(4), scan)
    proc = bundle_cmd("run", "--config_file", str(root / "configs" / "inference.json"), "--bundle_root", root,
                      "--dataset_dir", scan, "--num_workers", 0, check=False)  # fmt: skip
    last = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode != 0
    assert last.startswith("error: no weights at ") and str(root / "models" / "model.pt") in last, proc.stdout[-3000:]
    assert "train.json" in last and "python -m medssl pull la_seg_finetune" in last


def test_released_index_lists_committed_zips():
    index = json.loads((REPO / "bundle_index.json").read_text())
    assert "la_seg_finetune_v0.5.0" in index
    for key, entry in index.items():
        assert not entry["source"].startswith(("http", "/")) and (REPO / entry["source"]).is_file(), key
