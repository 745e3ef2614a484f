"""The same held-out scans handed over as a clinic would: score a trained segmentation bundle on every variant of
``medssl.geometry`` (release format, scanner units, flipped / permuted axes, 1.0 mm, 0.625 x 0.625 x 1.25 mm).

Each variant of the test cases is written under ``OUT/<variant>/`` with its own ``dataset.json``; the bundle's
``evaluate.json`` scores each in the variant's own grid (predictions inverted to it), and the table of mean Dice
(no post-processing, the papers' protocol; and with the largest connected component) goes to ``OUT/variants.md``
and ``variants.json``. Seconds per volume of the evaluation are recorded too.

    python benchmarks/geometry_variants.py --dataset_dir ../shared/data/la --bundle_root RUN_DIR --out OUT \
        --overrides '{"spacing": [1.25, 1.25, 1.25], "patch_size": [64, 64, 32]}'

``--dataset_dir`` is the full LA data; the test cases are those of the development split (cases 61-80 of
``train.list``, ``--num_train 60``), at their native resolution.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import fire
import numpy as np

from medssl.lab.benchmark import override_args
from medssl.bundle import bundle_path
from medssl.data import atomic_path, load_datalist, write_json
from medssl.geometry import VARIANTS, write_variant


def _mean(rows, key):
    return float(np.nanmean([float(r[key]) for r in rows])), float(np.nanstd([float(r[key]) for r in rows]))


def main(dataset_dir, bundle_root, out, bundle="la_seg_finetune", num_train=60, overrides=None, variants=None):
    overrides = json.loads(overrides) if isinstance(overrides, str) else dict(overrides or {})
    variants = list(VARIANTS) if variants is None else [v.strip() for v in str(variants).split(",")]
    root = Path(dataset_dir)
    test = load_datalist(root)["training"][int(num_train) :]
    out = Path(out)
    configs = json.dumps([str(bundle_path(bundle) / "configs" / f"{c}.json") for c in ("train", "evaluate")])
    results = {"bundle": bundle, "bundle_root": str(bundle_root), "overrides": overrides, "variants": {}}
    for variant in variants:
        vdir = out / variant
        if not (vdir / "dataset.json").is_file():
            entries = []
            for e in test:
                img, lab = write_variant(e["image"], e["label"], vdir, variant)  # paths resolved by load_datalist
                entries.append({"image": str(img.relative_to(vdir)), "label": str(lab.relative_to(vdir))})
            write_json(
                {"name": f"dev test cases as {variant}", "training": entries, "test": entries}, vdir / "dataset.json"
            )
        eval_dir = out / "eval" / variant
        cmd = [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            configs,
            "--bundle_root",
            str(bundle_root),
            "--dataset_dir",
            str(vdir),
            "--output_dir",
            str(eval_dir),
            *override_args(overrides),
        ]
        start = time.time()
        log = out / "eval" / f"{variant}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"evaluation of {variant} failed; see {log}")
        with open(eval_dir / "metrics.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["case"] not in ("mean", "std", "n_nan")]
        results["variants"][variant] = {
            "description": VARIANTS[variant],
            "dice": _mean(rows, "dice"),
            "dice_lcc": _mean(rows, "dice_lcc"),
            "cases": {r["case"]: float(r["dice"]) for r in rows},
            "seconds": time.time() - start,
        }
        print(variant, results["variants"][variant]["dice"], flush=True)
    write_json(results, out / "variants.json")
    lines = ["| the same held-out scans, handed over as | Dice % | Dice % (largest component) |", "|---|---|---|"]
    for v, r in results["variants"].items():
        lines.append(
            f"| {r['description']} | {100 * r['dice'][0]:.2f} ± {100 * r['dice'][1]:.2f} | "
            f"{100 * r['dice_lcc'][0]:.2f} ± {100 * r['dice_lcc'][1]:.2f} |"
        )
    with atomic_path(out / "variants.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    fire.Fire(main)
