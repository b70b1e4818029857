"""What a method did: the (possibly new) model, touched layers, structure changes, stats."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

__all__ = ["Outcome"]


@dataclasses.dataclass
class Outcome:
    """Result of one method.

    Attributes:
        model: The model to continue with; may be a new object.
        touched: Fqns of the layers the method changed.
        structure: Fqn -> description of a changed architecture (new shapes, swapped types);
            ``export`` uses the fqns to record how to rebuild the model.
        stats: Numbers for the report, e.g. ``{"sparsity": 0.5}``.
        layers: Per-layer numbers for the report, e.g. ``{"conv1": {"sparsity": 0.4}}``.
        fronts: Trade-off curves for the report, ``"x name|y name" -> [[x, y], ...]`` (e.g. a
            Pareto front of size vs error); each is drawn in ``plots/pareto.png``.
    """

    model: nn.Module
    touched: tuple[str, ...] = ()
    structure: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    stats: dict[str, float] = dataclasses.field(default_factory=dict)
    layers: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    fronts: dict[str, list[list[float]]] = dataclasses.field(default_factory=dict)
