"""TrainedMethod: the base of methods that work inside the training loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchslim.core.context import Context
from torchslim.core.outcome import Outcome

__all__ = ["Step", "TrainedMethod"]


class Step:
    """One training step as seen by trained methods.

    Attributes:
        index: Global step number, from 0.
        inputs: The batch's model inputs.
        targets: The batch's targets (None when the data has none).
        outputs: The student's outputs for ``inputs``.
        model: The model being trained (unwrapped from DDP).
        total: Number of optimizer steps of the stage, when known (schedules need it).
    """

    def __init__(
        self,
        index: int,
        inputs: Any,
        targets: Any,
        outputs: Any,
        model: nn.Module,
        teacher_fn: Callable[[Any], Any] | None = None,
        total: int | None = None,
    ) -> None:
        self.index = index
        self.inputs = inputs
        self.targets = targets
        self.outputs = outputs
        self.model = model
        self._teacher_fn = teacher_fn
        self.total = total
        self._teacher_outputs: Any = None

    def teacher_outputs(self) -> Any:
        """The teacher's outputs for ``inputs``, computed once per step without gradients."""
        if self._teacher_outputs is None:
            if self._teacher_fn is None:
                raise RuntimeError("this stage has no teacher")
            with torch.no_grad():
                self._teacher_outputs = self._teacher_fn(self.inputs)
        return self._teacher_outputs


class TrainedMethod:
    """Base of methods that act during training; every hook is a no-op by default.

    Class attributes:
        needs_teacher: The driver prepares a frozen teacher for this method.
        default_lr: The peak learning rate the method trains best with, used when the stage's
            ``train`` block sets no ``lr`` (None: no preference; the stage then uses 1e-3).
    """

    needs_teacher: bool = False
    default_lr: float | None = None

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def on_start(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Prepare the model (add masks, fake quant ...); return the model to train."""
        return model

    def synthesize(self, ctx: Context) -> Any:
        """Training data this method makes when the stage has none (data-free methods), or None.

        Called before ``on_start`` only when ``ctx.train_data`` is None; ``ctx.teacher`` is set.
        """
        return None

    def parameters(self) -> list[nn.Parameter]:
        """Extra trainable parameters (projections, discriminators) for the optimizer."""
        return []

    def task_weight(self) -> float:
        """Multiplier on the task loss; distillation uses ``1 - alpha``."""
        return 1.0

    def extra_loss(self, step: Step) -> torch.Tensor | None:
        """A loss term added to the task loss, or None."""
        return None

    def on_step(self, step: Step) -> None:
        """Called after each optimizer step (schedules, mask updates)."""

    def on_end(self, model: nn.Module, ctx: Context) -> Outcome:
        """Make changes permanent; return what was done."""
        return Outcome(model=model)

    def state_dict(self) -> dict[str, Any]:
        """Extra state to checkpoint (besides the model's)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
