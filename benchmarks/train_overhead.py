"""Seconds per training iteration: the la_seg_finetune bundle vs a bare PyTorch loop at the same patch and batch.

The bundle's iteration includes everything a user pays for (data loading and augmentation, the ignite engine,
LR schedule, loss logging, TensorBoard); the bare loop is forward + loss + backward + SGD step of the same VNet on
a tensor already in memory. Their ratio is the bundle's overhead.

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
from monai.losses import DiceCELoss

from medssl.bundle import bundle_path
from medssl.networks import VNet
from medssl.runtime import tune_cpu_allocator


def bundle_seconds(dataset_dir, patch_size, batch_size, warmup, iterations, num_workers, num_labeled, tuning=True):
    root = bundle_path("la_seg_finetune")
    with tempfile.TemporaryDirectory() as tmp:
        wf = ConfigWorkflow(
            config_file=str(root / "configs" / "train.json"), workflow_type="train", bundle_root=tmp,
            logging_file=str(root / "configs" / "logging.conf"), meta_file=str(root / "configs" / "metadata.json"),
            dataset_dir=str(dataset_dir), num_labeled=num_labeled, patch_size=list(patch_size),
            batch_size=batch_size, max_iterations=warmup + iterations, save_interval=0, num_workers=num_workers,
            cpu_allocator_tuning=bool(tuning),
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


def bare_seconds(patch_size, batch_size, warmup, iterations):
    torch.manual_seed(0)
    net = VNet().train()
    loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, squared_pred=True, batch=True,
                         smooth_nr=1e-5, smooth_dr=1e-5, lambda_dice=0.5, lambda_ce=0.5)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch_size, 1, *patch_size)
    y = (torch.rand(batch_size, 1, *patch_size) > 0.9).float()
    # as the bundle's trainer (MONAI SupervisedTrainer): gradients zeroed in place, not freed
    steps = []
    for i in range(warmup + iterations):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        loss_fn(net(x), y).backward()
        opt.step()
        if i >= warmup:
            steps.append(time.perf_counter() - t)
    return statistics.median(steps), steps


def main(dataset_dir="../shared/data/la", patch_size=(112, 112, 80), batch_size=4, warmup=2, iterations=6,
         num_workers=None, num_labeled=16, out=None, cpu_allocator_tuning=True):
    # the bundles tune glibc's allocator in their initialize step; tune (or not) before anything is timed so the
    # bare loop and the bundle run under the same allocator
    tuned = tune_cpu_allocator(cpu_allocator_tuning)
    patch_size = tuple(int(s) for s in (patch_size.split(",") if isinstance(patch_size, str) else patch_size))
    results = {"patch_size": patch_size, "batch_size": batch_size, "iterations_timed": iterations,
               "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
               "cpu_allocator_tuning": tuned}
    # bare loop before and after the bundle runs, so drift of the machine shows and averages out
    _, bare_steps = bare_seconds(patch_size, batch_size, warmup, iterations)
    workers = [0, 2] if num_workers is None else [int(num_workers)]
    bundle = {}
    for nw in workers:
        bundle[nw] = bundle_seconds(dataset_dir, patch_size, batch_size, warmup, iterations, nw, num_labeled, tuned)
    bare_steps += bare_seconds(patch_size, batch_size, warmup, iterations)[1]
    bare = statistics.median(bare_steps)
    results["bare_s_per_it"] = round(bare, 3)
    results["bare_steps"] = [round(s, 3) for s in bare_steps]
    for nw, (b, b_steps) in bundle.items():
        results[f"bundle_s_per_it_workers{nw}"] = round(b, 3)
        results[f"ratio_workers{nw}"] = round(b / bare, 3)
        results[f"bundle_steps_workers{nw}"] = [round(s, 3) for s in b_steps]
    print(json.dumps(results, indent=1))
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    fire.Fire(main)
