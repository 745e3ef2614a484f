"""The label-efficiency benchmark's plan: its profiles (how big a run is), its methods (which bundles, which
pre-training) and the runs a benchmark consists of (:func:`plan_runs`), each a list of ``monai.bundle run`` steps with
their overrides. :mod:`medssl.lab.benchmark` runs them, :mod:`medssl.lab.benchmark_report` reports them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

__all__ = [
    "PROFILES",
    "METHODS",
    "SWEEP_METHODS",
    "DEFAULT_METHODS",
    "METRICS",
    "STEP_KINDS",
    "BUNDLE_SEED",
    "scaled_lr_step",
    "ACDC_LABELS",
    "EVALUATE_KEYS",
    "patient_budgets",
    "Profile",
    "override_args",
    "plan_runs",
]


@dataclass(frozen=True)
class Profile:
    """How big a benchmark is. ``train`` and ``pretrain`` are bundle overrides shared by all runs."""

    name: str
    description: str
    labels: Sequence[int]  # label budgets: cases, or patients where the entries name their patient
    # dev split: the first num_train cases train, the rest test; None: the dataset's own test (or validation) list
    # where it has one (ACDC), else all but two cases train (the synthetic sample data)
    num_train: Optional[int]
    downsample: int
    train: Dict[str, Any]
    pretrain: Dict[str, Any]
    evaluate: Dict[str, Any] = field(default_factory=dict)
    # overrides of one pre-training bundle only (its optimiser, its own knobs), on top of ``pretrain``
    pretrain_extra: Dict[str, Dict[str, Any]] = field(default_factory=dict)


def scaled_lr_step(iterations: int) -> int:
    """The iteration of the x0.1 learning-rate step for a run of ``iterations``: the paper's 2500 of 6000, scaled."""
    return max(1, iterations * 2500 // 6000)  # the paper's x0.1 at 2500 of 6000 iterations, scaled


# ACDC's three cardiac structures, SNOMED CT coded for the DICOM SEG (DICOM CID 7151)
ACDC_LABELS = {
    "0": "background",
    "1": {"name": "right ventricle", "code": ["53085002", "SCT", "Right ventricle"]},
    "2": {"name": "myocardium", "code": ["74281007", "SCT", "Myocardium"]},
    "3": {"name": "left ventricle", "code": ["87878005", "SCT", "Left ventricle"]},
}

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
            "lr_step": scaled_lr_step(1000),
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
    "acdc_cpu": Profile(
        name="acdc_cpu",
        description="ACDC on 2 CPU cores: the SSL4MIS split (70 training patients, the 20 validation frames as the "
        "test set), budgets in patients (their ED and ES frames), the three cardiac labels; voxel units (the public "
        "release has no spacing), patch 128x128x16 with stacks of fewer slices padded (the VNet sees whole 6-16 "
        "slice stacks), 1000 iterations (lr x0.1 at 416), pre-training 600 iterations of batch 4",
        labels=(3, 7),
        num_train=None,
        downsample=1,
        train={
            "labels": ACDC_LABELS,
            "spacing": [1.0, 1.0, 1.0],
            "patch_size": [128, 128, 16],
            "pad_small_volumes": True,
            "max_iterations": 1000,
            "lr_step": scaled_lr_step(1000),
            "save_interval": 250,
            "sw_batch_size": 4,
        },
        pretrain={
            "spacing": [1.0, 1.0, 1.0],
            "patch_size": [128, 128, 16],
            "pad_small_volumes": True,
            "max_iterations": 600,
            "batch_size": 4,
            "save_interval": 100,
        },
        pretrain_extra={"pcrl_pretrain": {"learning_rate": 0.01}},
    ),
    "acdc_gpu": Profile(
        name="acdc_gpu",
        description="ACDC on a GPU: the SSL4MIS split, budgets in patients, patch 224x224x16 (fewer slices padded), "
        "6000 iterations, lr x0.1 every 2500; pre-training 6000 iterations of batch 16",
        labels=(3, 7),
        num_train=None,
        downsample=1,
        train={
            "labels": ACDC_LABELS,
            "spacing": [1.0, 1.0, 1.0],
            "patch_size": [224, 224, 16],
            "pad_small_volumes": True,
            "max_iterations": 6000,
            "lr_step": 2500,
            "save_interval": 500,
        },
        pretrain={
            "spacing": [1.0, 1.0, 1.0],
            "patch_size": [224, 224, 16],
            "pad_small_volumes": True,
            "max_iterations": 6000,
            "batch_size": 16,
            "save_interval": 500,
        },
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


# the training overrides that evaluation needs too (the grid, the window, the task)
EVALUATE_KEYS = ("patch_size", "spacing", "sw_batch_size", "num_workers", "labels", "intensity", "pad_small_volumes")


def patient_budgets(
    training: Sequence[Dict[str, Any]], budgets: Sequence[int], source: str = "training"
) -> Dict[int, int]:
    """Budgets in patients -> labeled entries: the first ``k`` patients' frames (ACDC: a patient's ED and ES frames
    stay together). Entries without a ``patient`` key count one each (budget = cases).

    Raises:
        ValueError: a patient's entries are not next to each other (the labeled prefix would split a patient), or a
            budget is not below the number of patients.
    """
    patients = [e.get("patient") for e in training]
    if any(p is None for p in patients):
        return {int(k): int(k) for k in budgets}
    order = list(dict.fromkeys(patients))
    for p in order:
        first, last = patients.index(p), len(patients) - 1 - patients[::-1].index(p)
        if patients[first : last + 1] != [p] * (last - first + 1):
            raise ValueError(f"{source}: the entries of patient {p!r} are not next to each other ({first}-{last}).")
    frames = {}
    for k in budgets:
        if not 0 < int(k) <= len(order):
            raise ValueError(f"{source}: a budget of {k} patients; the list has {len(order)}.")
        frames[int(k)] = sum(patients.count(p) for p in order[: int(k)])
    return frames


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
    num_labeled: Optional[Dict[int, int]] = None,
) -> List[Dict[str, Any]]:
    """The runs of a benchmark: ``[{"name", "method", "labels", "bundle", "dir", "steps": [...]}]`` where each step
    is ``{"kind": "pretrain"|"train"|"evaluate", "config": [...], "overrides": {...}}``. The PCRL pre-training is
    one shared run per pre-training bundle (``pcrl_pretrain``, ``spark_pretrain``) that the ``pcrl+*`` / ``spark+*``
    runs start from. ``num_labeled`` maps a budget of ``labels`` (and ``upper_bound``) to the bundles' labeled
    count where they differ (budgets in patients, each with several frames; see :func:`patient_budgets`)."""
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
        train = {
            "dataset_dir": str(data_dir),
            "bundle_root": str(d),
            "num_labeled": (num_labeled or {}).get(n, n),
            **profile.train,
        }
        if seed > 1:
            train["seed"] = BUNDLE_SEED + seed - 1
        if pretrained:
            train["pretrained_ckpt"] = str(out / "runs" / pretrained / "models" / "model.pt")
        evaluate = {
            "dataset_dir": str(data_dir),
            "bundle_root": str(d),
            "distance_unit": "voxel",  # the LA tables of the literature (medpy on the voxel grid)
            **{k: v for k, v in profile.train.items() if k in EVALUATE_KEYS},
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
