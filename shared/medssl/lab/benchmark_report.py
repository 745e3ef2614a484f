"""The label-efficiency benchmark's report: every run's metrics, timings and loss curve gathered (:func:`summarise`),
``results.json``, the paper-style table with paired per-case comparisons (``results.md``, Wilcoxon signed-rank) and
the PNG plots (:func:`write_report`)."""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from medssl.data import atomic_path, write_json
from medssl.lab.benchmark_plan import METHODS, Profile

__all__ = [
    "parse_training_log",
    "summarise",
    "write_report",
    "pool_seeds",
    "paired_comparisons",
    "per_class_table",
    "class_names",
]


def _read_metrics(path: Path) -> Dict[str, Any]:
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cases = [r for r in rows if r["case"] not in ("mean", "std", "n_nan")]
    # every column: the metrics, their largest-component twins, and with several classes one column per class
    per_metric = {m: np.array([float(r[m]) for r in cases]) for m in (cases[0] if cases else ()) if m != "case"}
    with np.errstate(all="ignore"):
        summary = {
            m: {"mean": float(np.nanmean(v)), "std": float(np.nanstd(v)), "n_nan": int(np.isnan(v).sum())}
            for m, v in per_metric.items()
        }
    return {"summary": summary, "cases": [{k: (v if k == "case" else float(v)) for k, v in r.items()} for r in cases]}


_ITER = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*Iter: (\d+)/(\d+) -- (.*)$")
_LOSS = re.compile(r"(?:^|\s)(?:train_)?loss: ([-+0-9.eE]+|nan|inf)")


def parse_training_log(log: Path) -> Dict[str, Any]:
    """Loss curve ``[[iteration, loss], ...]`` and the median seconds between consecutive iterations, parsed from a
    bundle's training log (StatsHandler lines); the median leaves out start-up, caching and evaluation time."""
    from datetime import datetime

    curve, stamps = {}, {}
    if Path(log).is_file():
        for line in Path(log).read_text(errors="replace").splitlines():
            m = _ITER.search(line)
            if not m:
                continue
            it = int(m.group(2))
            stamps[it] = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            loss = _LOSS.search(m.group(4))
            if loss:
                curve[it] = float(loss.group(1))
    steps = [stamps[i] - stamps[i - 1] for i in sorted(stamps) if i - 1 in stamps]
    return {
        "loss_curve": [[k, v] for k, v in sorted(curve.items())],
        "seconds_per_iteration": float(np.median(steps)) if steps else None,
    }


def _environment() -> Dict[str, Any]:
    import monai
    import torch

    import medssl

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "medssl": medssl.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def summarise(runs: List[Dict[str, Any]], profile: Profile) -> Dict[str, Any]:
    """Gather every run's metrics, timings, loss curve and overrides into one results dict."""
    table = []
    for run in runs:
        d = Path(run["dir"])
        train_step = next(s for s in run["steps"] if s["kind"] in ("train", "pretrain"))
        entry = {
            "name": run["name"],
            "method": run["method"],
            "labels": run["labels"],
            "seed": run.get("seed", 1),
            "bundle": run["bundle"],
            "dir": run["dir"],
            "seconds": run.get("seconds", {}),
            "overrides": {s["kind"]: s["overrides"] for s in run["steps"]},
            **parse_training_log(d / f"{train_step['kind']}.log"),
        }
        if (d / "eval" / "metrics.csv").is_file():
            entry.update(_read_metrics(d / "eval" / "metrics.csv"))
        table.append(entry)
    return {"profile": asdict(profile), "environment": _environment(), "runs": table}


def write_report(results: Dict[str, Any], out: Path) -> None:
    """``results.json``, ``results.md`` and ``dice_vs_labels.png`` / ``loss_curves.png`` under ``out`` (atomic)."""
    out = Path(out)
    write_json(results, out / "results.json")
    runs = [r for r in results["runs"] if "summary" in r]
    lines = [
        f"# medssl benchmark — profile `{results['profile']['name']}`",
        "",
        results["profile"]["description"],
        "",
        "| method | labeled | Dice % | Jaccard % | 95HD (vox) | ASD (vox) | empty preds | s / iteration | "
        "train min | Dice % (largest component) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (r["labels"], r["method"], r.get("seed", 1))):
        s = r["summary"]
        r = {**r, "method": _label(r)}
        pct = lambda m: f"{100 * s[m]['mean']:.2f} ± {100 * s[m]['std']:.2f}"  # noqa: E731
        dist = lambda m: f"{s[m]['mean']:.2f} ± {s[m]['std']:.2f}"  # noqa: E731
        spi = f"{r['seconds_per_iteration']:.3f}" if r["seconds_per_iteration"] else "-"
        train = r["seconds"].get("train")
        lines.append(
            f"| {r['method']} | {r['labels']} | {pct('dice')} | {pct('jaccard')} | {dist('hd95')} | "
            f"{dist('asd')} | {s['hd95']['n_nan']} | {spi} | {f'{train / 60:.1f}' if train else '-'} | "
            f"{pct('dice_lcc') if 'dice_lcc' in s else '-'} |"
        )
    for pre in results["runs"]:
        if pre["labels"] == 0 and pre["seconds"]:
            lines += [
                "",
                f"{pre['method']} pre-training: {pre['seconds'].get('pretrain', 0) / 60:.1f} min "
                f"({pre['seconds_per_iteration'] or 0:.2f} s / iteration).",
            ]
    lines += per_class_table(runs)
    lines += paired_comparisons(runs)
    env = results["environment"]
    lines += [
        "",
        "Mean ± std over the test cases; distances in voxels of the evaluated volumes; an empty prediction "
        "has no surface distance (counted under 'empty preds', left out of the distance means).",
        "",
        f"Environment: {env.get('gpu', env['cpu'])}, {env['cpu_count']} CPU cores, torch {env['torch']}, "
        f"monai {env['monai']}, medssl {env['medssl']}.",
        "",
        "![Dice vs labeled](dice_vs_labels.png)",
        "",
        "![Training loss](loss_curves.png)",
        "",
    ]
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text("\n".join(lines))
    _plot(results, out)


def class_names(summary: Dict[str, Any]) -> List[str]:
    """The class suffixes of a run's per-class Dice columns (``dice_<class>``, as MetricsTable names them), in
    column order; empty for a single class."""
    return [k[len("dice_") :] for k in summary if k.startswith("dice_") and not k.startswith("dice_lcc")]


def per_class_table(runs: List[Dict[str, Any]]) -> List[str]:
    """Markdown lines: per run, each class's Dice % and 95HD (mean ± std over the test cases), then the mean over
    the classes; empty when the runs have a single class."""
    runs = [r for r in runs if "summary" in r and class_names(r["summary"])]
    if not runs:
        return []
    names = class_names(runs[0]["summary"])
    hd = "hd95_mm" if any(k.startswith("hd95_mm") for k in runs[0]["summary"]) else "hd95"
    unit = "mm" if hd == "hd95_mm" else "vox"
    pretty = [n.replace("_", " ") for n in names]
    head = [f"{n} Dice %" for n in pretty] + ["mean Dice %"] + [f"{n} 95HD ({unit})" for n in pretty]
    lines = ["", "Per class (mean ± std over the test cases):", "", "| method | labeled | " + " | ".join(head) + " |"]
    lines.append("|---|---|" + "---|" * len(head))
    for r in sorted(runs, key=lambda r: (r["labels"], r["method"], r.get("seed", 1))):
        s = r["summary"]

        def cell(key: str, scale: float) -> str:
            return f"{scale * s[key]['mean']:.2f} ± {scale * s[key]['std']:.2f}" if key in s else "-"

        cells = [cell(f"dice_{n}", 100) for n in names] + [cell("dice", 100)]
        cells += [cell(f"{hd}_{n}", 1) for n in names]
        lines.append(f"| {_label(r)} | {r['labels']} | " + " | ".join(cells) + " |")
    return lines


def _label(run: Dict[str, Any]) -> str:
    seed = run.get("seed", 1)
    return run["method"] if seed == 1 else f"{run['method']} (seed {seed})"


def pool_seeds(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One entry per (method, label count) that has several seeds: each case's Dice averaged over the seeds
    (``seed`` = ``"mean of K"``), with the summary's Dice mean and std over those cases; single-seed groups are
    left out."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in runs:
        if r.get("cases"):
            groups.setdefault((r["method"], r["labels"]), []).append(r)
    pooled = []
    for (method, n), group in groups.items():
        if len(group) < 2:
            continue
        per_case = [{c["case"]: c["dice"] for c in r["cases"]} for r in group]
        common = sorted(set.intersection(*(set(d) for d in per_case)))
        cases = [{"case": k, "dice": float(np.mean([d[k] for d in per_case]))} for k in common]
        dice = np.array([c["dice"] for c in cases], dtype=float)
        pooled.append(
            {
                "method": method,
                "labels": n,
                "seed": f"mean of {len(group)}",
                "cases": cases,
                "summary": {"dice": {"mean": float(np.nanmean(dice)), "std": float(np.nanstd(dice))}},
            }
        )
    return pooled


def paired_comparisons(runs: List[Dict[str, Any]]) -> List[str]:
    """Markdown lines comparing runs case by case at the same label count and seed: every method against
    ``supervised`` and each pre-training against the other (``spark+X`` vs ``pcrl+X``): mean and median Dice
    difference, cases won, and the two-sided Wilcoxon signed-rank p over the test cases; with several seeds also on
    the per-case means over seeds (:func:`pool_seeds`). Empty when there is nothing to pair."""
    from scipy.stats import wilcoxon

    runs = [r for r in runs if r.get("cases")]
    by_key = {(r["method"], r["labels"], r.get("seed", 1)): r for r in runs + pool_seeds(runs)}
    order = list(METHODS)
    pairs = []
    for (method, n, seed), r in sorted(by_key.items(), key=lambda kv: (kv[0][1], str(kv[0][2]), order.index(kv[0][0]))):
        if method != "supervised" and ("supervised", n, seed) in by_key:
            pairs.append((r, by_key[("supervised", n, seed)]))
        if method.startswith("spark+") and ("pcrl+" + method[len("spark+") :], n, seed) in by_key:
            pairs.append((r, by_key[("pcrl+" + method[len("spark+") :], n, seed)]))
    rows = []
    for a, b in pairs:
        da = {c["case"]: c["dice"] for c in a["cases"]}
        db = {c["case"]: c["dice"] for c in b["cases"]}
        common = sorted(k for k in set(da) & set(db) if np.isfinite(da[k]) and np.isfinite(db[k]))
        if len(common) < 2:
            continue
        diff = 100 * (np.array([da[k] for k in common]) - np.array([db[k] for k in common]))
        p = wilcoxon(diff).pvalue if np.any(diff != 0) else 1.0
        seed = a.get("seed", 1)
        which = "" if seed == 1 else f" ({'seed ' if isinstance(seed, int) else ''}{seed})"
        rows.append(
            f"| {a['labels']} | {a['method']} vs {b['method']}{which} | {diff.mean():+.2f} | {np.median(diff):+.2f} | "
            f"{int((diff > 0).sum())} of {len(common)} | {p:.3f} |"
        )
    if not rows:
        return []
    return [
        "",
        "Paired per-case comparisons (Dice points; two-sided Wilcoxon signed-rank test over the test cases):",
        "",
        "| labeled | comparison | mean diff | median diff | cases better | Wilcoxon p |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def _plot(results: Dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if "summary" in r]
    pooled = pool_seeds(runs)  # several seeds: one column of per-case means over the seeds
    many = {(p["method"], p["labels"]) for p in pooled}
    runs = [r for r in runs if (r["method"], r["labels"]) not in many] + pooled
    n_max = max((r["labels"] for r in runs), default=0)
    counts = sorted({r["labels"] for r in runs})
    upper = [r for r in runs if r["method"] == "supervised" and r["labels"] == n_max and len(counts) > 1]
    order = list(METHODS)  # the baseline first, then the methods in their documented order
    methods = sorted(
        {r["method"] for r in runs if r not in upper}, key=lambda m: (order.index(m) if m in order else 99, m)
    )
    xs = [n for n in counts if not (upper and n == n_max)]  # the upper bound is a line, not a column group
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(methods) * max(1, len(xs))), 4))
    # one group of columns per label count; per method its cases (dots) and the mean ± std (bar)
    width = 0.8 / max(1, len(methods))
    for j, method in enumerate(methods):
        colour = f"C{j}"
        for i, n in enumerate(xs):
            r = next((r for r in runs if r["method"] == method and r["labels"] == n), None)
            if r is None:
                continue
            x = i - 0.4 + width * (j + 0.5)
            dice = 100 * np.array([c["dice"] for c in r.get("cases", [])], dtype=float)
            mean, std = 100 * r["summary"]["dice"]["mean"], 100 * (r["summary"]["dice"]["std"] or 0)
            ax.bar(
                x, mean, width * 0.9, yerr=std, color=colour, alpha=0.35, capsize=3, label=method if i == 0 else None
            )
            if dice.size:
                jitter = np.linspace(-0.25, 0.25, dice.size) * width
                ax.scatter(x + jitter, dice, s=8, color=colour, zorder=3)
            top = min(mean + std, 100)
            ax.annotate(f"{mean:.1f}", (x, top), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    if upper:
        ax.axhline(100 * upper[0]["summary"]["dice"]["mean"], ls="--", c="gray", label=f"supervised, all {n_max}")
    ax.set_xticks(range(len(xs)), [str(n) for n in xs])
    ax.set_ylim(0, 108)
    ax.set_xlabel(f"labeled {results.get('budget_unit', 'volumes')}")
    ax.set_ylabel("Dice % (test cases)")
    ax.set_title(f"Label efficiency — profile {results['profile']['name']}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    with atomic_path(out / "dice_vs_labels.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    _plot_classes(runs, results, out, plt)

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results["runs"]:
        if r["loss_curve"]:
            it, loss = np.array(r["loss_curve"]).T
            k = max(1, len(loss) // 50)  # a running mean over ~2 % of the run keeps the curves readable
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax.plot(it[k - 1 :], smooth, label=r["name"], lw=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss (each method's own objective)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out / "loss_curves.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _plot_classes(runs: List[Dict[str, Any]], results: Dict[str, Any], out: Path, plt) -> None:
    """``dice_per_class.png``: each run's Dice per class (mean ± std over the test cases); nothing for one class."""
    runs = [r for r in runs if class_names(r.get("summary", {}))]
    if not runs:
        return
    names = class_names(runs[0]["summary"])
    runs = sorted(runs, key=lambda r: (r["labels"], list(METHODS).index(r["method"]) if r["method"] in METHODS else 99))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(runs) * len(names)), 4))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        stats = [r["summary"].get(f"dice_{name}", {"mean": np.nan, "std": 0}) for r in runs]
        xs = np.arange(len(runs)) - 0.4 + width * (j + 0.5)
        means = [100 * st["mean"] for st in stats]
        ax.bar(xs, means, width * 0.9, yerr=[100 * (st["std"] or 0) for st in stats], capsize=3, color=f"C{j}",
               alpha=0.6, label=name.replace("_", " "))  # fmt: skip
    ax.set_xticks(range(len(runs)), [f"{r['method']}\n{r['labels']}" for r in runs], fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("Dice % (test cases)")
    ax.set_xlabel(f"method, labeled {results.get('budget_unit', 'volumes')}")
    ax.set_title(f"Dice per class — profile {results['profile']['name']}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    with atomic_path(out / "dice_per_class.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
