"""lowrank.separable: exact at full multiplier, optimal per-channel error at m=1, fewer FLOPs, reloads."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError, RecipeError, UnsupportedModuleError
from torchslim.export import load, save
from torchslim.lowrank import SeparableConfig, SeparableConv2d
from torchslim.lowrank.separable import separable_factors
from torchslim.measure.flops import count_flops
from torchslim.recipes import Recipe, load_recipe


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(32, 8, 1), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()  # 12x12 inputs


def _separable(conv: nn.Conv2d, m: int) -> SeparableConv2d:
    return SeparableConv2d.from_factors(conv, *separable_factors(conv.weight, m))


@pytest.mark.parametrize("m", [6, 9, 12])
def test_a_multiplier_of_min_out_kk_or_more_is_exact(m: int) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1)  # min(out, K*K) = 6
    x = torch.randn(2, 4, 11, 11)
    layer = _separable(conv, m)
    assert layer.depthwise.groups == 4 and layer.depthwise.out_channels == 4 * m
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x), atol=1e-5, rtol=1e-5)


def test_multiplier_one_is_the_best_rank_one_kernel_per_channel() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 10, 10)
    layer = _separable(conv, 1)
    dense = layer.to_conv()
    s = torch.linalg.svdvals(conv.weight.detach().double().permute(1, 0, 2, 3).reshape(8, 16, 9))
    optimum = float(s[:, 1:].pow(2).sum().sqrt())  # Eckart-Young, channel by channel
    assert float((dense.weight - conv.weight).detach().norm()) == pytest.approx(optimum, rel=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-5)  # it computes that kernel
        residual = nn.functional.conv2d(x, conv.weight - dense.weight, padding=1)
        torch.testing.assert_close(conv(x) - layer(x), residual, atol=1e-5, rtol=1e-5)


def test_error_is_small_on_near_separable_kernels_and_falls_with_the_multiplier() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    with torch.no_grad():  # each input channel: one spatial filter mixed into all outputs, plus 1% noise
        rank_one = torch.einsum("oc,ck->ock", torch.randn(16, 8), torch.randn(8, 9)).reshape(16, 8, 3, 3)
        conv.weight.copy_(rank_one + 0.01 * rank_one.std() * torch.randn_like(rank_one))
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        errors = [float((_separable(conv, m)(x) - conv(x)).norm() / conv(x).norm()) for m in (1, 2, 4, 9)]
    assert errors[0] < 0.03, errors
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-5, errors


def test_method_cuts_flops_and_reloads_exactly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, x = _cnn(), torch.randn(2, 3, 12, 12)
    flops = count_flops(model, x)
    with caplog.at_level(logging.INFO, logger="torchslim"):
        result = ts.compress(model, Recipe.single(SeparableConfig()), ts.Context(example_inputs=x))
    outcome = result.record.outcomes[0]
    assert set(outcome.touched) == {"0", "2"} and "4 (1x1 kernel)" in caplog.text
    assert outcome.layers["2"] == {"depth_multiplier": 1, "macs_ratio": pytest.approx((9 + 32) / (32 * 9), abs=1e-4)}
    assert all(isinstance(result.model[i], SeparableConv2d) for i in (0, 2))
    assert count_flops(result.model, x) < 0.35 * flops
    save(result, tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "run", _cnn)(x), result.model(x), rtol=0, atol=0)


def test_multipliers_that_save_nothing_are_skipped(caplog: pytest.LogCaptureFixture) -> None:
    model = _cnn()
    with caplog.at_level(logging.INFO, logger="torchslim"):
        out = ts.apply(model, SeparableConfig(depth_multiplier=6), ts.Context())
    # conv 0: 3 * 6 * (9 + 16) = 450 >= 3 * 16 * 9 = 432; conv 2: 16 * 6 * 41 = 3936 < 4608
    assert list(out.record.outcomes[0].touched) == ["2"]
    assert "0: {'depth_multiplier': 6} would not reduce FLOPs (450 >= 432" in caplog.text


def test_bad_input_is_reported() -> None:
    for m in (0, -2, 1.5, True):
        with pytest.raises(ConfigError, match="depth_multiplier must be an integer >= 1"):
            SeparableConfig(depth_multiplier=m)  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match="depth_multiplier"):
        load_recipe("version: 1\nstages:\n  - name: s\n    methods:\n"
                    "      - {method: lowrank.separable, depth_multiplier: two}\n")
    with pytest.raises(UnsupportedModuleError, match="expected a model with nn.Conv2d layers"):
        ts.apply(nn.Sequential(nn.Linear(4, 4)), SeparableConfig(), ts.Context())
    depthwise_only = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 3, groups=8))
    with pytest.raises(UnsupportedModuleError, match=r"found none \(skipped: 0 \(groups=8\); 1 \(groups=8\)\)"):
        ts.apply(depthwise_only, SeparableConfig(), ts.Context())
