"""Seconds per 112x112x80 window and per native LA scan for each inference runtime, each alone in its own process.

    python benchmarks/openvino_speed.py --dataset_dir ../shared/data/la --cases 61-64 \\
        --record bundles/la_seg_finetune/configs/openvino_int8.json --out benchmarks/results/openvino_amd_epyc

Per runtime (see ``openvino_common.py``), in a fresh process with ``--threads`` threads and the bundle's CPU
allocator tuning: the network on one window (batch 1) and on ``sw_batch_size`` windows at once (what the bundle's
sliding-window inference calls), median of ``--repeats`` after one warm-up; then the bundle's sliding-window
inference (softmax included) on each case's preprocessed volume, after one warm-up scan (loading and preprocessing,
the same for every runtime, are not timed); the process's peak resident memory; and the share of the 2 cores the
process got while timed (process CPU seconds / wall seconds / threads: near 1.0 on an idle machine, lower when other
work competed for the cores). Runtimes run one after the other, ``--rounds`` times, interleaved, and for each figure
the best round counts (the machine is shared). Writes ``speed.json`` and ``speed.md`` under ``--out``;
``--summarize A/speed.json B/speed.json --out DIR`` merges the rounds of several runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(args) -> None:
    """One runtime, timed in this process; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    from openvino_common import bundle_parts, case_list, runtime_network

    from medssl.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    root = Path(args.bundle_root)
    artefacts = json.loads(args.artefacts)
    parts = bundle_parts(root)
    net = runtime_network(args.runtime, root, artefacts, max_batch=args.max_batch)
    prob = torch.nn.Sequential(net, torch.nn.Softmax(dim=1))
    cases = case_list(Path(args.dataset_dir), args.cases)
    volumes = [parts["preprocessing"]({"image": c["image"]})["image"][None] for c in cases]
    z0 = [(s - p) // 2 for s, p in zip(volumes[0].shape[2:], parts["patch_size"])]
    window = volumes[0].as_tensor()[
        (slice(None), slice(None), *(slice(a, a + p) for a, p in zip(z0, parts["patch_size"])))
    ]
    window = window.contiguous()
    result = {"runtime": args.runtime, "pid": os.getpid()}
    with torch.inference_mode():
        for batch in (1, parts["sw_batch_size"]):
            x = window.repeat(batch, 1, 1, 1, 1)
            net(x)  # warm-up (compiles shapes, fills caches)
            times, cpu0, wall0 = [], _cpu_seconds(), time.perf_counter()
            for _ in range(args.repeats):
                t = time.perf_counter()
                net(x)
                times.append(time.perf_counter() - t)
            share = (_cpu_seconds() - cpu0) / (time.perf_counter() - wall0) / args.threads
            result[f"s_per_window_batch{batch}"] = statistics.median(times) / batch
            result[f"cpu_share_batch{batch}"] = round(share, 3)
        parts["inferer"](volumes[0], prob)  # warm-up scan
        scans, cpu0, wall0 = [], _cpu_seconds(), time.perf_counter()
        for volume in volumes:
            t = time.perf_counter()
            parts["inferer"](volume, prob)
            scans.append(time.perf_counter() - t)
        result["cpu_share_scans"] = round((_cpu_seconds() - cpu0) / (time.perf_counter() - wall0) / args.threads, 3)
    result["s_per_scan"] = [round(s, 3) for s in scans]
    result["median_s_per_scan"] = statistics.median(scans)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["scan_shapes"] = [list(v.shape[2:]) for v in volumes]
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", required=True)
    ap.add_argument("--cases", default="61-64", help="1-based positions of the training list (timing only)")
    ap.add_argument("--record", help="int8 calibration record; without it openvino-int8 is skipped")
    ap.add_argument("--bundle_root", help="bundle folder with models/model.pt (default: pull the release)")
    ap.add_argument("--runtimes", default="torch-fp32,torch-bf16,openvino,openvino-bf16,openvino-int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max_batch", type=int, default=1, help="OpenVINONetwork max_batch")
    ap.add_argument("--out")
    ap.add_argument("--summarize", nargs="+", help="merge the runs of these speed.json files into --out and stop")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--runtime", help=argparse.SUPPRESS)
    ap.add_argument("--artefacts", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.summarize:
        merged = [json.loads(Path(f).read_text()) for f in args.summarize]
        summary = {k: v for k, v in merged[0].items() if k not in ("all", "best")}
        summary["rounds"] = sum(m.get("rounds") or len(next(iter(m["all"].values()))) for m in merged)
        summary["all"] = {r: [run for m in merged for run in m["all"].get(r, [])] for r in merged[0]["all"]}
        return write_summary(summary, Path(args.out))
    from openvino_common import bundle_root, cpu_info, cpu_slug, prepare_artefacts

    import medssl.openvino as mov

    root = bundle_root(args.bundle_root)
    runtimes = [r for r in args.runtimes.split(",") if r and (args.record or r != "openvino-int8")]
    results = {r: [] for r in runtimes}
    with tempfile.TemporaryDirectory() as tmp:
        artefacts = prepare_artefacts(root, Path(tmp), args.record)
        for round_ in range(args.rounds):
            for runtime in runtimes:
                cmd = [sys.executable, __file__, "--child", "1", "--runtime", runtime, "--bundle_root", str(root),
                       "--artefacts", json.dumps(artefacts), "--dataset_dir", args.dataset_dir, "--cases", args.cases,
                       "--threads", str(args.threads), "--repeats", str(args.repeats),
                       "--max_batch", str(args.max_batch)]  # fmt: skip
                load = os.getloadavg()[0]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if proc.returncode or not line:
                    raise RuntimeError(f"{runtime} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
                res = {**json.loads(line[len("RESULT ") :]), "round": round_, "load_before": round(load, 2)}
                results[runtime].append(res)
                print(json.dumps(res), flush=True)
    summary = {
        "cpu": cpu_info(),
        "threads": args.threads,
        "cases": args.cases,
        "rounds": args.rounds,
        "max_batch": args.max_batch,
        "versions": {"torch": __import__("torch").__version__, **mov.tool_versions(int8=True)},
        "all": results,
    }
    write_summary(summary, Path(args.out or HERE / "results" / f"openvino_{cpu_slug(summary['cpu'])}"))


def _best(runs, key, share):
    run = min(runs, key=lambda r: r[key])
    return run[key], run[share]


def write_summary(summary, out: Path) -> None:
    """``speed.json`` (every run, and per runtime the best of its rounds for each figure, with the CPU share the
    process had in that round) and ``speed.md`` under ``out``."""
    best = {}
    for runtime, runs in summary["all"].items():
        best[runtime] = {
            "s_per_window_batch1": _best(runs, "s_per_window_batch1", "cpu_share_batch1"),
            "s_per_window_batch4": _best(runs, "s_per_window_batch4", "cpu_share_batch4"),
            "s_per_scan": _best(runs, "median_s_per_scan", "cpu_share_scans"),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        }
    summary["best"] = best
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(summary, indent=1) + "\n")
    info = summary["cpu"]
    ref = "torch-bf16" if "torch-bf16" in best else next(iter(best))
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in info["flags"].items())
    lines = [
        f"# Inference runtimes, {info['model_name']}, {summary['threads']} threads",
        "",
        f"CPU flags: {flags}. Command: `python benchmarks/openvino_speed.py --dataset_dir DATA --cases "
        f"{summary['cases']} --record RECORD --rounds {summary['rounds']}`; each runtime alone in its own process, "
        f"rounds interleaved, best round per figure; scan = the bundle's sliding-window inference (softmax included) "
        f"on a preprocessed native LA volume, median over cases {summary['cases']}. In brackets the CPU share the "
        "process had while timed (process CPU time / wall time / threads): 1.00 = both cores its own; about 0.5 = "
        "another job held one core, and the figure is up to 2x too slow.",
        "",
        f"| runtime | s / window (batch 1) | s / window (batch 4) | s / scan | scan vs {ref} | peak RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    for runtime, b in best.items():
        w1, w4, sc = b["s_per_window_batch1"], b["s_per_window_batch4"], b["s_per_scan"]
        lines.append(
            f"| {runtime} | {w1[0]:.3f} ({w1[1]:.2f}) | {w4[0]:.3f} ({w4[1]:.2f}) | {sc[0]:.2f} ({sc[1]:.2f}) | "
            f"{best[ref]['s_per_scan'][0] / sc[0]:.2f}x | {b['peak_rss_mb']:.0f} |"
        )
    (out / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
