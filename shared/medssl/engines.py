"""Semi-supervised training on MONAI/ignite: two data streams, a student, an EMA teacher, a method's objective.

The semi-supervised LA papers (UA-MT, DTC, MC-Net, CVRL, SimCVD) share one loop: every iteration draws a labeled
batch and an unlabeled batch (2 + 2 volumes), runs a student and a mean teacher, and sums a supervised loss on
the labeled half with unsupervised terms on the unlabeled half. :class:`SemiSupervisedTrainer` is that loop, once;
a method is only its objective (``medssl.losses.CVRLLoss``, ``medssl.losses.SimCVDLoss``): a module called as
``objective(student, teacher, image_l, label_l, image_u, iteration, **extras)`` (``extras``: the labeled batch's
other tensors, such as ``sdm``) that returns a dict with ``"loss"`` (to
minimise), ``"pred"`` (the student's logits on the labeled batch) and scalars to log (``"loss_*"`` terms,
``"weight_*"`` schedule values).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch.utils.data import DataLoader

__all__ = ["SemiSupervisedTrainer"]


class SemiSupervisedTrainer(SupervisedTrainer):
    """A ``SupervisedTrainer`` that also draws an unlabeled batch every iteration and trains with an objective.

    ``train_data_loader`` yields the labeled batches (``{"image", "label"}``), ``unlabeled_data_loader`` the
    unlabeled ones (``{"image"}`` only: no label is loaded or read for them); both should be endless (see
    :class:`medssl.data.InfiniteSampler`), so the labeled set cycles and ``epoch_length`` counts iterations. All
    MONAI/ignite handlers work as with ``SupervisedTrainer``; ``engine.state.output`` holds ``image``/``label``/
    ``pred`` of the labeled batch, ``loss`` and the objective's other scalars (``loss_*`` terms, ``weight_*``).

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
        train_data_loader: DataLoader,
        unlabeled_data_loader: DataLoader,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable,
        teacher: Optional[torch.nn.Module] = None,
        epoch_length: Optional[int] = None,
        train_handlers: Optional[Sequence] = None,
        amp: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            epoch_length=epoch_length,
            train_handlers=train_handlers,
            amp=amp,
            decollate=False,
            **kwargs,
        )
        self.unlabeled_data_loader = unlabeled_data_loader
        self.teacher = teacher
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
        image = batch[Keys.IMAGE]
        return image.to(self.state.device, non_blocking=self.non_blocking)

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
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        teacher_fn = engine.teacher.forward_heads if engine.teacher is not None else None

        def _objective() -> Dict[str, torch.Tensor]:
            out = engine.loss_function(
                engine.network, teacher_fn, image_l, label_l, image_u, engine.state.iteration, **extras
            )
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            return out

        if engine.amp and engine.scaler is not None:
            with torch.autocast("cuda", **engine.amp_kwargs):
                terms = _objective()
            engine.scaler.scale(terms["loss"]).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            terms = _objective()
            terms["loss"].backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        engine.state.output = {Keys.IMAGE: image_l, Keys.LABEL: label_l, Keys.PRED: terms["pred"].detach()}
        engine.state.output.update({k: torch.as_tensor(v).detach() for k, v in terms.items() if k != "pred"})
        return engine.state.output
