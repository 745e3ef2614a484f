"""The DICOM path against the NIfTI path: each LA case written as a classic MR series
(``medssl.clinic.dicom.nifti_to_series``) and segmented through ``segment``'s DICOM path, compared with the same case
segmented from its NIfTI file.

    python benchmarks/dicom_parity.py --dataset_dir ../shared/data/la --rows 60-79 --out benchmarks/results/dicom_parity

Per case: Dice between the two NIfTI outputs (the DICOM path's is in the series' geometry, which equals the NIfTI's
here), Dice between the DICOM SEG decoded onto the source slices and the NIfTI path's label map, the atrium volumes,
and the seconds of each path. Writes ``results.json`` and ``results.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from medssl.clinic.dicom import nifti_to_series, read_seg, read_series
from medssl.metrics import dice
from medssl.clinic.segment import Segmenter


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", required=True)
    ap.add_argument("--rows", default="60-79", help="0-based rows of train.list, e.g. 60-79 (dev cases 61-80)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    root = Path(args.dataset_dir)
    first, last = (int(x) for x in args.rows.split("-"))
    ids = (root / "train.list").read_text().split()[first : last + 1]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Segmenter(progress=False) as seg:
        tmp = Path(tmp)
        for case_id in ids:
            image = root / "imagesTr" / f"{case_id}.nii.gz"
            series = tmp / "dicom" / case_id
            nifti_to_series(image, series, patient_id=case_id)
            t = time.perf_counter()
            (n,) = seg.segment([image], out=tmp / "nifti")
            t_nifti = time.perf_counter() - t
            t = time.perf_counter()
            (d,) = seg.segment([series], out=tmp / "dicom_out")
            t_dicom = time.perf_counter() - t
            assert n["status"] == d["status"] == "ok", (n, d)
            a = np.asarray(nib.load(n["segmentation"]).dataobj)
            b = np.asarray(nib.load(d["segmentation"]).dataobj)
            seg_mask = read_seg(d["dicom_seg"], read_series(series))
            rows.append(
                {
                    "case": case_id,
                    "dice_nifti_vs_dicom": dice(a, b),
                    "dice_nifti_vs_seg": dice(a, seg_mask),
                    "identical": bool((a == b).all()),
                    "volume_ml_nifti": n["volume_ml"],
                    "volume_ml_dicom": d["volume_ml"],
                    "seconds_nifti": round(t_nifti, 2),
                    "seconds_dicom": round(t_dicom, 2),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    summary = {
        "cpu": cpu_name(),
        "cases": len(rows),
        "identical": sum(r["identical"] for r in rows),
        "min_dice_nifti_vs_dicom": min(r["dice_nifti_vs_dicom"] for r in rows),
        "min_dice_nifti_vs_seg": min(r["dice_nifti_vs_seg"] for r in rows),
        "median_seconds_nifti": float(np.median([r["seconds_nifti"] for r in rows])),
        "median_seconds_dicom": float(np.median([r["seconds_dicom"] for r in rows])),
    }
    (out / "results.json").write_text(json.dumps({"summary": summary, "cases": rows}, indent=1))
    lines = [
        f"# DICOM path vs NIfTI path, {len(rows)} LA cases (rows {args.rows} of train.list)",
        "",
        f"CPU: {summary['cpu']}. Command: `python benchmarks/dicom_parity.py --dataset_dir DATA --rows {args.rows} "
        "--out OUT`.",
        "",
        f"Label maps identical in {summary['identical']} of {len(rows)} cases; lowest Dice NIfTI vs DICOM path "
        f"{summary['min_dice_nifti_vs_dicom']:.4f}, NIfTI vs decoded SEG {summary['min_dice_nifti_vs_seg']:.4f}; "
        f"median seconds per scan {summary['median_seconds_nifti']:.1f} (NIfTI) / "
        f"{summary['median_seconds_dicom']:.1f} (DICOM: read, segment, write SEG + NIfTI).",
        "",
        "| case | Dice NIfTI vs DICOM | Dice NIfTI vs SEG | mL (NIfTI) | mL (DICOM) | s (NIfTI) | s (DICOM) |",  # noqa
        "|---|---|---|---|---|---|---|",
    ] + [
        f"| {r['case']} | {r['dice_nifti_vs_dicom']:.4f} | {r['dice_nifti_vs_seg']:.4f} | {r['volume_ml_nifti']} | "
        f"{r['volume_ml_dicom']} | {r['seconds_nifti']} | {r['seconds_dicom']} |"
        for r in rows
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:5]))


if __name__ == "__main__":
    main()
