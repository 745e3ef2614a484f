"""Speed benchmark: ``python -m medssl speed``.

For each bundle, seconds per training iteration at its configured patch and batch (the paper's by default),
measured inside the bundle's own workflow (data loading, augmentation, engine, handlers included), against the
bare VNet forward + loss + backward + SGD step on an in-memory batch of the same size; the training loader's
throughput (volumes per second) against what an iteration consumes; sliding-window inference seconds per volume
with the papers' stride and with MONAI's overlap 0.5 (and the Dice of each when weights are given); peak memory.
On a GPU the same runs use AMP. Writes ``speed.json`` and ``speed.md``.
"""

from __future__ import annotations

import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from medssl.bundle import bundle_path
from medssl.data import atomic_path, write_json
from medssl.runtime import tune_cpu_allocator

__all__ = ["speed", "bundle_iteration_seconds", "bare_iteration_seconds", "sliding_window_seconds"]

SEGMENTATION_BUNDLES = ("la_seg_finetune", "cvrl_semisup", "simcvd_distill")


def _workflow(bundle: str, bundle_root: str, overrides: Dict[str, Any], configs: Sequence[str] = ("train",)):
    from monai.bundle import ConfigWorkflow

    root = bundle_path(bundle)
    wf = ConfigWorkflow(
        config_file=[str(root / "configs" / f"{c}.json") for c in configs],
        workflow_type="train",
        logging_file=str(root / "configs" / "logging.conf"),
        meta_file=str(root / "configs" / "metadata.json"),
        bundle_root=bundle_root,
        **overrides,
    )
    wf.initialize()
    return wf


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bundle_iteration_seconds(
    bundle: str, dataset_dir: str, warmup: int, iterations: int, overrides: Optional[Dict[str, Any]] = None
) -> Dict[str, Any]:
    """Median seconds between consecutive ITERATION_COMPLETED events of the bundle's own trainer."""
    from ignite.engine import Events

    with tempfile.TemporaryDirectory() as tmp:
        wf = _workflow(
            bundle,
            tmp,
            {
                "dataset_dir": dataset_dir,
                "max_iterations": warmup + iterations,
                "save_interval": 0,
                **(overrides or {}),
            },
        )
        stamps: List[float] = []
        trainer = wf.parser.get_parsed_content("train#trainer")
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: stamps.append(time.perf_counter()))
        loader = wf.parser.get_parsed_content("train#dataloader")
        batch = int(wf.parser.get_parsed_content("batch_size"))
        patch = list(wf.parser.get_parsed_content("patch_size"))
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        wf.run()
        steps = [b - a for a, b in zip(stamps[warmup - 1 :], stamps[warmup:])] if warmup else np.diff(stamps).tolist()
        # throughput of the labeled loader alone, over as many batches as were timed
        it = iter(loader)
        next(it)
        start = time.perf_counter()
        for _ in range(iterations):
            next(it)
        loader_s = (time.perf_counter() - start) / iterations
        wf.finalize()
    result = {
        "bundle": bundle,
        "patch_size": patch,
        "batch_size": batch,
        "seconds_per_iteration": statistics.median(steps),
        "steps": [round(s, 4) for s in steps],
        "loader_volumes_per_second": batch / loader_s,
        "demand_volumes_per_second": batch / statistics.median(steps),
        "peak_rss_mb": _peak_rss_mb(),
    }
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def bare_iteration_seconds(
    patch_size: Sequence[int], batch_size: int, warmup: int, iterations: int, amp: bool = False
) -> float:
    """Median seconds of forward + DiceCE loss + backward + SGD step of the VNet on an in-memory batch."""
    from medssl.losses import supervised_loss
    from medssl.networks import VNet

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    net = VNet().to(device).train()
    loss_fn = supervised_loss()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    x = torch.randn(batch_size, 1, *patch_size, device=device)
    y = (torch.rand(batch_size, 1, *patch_size, device=device) > 0.9).float()
    steps = []
    for i in range(warmup + iterations):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        with torch.autocast(device.type, enabled=amp):
            loss = loss_fn(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            steps.append(time.perf_counter() - t)
    return statistics.median(steps)


def sliding_window_seconds(
    dataset_dir: str, patch_size: Sequence[int], weights: Optional[str], stride: Sequence[int], num_volumes: int = 1
) -> Dict[str, Any]:
    """Seconds per volume of la_seg_finetune's evaluation with the paper's stride and with overlap 0.5 (and the
    mean Dice of each when ``weights`` are given), on the first ``num_volumes`` test volumes."""
    from ignite.engine import Events

    out = {}
    for name, extra in (("paper_stride", {"sw_stride": list(stride)}), ("overlap_0.5", {})):
        with tempfile.TemporaryDirectory() as tmp:
            overrides = {
                "dataset_dir": dataset_dir,
                "patch_size": list(patch_size),
                "validate#dataset#data": f"$medssl.data.eval_list(@dataset_dir, 'test', required=True)[:{num_volumes}]",
                **extra,
            }
            (Path(tmp) / "models").mkdir()
            if weights:
                (Path(tmp) / "models" / "model.pt").symlink_to(Path(weights).resolve())
            else:  # timing only: an untrained network
                from medssl.networks import VNet

                torch.save(VNet().state_dict(), Path(tmp) / "models" / "model.pt")
            wf = _workflow("la_seg_finetune", tmp, overrides, ("train", "evaluate"))
            evaluator = wf.parser.get_parsed_content("validate#evaluator")
            stamps: List[float] = []
            evaluator.add_event_handler(Events.ITERATION_STARTED, lambda _: stamps.append(time.perf_counter()))
            evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda _: stamps.append(time.perf_counter()))
            evaluator.run()
            seconds = [b - a for a, b in zip(stamps[::2], stamps[1::2])]
            out[name] = {"seconds_per_volume": statistics.mean(seconds), "volumes": len(seconds)}
            if weights:
                out[name]["dice"] = float(evaluator.state.metrics["dice"])
            wf.finalize()
    return out


def speed(
    dataset_dir: str,
    out: str = "speed",
    warmup: int = 1,
    iterations: int = 3,
    bundles: Sequence[str] = ("la_seg_finetune", "cvrl_semisup", "simcvd_distill", "pcrl_pretrain"),
    overrides: Optional[Dict[str, Any]] = None,
    weights: Optional[str] = None,
    stride: Sequence[int] = (18, 18, 4),
    num_volumes: int = 1,
) -> Dict[str, Any]:
    """Run the speed benchmark and write ``out/speed.json`` and ``out/speed.md`` (see the module docstring).

    Args:
        dataset_dir: data with a ``"test"`` list (e.g. the dev split of ``python -m medssl dev_split``).
        overrides: bundle overrides for every training measurement (default: none, i.e. the paper's patch/batch).
        weights: la_seg_finetune weights for the inference Dice (optional).
    """
    overrides = dict(overrides or {})
    amp = torch.cuda.is_available()
    # the bundles tune the allocator in their initialize step: do it first, so the bare loop runs under it too
    tuned = tune_cpu_allocator(overrides.get("cpu_allocator_tuning", True))
    results: Dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if amp else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "amp": amp,
        "cpu_allocator_tuning": tuned,
        "bundles": [],
        "overrides": overrides,
    }
    from medssl.data import load_datalist

    num_labeled = max(1, min(8, len(load_datalist(dataset_dir)["training"]) - 1))  # leave unlabeled volumes
    for bundle in bundles:
        extra = {"num_labeled": num_labeled} if bundle in SEGMENTATION_BUNDLES else {}
        results["bundles"].append(
            bundle_iteration_seconds(bundle, dataset_dir, warmup, iterations, {**extra, **overrides})
        )
    bare = {}
    for r in results["bundles"]:
        if r["bundle"] in SEGMENTATION_BUNDLES:
            key = (tuple(r["patch_size"]), 4)  # 4 volumes per iteration: 4 labeled, or 2 labeled + 2 unlabeled
            if key not in bare:
                bare[key] = bare_iteration_seconds(key[0], key[1], warmup, iterations, amp)
            r["bare_seconds_per_iteration"] = bare[key]
            r["ratio_to_bare"] = r["seconds_per_iteration"] / bare[key]
    patch = next((r["patch_size"] for r in results["bundles"] if r["bundle"] == "la_seg_finetune"), [112, 112, 80])
    results["inference"] = sliding_window_seconds(dataset_dir, patch, weights, stride, num_volumes)
    results["peak_rss_mb"] = _peak_rss_mb()
    out_dir = Path(out)
    write_json(results, out_dir / "speed.json")
    lines = [
        f"# medssl speed — {results['device']} ({results['torch_threads']} threads, AMP {amp}, "
        f"CPU allocator tuning {tuned})",
        "",
        "| bundle | patch | batch | s / iteration | bare VNet s / it (4 volumes) | ratio | loader vol/s | "
        "demand vol/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["bundles"]:
        bare_s = f"{r['bare_seconds_per_iteration']:.3f}" if "bare_seconds_per_iteration" in r else "-"
        ratio = f"{r['ratio_to_bare']:.2f}" if "ratio_to_bare" in r else "-"
        lines.append(
            f"| {r['bundle']} | {'x'.join(map(str, r['patch_size']))} | {r['batch_size']} | "
            f"{r['seconds_per_iteration']:.3f} | {bare_s} | {ratio} | {r['loader_volumes_per_second']:.1f} | "
            f"{r['demand_volumes_per_second']:.2f} |"
        )
    lines += ["", "| sliding window | s / volume | Dice |", "|---|---|---|"]
    for name, r in results["inference"].items():
        lines.append(f"| {name} | {r['seconds_per_volume']:.2f} | {r.get('dice', float('nan')):.4f} |")
    lines += ["", f"Peak resident memory of the process: {results['peak_rss_mb']:.0f} MB."]
    with atomic_path(out_dir / "speed.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results
