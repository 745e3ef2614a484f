"""Ignite handlers of the medssl bundles (attach like MONAI's: ``handler.attach(engine)``)."""

from __future__ import annotations

import csv
import logging
import os
import random
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from medssl.data import as_bool, atomic_path

__all__ = ["MetricsTable", "TrainingCheckpoint", "EMATeacher", "TrainingRNG", "TaskRecord", "latest_checkpoint"]

logger = logging.getLogger("medssl")


class MetricsTable:
    """Write one CSV row per evaluated case with every metric, then ``mean`` and ``std`` rows.

    Reads the per-case values that MONAI metric handlers keep in ``engine.state.metric_details``
    (``save_details=True``, the default), and the case file names from the batch metadata. The file is
    written atomically at the end of the evaluation; the table is also logged. NaN values (a distance on an
    empty prediction or label) are left out of the mean and std, and counted in an ``n_nan`` row.

    With several foreground classes each metric has one column per class, named after the class
    (``dice_liver``, ``hd95_mm_spleen``, from ``labels``; the label value where there are no names), after a column of
    the case's mean over the classes (``dice``; NaN when one class is NaN, so a missed structure stays visible).
    Distance columns (``hd95*``, ``asd*``) are suffixed ``_mm`` when ``distance_unit`` is ``mm``; in voxels they keep
    their plain names (the LA benchmark's tables).

    Args:
        save_dir: folder of the CSV file.
        metrics: metric names as attached to the evaluator (``key_val_metric`` / ``additional_metrics``).
        filename: CSV file name.
        image_key: batch key whose ``.meta["filename_or_obj"]`` names the case.
        labels: the bundle's ``labels`` (value -> name or entry, see :mod:`medssl.task`), to name the class columns.
        distance_unit: ``"voxel"`` or ``"mm"``, the unit the distance metrics were computed in.
    """

    def __init__(
        self,
        save_dir: str,
        metrics: Sequence[str] = ("dice", "jaccard", "hd95", "asd"),
        filename: str = "metrics.csv",
        image_key: str = "image",
        labels: Optional[Mapping[Any, Any]] = None,
        distance_unit: str = "voxel",
    ) -> None:
        from medssl.task import distance_spacing, label_names

        self.save_dir, self.metrics, self.filename, self.image_key = save_dir, list(metrics), filename, image_key
        self.mm = distance_spacing(distance_unit) is not None
        self.label_names = label_names(labels) if labels else {}
        self._names: List[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self._names.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect_names)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _collect_names(self, engine: Engine) -> None:
        for item in engine.state.batch:
            meta = getattr(item[self.image_key], "meta", {})
            name = os.path.basename(str(meta.get("filename_or_obj", f"case_{len(self._names)}")))
            self._names.append(re.sub(r"\.nii(\.gz)?$", "", name))

    def _class_suffixes(self, n: int) -> List[str]:
        """Column suffixes of foreground classes 1..n: slugs of their names, or the values where names are missing
        or collide."""
        slugs = [re.sub(r"[^0-9a-z]+", "_", self.label_names.get(c, "").lower()).strip("_") for c in range(1, n + 1)]
        if all(slugs) and len(set(slugs)) == n:
            return slugs
        return [str(c) for c in range(1, n + 1)]

    def table(self, details: Dict[str, torch.Tensor]) -> Dict[str, np.ndarray]:
        columns: Dict[str, np.ndarray] = {}
        for name in self.metrics:
            values = np.asarray(torch.as_tensor(details[name]).float().cpu(), dtype=np.float64)
            values = values.reshape(len(values), -1)
            base = f"{name}_mm" if self.mm and name.startswith(("hd95", "asd")) else name
            columns[base] = values.mean(axis=1)
            if values.shape[1] > 1:
                for suffix, column in zip(self._class_suffixes(values.shape[1]), values.T):
                    columns[f"{base}_{suffix}"] = column
        return columns

    def __call__(self, engine: Engine) -> None:
        missing = [m for m in self.metrics if m not in engine.state.metric_details]
        if missing:
            raise KeyError(f"MetricsTable: metrics {missing} are not attached to the evaluator (or save_details=False)")
        columns = self.table(engine.state.metric_details)
        names = (
            self._names
            if len(self._names) == len(next(iter(columns.values())))
            else [f"case_{i}" for i in range(len(next(iter(columns.values()))))]
        )
        rows = [[n] + [f"{columns[c][i]:.6f}" for c in columns] for i, n in enumerate(names)]
        with np.errstate(all="ignore"):
            summary = {
                "mean": [np.nanmean(v) for v in columns.values()],
                "std": [np.nanstd(v) for v in columns.values()],
            }
        rows += [[k] + [f"{x:.6f}" for x in v] for k, v in summary.items()]
        rows.append(["n_nan"] + [str(int(np.isnan(v).sum())) for v in columns.values()])
        os.makedirs(self.save_dir, exist_ok=True)
        path = os.path.join(self.save_dir, self.filename)
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["case"] + list(columns))
                writer.writerows(rows)
        width = max(len(r[0]) for r in rows)
        lines = ["  ".join([f"{'case':<{width}}"] + [f"{c:>10}" for c in columns])]
        lines += ["  ".join([f"{r[0]:<{width}}"] + [f"{float(x):>10.4f}" for x in r[1:]]) for r in rows[:-1]]
        logger.info("per-case metrics (%s):\n%s", path, "\n".join(lines))


_CKPT = re.compile(r"^checkpoint_(\d+)\.pt$")


def latest_checkpoint(ckpt_dir: str) -> Optional[str]:
    """Path of the resume checkpoint with the highest iteration in ``ckpt_dir`` (None if there is none)."""
    if not os.path.isdir(ckpt_dir):
        return None
    found = [(int(m.group(1)), f) for f in os.listdir(ckpt_dir) if (m := _CKPT.match(f))]
    return os.path.join(ckpt_dir, max(found)[1]) if found else None


def _unwrap(obj: Any) -> Any:
    return obj.module if isinstance(obj, torch.nn.parallel.DistributedDataParallel) else obj


def _is_rank0() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


class TrainingCheckpoint:
    """Resume checkpoints and the final weights file of a training run, written atomically.

    Every ``save_interval`` iterations the state dicts of ``save_dict`` (network, optimizer, scheduler,
    and whatever an SSL method adds: EMA teacher, queues) and of the trainer itself (iteration count) go
    to ``ckpt_dir/checkpoint_<it>.pt`` through a temporary file and a rename, keeping the ``n_saved``
    newest. At the end of training the network's plain CPU state dict goes to ``ckpt_dir/<final_filename>``
    (the bundle's ``models/model.pt``), only when training completes, never on an exception. With
    ``resume=True`` the newest checkpoint is loaded (``weights_only=True``) when the trainer starts.
    Only rank 0 writes.

    Args:
        ckpt_dir: folder of the checkpoints and of the final weights.
        save_dict: ``{name: object with state_dict()/load_state_dict()}``; must hold ``final_key``.
        save_interval: iterations between resume checkpoints (0 disables them).
        n_saved: resume checkpoints kept.
        final_filename: file name of the final weights (None: none written).
        final_key: the ``save_dict`` entry whose weights are the final model.
        resume: load the newest resume checkpoint at start (a fresh start if there is none).
        final_prefixes: keep only the tensors whose names start with these in the final weights (the SSL bundles
            pass ``medssl.networks.BACKBONE_PREFIXES`` so their heads stay out of ``model.pt``); None keeps all.
    """

    def __init__(
        self,
        ckpt_dir: str,
        save_dict: Mapping[str, Any],
        save_interval: int = 0,
        n_saved: int = 2,
        final_filename: Optional[str] = "model.pt",
        final_key: str = "model",
        resume: bool = False,
        final_prefixes: Optional[Sequence[str]] = None,
    ) -> None:
        if final_filename and final_key not in save_dict:
            raise KeyError(f"TrainingCheckpoint: save_dict has no {final_key!r} entry for the final weights.")
        self.ckpt_dir, self.save_dict, self.save_interval = ckpt_dir, dict(save_dict), int(save_interval)
        self.n_saved, self.final_filename, self.final_key = n_saved, final_filename, final_key
        self.resume = as_bool(resume, "resume")
        self.final_prefixes = tuple(final_prefixes) if final_prefixes else None

    def attach(self, engine: Engine) -> None:
        self.save_dict.setdefault("trainer", engine)
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load_latest)
        elif self.save_interval > 0 and latest_checkpoint(self.ckpt_dir):
            raise FileExistsError(
                f"{self.ckpt_dir} holds resume checkpoints of an earlier run ({latest_checkpoint(self.ckpt_dir)}); "
                "pass --resume true to continue it, or choose another --ckpt_dir."
            )
        if self.save_interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.save_interval), self.save)
        if self.final_filename:
            engine.add_event_handler(Events.COMPLETED, self.save_final)

    def load_latest(self, engine: Engine) -> None:
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            logger.info("resume: no checkpoint in %s, starting from scratch", self.ckpt_dir)
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in self.save_dict if k not in state]
        if missing:
            raise KeyError(f"{path}: resume checkpoint lacks {missing}; it holds {sorted(state)}.")
        for name, obj in self.save_dict.items():
            _unwrap(obj).load_state_dict(state[name])
        for obj in self.save_dict.values():
            if isinstance(obj, TrainingRNG):
                obj.resume_at(engine.state.iteration)
        logger.info("resumed from %s (iteration %d)", path, engine.state.iteration)

    def save(self, engine: Engine) -> None:
        if not _is_rank0():
            return
        state = {name: _unwrap(obj).state_dict() for name, obj in self.save_dict.items()}
        path = os.path.join(self.ckpt_dir, f"checkpoint_{engine.state.iteration}.pt")
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        kept = sorted((int(m.group(1)), f) for f in os.listdir(self.ckpt_dir) if (m := _CKPT.match(f)))
        for _, f in kept[: -self.n_saved] if self.n_saved > 0 else []:
            os.remove(os.path.join(self.ckpt_dir, f))

    def save_final(self, engine: Engine) -> None:
        if not _is_rank0():
            return
        weights = {k: v.detach().cpu() for k, v in _unwrap(self.save_dict[self.final_key]).state_dict().items()}
        if self.final_prefixes:
            weights = {k: v for k, v in weights.items() if k.startswith(self.final_prefixes)}
        path = os.path.join(self.ckpt_dir, self.final_filename)
        with atomic_path(path) as tmp:
            torch.save(weights, tmp)
        logger.info("saved final weights (iteration %d) to %s", engine.state.iteration, path)


class EMATeacher:
    """Mean-teacher update after every iteration: ``teacher = a * teacher + (1 - a) * student`` on the parameters.

    Tarvainen and Valpola, "Mean teachers are better role models", NeurIPS 2017, with the warm-up of UA-MT
    (Yu et al., MICCAI 2019): ``a = min(1 - 1 / (step + 1), decay)`` where ``step`` counts the updates done before
    (0 at the first, so the teacher starts as a copy of the student). Buffers (BatchNorm statistics) are not
    averaged: as in UA-MT the teacher runs in train mode and keeps its own running statistics.

    Args:
        student: the trained network (a DDP wrapper is unwrapped).
        teacher: the EMA network, same architecture.
        decay: the EMA decay once warmed up (0.99 in UA-MT, DTC, SimCVD; 0.999 in PCRL's momentum encoder).
        warmup: use UA-MT's warm-up; False applies ``decay`` from the first step (PCRL / MoCo, whose key encoder
            starts as a copy of the student).
    """

    def __init__(
        self, student: torch.nn.Module, teacher: torch.nn.Module, decay: float = 0.99, warmup: bool = True
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}.")
        self.student, self.teacher, self.decay, self.warmup = student, teacher, float(decay), as_bool(warmup)
        s, t = list(_unwrap(student).parameters()), list(teacher.parameters())
        if [p.shape for p in s] != [p.shape for p in t]:
            raise ValueError("EMATeacher: student and teacher parameters differ in number or shape.")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    @torch.no_grad()
    def update(self, step: int) -> float:
        alpha = min(1.0 - 1.0 / (step + 1), self.decay) if self.warmup else self.decay
        for t, s in zip(self.teacher.parameters(), _unwrap(self.student).parameters()):
            t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
        return alpha

    def __call__(self, engine: Engine) -> None:
        self.update(engine.state.iteration - 1)


def _randomizable(obj: Any, seen: Optional[set] = None) -> List[Any]:
    """Every transform with a numpy ``R`` random state reachable from ``obj``: nested Compose / OneOf / lists, and
    the inner transforms that dictionary transforms keep as attributes (``RandSpatialCropd.cropper``, ...)."""
    from monai.transforms import Transform

    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        return [t for child in obj for t in _randomizable(child, seen)]
    if not isinstance(obj, Transform):
        return []
    found = [obj] if isinstance(getattr(obj, "R", None), np.random.RandomState) else []
    for value in vars(obj).values():
        if isinstance(value, (Transform, list, tuple)):
            found += _randomizable(value, seen)
    return found


class TrainingRNG:
    """The random state of a training run, as a checkpointable object (``state_dict`` / ``load_state_dict``).

    Holds torch's, numpy's and Python's global generators, the random state of every randomised transform of the
    given pipelines (MONAI ``Randomizable.R``), and moves the given :class:`medssl.data.InfiniteSampler`s to where
    the interrupted run left them (``iteration * batch_size``). Put it in ``TrainingCheckpoint``'s ``save_dict``:
    a resumed run then continues the interrupted one's data and random draws exactly, when the data loaders run in
    the main process (``num_workers=0``, the CPU default; with worker processes the augmentation stream restarts).

    Args:
        transforms: the training pipelines (``Compose`` objects or lists of transforms).
        samplers: the training ``InfiniteSampler``s.
        batch_sizes: the batch size of each sampler's loader.
    """

    def __init__(self, transforms: Sequence[Any] = (), samplers: Sequence[Any] = (), batch_sizes: Sequence[int] = ()):
        if len(samplers) != len(batch_sizes):
            raise ValueError(f"TrainingRNG: {len(samplers)} samplers but {len(batch_sizes)} batch sizes.")
        self.transforms = _randomizable(list(transforms))
        self.samplers, self.batch_sizes = list(samplers), [int(b) for b in batch_sizes]

    def state_dict(self) -> Dict[str, Any]:
        np_state = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.as_tensor(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
            "python": list(random.getstate()[1]) + [random.getstate()[2]],
            "python_version": random.getstate()[0],
            "transforms": [_rs_state(t.R) for t in self.transforms],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if len(state["transforms"]) != len(self.transforms):
            raise ValueError(
                f"TrainingRNG: the checkpoint holds {len(state['transforms'])} transform states, this "
                f"pipeline has {len(self.transforms)} randomised transforms; was the config changed?"
            )
        torch.set_rng_state(state["torch"])
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
        py = state["python"]
        random.setstate((state["python_version"], tuple(int(v) for v in py[:-1]), py[-1]))
        for t, s in zip(self.transforms, state["transforms"]):
            t.R.set_state((s[0], s[1].numpy().astype(np.uint32), int(s[2]), int(s[3]), float(s[4])))

    def resume_at(self, iteration: int) -> None:
        for sampler, batch_size in zip(self.samplers, self.batch_sizes):
            sampler.set_start(iteration * batch_size)


def _rs_state(rs: np.random.RandomState) -> List[Any]:
    name, keys, pos, has_gauss, gauss = rs.get_state()
    return [name, torch.as_tensor(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]


class TaskRecord:
    """At the end of a training (``Events.COMPLETED``, rank 0 only), write the run's task into the trained bundle's
    own ``configs/`` (:func:`medssl.task.write_task`: labels, classes, spacing, intensity, patch), so the bundle
    describes what it was trained for. Checked when built, so bad ``labels`` or ``intensity`` stop the run before
    training.

    A bare ``bundle_root`` (a run folder of weights and logs, its configs read from the bundle elsewhere) first gets
    a copy of the ``configs/`` of bundle ``configs_from`` (:func:`medssl.bundle.bundle_path`), so ``segment --bundle
    RUN_FOLDER`` works on any trained run; without ``configs_from`` such a folder is left alone.

    Args:
        bundle_root: the trained bundle's folder.
        labels, spacing, intensity, patch_size, modality: the run's top-level keys.
        configs_from: the bundle whose configs a bare ``bundle_root`` gets (the bundle's own name in its train.json).
    """

    def __init__(
        self,
        bundle_root: str,
        labels: Any,
        spacing: Sequence[float],
        intensity: Any = None,
        patch_size: Optional[Sequence[int]] = None,
        modality: Optional[str] = None,
        configs_from: Optional[str] = None,
    ) -> None:
        from medssl.task import check_intensity, check_modality, parse_labels

        parse_labels(labels)
        check_intensity(intensity)
        self.modality = None if modality is None else check_modality(modality)
        self.bundle_root, self.labels, self.spacing = bundle_root, labels, spacing
        self.intensity, self.patch_size, self.configs_from = intensity, patch_size, configs_from

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self.write)

    def write(self, engine: Optional[Engine] = None) -> List[str]:
        from medssl.task import write_task

        if not _is_rank0():
            return []
        configs = os.path.join(self.bundle_root, "configs")
        if self.configs_from and not os.path.isdir(configs):
            import shutil

            from medssl.bundle import bundle_path

            try:
                source = bundle_path(self.configs_from) / "configs"
            except FileNotFoundError as e:  # the weights are what matters: never fail a finished training for this
                logger.warning("%s: no configs/ and none to copy (%s); give segment the configs", configs, e)
                return []
            tmp = f"{configs}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, tmp)
            os.replace(tmp, configs)  # the folder appears whole or not at all
            logger.info("copied the configs of %s (%s) into %s", self.configs_from, source, configs)
        written = write_task(
            self.bundle_root, self.labels, self.spacing, self.intensity, self.patch_size, self.modality
        )
        for path in written:
            logger.info("wrote the run's task (labels, spacing, intensity, patch) into %s/%s", self.bundle_root, path)
        return written
