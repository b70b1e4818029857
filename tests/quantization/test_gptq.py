"""quantization.gptq: less output error than round-to-nearest, block by block on a tiny Llama, reloads."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import torchslim as ts
from tiny_llama import tiny_llama, token_batches
from torchslim.errors import ConfigError, DataError
from torchslim.export import load, save
from torchslim.quantization import GPTQConfig, WeightOnlyConfig, WeightOnlyLinear
from torchslim.quantization._gptq import gptq_quantize
from torchslim.quantization.packed import dequantize_groups, quantize_groups
from torchslim.recipes import Recipe


def _correlated(tokens: int, features: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features**0.5
    scales = torch.logspace(0, 1.5, features)[torch.randperm(features, generator=g)]  # outlier channels
    return (torch.randn(tokens, features, generator=g) @ mix) * scales


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_output_error_is_below_round_to_nearest(bits: int, act_order: bool) -> None:
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    x = _correlated(512, 128, 1)
    hessian = 2 * x.T @ x / len(x)
    rtn = dequantize_groups(*quantize_groups(w, bits, 32, False))
    gptq = dequantize_groups(*gptq_quantize(w, hessian, bits=bits, group_size=32, act_order=act_order,
                                            block_size=32))
    def err(q: torch.Tensor) -> float:
        return float(((q - w) @ x.T).pow(2).mean())
    assert err(gptq) < 0.7 * err(rtn)


def test_codes_fit_the_bit_width_and_groups_stay_contiguous() -> None:
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    codes, scale, zero = gptq_quantize(w, torch.eye(64), bits=3, group_size=16)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 7
    assert scale.shape == zero.shape == (8, 4)


def test_tiny_llama_quantizes_block_by_block_and_reloads(tmp_path: Path) -> None:
    build = lambda: tiny_llama(layers=2)  # noqa: E731
    model, batches = build(), token_batches(vocab=128)
    x = batches[0]
    with torch.no_grad():
        dense = model(x).logits
    ctx = ts.Context(calib_data=batches)
    rtn = ts.compress(build(), Recipe.single(WeightOnlyConfig(bits=3, group_size=32)), ctx).model
    result = ts.compress(model, Recipe.single(GPTQConfig(bits=3, group_size=32)), ctx)
    quantized = [m for m in result.model.modules() if isinstance(m, WeightOnlyLinear)]
    assert len(quantized) == 14  # 7 Linears per decoder layer; the tied lm_head stays float
    with torch.no_grad():
        out = result.model(x).logits
        assert float((out - dense).pow(2).mean()) < float((rtn(x).logits - dense).pow(2).mean())
    save(result, tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "run", build)(x).logits, out, rtol=0, atol=0)


def test_missing_calibration_data_is_a_data_error() -> None:
    with pytest.raises(DataError, match="calibration"):
        ts.apply(tiny_llama(layers=1), GPTQConfig(), ts.Context())


def test_awq_scales_before_gptq_lower_the_error_on_outlier_channels(tmp_path: Path) -> None:
    from torch import nn

    from torchslim.quantization._gptq import search_scales

    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 128, generator=g)
    x = torch.randn(512, 128, generator=g)
    x[:, :4] *= 30  # outlier input channels, as in LLM activations
    hessian = 2 * x.T @ x / len(x)
    s = search_scales(w, hessian, bits=3, group_size=32, symmetric=False, grid=20)
    assert s.shape == (128,) and float(s[:4].mean()) > float(s[4:].mean())  # the outlier columns grow
    layer = nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    model = nn.Sequential(layer)
    ctx = ts.Context(calib_data=[x])
    plain = ts.apply(copy.deepcopy(model), GPTQConfig(bits=3, group_size=32, block_size=32), ctx).model
    scaled = ts.compress(copy.deepcopy(model), Recipe.single(GPTQConfig(bits=3, group_size=32, block_size=32,
                                                                      scale_grid=20)), ctx)
    assert scaled.model[0].input_scale is not None
    with torch.no_grad():
        def err(m: nn.Module) -> float:
            return float((m(x) - layer(x)).pow(2).mean())
        assert err(scaled.model) < 0.9 * err(plain)
    save(scaled, tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "run", lambda: copy.deepcopy(model))(x), scaled.model(x),
                                   rtol=0, atol=0)
    with pytest.raises(ConfigError, match="scale_grid must be >= 0"):
        GPTQConfig(scale_grid=-1)
