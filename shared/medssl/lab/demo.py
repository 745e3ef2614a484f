"""The main job: ``python -m medssl demo``.

Writes the synthetic sample set, trains the la_seg_finetune bundle on its labeled cases for a few minutes of
CPU, evaluates it on the held-out cases with the paper metrics, segments them with ``inference.json``, prints
the metrics table and draws image / label / prediction slices to a PNG. Every step goes through the bundle's
own configs (``python -m monai.bundle run``), so the demo exercises exactly what a user runs.

Then it segments a real LA scan, handed over in scanner-like units, with the released la_seg_finetune (the zip
committed under ``releases/``: pulled and checksum-verified, no download), as ``python -m medssl segment`` does:
``release.png`` and the atrium's volume. The real scan comes from the LA data beside the checkout
(``$MEDSSL_SHARED_DIR/data/la`` or ``../shared/data/la``, dev test case 61) or ``--scan``; with neither, that step
says how to run it and is skipped.
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
from medssl.bundle import REPO_ROOT, run_bundle
from medssl.data import atomic_path, eval_list
from medssl.lab.sample_data import sample_data

__all__ = ["demo", "plot_cases", "read_metrics", "release_demo"]

logger = logging.getLogger("medssl")


def demo(
    out: os.PathLike | str = "demo_output",
    iterations: int = 100,
    patch_size: Sequence[int] = (64, 64, 48),
    batch_size: int = 2,
    num_cases: int = 6,
    num_test: int = 2,
    shape: Sequence[int] = (96, 96, 64),
    seed: int = 0,
    bundles_dir: Optional[str] = None,
    scan: Optional[str] = None,
    release: bool = True,
) -> Dict[str, Any]:
    """Sample data -> short la_seg_finetune training -> evaluation -> inference -> table and PNG.

    Args:
        out: output folder: ``data/`` (sample set), ``models/model.pt``, ``eval/metrics.csv`` (per case and
            mean), ``eval/*_seg.nii.gz`` (label maps) and ``demo.png``.
        iterations: training iterations (SGD, the bundle's paper recipe otherwise).
        patch_size: training patch and sliding-window size (sides divisible by 16).
        batch_size: patches per iteration.
        num_cases, num_test, shape, seed: the sample set (see :func:`medssl.lab.sample_data.sample_data`).
        bundles_dir: where the bundles are (default: the checkout's ``bundles/``).
        scan, release: see :func:`release_demo` (``release=False`` skips it).

    Returns:
        ``{"metrics": {column: mean}, "png": path, "seconds": wall time, "release": release_demo's result}``.
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
    print(_format_table(rows))
    print(f"\nper-case metrics: {metrics_csv}\nslices: {png}")
    released = release_demo(out / "release", scan=scan) if release else None
    seconds = time.time() - start
    print(f"wall time: {seconds:.0f} s")
    return {
        "metrics": {k: v for k, v in next(r for r in rows if r["case"] == "mean").items() if k != "case"},
        "png": str(png),
        "seconds": seconds,
        "release": released,
    }


def _real_case() -> Optional[tuple]:
    shared = Path(os.environ.get("MEDSSL_SHARED_DIR") or REPO_ROOT.parent / "shared")
    la = shared / "data" / "la"
    try:
        case = (la / "train.list").read_text().split()[60]  # dev test case 61: no dev-split training saw it
    except (OSError, IndexError):
        return None
    image, label = la / "imagesTr" / f"{case}.nii.gz", la / "labelsTr" / f"{case}.nii.gz"
    return (image, label) if image.is_file() and label.is_file() else None


def release_demo(out: os.PathLike | str, scan: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Segment a real scan with the released la_seg_finetune: ``out/release.png`` (image, label if known,
    prediction), the atrium's volume and, with a label, the Dice. The LA case is written in scanner-like units
    first (``medssl.geometry``), as a clinic would send it. Returns None (and says why) when no scan is found."""
    from medssl.geometry import write_variant
    from medssl.clinic.segment import print_table, segment

    out = Path(out)
    if scan:
        image, label = Path(scan), None
    else:
        case = _real_case()
        if case is None:
            print("\nreleased la_seg_finetune: no LA scan found (../shared/data/la); segment your own with\n"
                  "  python -m medssl segment SCAN.nii.gz --out segmentations")  # fmt: skip
            return None
        image, label = write_variant(*case, out / "scan", "scanner_units")
    print(f"\nreleased la_seg_finetune on a real LA MRI ({image.name}{', scanner-like units' if label else ''}):")
    (result,) = segment(
        [image], out=out / "segmentations", bundle_dir=str(out / "bundles"), progress=False, fail_fast=True
    )
    print_table([result])
    pred = nib.load(result["segmentation"])
    dice = None
    title = f"{image.name.split('.')[0]}  {result['volume_ml']:.1f} mL"
    if label is not None:
        a, b = np.asanyarray(pred.dataobj) > 0, np.asanyarray(nib.load(str(label)).dataobj) > 0
        dice = float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))
        title += f"  Dice {dice:.3f}"
        print(f"Dice with its label: {dice:.3f} (the release trained on all 80 LA cases, this one included)")
    png = plot_cases([image], [label if label is not None else result["segmentation"]], [result["segmentation"]],
                     out / "release.png", titles=[title])  # fmt: skip
    print(f"slices: {png}")
    return {**result, "dice": dice, "png": str(png)}


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
    unit = "mm" if "hd95_mm" in cols else "voxels"
    return f"Dice / Jaccard in [0, 1]; 95HD / ASD in {unit}\n" + "\n".join(lines)


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
