"""Gradual magnitude pruning on the cubic AGP schedule (Zhu & Gupta 2017).

Masks start all ones; every ``frequency`` steps between ``start`` and ``end`` they are
recomputed from the weights' magnitudes so that sparsity follows
``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t_end - t0))^3``: fast at first, while the
network has many redundant weights, slowly near the end.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, Step, TrainedMethod, check, register, surgery
from torchslim.pruning._unstructured import (
    Scope,
    base_weight,
    layer_sparsity,
    masks_for,
    prunable_layers,
    weight_of,
)

__all__ = ["GradualPruning", "GradualPruningConfig", "agp_sparsity", "schedule_bounds"]

logger = logging.getLogger(__name__)

_NAME = "pruning.gradual"


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradualPruningConfig(MethodConfig):
    """Raise sparsity during training on the cubic schedule of automated gradual pruning.

    Paper: Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning for
    model compression", 2017, https://arxiv.org/abs/1710.01878

    Args:
        sparsity: Final fraction of the selected weights set to zero, in [0, 1).
        initial_sparsity: Sparsity applied at ``start``, in [0, ``sparsity``].
        start: When pruning begins, as a fraction of the stage's training steps.
        end: When ``sparsity`` is reached, as a fraction of the stage's steps (the rest of
            the stage fine-tunes at the final sparsity).
        frequency: Recompute the masks every this many optimizer steps.
        scope: ``layer`` brings every layer to the scheduled sparsity; ``global`` ranks all
            selected weights together.
        criterion: What ranks the weights: ``magnitude`` (``|w|``).
        targets: Layer selectors: an fqn, ``re:<regex>`` or ``type:<ClassName>``.
        ignore: Selectors removed from ``targets``.

    Recipe:
        - method: pruning.gradual
          sparsity: 0.8
          start: 0.0
          end: 0.8
          frequency: 10

    Lifecycle:
        on_start: add an all-ones mask to every selected weight (and apply
            ``initial_sparsity`` when ``start`` is 0).
        on_step: after optimizer steps t0, t0 + frequency, ... and at t_end, recompute the
            masks for the scheduled sparsity (t counts finished steps; t0 = start * total,
            t_end = end * total, rounded; a nonzero fraction is at least one step). Pruned
            weights stay pruned.
        on_end: make sure the final sparsity is reached; the stage's finalize bakes the
            masks into the weights.

    Notes:
        Resuming restores the masks (they are part of the model's state) and the schedule
        position, so a resumed run ends bit-identical to an uninterrupted one. Tied weights
        are skipped. The saved file stores the zeros compactly; dense kernels run no faster.
    """

    name: ClassVar[str] = _NAME
    sparsity: float = 0.5
    initial_sparsity: float = 0.0
    start: float = 0.0
    end: float = 0.8
    frequency: int = 10
    scope: Scope = "layer"
    criterion: Literal["magnitude"] = "magnitude"
    targets: tuple[str, ...] = ("type:Linear", "type:Conv2d", "type:Conv1d")
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check(0.0 <= self.sparsity < 1.0, f"{_NAME}: sparsity must be in [0, 1), got {self.sparsity}")
        check(0.0 <= self.initial_sparsity <= self.sparsity,
              f"{_NAME}: initial_sparsity must be in [0, sparsity={self.sparsity}], "
              f"got {self.initial_sparsity}")
        check(0.0 <= self.start <= self.end <= 1.0,
              f"{_NAME}: need 0 <= start <= end <= 1, got start={self.start}, end={self.end}")
        check(self.frequency >= 1, f"{_NAME}: frequency must be >= 1 step, got {self.frequency}")
        check(self.scope in ("layer", "global"),
              f"{_NAME}: scope must be 'layer' or 'global', got {self.scope!r}")
        check(self.criterion == "magnitude",
              f"{_NAME}: criterion must be 'magnitude', got {self.criterion!r}")


def schedule_bounds(cfg: GradualPruningConfig, total: int) -> tuple[int, int]:
    """(t0, t_end) in finished optimizer steps for a stage of ``total`` steps."""

    def at(fraction: float) -> int:
        return 0 if fraction == 0 else min(total, max(1, round(fraction * total)))

    t0 = at(cfg.start)
    return t0, max(t0, at(cfg.end))


def agp_sparsity(t: int, *, initial: float, final: float, t0: int, t_end: int) -> float:
    """Scheduled sparsity after ``t`` finished steps (Zhu & Gupta 2017, eq. 1); 0 before ``t0``."""
    if t < t0:
        return 0.0
    if t >= t_end:
        return final
    progress = (t - t0) / (t_end - t0)
    return final + (initial - final) * (1.0 - progress) ** 3


@register(GradualPruningConfig)
class GradualPruning(TrainedMethod):
    """Updates magnitude masks on the AGP schedule as training goes."""

    cfg: GradualPruningConfig

    def __init__(self, cfg: GradualPruningConfig) -> None:
        super().__init__(cfg)
        self._fqns: tuple[str, ...] = ()
        self._sparsity = 0.0  # sparsity of the masks now in place
        self._last_update = -1  # finished steps at the last mask update

    def on_start(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Add all-ones masks; prune to the sparsity due at step 0."""
        layers = prunable_layers(model, self.cfg.targets, self.cfg.ignore, _NAME)
        for module in layers.values():
            surgery.add_mask(module, "weight", torch.ones_like(weight_of(module), dtype=torch.bool))
        self._fqns = tuple(layers)
        # At t = 0 the bounds do not depend on the total: t0 == 0 iff start == 0, same for t_end.
        self._maybe_update(model, 0, total=1)
        return model

    def on_step(self, step: Step) -> None:
        """Recompute the masks when step ``index + 1`` is on the schedule."""
        if step.total is None:
            return  # the caller did not say how long the stage is: on_end prunes at once
        self._maybe_update(step.model, step.index + 1, total=step.total)

    def on_end(self, model: nn.Module, ctx: Context) -> Outcome:
        """Reach the final sparsity if the schedule did not; report per-layer sparsity."""
        if self._fqns and self._sparsity != self.cfg.sparsity:
            logger.warning("%s: training ended at sparsity %.3f before the schedule did; pruning to %.3f now",
                           _NAME, self._sparsity, self.cfg.sparsity)
            self._prune(model, self.cfg.sparsity, self._last_update)
        per_layer, overall = layer_sparsity(model, self._fqns)
        return Outcome(model=model, touched=self._fqns, layers=per_layer, stats={"sparsity": overall})

    def state_dict(self) -> dict[str, Any]:
        """The schedule position; the masks themselves are in the model's state."""
        return {"sparsity": self._sparsity, "last_update": self._last_update}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self._sparsity = float(state["sparsity"])
        self._last_update = int(state["last_update"])

    def _maybe_update(self, model: nn.Module, t: int, *, total: int) -> None:
        t0, t_end = schedule_bounds(self.cfg, total)
        due = t0 <= t <= t_end and ((t - t0) % self.cfg.frequency == 0 or t == t_end)
        if not due or not self._fqns:
            return
        target = agp_sparsity(t, initial=self.cfg.initial_sparsity, final=self.cfg.sparsity,
                              t0=t0, t_end=t_end)
        self._prune(model, target, t)

    @torch.no_grad()
    def _prune(self, model: nn.Module, sparsity: float, t: int) -> None:
        scores = {}
        for fqn in self._fqns:
            module = model.get_submodule(fqn)
            mask = surgery.get_mask(module, "weight")
            magnitude = base_weight(module).detach().abs().float()
            # Pruned weights score -1, below any kept weight (even an exact zero): they stay pruned.
            scores[fqn] = magnitude if mask is None else torch.where(mask.bool(), magnitude, -1.0)
        for fqn, mask in masks_for(scores, sparsity, self.cfg.scope).items():
            surgery.add_mask(model.get_submodule(fqn), "weight", mask)
        self._sparsity, self._last_update = sparsity, t
        logger.debug("%s: step %d, sparsity %.4f", _NAME, t, sparsity)
