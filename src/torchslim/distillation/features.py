"""Feature (hint) distillation: student layers regress teacher layers (FitNets).

Paper: Romero et al. 2015, https://arxiv.org/abs/1412.6550
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, Step, TrainedMethod, check, register
from torchslim.distillation._outputs import frozen_teacher, padding_mask, shape_mismatch
from torchslim.distillation._taps import (
    Recorder,
    Tap,
    last_layer,
    mapped_taps,
    parse_pairs,
    probe,
    removed_on_error,
    sample_inputs,
)
from torchslim.distillation.losses import feature_loss

__all__ = ["FeatureDistillation", "FeatureDistillationConfig", "channel_dim", "make_projection"]

logger = logging.getLogger(__name__)

_NAME = "distillation.features"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeatureDistillationConfig(MethodConfig):
    """Pull student activations towards the teacher's at paired layers (hints).

    Paper: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015,
    https://arxiv.org/abs/1412.6550

    Args:
        pairs: ``"student_fqn:teacher_fqn"`` (or one fqn naming both) per hint, compared at
            the modules' outputs. Empty: the layers come from ``mapping``.
        mapping: How layers are paired when ``pairs`` is empty. ``auto``: the input of each
            model's last Linear/Conv layer (the last hidden features). ``uniform``: the
            ``targets`` layers of the student spread evenly over the teacher's (student with
            fewer layers; the last meets the last). ``last``: the student's ``targets`` layers
            against the teacher's last ones.
        targets: Selectors of the layers that ``uniform`` and ``last`` pair, applied to both
            models (e.g. ``re:encoder\\.layer\\.\\d+``).
        loss: ``mse`` or ``cosine`` (``1 - cos`` along the channels).
        weight: Multiplier on the hint loss (the mean over pairs), added to the task loss.

    Recipe:
        - method: distillation.features
          pairs: ["body.4:body.5"]  # student layer : teacher layer
          loss: mse
          weight: 1.0

    Lifecycle:
        on_start: hooks record the paired activations of the student and of the teacher;
            one forward pass of both on ``ctx.example_inputs`` (or the first training batch,
            in eval mode) measures the widths, and a learned projection (1x1 convolution for
            ``(B, C, H, W)`` maps, linear otherwise, no bias) maps the student's channels to
            the teacher's where they differ.
        parameters: the projections, trained with the student by the stage's optimizer.
        extra_loss: ``weight * mean over pairs of loss(project(student), teacher)``; the
            teacher's activations come from its one shared pass per step
            (``step.teacher_outputs``), without gradients.
        on_end: removes every hook; the projections are dropped (they are checkpointed
            with the stage while it runs).

    Notes:
        Channels are dimension 1 of 4-D activations and the last dimension otherwise; all
        other dimensions must agree. Padding tokens (``attention_mask`` of dict inputs) are
        left out of sequence features. Tied or quantized layers are fine: hooks only read.
    """

    name: ClassVar[str] = _NAME
    pairs: tuple[str, ...] = ()
    mapping: Literal["auto", "uniform", "last"] = "auto"
    targets: tuple[str, ...] = ()
    loss: Literal["mse", "cosine"] = "mse"
    weight: float = 1.0

    def __post_init__(self) -> None:
        check(self.weight >= 0, f"{_NAME}: weight must be >= 0, got {self.weight}")
        check(self.loss in ("mse", "cosine"), f"{_NAME}: loss must be 'mse' or 'cosine', got {self.loss!r}")
        check(self.mapping in ("auto", "uniform", "last"),
              f"{_NAME}: mapping must be auto, uniform or last, got {self.mapping!r}")
        parse_pairs(self.pairs, _NAME)


def channel_dim(features: torch.Tensor) -> int:
    """Where the channels are: 1 for ``(B, C, H, W)`` maps, the last dimension otherwise."""
    return 1 if features.dim() == 4 else -1


def make_projection(student: torch.Tensor, teacher: torch.Tensor) -> nn.Module | None:
    """A bias-free map from the student's channels to the teacher's; None when widths agree."""
    dim = channel_dim(teacher)
    c_s, c_t = student.shape[dim], teacher.shape[dim]
    if c_s == c_t:
        return None
    if teacher.dim() == 4:
        return nn.Conv2d(c_s, c_t, kernel_size=1, bias=False)
    return nn.Linear(c_s, c_t, bias=False)


def _check_shapes(student: torch.Tensor, teacher: torch.Tensor, where: str) -> None:
    dim = channel_dim(teacher) % max(teacher.dim(), 1)
    same_rank = student.dim() == teacher.dim()
    rest_s = [n for i, n in enumerate(student.shape) if i not in (0, dim)]
    rest_t = [n for i, n in enumerate(teacher.shape) if i not in (0, dim)]
    if not same_rank or rest_s != rest_t:
        raise shape_mismatch(where, "features", student.shape, teacher.shape,
                             f"a projection maps only the channels (dimension {dim}); pair layers "
                             "whose other dimensions agree")


@register(FeatureDistillationConfig)
class FeatureDistillation(TrainedMethod):
    """Adds hint losses between paired student and teacher activations."""

    needs_teacher = True
    cfg: FeatureDistillationConfig

    def __init__(self, cfg: FeatureDistillationConfig) -> None:
        super().__init__(cfg)
        self._student = Recorder(_NAME)
        self._teacher = Recorder(_NAME)
        self._names: list[str] = []
        self.projections = nn.ModuleDict()

    def _taps(self, model: nn.Module, teacher: nn.Module) -> list[tuple[Tap, Tap]]:
        if self.cfg.pairs:
            return [(Tap(s), Tap(t)) for s, t in parse_pairs(self.cfg.pairs, _NAME)]
        if self.cfg.mapping == "auto":
            return [(Tap(last_layer(model, _NAME), "input"), Tap(last_layer(teacher, _NAME), "input"))]
        return mapped_taps(model, teacher, self.cfg.targets, self.cfg.mapping, _NAME)

    def on_start(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Hook both models, measure widths once and build the projections."""
        teacher = frozen_teacher(ctx, model, _NAME)
        with removed_on_error(self._student, self._teacher):
            taps = self._taps(model, teacher)
            self._names = [f"{s.fqn}:{t.fqn}" for s, t in taps]
            for key, (s, t) in zip(self._names, taps):
                self._student.tap(model, s, key, "student")
                self._teacher.tap(teacher, t, key, "teacher")
            inputs = sample_inputs(ctx, _NAME)
            probe(model, inputs)
            probe(teacher, inputs)
            self._build_projections(ctx.seed)
        self._student.clear()
        self._teacher.clear()
        return model

    def _build_projections(self, seed: int) -> None:
        with torch.random.fork_rng(devices=[]):  # seeded init that leaves the global RNG alone
            torch.manual_seed(seed)
            for key in self._names:
                s, t = self._student.get(key, "student"), self._teacher.get(key, "teacher")
                _check_shapes(s, t, f"{_NAME} pair {key!r}")
                projection = make_projection(s, t)
                if projection is not None:
                    self.projections[_slot(key)] = projection.to(device=t.device, dtype=s.dtype)
                    logger.info("%s: projection %s for %s", _NAME, projection, key)

    def parameters(self) -> list[nn.Parameter]:
        """The projections' weights."""
        return list(self.projections.parameters())

    def extra_loss(self, step: Step) -> torch.Tensor:
        """``weight * mean over pairs`` of the hint loss."""
        with removed_on_error(self._student, self._teacher):
            step.teacher_outputs()  # the shared teacher pass fills the teacher's hooks
            terms = [self._hint_loss(key, step.inputs) for key in self._names]
        return self.cfg.weight * torch.stack(terms).mean()

    def _hint_loss(self, key: str, inputs: Any) -> torch.Tensor:
        s, t = self._student.get(key, "student"), self._teacher.get(key, "teacher")
        if _slot(key) in self.projections:
            s = _project(self.projections[_slot(key)], s)
        if s.shape != t.shape:
            _check_shapes(s, t, f"{_NAME} pair {key!r}")
            raise shape_mismatch(f"{_NAME} pair {key!r}", "features", s.shape, t.shape,
                                 "their widths changed since the start of the stage")
        dim = channel_dim(t)
        mask = padding_mask(inputs, None, _without(t.shape, dim), None)
        return feature_loss(s, t, self.cfg.loss, channel_dim=dim, mask=mask)

    def on_step(self, step: Step) -> None:
        """Drop this step's activations."""
        self._student.clear()
        self._teacher.clear()

    def on_end(self, model: nn.Module, ctx: Context) -> Outcome:
        """Remove every hook."""
        self._student.remove()
        self._teacher.remove()
        touched = tuple(key.split(":")[0] for key in self._names)
        return Outcome(model=model, touched=touched, stats={"hints": float(len(self._names))})

    def state_dict(self) -> dict[str, Any]:
        """The projections' weights."""
        return {"projections": self.projections.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the projections."""
        self.projections.load_state_dict(state["projections"], strict=True)


def _slot(key: str) -> str:
    return key.replace(".", "/")  # ModuleDict keys cannot contain dots


def _without(shape: torch.Size, dim: int) -> torch.Size:
    dims = list(shape)
    del dims[dim]
    return torch.Size(dims)


def _project(projection: nn.Module, features: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = projection(features)
    return out
