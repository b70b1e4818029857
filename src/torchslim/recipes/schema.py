"""Recipe, Stage and TrainSpec: plain frozen data describing a compression run."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from torchslim.core.config import MethodConfig, check

__all__ = ["EXPORTS", "MEASURES", "Recipe", "Stage", "TrainSpec"]

MEASURES = ("accuracy", "params", "size", "flops", "latency")
EXPORTS = ("checkpoint", "onnx")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSpec:
    """How a stage trains (fine-tuning, distillation, QAT, gradual pruning).

    Args:
        epochs: Passes over the training data.
        steps: Optimizer steps in total; replaces ``epochs`` when set (data-free methods).
        lr: Peak learning rate. Unset: the largest ``default_lr`` of the stage's trained
            methods (``distillation.datafree``: 2e-3), else 1e-3.
        batch_size: Batch size when the training data is a Dataset (a DataLoader keeps its own).
        optimizer: ``adam``, ``adamw`` or ``sgd``.
        weight_decay: L2 penalty / decoupled weight decay.
        schedule: Learning-rate schedule: ``cosine`` decay to zero or ``constant``.
        grad_clip: Clip the gradient norm to this value when set.
        precision: ``fp32``, or ``bf16``: forward passes (the model's, the teacher's) and
            losses run under bfloat16 autocast while the weights, gradients and optimizer
            state stay float32 (mixed precision; about 2-3x faster matrix products on CPUs
            with AVX-512 BF16 or AMX and on recent GPUs, slower on CPUs without them).
    """

    name: ClassVar[str] = "train"
    epochs: int = 1
    steps: int | None = None
    lr: float | None = None
    batch_size: int = 128
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float | None = None
    precision: Literal["fp32", "bf16"] = "fp32"

    def __post_init__(self) -> None:
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        check(self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(self.grad_clip is None or self.grad_clip > 0,
              f"grad_clip must be > 0, got {self.grad_clip}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for YAML."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
    """One step of a recipe: one-shot methods in order, then training, then finalize."""

    name: str
    methods: tuple[MethodConfig, ...]
    train: TrainSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for YAML."""
        out: dict[str, Any] = {"name": self.name, "methods": [m.to_dict() for m in self.methods]}
        if self.train is not None:
            out["train"] = self.train.to_dict()
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """An ordered list of stages plus what to measure and export."""

    stages: tuple[Stage, ...]
    version: int = 1
    model: str | None = None
    data: str | None = None
    measure: tuple[str, ...] = MEASURES
    export: tuple[str, ...] = ("checkpoint",)

    @classmethod
    def single(cls, cfg: MethodConfig, train: TrainSpec | None = None) -> Recipe:
        """A one-stage recipe running one method (with ``train`` for trained methods)."""
        return cls(stages=(Stage(name=cfg.name.replace(".", "-"), methods=(cfg,), train=train),))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for YAML; ``load_recipe(dump_recipe(r)) == r``."""
        out: dict[str, Any] = {"version": self.version}
        if self.model is not None:
            out["model"] = self.model
        if self.data is not None:
            out["data"] = self.data
        out["stages"] = [s.to_dict() for s in self.stages]
        out["measure"] = list(self.measure)
        out["export"] = list(self.export)
        return out
