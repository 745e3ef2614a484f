"""Label-efficiency benchmark: every method at each label count against the supervised baseline, one command.

``python -m medssl benchmark --dataset_dir D --profile {smoke,cpu,paper} --out results/`` writes the development
split of ``D`` (cases 1-``num_train`` for training, the rest for testing; see :func:`medssl.data.write_dev_split`),
trains every (method, label count) through the bundles' own configs (``python -m monai.bundle run`` subprocesses,
logs kept per run), evaluates each on the split's ``"test"`` list with the paper metrics, and writes
``results.json`` (every figure, the overrides, versions, hardware, wall times), ``results.md`` (the paper-style
table) and PNG plots (Dice vs labeled count; training loss curves). Finished runs are skipped and interrupted
ones resume from their newest checkpoint, so the command can be re-run until it completes.

Methods: ``supervised`` (la_seg_finetune from scratch), ``pcrl+supervised`` / ``spark+supervised`` (pcrl_pretrain or
spark_pretrain on the training cases' images, the same iterations x batch, then la_seg_finetune from its weights),
``cvrl`` (cvrl_semisup), ``simcvd`` (simcvd_distill), and optionally ``pcrl+cvrl`` / ``spark+cvrl`` / ``pcrl+simcvd``.
The supervised baseline with every training case labeled is the upper bound. The pre-training comparison
(:data:`SWEEP_METHODS` at 4, 8 and 16 labels) is ``--methods supervised,pcrl+supervised,spark+supervised --labels
4,8,16``; ``results.md`` then pairs every method with the baseline, and SparK with PCRL, case by case (Wilcoxon).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from medssl.bundle import bundle_path
from medssl.data import atomic_path, load_datalist, write_dev_split, write_json

__all__ = [
    "PROFILES",
    "METHODS",
    "SWEEP_METHODS",
    "paired_comparisons",
    "pool_seeds",
    "Profile",
    "benchmark",
    "plan_runs",
    "parse_training_log",
    "summarise",
    "write_report",
]


@dataclass(frozen=True)
class Profile:
    """How big a benchmark is. ``train`` and ``pretrain`` are bundle overrides shared by all runs."""

    name: str
    description: str
    labels: Sequence[int]
    num_train: Optional[int]  # dev split: the first num_train cases train, the rest test (None: sample data)
    downsample: int
    train: Dict[str, Any]
    pretrain: Dict[str, Any]
    evaluate: Dict[str, Any] = field(default_factory=dict)
    # overrides of one pre-training bundle only (its optimiser, its own knobs), on top of ``pretrain``
    pretrain_extra: Dict[str, Dict[str, Any]] = field(default_factory=dict)


def _lr_step(iterations: int) -> int:
    return max(1, iterations * 2500 // 6000)  # the paper's x0.1 at 2500 of 6000 iterations, scaled


PROFILES: Dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        description="seconds on a CPU, for CI: synthetic sample data (or the given data), 32^3 patches, 4 iterations",
        labels=(2,),
        num_train=None,
        downsample=1,
        train={
            "patch_size": [32, 32, 32],
            "max_iterations": 4,
            "lr_step": 2,
            "num_workers": 0,
            "sw_batch_size": 2,
            "save_interval": 2,
            "batch_size": 2,
        },
        pretrain={
            "patch_size": [32, 32, 32],
            "max_iterations": 2,
            "batch_size": 2,
            "num_workers": 0,
            "save_interval": 1,
        },
        pretrain_extra={"pcrl_pretrain": {"queue_size": 64}},
    ),
    "cpu": Profile(
        name="cpu",
        description="a reduced protocol for 2 CPU cores: volumes downsampled x2 (1.25 mm) and the bundles' spacing "
        "set to that grid, patch 64x64x32, 1000 iterations (lr x0.1 at 416), PCRL pre-training 600 iterations of "
        "batch 4 at lr 0.01 (SparK: the same 600 x 4 at its AdamW lr 0.001); sliding window overlap 0.5",
        labels=(8,),
        num_train=60,
        downsample=2,
        train={
            "patch_size": [64, 64, 32],
            "spacing": [1.25, 1.25, 1.25],
            "max_iterations": 1000,
            "lr_step": _lr_step(1000),
            "save_interval": 250,
            "sw_batch_size": 4,
        },
        pretrain={
            "patch_size": [64, 64, 32],
            "spacing": [1.25, 1.25, 1.25],
            "max_iterations": 600,
            "batch_size": 4,
            "save_interval": 100,
        },
        # each pre-training with its own optimiser (SGD for PCRL, AdamW for SparK), the same iterations x batch
        pretrain_extra={"pcrl_pretrain": {"learning_rate": 0.01}},
    ),
    "paper": Profile(
        name="paper",
        description="the LA protocol of METHODS.md (GPU): full resolution, patch 112x112x80, 6000 iterations, "
        "lr x0.1 every 2500; sliding window stride 18/18/4; PCRL and SparK 6000 iterations of batch 16",
        labels=(8, 16),
        num_train=60,
        downsample=1,
        train={"patch_size": [112, 112, 80], "max_iterations": 6000, "lr_step": 2500, "save_interval": 500},
        pretrain={"max_iterations": 6000, "batch_size": 16, "save_interval": 500},
        evaluate={"sw_stride": [18, 18, 4]},
    ),
}

# method -> (segmentation bundle, the pre-training bundle it starts from or None)
METHODS: Dict[str, tuple] = {
    "supervised": ("la_seg_finetune", None),
    "pcrl+supervised": ("la_seg_finetune", "pcrl_pretrain"),
    "spark+supervised": ("la_seg_finetune", "spark_pretrain"),
    "cvrl": ("cvrl_semisup", None),
    "simcvd": ("simcvd_distill", None),
    "pcrl+cvrl": ("cvrl_semisup", "pcrl_pretrain"),
    "spark+cvrl": ("cvrl_semisup", "spark_pretrain"),
    "pcrl+simcvd": ("simcvd_distill", "pcrl_pretrain"),
}
# the pre-training comparison of issue 14: one fine-tuning bundle, three initialisations
SWEEP_METHODS = ("supervised", "pcrl+supervised", "spark+supervised")
DEFAULT_METHODS = ("supervised", "pcrl+supervised", "cvrl", "simcvd")
METRICS = ("dice", "jaccard", "hd95", "asd")
STEP_KINDS = ("pretrain", "train", "evaluate")
BUNDLE_SEED = 1337  # the "seed" of every bundle's train.json; seed k > 1 of a benchmark run uses BUNDLE_SEED + k - 1


def _configs(bundle: str, *names: str, bundles_dir: Optional[str] = None) -> str:
    root = bundle_path(bundle, bundles_dir)
    files = [str(root / "configs" / f"{n}.json") for n in names]
    return files[0] if len(files) == 1 else json.dumps(files)


def override_args(overrides: Dict[str, Any]) -> List[str]:
    """``python -m monai.bundle run`` arguments for config overrides (lists, dicts and booleans as JSON)."""
    out = []
    for k, v in overrides.items():
        out += [f"--{k}", json.dumps(v) if isinstance(v, (list, dict, bool)) else str(v)]
    return out


def plan_runs(
    profile: Profile,
    methods: Sequence[str],
    labels: Sequence[int],
    upper_bound: Optional[int],
    data_dir: Path,
    out: Path,
    seeds: int = 1,
) -> List[Dict[str, Any]]:
    """The runs of a benchmark: ``[{"name", "method", "labels", "bundle", "dir", "steps": [...]}]`` where each step
    is ``{"kind": "pretrain"|"train"|"evaluate", "config": [...], "overrides": {...}}``. The PCRL pre-training is
    one shared run per pre-training bundle (``pcrl_pretrain``, ``spark_pretrain``) that the ``pcrl+*`` / ``spark+*``
    runs start from."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}.")
    runs = []
    for pretrainer in dict.fromkeys(METHODS[m][1] for m in methods if METHODS[m][1]):
        d = out / "runs" / pretrainer
        overrides = {"dataset_dir": str(data_dir), "bundle_root": str(d), **profile.pretrain}
        runs.append(
            {
                "name": pretrainer,
                "method": pretrainer,
                "labels": 0,
                "bundle": pretrainer,
                "dir": str(d),
                "steps": [
                    {
                        "kind": "pretrain",
                        "config": ["train"],
                        "overrides": {**overrides, **profile.pretrain_extra.get(pretrainer, {})},
                    }
                ],
            }
        )
    if int(seeds) < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}.")
    pairs = [(m, n, seed) for m in methods for n in labels for seed in range(1, int(seeds) + 1)]
    if upper_bound:
        pairs.append(("supervised", upper_bound, 1))
    for method, n, seed in pairs:
        bundle, pretrained = METHODS[method]
        suffix = f"-seed{seed}" if seed > 1 else ""
        d = out / "runs" / f"{method.replace('+', '_')}-{n}{suffix}"
        train = {"dataset_dir": str(data_dir), "bundle_root": str(d), "num_labeled": n, **profile.train}
        if seed > 1:
            train["seed"] = BUNDLE_SEED + seed - 1
        if pretrained:
            train["pretrained_ckpt"] = str(out / "runs" / pretrained / "models" / "model.pt")
        evaluate = {
            "dataset_dir": str(data_dir),
            "bundle_root": str(d),
            **{
                k: v for k, v in profile.train.items() if k in ("patch_size", "spacing", "sw_batch_size", "num_workers")
            },
            **profile.evaluate,
        }
        runs.append(
            {
                "name": f"{method}-{n}{suffix}",
                "method": method,
                "labels": n,
                "seed": seed,
                "bundle": bundle,
                "dir": str(d),
                "steps": [
                    {"kind": "train", "config": ["train"], "overrides": train},
                    {"kind": "evaluate", "config": ["train", "evaluate"], "overrides": evaluate},
                ],
            }
        )
    return runs


def _drop_resume_checkpoints(run: Dict[str, Any]) -> None:
    """A finished run needs only its final weights: its resume checkpoints (weights and optimizer state,
    twice the model's size each) are deleted once ``done.json`` is written."""
    for step in run["steps"]:
        for ckpt in (Path(step["overrides"]["bundle_root"]) / "models").glob("checkpoint_*.pt"):
            ckpt.unlink()


def _run_step(bundle: str, step: Dict[str, Any], log: Path, bundles_dir: Optional[str]) -> float:
    """Run one ``python -m monai.bundle run`` step (resuming a half-done training); returns its wall seconds."""
    overrides = dict(step["overrides"])
    ckpts = Path(overrides["bundle_root"]) / "models"
    if step["kind"] in ("train", "pretrain") and any(ckpts.glob("checkpoint_*.pt")):
        overrides["resume"] = True
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        _configs(bundle, *step["config"], bundles_dir=bundles_dir),
        *override_args(overrides),
    ]
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{bundle} {step['kind']} failed (exit {proc.returncode}); see {log}")
    return time.time() - start


def _read_metrics(path: Path) -> Dict[str, Any]:
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cases = [r for r in rows if r["case"] not in ("mean", "std", "n_nan")]
    names = METRICS + tuple(f"{m}_lcc" for m in METRICS)  # the bundles' evaluate also scores the largest component
    per_metric = {m: np.array([float(r[m]) for r in cases]) for m in names if cases and m in cases[0]}
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


def benchmark(
    dataset_dir: Optional[str] = None,
    profile: str = "smoke",
    out: str = "results",
    labels: Optional[Sequence[int]] = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    upper_bound: bool = True,
    bundles_dir: Optional[str] = None,
    amp: bool = True,
    seeds: int = 1,
    iterations: Optional[int] = None,
    parallel: int = 1,
    steps: Sequence[str] = STEP_KINDS,
    overrides: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Run (or resume) a benchmark and write ``results.json``, ``results.md`` and the plots under ``out``.

    Args:
        dataset_dir: LA data (dataset.json with the 80 training cases); for ``smoke`` it may be None, then the
            synthetic sample set is used.
        profile: ``smoke``, ``cpu`` or ``paper`` (see :data:`PROFILES`).
        out: output folder (``data/``, ``runs/<method>-<labels>/``, reports).
        labels: labeled counts (default: the profile's).
        methods: methods to run (see :data:`METHODS`).
        upper_bound: also train the supervised baseline with every training case labeled.
        amp: mixed precision where the device has it (the bundles' default); False trains and evaluates in fp32.
        seeds: fine-tuning seeds per (method, label count) (see :func:`plan_runs`); the report pairs runs of the
            same seed and, with several, the per-case means over seeds.
        iterations: the training iterations of every fine-tuning / semi-supervised run instead of the profile's,
            with the learning-rate step scaled to it (the paper's 2500 of 6000) and at least two checkpoints; the
            schedule to fit a time budget (pre-trainings keep the profile's).
        parallel: runs trained side by side (one GPU shared by several runs, or spare CPU cores); every run's
            steps stay in order and pre-trainings finish before the runs that start from them.
        steps: the step kinds to run (``pretrain``, ``train``, ``evaluate``); e.g. ``("pretrain", "train")`` on a
            lent GPU, then the default on another machine to evaluate the weights brought back (each done step
            leaves ``<kind>.done.json`` in its run's folder and is not run again).
        overrides: bundle overrides for every training and evaluation step on top of the profile's (e.g.
            ``{"patch_size": [32, 32, 32], "sw_stride": [16, 16, 16]}`` to smoke-test a GPU profile on a CPU).

    Raises:
        ValueError: unknown profile, method or step kind, a label count larger than the training set, or
            ``iterations`` / ``parallel`` below 1.
        RuntimeError: a run failed; the others still ran (side by side) and the report holds them.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {sorted(PROFILES)}.")
    prof = PROFILES[profile]
    kinds = [k.strip() for k in ([steps] if isinstance(steps, str) else steps)]
    if not kinds or any(k not in STEP_KINDS for k in kinds):
        raise ValueError(f"steps: expected some of {list(STEP_KINDS)}, got {list(kinds)}.")
    if int(parallel) < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}.")
    parallel = int(parallel)
    if iterations is not None:
        n = int(iterations)
        if n < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}.")
        save = max(1, min(int(prof.train.get("save_interval", n)), n // 2))
        prof = replace(
            prof,
            description=f"{prof.description}; training shortened to {n} iterations (lr x0.1 every {_lr_step(n)})",
            train={**prof.train, "max_iterations": n, "lr_step": _lr_step(n), "save_interval": save},
        )
    if overrides:
        if not isinstance(overrides, dict):
            raise ValueError(f"overrides: expected a dict of bundle config keys, got {overrides!r}.")
        prof = replace(prof, train={**prof.train, **overrides}, evaluate={**prof.evaluate, **overrides})
    if not amp:  # every step of every run in fp32
        prof = replace(
            prof,
            train={**prof.train, "amp": False},
            pretrain={**prof.pretrain, "amp": False},
            evaluate={**prof.evaluate, "amp": False},
        )
    out = Path(out).resolve()
    data_dir = out / "data"
    if dataset_dir is None:
        if profile != "smoke":
            raise ValueError(f"profile {profile!r} needs --dataset_dir (the LA data with 80 training cases).")
        from medssl.lab.sample_data import sample_data

        sample_data(data_dir, num_cases=8, shape=(48, 48, 32), num_test=2)
    else:
        num_train = prof.num_train or max(1, len(load_datalist(dataset_dir)["training"]) - 2)
        write_dev_split(dataset_dir, data_dir, num_train=num_train, downsample=prof.downsample)
    n_train = len(load_datalist(data_dir)["training"])
    labels = [int(n) for n in (labels or prof.labels)]
    if any(not 0 < n < n_train for n in labels):
        raise ValueError(
            f"labels {labels} must be between 1 and {n_train - 1} (the split has {n_train} training cases)."
        )
    runs = plan_runs(prof, list(methods), labels, n_train if upper_bound else None, data_dir, out, seeds)
    # the pre-trainings first (the runs that start from them need their weights), then the rest, `parallel` at a time
    failures = []
    for group in ([r for r in runs if r["labels"] == 0], [r for r in runs if r["labels"] != 0]):
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = {pool.submit(_execute_run, run, kinds, bundles_dir): run for run in group}
        for future, run in futures.items():
            if future.exception() is not None:
                failures.append(f"{run['name']}: {future.exception()}")
        if failures:
            break
    results = summarise(runs, prof)
    write_report(results, out)
    if failures:
        raise RuntimeError("benchmark runs failed (the report holds the others):\n" + "\n".join(failures))
    return results


def _execute_run(run: Dict[str, Any], kinds: Sequence[str], bundles_dir: Optional[str]) -> None:
    """Run the steps of one run whose kind is in ``kinds``, in order, skipping those already done (each done step
    leaves ``<kind>.done.json`` with its seconds; a run with every step done leaves ``done.json``). A step of
    another kind that is not done yet ends the run here: the steps after it need its output. A finished training
    drops its resume checkpoints."""
    d = Path(run["dir"])
    if (d / "done.json").is_file():
        run.update(json.loads((d / "done.json").read_text()))
        return
    seconds = {}
    for step in run["steps"]:
        kind = step["kind"]
        marker = d / f"{kind}.done.json"
        if marker.is_file():
            seconds[kind] = json.loads(marker.read_text())["seconds"]
            continue
        if kind not in kinds:
            break
        seconds[kind] = _run_step(run["bundle"], step, d / f"{kind}.log", bundles_dir)
        write_json({"seconds": seconds[kind]}, marker)
        if kind in ("train", "pretrain"):
            _drop_resume_checkpoints(run)
    run["seconds"] = seconds
    if len(seconds) == len(run["steps"]):
        write_json({"seconds": seconds}, d / "done.json")


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
    ax.set_xlabel("labeled volumes")
    ax.set_ylabel("Dice % (test cases)")
    ax.set_title(f"Label efficiency — profile {results['profile']['name']}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    with atomic_path(out / "dice_vs_labels.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

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
