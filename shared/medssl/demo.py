"""The main job: ``python -m medssl demo``.

Writes the synthetic sample set, trains the la_seg_finetune bundle on its labeled cases for a few minutes of
CPU, evaluates it on the held-out cases with the paper metrics, segments them with ``inference.json``, prints
the metrics table and draws image / label / prediction slices to a PNG. Every step goes through the bundle's
own configs (``python -m monai.bundle run``), so the demo exercises exactly what a user runs.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import nibabel as nib
import numpy as np
from medssl.bundle import run_bundle
from medssl.data import atomic_path, eval_list
from medssl.sample_data import sample_data

__all__ = ["demo", "plot_cases", "read_metrics"]

logger = logging.getLogger("medssl")


def demo(
    out: os.PathLike | str = "demo_output",
    iterations: int = 200,
    patch_size: Sequence[int] = (64, 64, 48),
    batch_size: int = 2,
    num_cases: int = 6,
    num_test: int = 2,
    shape: Sequence[int] = (96, 96, 64),
    seed: int = 0,
    bundles_dir: Optional[str] = None,
) -> Dict[str, Any]:
    """Sample data -> short la_seg_finetune training -> evaluation -> inference -> table and PNG.

    Args:
        out: output folder: ``data/`` (sample set), ``models/model.pt``, ``eval/metrics.csv`` (per case and
            mean), ``eval/*_seg.nii.gz`` (label maps) and ``demo.png``.
        iterations: training iterations (SGD, the bundle's paper recipe otherwise).
        patch_size: training patch and sliding-window size (sides divisible by 16).
        batch_size: patches per iteration.
        num_cases, num_test, shape, seed: the sample set (see :func:`medssl.sample_data.sample_data`).
        bundles_dir: where the bundles are (default: the checkout's ``bundles/``).

    Returns:
        ``{"metrics": {column: mean}, "png": path, "seconds": wall time}``.
    """
    start = time.time()
    out = Path(out).resolve()
    data_dir = sample_data(out / "data", num_cases=num_cases, shape=shape, seed=seed, num_test=num_test)
    common = dict(bundle_root=str(out), dataset_dir=str(data_dir), patch_size=list(patch_size), bundles_dir=bundles_dir)
    run_bundle(
        "la_seg_finetune",
        ["train"],
        num_labeled=num_cases - num_test,
        batch_size=batch_size,
        max_iterations=int(iterations),
        save_interval=0,
        num_workers=0,
        seed=seed,
        **common,
    )
    run_bundle("la_seg_finetune", ["train", "evaluate"], **common)
    run_bundle("la_seg_finetune", ["inference"], **common)

    metrics_csv = out / "eval" / "metrics.csv"
    rows = read_metrics(metrics_csv)
    cases = eval_list(data_dir, "test")
    preds = [out / "eval" / (Path(c["image"]).name.replace(".nii.gz", "_seg.nii.gz")) for c in cases]
    png = plot_cases(
        [c["image"] for c in cases],
        [c["label"] for c in cases],
        preds,
        out / "demo.png",
        titles=[f"{Path(c['image']).name.split('.')[0]}  Dice {rows[i]['dice']:.3f}" for i, c in enumerate(cases)],
    )
    seconds = time.time() - start
    print(_format_table(rows))
    print(f"\nper-case metrics: {metrics_csv}\nslices: {png}\nwall time: {seconds:.0f} s")
    return {"metrics": {k: v for k, v in rows[-2].items() if k != "case"}, "png": str(png), "seconds": seconds}


def read_metrics(path: os.PathLike | str) -> List[Dict[str, Any]]:
    """Rows of a ``metrics.csv`` written by :class:`medssl.handlers.MetricsTable` (values as floats)."""
    with open(path, newline="") as f:
        return [{k: (v if k == "case" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def _format_table(rows: List[Dict[str, Any]]) -> str:
    cols = [k for k in rows[0] if k != "case"]
    width = max(len(r["case"]) for r in rows)
    lines = [f"{'case':<{width}}  " + "  ".join(f"{c:>8}" for c in cols)]
    for r in rows:
        if r["case"] == "n_nan":
            continue
        lines.append(f"{r['case']:<{width}}  " + "  ".join(f"{r[c]:>8.3f}" for c in cols))
    return "Dice / Jaccard in [0, 1]; 95HD / ASD in voxels\n" + "\n".join(lines)


def plot_cases(
    images: Sequence[str],
    labels: Sequence[str],
    preds: Sequence[str],
    path: os.PathLike | str,
    titles: Optional[Sequence[str]] = None,
) -> Path:
    """One row per case: the image, the label and the prediction on the axial slice through the label's centre.

    Raises:
        ValueError: the three lists differ in length or a prediction's shape differs from its label's.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not len(images) == len(labels) == len(preds) > 0:
        raise ValueError(
            f"need as many images, labels and predictions (>0): {len(images)}, {len(labels)}, {len(preds)}"
        )
    fig, axes = plt.subplots(len(images), 3, figsize=(9, 3.1 * len(images)), squeeze=False)
    for row, (img_p, lab_p, pred_p) in enumerate(zip(images, labels, preds)):
        img = np.asanyarray(nib.load(str(img_p)).dataobj, dtype=np.float32)
        lab = np.asanyarray(nib.load(str(lab_p)).dataobj) > 0
        pred = np.asanyarray(nib.load(str(pred_p)).dataobj) > 0
        if pred.shape != lab.shape:
            raise ValueError(f"{pred_p}: prediction shape {pred.shape} differs from label shape {lab.shape} ({lab_p}).")
        z = int(np.round(np.argwhere(lab)[:, 2].mean())) if lab.any() else lab.shape[2] // 2
        sl = img[:, :, z].T
        for col, (mask, name, colour) in enumerate(
            [(None, "image", None), (lab, "label", "lime"), (pred, "prediction", "red")]
        ):
            ax = axes[row, col]
            ax.imshow(sl, cmap="gray", origin="lower")
            if mask is not None:
                m = mask[:, :, z].T
                ax.imshow(
                    np.ma.masked_where(~m, m),
                    cmap=matplotlib.colors.ListedColormap([colour]),
                    alpha=0.45,
                    origin="lower",
                )
            ax.set_title(f"{name} (z={z})" if col else (titles[row] if titles else name), fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)
