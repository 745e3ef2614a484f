"""Speed benchmark: ``python -m medssl speed``.

For each bundle and each precision mode, side by side in one run: seconds per training iteration at the bundle's
configured patch and batch (the paper's by default), measured inside the bundle's own workflow (data loading,
augmentation, engine, handlers included), against the bare VNet forward + loss + backward + SGD step on an
in-memory batch of the same size in the same mode (modes interleaved step by step); the training loader's throughput
(volumes per second) against what an iteration consumes; sliding-window inference seconds per volume with the
papers' stride and with MONAI's overlap 0.5 (and the Dice of each when weights are given), and how far the label
maps of the modes agree; peak memory. Writes ``speed.json`` and ``speed.md``.

Modes (:data:`MODES`): ``fp32`` is ``--amp false`` (fp32, channels-last on a CPU); ``amp`` the bundles' default
(bf16 on a CPU with native bf16, fp16 on CUDA; see :mod:`medssl.precision`); ``fp32_contiguous`` fp32 without the
channels-last layout (every bundle's CPU setting before mixed precision came).
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from medssl.bundle import bundle_path
from medssl.data import atomic_path, write_json
from medssl.precision import MixedPrecision, prepare_network, resolve_precision
from medssl.runtime import tune_cpu_allocator

__all__ = [
    "MODES",
    "RUNTIMES",
    "speed",
    "bundle_iteration_seconds",
    "bare_iteration_seconds",
    "sliding_window_seconds",
    "runtime_seconds",
]

SEGMENTATION_BUNDLES = ("la_seg_finetune", "cvrl_semisup", "simcvd_distill")
# mode -> bundle overrides
MODES: Dict[str, Dict[str, Any]] = {
    "fp32": {"amp": False},
    "amp": {"amp": True},
    "fp32_contiguous": {"amp": False, "channels_last": False},
}
DEFAULT_MODES = ("fp32", "amp")


def _check_modes(modes: Sequence[str]) -> List[str]:
    modes = list(modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"unknown speed modes {unknown or modes}; choose from {sorted(MODES)}.")
    return modes


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
        precision = wf.parser.get_parsed_content("precision")
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
        "precision": precision,
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
    patch_size: Sequence[int], batch_size: int, warmup: int, iterations: int, modes: Sequence[str] = DEFAULT_MODES
) -> Dict[str, float]:
    """Median seconds of forward + DiceCE loss + backward + SGD step of the VNet on an in-memory batch, per mode;
    the modes take turns step by step (one network per mode, same initial weights), so drift of the machine falls
    on all of them alike."""
    from medssl.losses import supervised_loss
    from medssl.networks import VNet

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loss_fn = supervised_loss()
    x = torch.randn(batch_size, 1, *patch_size, device=device)
    y = (torch.rand(batch_size, 1, *patch_size, device=device) > 0.9).float()
    setups = {}
    for mode in _check_modes(modes):
        torch.manual_seed(0)
        precision = resolve_precision(MODES[mode]["amp"], device)
        channels_last = MODES[mode].get("channels_last", device.type == "cpu")
        net = prepare_network(VNet(), device, channels_last).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        setups[mode] = (MixedPrecision(net, precision, channels_last), opt, scaler)
    steps: Dict[str, List[float]] = {m: [] for m in setups}
    for i in range(warmup + iterations):
        for mode, (net, opt, scaler) in setups.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            opt.zero_grad(set_to_none=False)
            loss = loss_fn(net(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                steps[mode].append(time.perf_counter() - t)
    return {m: statistics.median(v) for m, v in steps.items()}


def _foreground(engine: Any) -> List[np.ndarray]:
    """The foreground masks of an evaluator's current (decollated, one-hot) predictions."""
    return [np.asarray(item["pred"][1:].sum(0).cpu() > 0) for item in engine.state.output]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def sliding_window_seconds(
    dataset_dir: str,
    patch_size: Sequence[int],
    weights: Optional[str],
    stride: Sequence[int],
    num_volumes: int = 1,
    modes: Sequence[str] = DEFAULT_MODES,
) -> Dict[str, Any]:
    """Seconds per volume of la_seg_finetune's evaluation with the paper's stride and with overlap 0.5 in each mode
    (and the mean Dice of each when ``weights`` are given), on the first ``num_volumes`` test volumes; with several
    modes, ``agreement`` is the mean Dice between each mode's foreground and the first mode's (same weights)."""
    from ignite.engine import Events

    out: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as weights_dir:
        if not weights:  # timing only: an untrained network, the same one for every mode
            from medssl.networks import VNet

            torch.manual_seed(0)
            weights = str(Path(weights_dir) / "model.pt")
            torch.save(VNet().state_dict(), weights)
            trained = False
        else:
            trained = True
        for name, extra in (("paper_stride", {"sw_stride": list(stride)}), ("overlap_0.5", {})):
            masks: Dict[str, List[np.ndarray]] = {}
            for mode in _check_modes(modes):
                with tempfile.TemporaryDirectory() as tmp:
                    overrides = {
                        "dataset_dir": dataset_dir,
                        "patch_size": list(patch_size),
                        "validate#dataset#data": "$medssl.data.eval_list(@dataset_dir, 'test', required=True)"
                        f"[:{num_volumes}]",
                        **extra,
                        **MODES[mode],
                    }
                    (Path(tmp) / "models").mkdir()
                    (Path(tmp) / "models" / "model.pt").symlink_to(Path(weights).resolve())
                    wf = _workflow("la_seg_finetune", tmp, overrides, ("train", "evaluate"))
                    evaluator = wf.parser.get_parsed_content("validate#evaluator")
                    stamps: List[float] = []
                    masks[mode] = []
                    evaluator.add_event_handler(Events.ITERATION_STARTED, lambda _: stamps.append(time.perf_counter()))
                    evaluator.add_event_handler(
                        Events.ITERATION_COMPLETED, lambda _: stamps.append(time.perf_counter())
                    )
                    evaluator.add_event_handler(
                        Events.ITERATION_COMPLETED, lambda e: masks[mode].extend(_foreground(e))
                    )
                    evaluator.run()
                    seconds = [b - a for a, b in zip(stamps[::2], stamps[1::2])]
                    entry = {
                        "precision": wf.parser.get_parsed_content("precision"),
                        "seconds_per_volume": statistics.mean(seconds),
                        "volumes": len(seconds),
                    }
                    if trained:
                        entry["dice"] = float(evaluator.state.metrics["dice"])
                    out.setdefault(name, {})[mode] = entry
                    wf.finalize()
            first = next(iter(masks))
            for mode in list(masks)[1:]:
                out[name][mode][f"agreement_with_{first}"] = float(
                    np.mean([_dice(a, b) for a, b in zip(masks[first], masks[mode])])
                )
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
    modes: Sequence[str] = DEFAULT_MODES,
    repeats: int = 1,
) -> Dict[str, Any]:
    """Run the speed benchmark and write ``out/speed.json`` and ``out/speed.md`` (see the module docstring).

    Args:
        dataset_dir: data with a ``"test"`` list (e.g. the dev split of ``python -m medssl dev_split``).
        overrides: bundle overrides for every training measurement (default: none, i.e. the paper's patch/batch).
        weights: la_seg_finetune weights for the inference Dice (optional).
        modes: precision modes (:data:`MODES`), measured side by side: each bundle runs in every mode in turn.
        repeats: rounds over the modes per bundle (the median over rounds is reported).
    """
    modes = _check_modes(modes)
    overrides = dict(overrides or {})
    cuda = torch.cuda.is_available()
    # the bundles tune the allocator in their initialize step: do it first, so the bare loop runs under it too
    tuned = tune_cpu_allocator(overrides.get("cpu_allocator_tuning", True))
    results: Dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "modes": {m: MODES[m] for m in modes},
        "cpu_allocator_tuning": tuned,
        "bundles": [],
        "overrides": overrides,
    }
    from medssl.data import load_datalist

    num_labeled = max(1, min(8, len(load_datalist(dataset_dir)["training"]) - 1))  # leave unlabeled volumes
    for bundle in bundles:
        extra = {"num_labeled": num_labeled} if bundle in SEGMENTATION_BUNDLES else {}
        rounds: Dict[str, List[Dict[str, Any]]] = {m: [] for m in modes}
        for _ in range(max(1, int(repeats))):
            for mode in modes:
                rounds[mode].append(
                    bundle_iteration_seconds(
                        bundle, dataset_dir, warmup, iterations, {**extra, **overrides, **MODES[mode]}
                    )
                )
        for mode, runs in rounds.items():
            r = dict(runs[0])
            r["mode"] = mode
            r["seconds_per_iteration"] = statistics.median(x["seconds_per_iteration"] for x in runs)
            r["steps"] = [s for x in runs for s in x["steps"]]
            results["bundles"].append(r)
    bare: Dict[tuple, Dict[str, float]] = {}
    for r in results["bundles"]:
        if r["bundle"] in SEGMENTATION_BUNDLES:
            key = (tuple(r["patch_size"]), 4)  # 4 volumes per iteration: 4 labeled, or 2 labeled + 2 unlabeled
            if key not in bare:
                bare[key] = bare_iteration_seconds(key[0], key[1], warmup, iterations, modes)
            r["bare_seconds_per_iteration"] = bare[key][r["mode"]]
            r["ratio_to_bare"] = r["seconds_per_iteration"] / bare[key][r["mode"]]
    patch = next((r["patch_size"] for r in results["bundles"] if r["bundle"] == "la_seg_finetune"), [112, 112, 80])
    results["inference"] = sliding_window_seconds(dataset_dir, patch, weights, stride, num_volumes, modes)
    results["peak_rss_mb"] = _peak_rss_mb()
    out_dir = Path(out)
    write_json(results, out_dir / "speed.json")
    lines = _report(results, modes, tuned)
    with atomic_path(out_dir / "speed.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


def _report(results: Dict[str, Any], modes: List[str], tuned: bool) -> List[str]:
    first = modes[0]
    lines = [
        f"# medssl speed — {results['device']} ({results['torch_threads']} threads, CPU allocator tuning {tuned})",
        "",
        "Modes: " + "; ".join(f"`{m}` = {', '.join(f'{k} {v}' for k, v in MODES[m].items())}" for m in modes) + ".",
        "",
        "| bundle | patch | batch | mode | precision | s / iteration | speed-up vs "
        f"{first} | bare VNet s / it (4 volumes) | ratio to bare | loader vol/s | demand vol/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["bundle"]: r["seconds_per_iteration"] for r in results["bundles"] if r["mode"] == first}
    for r in results["bundles"]:
        bare_s = f"{r['bare_seconds_per_iteration']:.3f}" if "bare_seconds_per_iteration" in r else "-"
        ratio = f"{r['ratio_to_bare']:.2f}" if "ratio_to_bare" in r else "-"
        lines.append(
            f"| {r['bundle']} | {'x'.join(map(str, r['patch_size']))} | {r['batch_size']} | {r['mode']} | "
            f"{r['precision']} | {r['seconds_per_iteration']:.3f} | "
            f"{base[r['bundle']] / r['seconds_per_iteration']:.2f}x | {bare_s} | {ratio} | "
            f"{r['loader_volumes_per_second']:.1f} | {r['demand_volumes_per_second']:.2f} |"
        )
    lines += ["", f"| sliding window | mode | precision | s / volume | Dice | label agreement with {first} |"]
    lines += ["|---|---|---|---|---|---|"]
    for name, per_mode in results["inference"].items():
        for mode, r in per_mode.items():
            agree = r.get(f"agreement_with_{first}")
            lines.append(
                f"| {name} | {mode} | {r['precision']} | {r['seconds_per_volume']:.2f} | "
                f"{r.get('dice', float('nan')):.4f} | {'-' if agree is None else f'{100 * agree:.2f} %'} |"
            )
    lines += ["", f"Peak resident memory of the process: {results['peak_rss_mb']:.0f} MB."]
    return lines


# -- inference runtimes side by side -------------------------------------------------------------------------------

# label -> Segmenter arguments (runtime, model_format, overrides)
RUNTIMES: Dict[str, Dict[str, Any]] = {
    "torch": {"runtime": "torch", "model_format": "pt", "overrides": {}},
    "torch-fp32": {"runtime": "torch", "model_format": "pt", "overrides": {"amp": False}},
    "ts": {"runtime": "torch", "model_format": "ts", "overrides": {}},
    "pt2": {"runtime": "torch", "model_format": "pt2", "overrides": {}},
    "openvino": {"runtime": "openvino", "model_format": "pt", "overrides": {}},
    "openvino-int8": {"runtime": "openvino-int8", "model_format": "pt", "overrides": {}},
    "auto": {"runtime": "auto", "model_format": "pt", "overrides": {}},  # what segment runs by default
}
REFERENCE_RUNTIME = "torch-fp32"


def _runtime_child(bundle_root: str, label: str, scans: List[str], out: str) -> Dict[str, Any]:
    """In its own process: the bundle in runtime ``label`` on ``scans`` (the first once more before, untimed: the
    compilation and first-call costs are reported apart); label maps written under ``out``."""
    from medssl.clinic.segment import Segmenter

    spec = RUNTIMES[label]
    start = time.perf_counter()
    seg = Segmenter(
        bundle_root,
        progress=False,
        largest_component=False,
        overrides=spec["overrides"],
        runtime=spec["runtime"],
        model_format=spec["model_format"],
    )
    load = time.perf_counter() - start
    start = time.perf_counter()
    seg.infer(Path(scans[0]))
    first = time.perf_counter() - start
    seconds = []
    Path(out).mkdir(parents=True, exist_ok=True)
    for scan in scans:
        start = time.perf_counter()
        written = seg.infer(Path(scan))
        seconds.append(time.perf_counter() - start)
        shutil.move(str(written), str(Path(out) / written.name))
    result = {
        "runtime": label,
        "ran": seg.runtime,  # the artefact kind (for auto: what it chose)
        "precision": seg.precision,
        "load_seconds": load,
        "first_call_seconds": first,
        "seconds": seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "threads": torch.get_num_threads(),
    }
    seg.close()
    return result


def runtime_seconds(
    scans: Sequence[str],
    bundle_root: str,
    runtimes: Sequence[str] = ("torch", "torch-fp32", "pt2", "openvino", "openvino-int8"),
    labels: Optional[Sequence[Optional[str]]] = None,
    out: str = "speed_runtimes",
) -> Dict[str, Any]:
    """Seconds per native scan of each inference runtime, each alone in its own process (the bundle's whole
    inference: preprocessing, sliding window, inversion; no largest-component step), peak memory, Dice against
    ``labels`` and label-map agreement with :data:`REFERENCE_RUNTIME`. Writes ``out/runtimes.json`` and
    ``out/runtimes.md``."""
    import json
    import subprocess
    import sys

    from medssl.export import check_runtime

    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise ValueError(f"runtimes: unknown {unknown}; expected some of {', '.join(RUNTIMES)}.")
    for r in runtimes:
        if RUNTIMES[r]["runtime"] != "auto":
            check_runtime(RUNTIMES[r]["runtime"], RUNTIMES[r]["model_format"])
    out_dir = Path(out)
    from medssl.precision import onednn_isa_cap

    results: Dict[str, Any] = {
        "cpu": _cpu_name(),
        "onednn_isa_cap": onednn_isa_cap(),
        "scans": [str(s) for s in scans],
        "runtimes": {},
    }
    for label in runtimes:
        child_out = out_dir / "labels" / label
        args = json.dumps([str(bundle_root), label, [str(s) for s in scans], str(child_out)])
        proc = subprocess.run(
            [sys.executable, "-m", "medssl.lab.speed", args], capture_output=True, text=True, env={**os.environ}
        )
        if proc.returncode != 0:
            results["runtimes"][label] = {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
            continue
        results["runtimes"][label] = json.loads(proc.stdout.strip().splitlines()[-1])
    _runtime_accuracy(results, out_dir, scans, labels)
    write_json(results, out_dir / "runtimes.json")
    lines = _runtime_report(results)
    with atomic_path(out_dir / "runtimes.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _runtime_accuracy(results: Dict[str, Any], out_dir: Path, scans: Sequence[str], labels) -> None:
    import nibabel as nib

    from medssl.clinic.segment import _stem

    def load(label: str, scan: str) -> Optional[np.ndarray]:
        path = out_dir / "labels" / label / f"{_stem(Path(scan))}_seg.nii.gz"
        return np.asarray(nib.load(path).dataobj) > 0 if path.is_file() else None

    for label, r in results["runtimes"].items():
        if "error" in r:
            continue
        dice, agree = [], []
        for i, scan in enumerate(scans):
            got = load(label, scan)
            if labels and labels[i]:
                truth = np.asarray(nib.load(labels[i]).dataobj) > 0
                dice.append(_dice(got, truth))
            ref = load(REFERENCE_RUNTIME, scan) if REFERENCE_RUNTIME in results["runtimes"] else None
            if ref is not None:
                agree.append(_dice(got, ref))
        r["dice"] = dice
        r["agreement_with_reference"] = agree


def _runtime_report(results: Dict[str, Any]) -> List[str]:
    cap = results.get("onednn_isa_cap")
    lines = [
        f"# Inference runtimes — {results['cpu']}{f' (oneDNN capped at {cap})' if cap else ''}",
        "",
        f"{len(results['scans'])} native scans; each runtime alone in its own process; seconds per scan = the bundle's"
        " whole inference (preprocessing, sliding window, inversion), median over the scans after one untimed call;"
        " load = the bundle loaded, its artefacts made if missing and, for auto, the runtimes timed (once per machine).",
        "",
        f"| runtime | precision | s / scan (median) | min-max | load s | first call s | peak RSS MB | Dice % (mean) | "
        f"agreement with {REFERENCE_RUNTIME} % (mean, min) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in results["runtimes"].items():
        if "error" in r:
            lines.append(f"| {label} | failed: {' '.join(r['error'])} | | | | | | | |")
            continue
        s = r["seconds"]
        dice = f"{100 * statistics.mean(r['dice']):.2f}" if r.get("dice") else "-"
        agree = r.get("agreement_with_reference") or []
        agree_s = f"{100 * statistics.mean(agree):.2f}, {100 * min(agree):.2f}" if agree else "-"
        ran = r.get("ran", label)
        name = label if ran in (label, "pt") or label != "auto" else f"{label} ({ran})"
        precision = "int8 (fp32 elsewhere)" if ran == "openvino-int8" else r["precision"]
        lines.append(
            f"| {name} | {precision} | {statistics.median(s):.2f} | {min(s):.2f}-{max(s):.2f} | "
            f"{r['load_seconds']:.1f} | {r['first_call_seconds']:.2f} | {r['peak_rss_mb']:.0f} | {dice} | {agree_s} |"
        )
    return lines


if __name__ == "__main__":  # the child of runtime_seconds: one runtime, alone in this process
    import json
    import sys

    print(json.dumps(_runtime_child(*json.loads(sys.argv[1]))))
