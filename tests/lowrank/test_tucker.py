"""lowrank.tucker: exact at full ranks, error falls with rank, HOSVD recovers known ranks, reloads."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError, RecipeError, UnsupportedModuleError
from torchslim.export import load, save
from torchslim.lowrank import TuckerConfig, TuckerConv2d
from torchslim.lowrank.tucker import tucker_factors
from torchslim.measure.flops import count_flops
from torchslim.recipes import Recipe, load_recipe


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)  # 1 input channel: Tucker never saves FLOPs here
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=2, dilation=2), nn.ReLU())
        self.point = nn.Conv2d(32, 32, 1)  # 1x1: not eligible
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.point(self.body(torch.relu(self.stem(x))))
        return self.head(h.mean(dim=(2, 3)))


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _CNN().eval()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("geometry", [{"stride": 1, "padding": 1}, {"stride": 2, "padding": 2, "dilation": 2},
                                      {"stride": (1, 2), "padding": "valid"}])
def test_full_ranks_reproduce_the_convolution(geometry: dict[str, object]) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, (3, 5), **geometry)  # type: ignore[arg-type]
    x = torch.randn(2, 8, 13, 14)
    tucker = TuckerConv2d.from_factors(conv, *tucker_factors(conv.weight, 100))  # capped at 8 and 12
    assert (tucker.rank_in, tucker.rank_out) == (8, 12)
    with torch.no_grad():
        torch.testing.assert_close(tucker(x), conv(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tucker.to_conv().weight, conv.weight, atol=1e-6, rtol=1e-5)


def test_error_falls_as_rank_rises() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(4, 16, 10, 10)
    with torch.no_grad():
        errors = [_relative(TuckerConv2d.from_factors(conv, *tucker_factors(conv.weight, r))(x), conv(x))
                  for r in (2, 4, 8, 12, 16)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.5 and errors[-1] < 1e-5, errors


def test_hosvd_finds_the_ranks_of_a_tucker_kernel_by_energy() -> None:
    torch.manual_seed(0)
    core = torch.randn(3, 5, 3, 3)  # rank_out 3, rank_in 5
    weight = torch.einsum("or,rshw,is->oihw", torch.randn(20, 3), core, torch.randn(24, 5))
    u_in, small_core, u_out = tucker_factors(weight, 0.5, energy=0.999999)
    assert (u_in.shape[1], u_out.shape[1]) == (5, 3)
    rebuilt = torch.einsum("or,rshw,is->oihw", u_out, small_core, u_in)
    torch.testing.assert_close(rebuilt, weight, atol=1e-4, rtol=1e-4)


def test_method_cuts_flops_and_params_and_reloads_exactly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, x = _cnn(), torch.randn(2, 1, 16, 16)
    flops, params = count_flops(model, x), sum(p.numel() for p in model.parameters())
    with caplog.at_level(logging.INFO, logger="torchslim"):
        result = ts.compress(model, Recipe.single(TuckerConfig(rank=0.5)), ts.Context(example_inputs=x))
    outcome = result.record.outcomes[0]
    assert set(outcome.touched) == {"body.0", "body.2"}
    assert outcome.layers["body.0"] == {"rank_in": 8, "rank_out": 16, "macs_ratio": pytest.approx((16 * 8 * 4 + 8 * 16 * 9 + 16 * 32) / (16 * 32 * 9), abs=1e-4)}
    assert "stem" in caplog.text and "would not reduce FLOPs" in caplog.text
    assert "point (1x1 kernel)" in caplog.text
    assert isinstance(result.model.body[2], TuckerConv2d) and type(result.model.stem) is nn.Conv2d
    assert count_flops(result.model, x) < 0.6 * flops
    assert sum(p.numel() for p in result.model.parameters()) < 0.6 * params
    save(result, tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "run", _cnn)(x), result.model(x), rtol=0, atol=0)


def test_bad_input_is_reported() -> None:
    for rank in (0, -1, 1.5, 2.5):
        with pytest.raises(ConfigError, match="rank must be"):
            TuckerConfig(rank=rank)
    with pytest.raises(ConfigError, match="energy must be"):
        TuckerConfig(energy=0)
    with pytest.raises(RecipeError, match="rank"):
        load_recipe("version: 1\nstages:\n  - name: s\n    methods:\n      - {method: lowrank.tucker, rank: high}\n")
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModuleError, match="expected a model with nn.Conv2d layers; found none"):
        ts.apply(mlp, TuckerConfig(), ts.Context())
    pointwise_and_depthwise = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=8))
    with pytest.raises(UnsupportedModuleError, match=r"groups=1 .*\(skipped: 0 \(1x1 kernel\); 1 \(groups=8\)"):
        ts.apply(pointwise_and_depthwise, TuckerConfig(), ts.Context())
