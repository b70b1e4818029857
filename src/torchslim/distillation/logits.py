"""Soft-target distillation (Hinton et al. 2015, https://arxiv.org/abs/1503.02531)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from torchslim.core import MethodConfig, Step, TrainedMethod, check, register
from torchslim.errors import DataError

__all__ = ["LogitDistillation", "LogitDistillationConfig", "soft_target_loss"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogitDistillationConfig(MethodConfig):
    """Pull the student's softened logits towards the teacher's.

    Paper: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015,
    https://arxiv.org/abs/1503.02531

    Args:
        temperature: Softmax temperature T applied to both models' logits (> 0).
        alpha: Weight of the distillation term; the hard-label task loss gets ``1 - alpha``.

    Recipe:
        - method: distillation.logits
          temperature: 4.0
          alpha: 0.9

    Lifecycle:
        on_start: the driver freezes the teacher (``ctx.teacher``, or the model as it was
            before the recipe) in eval mode.
        extra_loss: ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch.
        task_weight: ``1 - alpha`` times the task loss on hard labels.
    """

    name: ClassVar[str] = "distillation.logits"
    temperature: float = 4.0
    alpha: float = 0.9

    def __post_init__(self) -> None:
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        check(0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}")


@register(LogitDistillationConfig)
class LogitDistillation(TrainedMethod):
    """Adds the soft-target term to the training loss."""

    needs_teacher = True
    cfg: LogitDistillationConfig

    def task_weight(self) -> float:
        """Hard labels keep ``1 - alpha`` of the task loss."""
        return 1.0 - self.cfg.alpha

    def extra_loss(self, step: Step) -> torch.Tensor:
        """``alpha * T^2 * KL`` between softened teacher and student outputs."""
        student, teacher = _logits(step.outputs), _logits(step.teacher_outputs())
        if student.shape != teacher.shape:
            raise DataError(
                f"distillation.logits: student outputs {tuple(student.shape)} and teacher outputs "
                f"{tuple(teacher.shape)} differ; use distillation.features with a projection"
            )
        loss = soft_target_loss(student, teacher, self.cfg.temperature)
        return self.cfg.alpha * loss


def _logits(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise DataError(f"distillation.logits: cannot find logits in outputs of type {type(outputs).__name__}")


def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` averaged over rows.

    The ``T^2`` factor keeps gradient magnitudes comparable across temperatures (Hinton §2).
    """
    t = temperature
    classes = student.shape[-1]
    kl = F.kl_div(
        F.log_softmax(student.reshape(-1, classes) / t, dim=-1),
        F.log_softmax(teacher.reshape(-1, classes).detach() / t, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    return kl * t * t
