"""RunRecord: plain data describing a run, the only input of every report renderer."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

__all__ = ["DeploymentRow", "MetricsRow", "OutcomeRow", "RunRecord", "SampleRow"]


@dataclasses.dataclass
class MetricsRow:
    """Measurements of the model at one point: ``before`` or after a stage."""

    label: str
    values: dict[str, float]


@dataclasses.dataclass
class OutcomeRow:
    """What one method did in one stage."""

    stage: str
    method: str
    config: dict[str, Any]
    touched: list[str]
    stats: dict[str, float]
    layers: dict[str, dict[str, float]]
    seconds: float
    fronts: dict[str, list[list[float]]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DeploymentRow:
    """An exported artifact measured in the engine that runs it (e.g. int8 ONNX in ORT)."""

    name: str
    engine: str
    values: dict[str, float]
    note: str = ""


@dataclasses.dataclass
class SampleRow:
    """A model's output for one fixed input, before and after compression (e.g. a generation)."""

    prompt: str
    before: str
    after: str


@dataclasses.dataclass
class RunRecord:
    """Resolved recipe, environment, metrics per stage, method outcomes, deployments and samples.

    ``samples`` is optional: records written before it existed read back with none.
    """

    recipe: dict[str, Any]
    environment: dict[str, Any]
    metrics: list[MetricsRow] = dataclasses.field(default_factory=list)
    outcomes: list[OutcomeRow] = dataclasses.field(default_factory=list)
    deployments: list[DeploymentRow] = dataclasses.field(default_factory=list)
    structure: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    completed_stages: int = 0
    samples: list[SampleRow] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Indented JSON text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, default=str)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunRecord:
        """Inverse of ``to_dict``."""
        return cls(
            recipe=raw["recipe"],
            environment=raw["environment"],
            metrics=[MetricsRow(**m) for m in raw.get("metrics", [])],
            outcomes=[OutcomeRow(**o) for o in raw.get("outcomes", [])],
            deployments=[DeploymentRow(**d) for d in raw.get("deployments", [])],
            structure=raw.get("structure", {}),
            completed_stages=raw.get("completed_stages", 0),
            samples=[SampleRow(**s) for s in raw.get("samples", [])],
        )

    def before(self) -> dict[str, float]:
        """Metrics before the first stage."""
        return self.metrics[0].values if self.metrics else {}

    def after(self) -> dict[str, float]:
        """Metrics after the last completed stage."""
        return self.metrics[-1].values if self.metrics else {}
