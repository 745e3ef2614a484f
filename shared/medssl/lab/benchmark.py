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

This module runs a benchmark (the steps as subprocesses, resumable); what to run is planned in
:mod:`medssl.lab.benchmark_plan` (profiles, methods, runs) and reported by :mod:`medssl.lab.benchmark_report`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from medssl.bundle import bundle_path
from medssl.data import load_datalist, write_dev_split, write_json
from medssl.lab.benchmark_plan import (  # part of this module's API, as before
    DEFAULT_METHODS,
    METHODS,
    PROFILES,
    STEP_KINDS,
    SWEEP_METHODS,
    Profile,
    override_args,
    patient_budgets,
    plan_runs,
    scaled_lr_step,
)
from medssl.lab.benchmark_report import paired_comparisons, parse_training_log, pool_seeds, summarise, write_report

__all__ = [
    "PROFILES",
    "METHODS",
    "SWEEP_METHODS",
    "paired_comparisons",
    "pool_seeds",
    "Profile",
    "benchmark",
    "plan_runs",
    "override_args",
    "parse_training_log",
    "summarise",
    "write_report",
]


def _configs(bundle: str, *names: str, bundles_dir: Optional[str] = None) -> str:
    root = bundle_path(bundle, bundles_dir)
    files = [str(root / "configs" / f"{n}.json") for n in names]
    return files[0] if len(files) == 1 else json.dumps(files)


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
    num_train: Optional[int] = None,
) -> Dict[str, Any]:
    """Run (or resume) a benchmark and write ``results.json``, ``results.md`` and the plots under ``out``.

    Args:
        dataset_dir: the data (LA: dataset.json with the 80 training cases; ACDC: its SSL4MIS lists); for ``smoke``
            it may be None, then the synthetic sample set is used.
        profile: ``smoke``, ``cpu``, ``paper`` (LA), ``acdc_cpu``, ``acdc_gpu`` (see :data:`PROFILES`).
        out: output folder (``data/``, ``runs/<method>-<labels>/``, reports).
        labels: label budgets (default: the profile's): labeled cases, or patients where the training entries name
            their ``patient`` (ACDC: 3 patients = their 6 frames).
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
        num_train: a dev split of the first ``num_train`` training cases (the rest test) instead of the profile's
            split (LA: 60; ACDC: the dataset's own lists). The task's ``labels`` come from the profile, else from the
            dataset.json's ``labels``.

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
            description=f"{prof.description}; training shortened to {n} iterations (lr x0.1 every {scaled_lr_step(n)})",
            train={**prof.train, "max_iterations": n, "lr_step": scaled_lr_step(n), "save_interval": save},
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
        source = load_datalist(dataset_dir)
        own_lists = any(source.get(k) for k in ("test", "validation"))
        split = num_train or prof.num_train or (None if own_lists else max(1, len(source["training"]) - 2))
        write_dev_split(dataset_dir, data_dir, num_train=split, downsample=prof.downsample)
        if "labels" not in prof.train and isinstance(source.get("labels"), dict):  # the dataset's own label set
            prof = replace(prof, train={**prof.train, "labels": source["labels"]})
    training = load_datalist(data_dir)["training"]
    named = all("patient" in e for e in training)
    patients = list(dict.fromkeys(e["patient"] for e in training)) if named else None
    n_train = len(patients) if patients else len(training)
    unit = "patients" if patients else "training cases"
    labels = [int(n) for n in (labels or prof.labels)]
    if any(not 0 < n < n_train for n in labels):
        raise ValueError(f"labels {labels} must be between 1 and {n_train - 1} (the split has {n_train} {unit}).")
    frames = patient_budgets(training, labels + [n_train], str(data_dir / "dataset.json"))
    runs = plan_runs(prof, list(methods), labels, n_train if upper_bound else None, data_dir, out, seeds, frames)
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
    results = {**summarise(runs, prof), "budget_unit": "patients" if patients else "volumes"}
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
