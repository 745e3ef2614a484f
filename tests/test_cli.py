"""``python -m medssl``: the demo (README's first command), sample_data and prepare_la, as subprocesses."""

import csv
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
from conftest import LA_DIR
from helpers import REPO


def medssl(*args, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "medssl", *map(str, args)],
        cwd=REPO,
        text=True,
        timeout=timeout,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_demo_readme_command(tmp_path):
    """`python -m medssl demo` as in the README (output folder moved to tmp): trains, evaluates, plots."""
    out = tmp_path / "demo"
    proc = medssl("demo", "--out", out)
    assert proc.returncode == 0, proc.stdout[-5000:]
    rows = list(csv.DictReader(open(out / "eval" / "metrics.csv")))
    assert [r["case"] for r in rows] == ["sample_004", "sample_005", "mean", "std", "n_nan"]
    mean = rows[2]
    # 100 SGD iterations on 4 synthetic cases segment the 2 held-out ones well (0.885 mean Dice when recorded on the
    # 2-core EPYC without AVX-512; 200 iterations gave 0.92 in twice the time)
    assert float(mean["dice"]) > 0.8 and float(mean["jaccard"]) > 0.65
    assert "Dice / Jaccard in [0, 1]; 95HD / ASD in mm" in proc.stdout  # the bundles' default distance_unit
    mean_line = [line for line in proc.stdout.splitlines() if line.startswith("mean ")][-1]  # the printed table
    assert mean_line.split()[1:3] == [f"{float(mean['dice']):.3f}", f"{float(mean['jaccard']):.3f}"]
    png = (out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (990, 682)  # 3 panels x 2 cases at 110 dpi
    for case in ("sample_004", "sample_005"):
        pred = nib.load(out / "eval" / f"{case}_seg.nii.gz")
        assert pred.shape == (96, 96, 64)
    # it ends with the released la_seg_finetune on a real LA scan in scanner-like units (no download)
    if not LA_DIR.is_dir():
        assert "no LA scan found" in proc.stdout
        return
    case = (LA_DIR / "train.list").read_text().split()[60]
    seg = nib.load(out / "release" / "segmentations" / f"{case}_seg.nii.gz")
    scan = nib.load(out / "release" / "scan" / "imagesTr" / f"{case}.nii.gz")
    assert seg.shape == scan.shape and np.allclose(seg.affine, scan.affine) and scan.get_data_dtype() == np.int16
    dice = float(next(ln for ln in proc.stdout.splitlines() if ln.startswith("Dice with its label:")).split()[4])
    assert dice > 0.88  # the release trained on this case: a check that weights, pull and geometry fit together
    assert (out / "release" / "release.png").read_bytes()[:4] == b"\x89PNG"
    assert "left atrium (mL)" in proc.stdout


def test_sample_data_cli(tmp_path):
    proc = medssl("sample_data", "--out", tmp_path, "--num_cases", 3, "--num_test", 1, "--shape", "32,32,16")
    assert proc.returncode == 0, proc.stdout
    d = json.loads((tmp_path / "dataset.json").read_text())
    assert len(d["training"]) == 2 and len(d["test"]) == 1
    assert nib.load(tmp_path / d["test"][0]["image"]).shape == (32, 32, 16)


def test_prepare_la_cli(la_h5_dir, tmp_path):
    proc = medssl("prepare_la", "--src", la_h5_dir, "--out", tmp_path / "la")
    assert proc.returncode == 0, proc.stdout
    d = json.loads((tmp_path / "la" / "dataset.json").read_text())
    assert [e["image"] for e in d["training"]] == [
        "imagesTr/06SR5RBREL16DQ6M8LWS.nii.gz",
        "imagesTr/0RZDK210BSMWAA6467LU.nii.gz",
    ]
    img = nib.load(tmp_path / "la" / "imagesTr" / "06SR5RBREL16DQ6M8LWS.nii.gz")
    assert img.shape == (183, 140, 88) and np.allclose(np.diag(img.affine), [0.625, 0.625, 0.625, 1])


def test_cli_errors_are_one_clear_line(tmp_path):
    proc = medssl("prepare_la", "--src", tmp_path / "missing", "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stdout.strip().splitlines()[-1].startswith("error: ") and "missing" in proc.stdout
    assert "Traceback" not in proc.stdout
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_ci_runs_exactly_the_readme_test_command():
    """CI must run the README's test command as written (it installs the Debian packages the PACS tests need)."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("Set up and run the tests", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    ci_lines = [
        ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith(("#", "set ", "cd "))
    ]
    assert ci_lines == [block.strip()]
    assert "apt-get install" in block and "orthanc-dicomweb" in block and "dicom3tools" in block
