"""Adaptive BatchNorm: running statistics recomputed on calibration batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchslim.core.batchnorm import batchnorms, recalibrate_batchnorm
from torchslim.errors import ConfigError


class _Keyed(nn.Module):
    """Takes a dict of inputs, as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)
        self.norm = nn.BatchNorm2d(4, momentum=0.3)
        self.plain = nn.BatchNorm1d(4, track_running_stats=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.plain(self.norm(self.conv(pixels)).mean(dim=(2, 3)))


def test_statistics_are_the_average_over_the_batches_and_momentum_is_restored() -> None:
    torch.manual_seed(0)
    model = _Keyed().train()
    batches = [({"pixels": torch.randn(8, 2, 5, 5) * 3 + 2}, torch.zeros(8)) for _ in range(3)]
    assert batchnorms(model) == [model.norm]  # a BatchNorm without running statistics is left alone
    recalibrate_batchnorm(model, batches, "test")
    with torch.no_grad():
        outs = [model.conv(b[0]["pixels"]) for b in batches]
    mean = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.var(dim=(0, 2, 3)) for o in outs]).mean(0)  # unbiased per batch, as BatchNorm keeps it
    torch.testing.assert_close(model.norm.running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.norm.running_var, var, rtol=1e-5, atol=1e-5)
    assert model.norm.num_batches_tracked == 3 and model.norm.momentum == 0.3 and not model.training


def test_momentum_is_restored_when_the_forward_fails_and_empty_data_is_refused() -> None:
    model = _Keyed()
    with pytest.raises(RuntimeError):
        recalibrate_batchnorm(model, [{"pixels": torch.randn(2, 3, 5, 5)}], "test")  # 3 channels, conv wants 2
    assert model.norm.momentum == 0.3
    with pytest.raises(ConfigError, match="test: the calibration data for BatchNorm statistics is empty"):
        recalibrate_batchnorm(model, [], "test")
