"""lowrank.svd and lowrank.drone: exact on low-rank weights, data-aware beats plain SVD, reloads."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError, DataError
from torchslim.export import load, save
from torchslim.lowrank import DroneConfig, LowRankLinear, SVDConfig
from torchslim.lowrank.drone import drone_factors
from torchslim.lowrank.svd import svd_factors
from torchslim.measure.flops import count_flops
from torchslim.recipes import Recipe


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 80), nn.ReLU(), nn.Linear(80, 10))


def _correlated(n: int = 512, dim: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, dim, generator=g)  # inputs live near an 8-dimensional subspace
    return torch.randn(n, 8, generator=g) @ basis + 0.01 * torch.randn(n, dim, generator=g)


def test_a_weight_of_rank_r_is_reproduced_exactly_at_rank_r() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(48, 6) @ torch.randn(6, 64))
    x = torch.randn(20, 64)
    for first, second in (svd_factors(layer.weight, 6), drone_factors(layer.weight, x.T @ x / 20, 6, damping=0)):
        low = LowRankLinear.from_factors(first, second, layer.bias.detach())
        torch.testing.assert_close(low(x), layer(x), atol=1e-4, rtol=1e-4)


def test_drone_beats_svd_on_the_inputs_it_was_calibrated_on() -> None:
    torch.manual_seed(0)
    layer, x = nn.Linear(64, 64), _correlated()
    cov = x.T.double() @ x.double() / len(x)
    errors = {}
    for name, (first, second) in {"svd": svd_factors(layer.weight, 8),
                                  "drone": drone_factors(layer.weight, cov, 8)}.items():
        low = LowRankLinear.from_factors(first, second, layer.bias.detach())
        errors[name] = float((low(x) - layer(x)).pow(2).mean().detach())
    assert errors["drone"] < 0.1 * errors["svd"], errors


@pytest.mark.parametrize("cfg", [SVDConfig(rank=0.25), DroneConfig(rank=0.25)], ids=["svd", "drone"])
def test_methods_cut_flops_and_reload_exactly(cfg: SVDConfig | DroneConfig, tmp_path: Path) -> None:
    model = _mlp()
    x = _correlated(32)
    flops = count_flops(model, x)
    ctx = ts.Context(example_inputs=x, calib_data=[x])
    result = ts.compress(model, Recipe.single(cfg), ctx)
    assert {type(m) for m in result.model.modules()} >= {LowRankLinear}
    assert count_flops(result.model, x) < 0.6 * flops
    save(result, tmp_path / "run")
    torch.testing.assert_close(load(tmp_path / "run", _mlp)(x), result.model(x), rtol=0, atol=0)


def test_ranks_that_save_nothing_are_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = _mlp()
    with caplog.at_level(logging.WARNING):
        out = ts.apply(model, SVDConfig(rank=10), ts.Context())
    assert "rank 10 >= min(in, out) = 10" in caplog.text  # the 80 -> 10 classifier
    assert {f for f in out.record.outcomes[0].touched} == {"0", "2"}


def test_energy_keeps_the_smallest_sufficient_rank() -> None:
    weight = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.1]))
    first, _ = svd_factors(weight, 0.5, energy=0.95)  # 9 + 4 = 13 of 14.01 is 92.8%; 14 is 99.9%
    assert first.shape[0] == 3


def test_bad_input_is_reported() -> None:
    with pytest.raises(ConfigError, match="rank must be"):
        SVDConfig(rank=2.5)
    with pytest.raises(ConfigError, match="energy must be"):
        DroneConfig(energy=1.5)
    with pytest.raises(DataError, match="calibration data"):
        ts.apply(_mlp(), DroneConfig(), ts.Context())
