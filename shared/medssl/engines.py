"""Training loops on MONAI/ignite for methods that are an objective, not a ``loss(pred, label)``.

The semi-supervised LA papers (UA-MT, DTC, MC-Net, CVRL, SimCVD) share one loop: every iteration draws a labeled
batch and an unlabeled batch (2 + 2 volumes), runs a student and a mean teacher, and sums a supervised loss on
the labeled half with unsupervised terms on the unlabeled half. :class:`SemiSupervisedTrainer` is that loop, once;
a method is only its objective (``medssl.losses.CVRLLoss``, ``medssl.losses.SimCVDLoss``): a module called as
``objective(student, teacher, image_l, label_l, image_u, iteration, **extras)`` (``extras``: the labeled batch's
other tensors, such as ``sdm``) that returns a dict with ``"loss"`` (to minimise), ``"pred"`` (the student's
logits on the labeled batch) and scalars to log (``"loss_*"`` terms, ``"weight_*"`` schedule values).

Self-supervised pre-training (PCRL) has one stream of unlabeled batches: :class:`SelfSupervisedTrainer` calls
``objective(student, teacher, batch, iteration)`` with the whole batch dict and logs the same way.

Both are ``monai.engines.SupervisedTrainer`` subclasses, so MONAI/ignite handlers (StatsHandler, TensorBoard,
checkpoints, ValidationHandler, LrScheduleHandler, MLflow) attach as usual and ``epoch_length`` counts iterations.
``engine.state.output`` is a list holding one dict (batch tensors and scalars), the shape of a decollated
``SupervisedTrainer`` output, so that MONAI's defaults such as ``from_engine(["loss"], first=True)`` (used by
``--tracking mlflow``) read it unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Sequence

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from medssl.precision import precision_proxy

__all__ = ["SemiSupervisedTrainer", "SelfSupervisedTrainer"]


class _ObjectiveTrainer(SupervisedTrainer):
    """A ``SupervisedTrainer`` whose iteration minimises ``terms["loss"]`` of an objective (see the module doc).

    ``precision`` (``medssl.precision.resolve_precision``; default ``"fp16"`` if ``amp`` else ``"fp32"``) and
    ``channels_last``: the objective sees the student and the teacher through ``medssl.precision.precision_proxy``,
    so their forward passes run in that precision and layout while the objective's losses stay fp32; with ``amp``
    (CUDA) the loss is scaled (MONAI's GradScaler).
    """

    def __init__(
        self,
        teacher: Optional[torch.nn.Module] = None,
        precision: Optional[str] = None,
        channels_last: Any = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(decollate=False, **kwargs)
        self.teacher = teacher
        self.precision = precision or ("fp16" if self.amp else "fp32")
        self.student_fn = precision_proxy(self.network, self.precision, channels_last)
        self.teacher_fn = precision_proxy(teacher, self.precision, channels_last)

    def _optimize(self, engine: "_ObjectiveTrainer", compute: Callable[[], Dict[str, torch.Tensor]]) -> Dict:
        """Zero grads, run ``compute``, back-propagate ``loss`` (scaled with CUDA AMP), step; fire MONAI's events."""
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)

        def _compute() -> Dict[str, torch.Tensor]:
            out = compute()
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            return out

        terms = _compute()
        if engine.amp and engine.scaler is not None:
            engine.scaler.scale(terms["loss"]).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            terms["loss"].backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return {k: torch.as_tensor(v).detach() for k, v in terms.items() if k != Keys.PRED}


class SemiSupervisedTrainer(_ObjectiveTrainer):
    """A ``SupervisedTrainer`` that also draws an unlabeled batch every iteration and trains with an objective.

    ``train_data_loader`` yields the labeled batches (``{"image", "label"}``), ``unlabeled_data_loader`` the
    unlabeled ones (``{"image"}`` only: no label is loaded or read for them); both should be endless (see
    :class:`medssl.data.InfiniteSampler`), so the labeled set cycles and ``epoch_length`` counts iterations.
    ``engine.state.output[0]`` holds ``image``/``label``/``pred`` of the labeled batch, ``loss`` and the objective's
    other scalars (``loss_*`` terms, ``weight_*``).

    Args:
        unlabeled_data_loader: loader of unlabeled batches.
        teacher: the mean teacher (updated by :class:`medssl.handlers.EMATeacher`), or None for methods without.
        loss_function: the method's objective (see the module docstring).
        other args: as :class:`monai.engines.SupervisedTrainer`.

    Raises:
        ValueError: the unlabeled loader yields an entry without ``"image"``.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        unlabeled_data_loader: Iterable,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable,
        teacher: Optional[torch.nn.Module] = None,
        epoch_length: Optional[int] = None,
        train_handlers: Optional[Sequence] = None,
        amp: bool = False,
        precision: Optional[str] = None,
        channels_last: Any = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            teacher=teacher,
            precision=precision,
            channels_last=channels_last,
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            epoch_length=epoch_length,
            train_handlers=train_handlers,
            amp=amp,
            **kwargs,
        )
        self.unlabeled_data_loader = unlabeled_data_loader
        self._unlabeled: Optional[Iterator] = None

    def _next_unlabeled(self) -> torch.Tensor:
        if self._unlabeled is None:
            self._unlabeled = iter(self.unlabeled_data_loader)
        try:
            batch = next(self._unlabeled)
        except StopIteration:  # a finite loader: start it again
            self._unlabeled = iter(self.unlabeled_data_loader)
            batch = next(self._unlabeled)
        if Keys.IMAGE not in batch:
            raise ValueError(f"unlabeled batch has no {str(Keys.IMAGE)!r} key; keys: {sorted(map(str, batch))}")
        return batch[Keys.IMAGE].to(self.state.device, non_blocking=self.non_blocking)

    def _iteration(self, engine: "SemiSupervisedTrainer", batchdata: Dict[str, torch.Tensor]) -> Dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        image_l, label_l = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)[:2]
        image_u = engine._next_unlabeled()
        # other tensors of the labeled batch (e.g. the label's signed distance map) go to the objective by name
        extras = {
            str(k): v.to(engine.state.device, non_blocking=engine.non_blocking)
            for k, v in batchdata.items()
            if k not in (Keys.IMAGE, Keys.LABEL) and isinstance(v, torch.Tensor)
        }
        teacher_fn = engine.teacher_fn.forward_heads if engine.teacher_fn is not None else None
        pred: Dict[str, torch.Tensor] = {}

        def compute() -> Dict[str, torch.Tensor]:
            out = engine.loss_function(
                engine.student_fn, teacher_fn, image_l, label_l, image_u, engine.state.iteration, **extras
            )
            pred[Keys.PRED] = out[Keys.PRED].detach()
            return out

        terms = engine._optimize(engine, compute)
        engine.state.output = [{Keys.IMAGE: image_l, Keys.LABEL: label_l, **pred, **terms}]
        return engine.state.output


class SelfSupervisedTrainer(_ObjectiveTrainer):
    """A ``SupervisedTrainer`` for self-supervised pre-training: one stream of unlabeled batches (any keys: the
    views, targets and codes a method's transforms produce), trained with ``objective(student, teacher, batch,
    iteration)`` returning ``{"loss", ...}``. ``engine.state.output[0]`` holds ``loss`` and the other scalars.

    Args:
        teacher: a momentum / EMA encoder (updated by :class:`medssl.handlers.EMATeacher`), or None.
        other args: as :class:`monai.engines.SupervisedTrainer` (``train_data_loader`` yields the unlabeled batches).
    """

    def _iteration(self, engine: "SelfSupervisedTrainer", batchdata: Dict[str, torch.Tensor]) -> Dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = {
            str(k): v.to(engine.state.device, non_blocking=engine.non_blocking) if isinstance(v, torch.Tensor) else v
            for k, v in batchdata.items()
        }
        terms = engine._optimize(
            engine, lambda: engine.loss_function(engine.student_fn, engine.teacher_fn, batch, engine.state.iteration)
        )
        engine.state.output = [terms]
        return engine.state.output
