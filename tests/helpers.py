"""Helpers for tests that run bundles the way users do: ``python -m monai.bundle ...`` subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
TINY = ["--patch_size", "[32,32,32]", "--num_workers", "0", "--sw_batch_size", "2"]


def bundle_cmd(*args, cwd=REPO, timeout=900, check=True, env=None):
    """Run ``python -m monai.bundle <args>``; returns the CompletedProcess (stdout and stderr merged)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *map(str, args)],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"monai.bundle {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout[-6000:]}"
        )
    return proc


def configs(bundle, *names):
    """``--config_file`` value overlaying ``names`` of ``bundle`` in order."""
    files = [str(BUNDLES / bundle / "configs" / f"{n}.json") for n in names]
    return files[0] if len(files) == 1 else json.dumps(files)


def real_subset(la_dir, out, train_ids, test_ids=(), validation_ids=()):
    """A dataset.json in ``out`` pointing at real LA cases in place (nothing is copied)."""

    def entry(case_id):
        return {
            "image": str(la_dir / "imagesTr" / f"{case_id}.nii.gz"),
            "label": str(la_dir / "labelsTr" / f"{case_id}.nii.gz"),
        }

    out.mkdir(parents=True, exist_ok=True)
    d = {"training": [entry(i) for i in train_ids]}
    if test_ids:
        d["test"] = [entry(i) for i in test_ids]
    if validation_ids:
        d["validation"] = [entry(i) for i in validation_ids]
    (out / "dataset.json").write_text(json.dumps(d, indent=1))
    return out
