"""Accuracy of each inference runtime on LA cases at their native grid: Dice against the labels (no post-processing,
and with the largest connected component) and label-map agreement (Dice) with PyTorch fp32.

    python benchmarks/openvino_accuracy.py --dataset_dir ../shared/data/la --cases 61-80 \\
        --record bundles/la_seg_finetune/configs/openvino_int8.json --out benchmarks/results/openvino_amd_epyc

Each case goes through the bundle's own preprocessing, sliding-window inference (``inference.json``: patch, overlap,
``sw_batch_size``) with the runtime's network, inversion to the input's grid and argmax. The int8 IR is the one a pull
makes: rebuilt from ``--record`` without data. Writes ``accuracy.json`` and ``accuracy.md`` under ``--out``. The
seconds per scan here come from one process running every runtime; ``openvino_speed.py`` times each alone.

The issue's rule for offering int8 by default: agreement with fp32 >= 99.5 % Dice and mean Dice within 0.2 points.
Calibrate on training cases only (1-60); cases 61-80 are for evaluation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from openvino_common import RUNTIMES, bundle_parts, bundle_root, case_list, cpu_info, prepare_artefacts, runtime_network

from medssl.metrics import dice


def largest_component(mask: np.ndarray) -> np.ndarray:
    from monai.transforms import KeepLargestConnectedComponent

    return np.asarray(KeepLargestConnectedComponent(applied_labels=[1])(torch.as_tensor(mask[None]))[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", help="the LA dataset (required unless --from_json)")
    ap.add_argument("--cases", default="61-80", help="1-based positions of the training list: 61-80 or 3,8,13")
    ap.add_argument("--record", help="int8 calibration record (JSON); without it openvino-int8 is skipped")
    ap.add_argument("--bundle_root", help="bundle folder with models/model.pt (default: pull the release)")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES))
    ap.add_argument("--reference", default="torch-fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="folder for accuracy.json / accuracy.md (required unless --from_json)")
    ap.add_argument(
        "--bundle_record",
        help="also write the bundle's runtime accuracy record here (configs/runtime_accuracy.json of the bundle "
        "whose weights were measured; runtime 'auto' reads it)",
    )
    ap.add_argument(
        "--from_json", help="write --bundle_record from this finished run's accuracy.json, measuring nothing"
    )
    args = ap.parse_args()
    if args.from_json:
        if not args.bundle_record:
            ap.error("--from_json needs --bundle_record")
        write_bundle_record(
            json.loads(Path(args.from_json).read_text()), args.bundle_record, args.from_json, args.record
        )
        return
    if not args.out or not args.dataset_dir:
        ap.error("--dataset_dir and --out are required")
    torch.set_num_threads(args.threads)
    from medssl.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    root = bundle_root(args.bundle_root)
    runtimes = [r for r in args.runtimes.split(",") if r and (args.record or r != "openvino-int8")]
    if args.reference not in runtimes:
        runtimes.insert(0, args.reference)
    parts = bundle_parts(root)
    cases = case_list(Path(args.dataset_dir), args.cases)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        artefacts = prepare_artefacts(root, Path(tmp), args.record)
        nets = {r: torch.nn.Sequential(runtime_network(r, root, artefacts), torch.nn.Softmax(dim=1)) for r in runtimes}
        for case in cases:
            label = np.asarray(nib.load(case["label"]).dataobj) > 0
            maps, seconds = {}, {}
            for runtime, net in nets.items():
                item = parts["preprocessing"]({"image": case["image"]})
                start = time.perf_counter()
                with torch.inference_mode():
                    item["pred"] = parts["inferer"](item["image"][None], net)[0]
                seconds[runtime] = time.perf_counter() - start
                pred = np.asarray(parts["postprocessing"](item)["pred"])[0] > 0
                if pred.shape != label.shape:
                    raise RuntimeError(f"{case['id']}: {runtime} label map {pred.shape} vs label {label.shape}.")
                maps[runtime] = pred
            ref = maps[args.reference]
            row = {"position": case["position"], "case": case["id"]}
            for runtime, pred in maps.items():
                lcc = largest_component(pred)
                row[runtime] = {
                    "dice": dice(pred, label),
                    "dice_lcc": dice(lcc, label),
                    "agreement": dice(pred, ref),
                    "identical": bool((pred == ref).all()),
                    "seconds": round(seconds[runtime], 3),
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for runtime in nets:
        vals = {k: [r[runtime][k] for r in rows] for k in ("dice", "dice_lcc", "agreement", "seconds")}
        summary[runtime] = {
            "mean_dice": statistics.mean(vals["dice"]),
            "mean_dice_lcc": statistics.mean(vals["dice_lcc"]),
            "mean_agreement": statistics.mean(vals["agreement"]),
            "min_agreement": min(vals["agreement"]),
            "identical_maps": sum(r[runtime]["identical"] for r in rows),
            "median_seconds": statistics.median(vals["seconds"]),
        }
    ref = summary[args.reference]
    for runtime, s in summary.items():
        s["dice_points_vs_reference"] = 100 * (s["mean_dice"] - ref["mean_dice"])
        s["meets_int8_rule"] = bool(s["mean_agreement"] >= 0.995 and abs(s["dice_points_vs_reference"]) <= 0.2)
    import medssl.openvino as mov

    result = {
        "cpu": cpu_info(),
        "threads": args.threads,
        "bundle": str(root),
        "weights_sha256": mov.file_sha256(root / "models" / "model.pt"),
        "record": args.record,
        "cases": args.cases,
        "reference": args.reference,
        "versions": {"torch": torch.__version__, **mov.tool_versions(int8=True)},
        "inference": {k: parts[k] for k in ("patch_size", "sw_batch_size", "sw_overlap")},
        "summary": summary,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# Runtimes on LA cases {args.cases} at their native grid ({result['cpu']['model_name']}, "
        f"{args.threads} threads)",
        "",
        f"Command: `python benchmarks/openvino_accuracy.py --dataset_dir DATA --cases {args.cases} --record RECORD "
        f"--out OUT`. Sliding window {parts['patch_size']}, overlap {parts['sw_overlap']}, sw_batch_size "
        f"{parts['sw_batch_size']}; agreement = Dice of the label map with {args.reference}'s (no post-processing).",
        "",
        "| runtime | mean Dice % | mean Dice % (largest component) | Dice vs reference (points) | mean agreement % "
        "| min agreement % | identical maps | int8 rule (>= 99.5 %, within 0.2 pt) | s / scan (shared process) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for runtime, s in summary.items():
        lines.append(
            f"| {runtime} | {100 * s['mean_dice']:.2f} | {100 * s['mean_dice_lcc']:.2f} | "
            f"{s['dice_points_vs_reference']:+.2f} | {100 * s['mean_agreement']:.2f} | "
            f"{100 * s['min_agreement']:.2f} | {s['identical_maps']}/{len(rows)} | "
            f"{'yes' if s['meets_int8_rule'] else 'no'} | {s['median_seconds']:.2f} |"
        )
    lines += ["", "| case | " + " | ".join(f"{r} Dice / agreement" for r in summary) + " |",
              "|---|" + "---|" * len(summary)]  # fmt: skip
    for row in rows:
        cells = [f"{100 * row[r]['dice']:.2f} / {100 * row[r]['agreement']:.2f}" for r in summary]
        lines.append(f"| {row['position']} {row['case']} | " + " | ".join(cells) + " |")
    (out / "accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: 8 + len(summary)]))
    if args.bundle_record:
        write_bundle_record(result, args.bundle_record, str(out / "accuracy.json"), args.record)


def write_bundle_record(result: dict, target: str, source: str, int8_record: str = None) -> None:
    """The bundle's runtime accuracy record (``medssl.clinic.runtime_choice.write_accuracy_record``) from a run's result
    (``int8_record``: the calibration record the int8 figures were measured with; its sha256 is kept)."""
    from medssl.export import file_sha256
    from medssl.clinic.runtime_choice import write_accuracy_record

    if "openvino-int8" in result["summary"] and not int8_record:
        raise SystemExit(
            "--record is needed: the int8 figures hold only for the calibration record they were made with"
        )

    cases = result["cases"]
    path = write_accuracy_record(
        result["summary"],
        target,
        weights_sha256=result["weights_sha256"],
        cases=f"LA training-list positions {cases} (the dev split's held-out cases), each at its native grid",
        measured_on={"cpu": result["cpu"], "threads": result["threads"], "versions": result["versions"]},
        inference=result["inference"],
        command=f"python benchmarks/openvino_accuracy.py --dataset_dir DATA --cases {cases} --record RECORD --out OUT",
        source=Path(source).name,
        **({"int8_record_sha256": file_sha256(int8_record)} if int8_record else {}),
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
