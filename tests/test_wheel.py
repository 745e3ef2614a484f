"""medssl without this checkout: the wheel built by the standard front-end (``python -m build``) from a copy of the
tracked sources, installed with the constraints into a fresh virtual environment, pulls the released la_seg_finetune
from the committed index by path, runs its ``inference.json`` with ``python -m monai.bundle run`` and ``segment`` on
a real LA case, in a folder outside the checkout: outputs in the input's geometry."""

import json
import os
import shutil
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from helpers import REPO

import medssl


def _run(cmd, cwd, env, timeout=1200):
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-5000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(module_tmp):
    """(venv python, work folder, env): medssl installed from its wheel into a fresh venv outside the checkout."""
    root = module_tmp("wheel")
    src = root / "src"
    tracked = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    for rel in filter(None, tracked.decode().split("\0")):
        if rel.startswith(("releases/", "tests/", "benchmarks/")) or not (REPO / rel).is_file():
            continue  # the wheel is built from the package sources; skip the large and irrelevant files
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    # a user's environment: no test settings (MEDSSL_RUNTIME among them: segment runs its real default, auto)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "MEDSSL_BUNDLES", "MEDSSL_RUNTIME")
    }
    env.update(MEDSSL_HOME=str(root / "home"), PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", root / "dist", src], cwd=root, env=env)
    built = time.perf_counter() - start
    (wheel,) = (root / "dist").glob("medssl-*-py3-none-any.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=root, env=env)
    start = time.perf_counter()
    _run([venv / "bin" / "pip", "install", "-q", "-c", REPO / "constraints.txt", wheel], cwd=root, env=env)
    print(f"wheel {wheel.name}: {wheel.stat().st_size / 1e3:.0f} kB, built in {built:.1f} s, installed with its "
          f"dependencies in {time.perf_counter() - start:.1f} s")  # fmt: skip
    work = root / "work"
    work.mkdir()
    yield venv / "bin" / "python", work, env, wheel


def test_wheel_version_is_the_one_the_bundles_require(installed):
    python, work, env, wheel = installed
    assert wheel.name == f"medssl-{medssl.__version__}-py3-none-any.whl"
    out = _run([python, "-c", "import importlib.metadata as m, medssl; print(m.version('medssl')); print(medssl.__file__)"],
               cwd=work, env=env).split()  # fmt: skip
    assert out[-2] == medssl.__version__
    assert str(python.parents[1]) in out[-1] and str(REPO) not in out[-1]  # the installed copy, not the checkout
    for meta in (REPO / "bundles").glob("*/configs/metadata.json"):
        assert json.loads(meta.read_text())["required_packages_version"]["medssl"] == medssl.__version__, meta


def test_installed_wheel_pulls_and_runs_the_released_bundle(installed, la_dir):
    python, work, env, _ = installed
    case = (la_dir / "train.list").read_text().split()[0]  # a training case of the release
    image = la_dir / "imagesTr" / f"{case}.nii.gz"
    (work / "scans").mkdir()
    shutil.copy(image, work / "scans" / image.name)
    folder = _run([python, "-m", "medssl", "pull", "la_seg_finetune", "--index", REPO / "bundle_index.json",
                   "--bundle_dir", "pulled"], cwd=work, env=env).strip().splitlines()[-1]  # fmt: skip
    folder = work / folder if not os.path.isabs(folder) else folder
    assert (folder / "models" / "model.pt").is_file() and (folder / "models" / "model.ts").is_file()
    _run([python, "-m", "monai.bundle", "run", "--config_file", folder / "configs" / "inference.json",
          "--bundle_root", folder, "--dataset_dir", "scans", "--output_dir", "out"], cwd=work, env=env)  # fmt: skip
    _run([python, "-m", "medssl", "segment", f"scans/{image.name}", "--bundle", folder, "--out", "segs"],
         cwd=work, env=env)  # fmt: skip
    src = nib.load(image)
    truth = np.asarray(nib.load(la_dir / "labelsTr" / f"{case}.nii.gz").dataobj) > 0
    for out in (work / "out", work / "segs"):
        (seg,) = out.glob("*_seg.nii.gz")
        seg = nib.load(seg)
        assert seg.shape == src.shape and np.allclose(seg.affine, src.affine, atol=1e-4), out
        got = np.asarray(seg.dataobj) > 0
        assert 2 * (got & truth).sum() / (got.sum() + truth.sum()) > 0.85, out
    # segment's default is auto; without the openvino extra it runs PyTorch and says why
    (stats,) = (work / "segs").glob("*_statistics.json")
    choice = json.loads(stats.read_text())["runtime_choice"]
    assert choice["runtime"] == "torch" and 'pip install "medssl[openvino]"' in choice["reason"], choice
