"""Calibrate the int8 OpenVINO model of a bundle on training images and write its record (the release step).

    python benchmarks/openvino_calibrate.py --bundle_root PULLED/la_seg_finetune_v0.3.0 \\
        --dataset_dir ../shared/data/la --out bundles/la_seg_finetune/configs/openvino_int8.json

Defaults: :data:`medssl.openvino_int8.DEFAULT_CALIBRATION_CASES` (training cases 1, 6, ..., 56 of the dev split), 4
sliding-window crops of each, seed 0, NNCF's ``performance`` preset. Cases past 60 are refused (61-80 are the dev
test cases). The record binds itself to the sha256 of ``models/model.pt``: calibrate the weights you release.
"""

from __future__ import annotations

import argparse
import json
import time

from openvino_common import bundle_root

from medssl import openvino_int8 as mov


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", required=True)
    ap.add_argument("--bundle_root", help="bundle folder with models/model.pt (default: pull the release)")
    ap.add_argument("--out", required=True, help="where to write the record (JSON)")
    ap.add_argument("--cases", default=",".join(map(str, mov.DEFAULT_CALIBRATION_CASES)))
    ap.add_argument("--crops_per_case", type=int, default=mov.DEFAULT_CROPS_PER_CASE)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default=mov.QUANTIZE_ARGS["preset"], choices=("performance", "mixed"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    record = mov.record_int8_calibration(
        bundle_root(args.bundle_root),
        args.dataset_dir,
        args.out,
        cases=[int(c) for c in args.cases.split(",")],
        crops_per_case=args.crops_per_case,
        seed=args.seed,
        quantize_args={"preset": args.preset},
    )
    print(json.dumps({**mov.calibration_recipe(record), "seconds": round(time.perf_counter() - start, 1)}, indent=1))


if __name__ == "__main__":
    main()
