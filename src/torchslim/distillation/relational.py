"""Relational knowledge distillation: match distances and angles between samples (RKD).

Paper: Park et al. 2019, https://arxiv.org/abs/1904.05068
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, Step, TrainedMethod, check, register
from torchslim.distillation._outputs import frozen_teacher, logits_of, shape_mismatch
from torchslim.distillation._taps import Recorder, Tap, parse_pairs, removed_on_error
from torchslim.distillation.losses import rkd_angle_loss, rkd_distance_loss

__all__ = ["RelationalDistillation", "RelationalDistillationConfig"]

_NAME = "distillation.relational"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RelationalDistillationConfig(MethodConfig):
    """Match the geometry of a batch: distances and angles between samples' embeddings.

    Paper: Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019,
    https://arxiv.org/abs/1904.05068

    Args:
        pairs: ``"student_fqn:teacher_fqn"`` (or one fqn for both): layers whose outputs are
            the embeddings. Empty: the models' outputs. Widths may differ.
        distance_weight: Weight of the distance-wise loss (Huber loss between pairwise
            distances, each divided by its batch mean).
        angle_weight: Weight of the angle-wise loss (Huber loss between the cosines of the
            angles formed by every triplet of samples).

    Recipe:
        - method: distillation.relational
          distance_weight: 25.0
          angle_weight: 50.0

    Lifecycle:
        on_start: with ``pairs``, hooks record the named layers' outputs on the student and
            on the teacher.
        extra_loss: ``distance_weight * L_dist + angle_weight * L_angle``, averaged over
            pairs; each sample's embedding is flattened. The teacher's side comes from its
            one shared pass per step, without gradients.
        on_end: removes every hook.

    Notes:
        Needs batches of at least 2 (distances) and 3 (angles) samples; smaller batches add
        nothing. Both losses are invariant to the scale of either embedding. Angle memory
        grows as ``batch^2 * width``. Defaults are the paper's (25 and 50).
    """

    name: ClassVar[str] = _NAME
    pairs: tuple[str, ...] = ()
    distance_weight: float = 25.0
    angle_weight: float = 50.0

    def __post_init__(self) -> None:
        check(self.distance_weight >= 0, f"{_NAME}: distance_weight must be >= 0, got {self.distance_weight}")
        check(self.angle_weight >= 0, f"{_NAME}: angle_weight must be >= 0, got {self.angle_weight}")
        check(self.distance_weight + self.angle_weight > 0,
              f"{_NAME}: distance_weight and angle_weight are both 0; nothing would be distilled")
        parse_pairs(self.pairs, _NAME)


def rkd_loss(student: torch.Tensor, teacher: torch.Tensor, cfg: RelationalDistillationConfig) -> torch.Tensor:
    """``distance_weight * L_dist + angle_weight * L_angle`` between two batches of embeddings."""
    if student.shape[0] != teacher.shape[0]:
        raise shape_mismatch(_NAME, "embeddings", student.shape, teacher.shape,
                             "their batch sizes must agree (widths may differ)")
    loss = student.new_zeros(())
    if cfg.distance_weight:
        loss = loss + cfg.distance_weight * rkd_distance_loss(student, teacher)
    if cfg.angle_weight:
        loss = loss + cfg.angle_weight * rkd_angle_loss(student, teacher)
    return loss


@register(RelationalDistillationConfig)
class RelationalDistillation(TrainedMethod):
    """Adds the RKD distance and angle losses."""

    needs_teacher = True
    cfg: RelationalDistillationConfig

    def __init__(self, cfg: RelationalDistillationConfig) -> None:
        super().__init__(cfg)
        self._student = Recorder(_NAME)
        self._teacher = Recorder(_NAME)
        self._keys: list[str] = []

    def on_start(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Hook the named layers (none when the outputs are compared)."""
        teacher = frozen_teacher(ctx, model, _NAME)
        with removed_on_error(self._student, self._teacher):
            for s, t in parse_pairs(self.cfg.pairs, _NAME):
                key = f"{s}:{t}"
                self._student.tap(model, Tap(s), key, "student")
                self._teacher.tap(teacher, Tap(t), key, "teacher")
                self._keys.append(key)
        return model

    def extra_loss(self, step: Step) -> torch.Tensor:
        """RKD between the outputs, or the mean over the named pairs."""
        with removed_on_error(self._student, self._teacher):
            teacher_out = step.teacher_outputs()
            if not self._keys:
                return rkd_loss(logits_of(step.outputs, _NAME), logits_of(teacher_out, _NAME), self.cfg)
            terms = [rkd_loss(self._student.get(k, "student"), self._teacher.get(k, "teacher"), self.cfg)
                     for k in self._keys]
        return torch.stack(terms).mean()

    def on_step(self, step: Step) -> None:
        """Drop this step's activations."""
        self._student.clear()
        self._teacher.clear()

    def on_end(self, model: nn.Module, ctx: Context) -> Outcome:
        """Remove every hook."""
        self._student.remove()
        self._teacher.remove()
        return Outcome(model=model, touched=tuple(k.split(":")[0] for k in self._keys))
