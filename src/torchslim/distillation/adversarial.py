"""Adversarial distillation: a discriminator tells teacher from student outputs; the student
learns to fool it, alongside the soft-target loss (GAN-style knowledge distillation).

Paper: Xu, Hsu, Huang 2017, https://arxiv.org/abs/1709.00513
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, Step, TrainedMethod, check, register
from torchslim.distillation._outputs import frozen_teacher, logits_of, padding_mask
from torchslim.distillation.logits import LogitDistillationConfig, output_loss, scheduled_temperature

__all__ = ["AdversarialDistillation", "AdversarialDistillationConfig", "discriminator", "fooling_loss"]

_NAME = "distillation.adversarial"


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdversarialDistillationConfig(MethodConfig):
    """Train the student to fool a discriminator between its and the teacher's outputs.

    Paper: Xu, Hsu, Huang, "Training Shallow and Thin Networks for Acceleration via Knowledge
    Distillation with Conditional Adversarial Networks", 2017, https://arxiv.org/abs/1709.00513

    Args:
        temperature: Softmax temperature of the soft-target term and of the probabilities
            the discriminator sees (> 0).
        alpha: Weight of the soft-target term; the hard-label task loss gets ``1 - alpha``.
        weight: Weight of the adversarial (fooling) term.
        hidden: Width of the discriminator's hidden layer.
        lr: Learning rate of the discriminator's own Adam optimizer.

    Recipe:
        - method: distillation.adversarial
          temperature: 4.0
          alpha: 0.9
          weight: 0.1

    Lifecycle:
        on_start: keeps the seed; the discriminator (Linear, LeakyReLU, Linear) is built
            at the first step, when the output width is known.
        extra_loss: first one discriminator step with its own Adam on detached outputs
            (teacher rows labelled 1, student rows 0; binary cross-entropy), then
            ``alpha * T^2 * KL + weight * (-log D(student) + log D(teacher))``. The teacher
            term is a constant baseline: it makes the fooling term 0 when the student's
            outputs equal the teacher's, without changing its gradient.
        task_weight: ``1 - alpha``.
        state_dict: the discriminator and its optimizer, checkpointed with the stage.
        on_end: reports the discriminator's last accuracy; the discriminator is dropped.

    Notes:
        Works on classifier outputs ``(B, C)`` and per-token sequence outputs ``(B, T, V)``
        (padding left out, see ``distillation.logits``). To list it with
        ``distillation.logits`` in one stage, set ``alpha: 0`` on one of them. Under
        DistributedDataParallel each process trains its own discriminator.
    """

    name: ClassVar[str] = _NAME
    temperature: float = 4.0
    alpha: float = 0.9
    weight: float = 0.1
    hidden: int = 64
    lr: float = 1.0e-3

    def __post_init__(self) -> None:
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        check(0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}")
        check(self.weight >= 0, f"{_NAME}: weight must be >= 0, got {self.weight}")
        check(self.hidden >= 1, f"{_NAME}: hidden must be >= 1, got {self.hidden}")
        check(self.lr > 0, f"{_NAME}: lr must be > 0, got {self.lr}")


def discriminator(width: int, hidden: int) -> nn.Sequential:
    """A small MLP scoring a probability vector: positive logit = teacher-like."""
    return nn.Sequential(nn.Linear(width, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))


def fooling_loss(disc: nn.Module, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean(-log D(student)) - mean(-log D(teacher))``: 0 when the rows are equal."""
    return F.softplus(-disc(student)).mean() - F.softplus(-disc(teacher.detach())).mean()


@register(AdversarialDistillationConfig)
class AdversarialDistillation(TrainedMethod):
    """Soft targets plus a discriminator the student learns to fool."""

    needs_teacher = True
    cfg: AdversarialDistillationConfig

    def __init__(self, cfg: AdversarialDistillationConfig) -> None:
        super().__init__(cfg)
        self._soft = LogitDistillationConfig(temperature=cfg.temperature, alpha=cfg.alpha)
        self._seed = 0
        self._device = torch.device("cpu")
        self.disc: nn.Sequential | None = None
        self._opt: torch.optim.Optimizer | None = None
        self.accuracy = float("nan")

    def on_start(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Check for a teacher and keep the seed of the discriminator's initialisation."""
        frozen_teacher(ctx, model, _NAME)
        self._seed, self._device = ctx.seed, torch.device(ctx.device)
        return model

    def _build(self, width: int, device: torch.device) -> nn.Sequential:
        if self.disc is None:
            with torch.random.fork_rng(devices=[]):  # seeded; the global RNG is left alone
                torch.manual_seed(self._seed)
                self.disc = discriminator(width, self.cfg.hidden).to(device)
            self._opt = torch.optim.Adam(self.disc.parameters(), lr=self.cfg.lr, betas=(0.5, 0.999))
        return self.disc

    def task_weight(self) -> float:
        """Hard labels keep ``1 - alpha`` of the task loss."""
        return 1.0 - self.cfg.alpha

    def _rows(self, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        student, teacher = logits_of(step.outputs, _NAME), logits_of(step.teacher_outputs(), _NAME)
        t = scheduled_temperature(self._soft, step.index)
        mask = padding_mask(step.inputs, step.targets, student.shape[:-1], self._soft.ignore_index)
        s_p = F.softmax(student / t, dim=-1)
        t_p = F.softmax(teacher.detach() / t, dim=-1)
        if mask is not None:
            return s_p[mask], t_p[mask]  # (B, T, V) -> (real tokens, V)
        return s_p.reshape(-1, s_p.shape[-1]), t_p.reshape(-1, t_p.shape[-1])

    def discriminator_step(self, student: torch.Tensor, teacher: torch.Tensor) -> float:
        """One Adam step of the discriminator on detached rows; its accuracy before the step."""
        disc = self._build(student.shape[-1], student.device)
        assert self._opt is not None  # set by _build
        disc.requires_grad_(True)
        real, fake = disc(teacher.detach()), disc(student.detach())
        loss = (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
        self._opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self._opt.step()
        self._opt.zero_grad(set_to_none=True)  # so the student's backward leaves no trace here
        correct = (real > 0).sum() + (fake <= 0).sum()
        return float(correct) / (len(real) + len(fake))

    def extra_loss(self, step: Step) -> torch.Tensor:
        """Discriminator step, then ``alpha * soft-target + weight * fooling``."""
        soft = output_loss(step, self._soft, _NAME)  # also checks that the shapes agree
        s_rows, t_rows = self._rows(step)
        if len(s_rows) == 0:
            return self.cfg.alpha * soft
        self.accuracy = self.discriminator_step(s_rows, t_rows)
        assert self.disc is not None
        self.disc.requires_grad_(False)  # the student's loss must not train the discriminator
        return self.cfg.alpha * soft + self.cfg.weight * fooling_loss(self.disc, s_rows, t_rows)

    def on_end(self, model: nn.Module, ctx: Context) -> Outcome:
        """Report the discriminator's last accuracy."""
        return Outcome(model=model, stats={"discriminator_accuracy": self.accuracy})

    def state_dict(self) -> dict[str, Any]:
        """The discriminator and its optimizer (empty before the first step)."""
        if self.disc is None or self._opt is None:
            return {}
        return {"discriminator": self.disc.state_dict(), "optimizer": self._opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild the discriminator from a checkpoint."""
        if not state:
            return
        weight = state["discriminator"]["0.weight"]  # (hidden, width)
        self._build(int(weight.shape[1]), self._device).load_state_dict(state["discriminator"])
        assert self._opt is not None
        self._opt.load_state_dict(state["optimizer"])
