"""Soft-target distillation (Hinton et al. 2015, https://arxiv.org/abs/1503.02531)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import torch

from torchslim.core import MethodConfig, Step, TrainedMethod, check, register
from torchslim.distillation._outputs import logits_of, padding_mask, shape_mismatch
from torchslim.distillation.losses import feature_loss, soft_target_loss

__all__ = ["LogitDistillation", "LogitDistillationConfig", "scheduled_temperature", "soft_target_loss"]

_NAME = "distillation.logits"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogitDistillationConfig(MethodConfig):
    """Pull the student's softened logits towards the teacher's.

    Paper: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015,
    https://arxiv.org/abs/1503.02531

    Args:
        temperature: Softmax temperature T applied to both models' logits (> 0).
        alpha: Weight of the distillation term; the hard-label task loss gets ``1 - alpha``.
        loss: ``kl`` (soft targets, for classifiers and per-token sequence outputs), or
            ``mse`` / ``cosine`` for embedding outputs (the temperature is then unused).
        temperature_end: When set, T moves linearly from ``temperature`` to this value
            over ``anneal_steps`` optimizer steps, then stays there.
        anneal_steps: Length of the temperature schedule in steps.
        ignore_index: Target value marking padding tokens, left out of the average (the
            Hugging Face ``-100`` convention).

    Recipe:
        - method: distillation.logits
          temperature: 4.0
          alpha: 0.9

    Lifecycle:
        on_start: the driver freezes the teacher (``ctx.teacher``, or the model as it was
            before the recipe) in eval mode.
        extra_loss: ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over
            samples (classifiers) or tokens (``(B, T, V)`` outputs, padding left out);
            ``alpha * mse`` or ``alpha * (1 - cos)`` for embeddings.
        task_weight: ``1 - alpha`` times the task loss on hard labels.

    Notes:
        Padding comes from targets equal to ``ignore_index`` of the same shape as the
        token rows, else from an ``attention_mask`` entry of dict inputs. Student and teacher
        outputs must have the same shape; for different widths use
        ``distillation.features`` with its learned projection.
    """

    name: ClassVar[str] = _NAME
    temperature: float = 4.0
    alpha: float = 0.9
    loss: Literal["kl", "mse", "cosine"] = "kl"
    temperature_end: float | None = None
    anneal_steps: int = 1000
    ignore_index: int = -100

    def __post_init__(self) -> None:
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        check(self.temperature_end is None or self.temperature_end > 0,
              f"temperature_end must be > 0, got {self.temperature_end}")
        check(0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}")
        check(self.loss in ("kl", "mse", "cosine"), f"loss must be kl, mse or cosine, got {self.loss!r}")
        check(self.anneal_steps >= 1, f"anneal_steps must be >= 1, got {self.anneal_steps}")


def scheduled_temperature(cfg: LogitDistillationConfig, step: int) -> float:
    """The temperature at optimizer step ``step`` (from 0)."""
    if cfg.temperature_end is None:
        return cfg.temperature
    progress = min(step / cfg.anneal_steps, 1.0)
    return cfg.temperature + (cfg.temperature_end - cfg.temperature) * progress


def output_loss(step: Step, cfg: LogitDistillationConfig, who: str = _NAME) -> torch.Tensor:
    """The unweighted distillation loss between the student's and the teacher's outputs."""
    student, teacher = logits_of(step.outputs, who), logits_of(step.teacher_outputs(), who)
    if student.shape != teacher.shape:
        raise shape_mismatch(who, "outputs", student.shape, teacher.shape,
                             "add a projection: use distillation.features (it learns one between "
                             "hidden layers of different widths) or give both the same output size")
    mask = padding_mask(step.inputs, step.targets, student.shape[:-1], cfg.ignore_index)
    if cfg.loss == "kl":
        return soft_target_loss(student, teacher, scheduled_temperature(cfg, step.index), mask=mask)
    return feature_loss(student, teacher, cfg.loss, mask=mask)


@register(LogitDistillationConfig)
class LogitDistillation(TrainedMethod):
    """Adds the soft-target term to the training loss."""

    needs_teacher = True
    cfg: LogitDistillationConfig

    def task_weight(self) -> float:
        """Hard labels keep ``1 - alpha`` of the task loss."""
        return 1.0 - self.cfg.alpha

    def extra_loss(self, step: Step) -> torch.Tensor:
        """``alpha`` times the soft-target (or embedding) loss."""
        return self.cfg.alpha * output_loss(step, self.cfg)
