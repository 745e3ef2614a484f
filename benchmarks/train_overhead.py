"""Seconds per training iteration: the la_seg_finetune bundle vs a bare PyTorch loop at the same patch and batch,
in each precision mode side by side (``medssl.lab.speed.MODES``: fp32 = ``--amp false``, amp = the default, bf16 on a
CPU with native bf16; fp32_contiguous = fp32 without channels-last).

The bundle's iteration includes everything a user pays for (data loading and augmentation, the ignite engine,
LR schedule, loss logging, TensorBoard); the bare loop is forward + loss + backward + SGD step of the same VNet on
a tensor already in memory, in the same mode (modes interleaved step by step). Their ratio is the bundle's overhead.

    python benchmarks/train_overhead.py --dataset_dir ../shared/data/la --patch_size 112,112,80 --batch_size 4
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time

import fire
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from medssl.bundle import bundle_path
from medssl.runtime import tune_cpu_allocator
from medssl.lab.speed import MODES, bare_iteration_seconds


def bundle_seconds(dataset_dir, patch_size, batch_size, warmup, iterations, num_workers, num_labeled, tuning=True,
                   mode="amp"):
    root = bundle_path("la_seg_finetune")
    with tempfile.TemporaryDirectory() as tmp:
        wf = ConfigWorkflow(
            config_file=str(root / "configs" / "train.json"), workflow_type="train", bundle_root=tmp,
            logging_file=str(root / "configs" / "logging.conf"), meta_file=str(root / "configs" / "metadata.json"),
            dataset_dir=str(dataset_dir), num_labeled=num_labeled, patch_size=list(patch_size),
            batch_size=batch_size, max_iterations=warmup + iterations, save_interval=0, num_workers=num_workers,
            cpu_allocator_tuning=bool(tuning), **MODES[mode],
        )
        wf.initialize()
        stamps = []
        wf.parser.get_parsed_content("train#trainer").add_event_handler(
            Events.ITERATION_COMPLETED, lambda _: stamps.append(time.perf_counter())
        )
        wf.run()
        wf.finalize()
    steps = [b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:])]
    return statistics.median(steps), steps


def main(dataset_dir="../shared/data/la", patch_size=(112, 112, 80), batch_size=4, warmup=2, iterations=6,
         num_workers=None, num_labeled=16, out=None, cpu_allocator_tuning=True, modes="fp32,amp"):
    # the bundles tune glibc's allocator in their initialize step; tune (or not) before anything is timed so the
    # bare loop and the bundle run under the same allocator
    tuned = tune_cpu_allocator(cpu_allocator_tuning)
    patch_size = tuple(int(s) for s in (patch_size.split(",") if isinstance(patch_size, str) else patch_size))
    modes = [m.strip() for m in (modes.split(",") if isinstance(modes, str) else modes) if m.strip()]
    results = {"patch_size": patch_size, "batch_size": batch_size, "iterations_timed": iterations,
               "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
               "cpu_allocator_tuning": tuned, "modes": {m: MODES[m] for m in modes}}
    # bare loop (modes interleaved) before and after the bundle runs, so drift of the machine shows and averages out
    bare_before = bare_iteration_seconds(patch_size, batch_size, warmup, iterations, modes)
    workers = [0, 2] if num_workers is None else [int(num_workers)]
    bundle = {}
    for nw in workers:
        for mode in modes:  # the bundle in each mode in turn
            bundle[nw, mode] = bundle_seconds(dataset_dir, patch_size, batch_size, warmup, iterations, nw,
                                              num_labeled, tuned, mode)
    bare_after = bare_iteration_seconds(patch_size, batch_size, warmup, iterations, modes)
    for mode in modes:
        bare = (bare_before[mode] + bare_after[mode]) / 2
        results[f"bare_s_per_it_{mode}"] = round(bare, 3)
        results[f"bare_before_after_{mode}"] = [round(bare_before[mode], 3), round(bare_after[mode], 3)]
        for nw in workers:
            b, b_steps = bundle[nw, mode]
            results[f"bundle_s_per_it_{mode}_workers{nw}"] = round(b, 3)
            results[f"ratio_{mode}_workers{nw}"] = round(b / bare, 3)
            results[f"bundle_steps_{mode}_workers{nw}"] = [round(s, 3) for s in b_steps]
    if "fp32" in modes:
        for mode in modes:
            for nw in workers:
                results[f"speedup_{mode}_vs_fp32_workers{nw}"] = round(bundle[nw, "fp32"][0] / bundle[nw, mode][0], 3)
    print(json.dumps(results, indent=1))
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    fire.Fire(main)
