from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from torchslim.errors import ConfigError
from torchslim.measure.latency import measure_latency, model_latency


def test_statistics_are_positive_and_ordered() -> None:
    calls = []
    stats = measure_latency(lambda: calls.append(sum(range(2000))), warmup=3, repeats=12)
    assert len(calls) == 15 and stats["repeats"] == 12
    assert 0 < stats["latency_min_ms"] <= stats["latency_ms"] <= stats["latency_p90_ms"]


def test_latency_reflects_the_work() -> None:
    stats = measure_latency(lambda: time.sleep(0.002), warmup=1, repeats=5)
    assert 2.0 <= stats["latency_min_ms"] < 50.0


def test_min_seconds_extends_the_repeats() -> None:
    stats = measure_latency(lambda: time.sleep(0.001), warmup=0, repeats=2, min_seconds=0.03)
    assert stats["repeats"] >= 10


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="repeats=0"):
        measure_latency(lambda: None, repeats=0)


class _Probe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.training, torch.is_inference_mode_enabled()))
        return self.fc(x)


@pytest.mark.parametrize("training", [True, False])
def test_model_latency_runs_in_eval_inference_mode_and_restores(training: bool) -> None:
    model = _Probe().train(training)
    stats = model_latency(model, torch.randn(4, 16), warmup=2, repeats=5)
    assert stats["latency_ms"] > 0 and stats["repeats"] == 5
    assert set(model.seen) == {(False, True)} and len(model.seen) == 7
    assert model.training is training and model.fc.training is training
