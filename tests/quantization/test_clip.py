"""Clip search: shrinking a group's range where that lowers the output error, in GPTQ and AWQ."""

from __future__ import annotations

import pytest
import torch

from torchslim.errors import ConfigError
from torchslim.quantization import AWQConfig, GPTQConfig
from torchslim.quantization._clip import search_clip
from torchslim.quantization._gptq import gptq_quantize, output_error
from torchslim.quantization.awq import InputSample, _quantize_layer
from torchslim.quantization.packed import dequantize_groups, quantize_groups


def _heavy_tailed(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Student-t weights (3 degrees of freedom): a few large values stretch each group's range."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, cols, generator=g)
    chi = torch.randn(3, rows, cols, generator=g).pow(2).sum(0) / 3
    return normal / chi.sqrt()


def _inputs(tokens: int, features: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, features, generator=g) @ (torch.randn(features, features, generator=g) / 8)


def _error(q: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    return float(((q - w) @ x.T).pow(2).mean())


@pytest.mark.parametrize("symmetric", [False, True])
def test_searched_ranges_lower_the_output_error_of_rounding(symmetric: bool) -> None:
    w, x = _heavy_tailed(64, 128, 0), _inputs(512, 128, 1)
    clip = search_clip(w, x.T @ x, bits=3, group_size=32, symmetric=symmetric, shrink=0.5)
    assert clip.shape == (64, 4) and float(clip.min()) >= 0.5 and float(clip.max()) <= 1.0
    assert float(clip.min()) < 1.0  # some group's range did shrink
    full = dequantize_groups(*quantize_groups(w, 3, 32, symmetric))
    clipped = dequantize_groups(*quantize_groups(w, 3, 32, symmetric, clip))
    assert _error(clipped, w, x) < 0.9 * _error(full, w, x)
    # with nothing to gain from shrinking (uniform weights fill their range evenly), ranges stay whole
    uniform = torch.rand(16, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    kept = search_clip(uniform, torch.eye(64), bits=8, group_size=32, symmetric=False, shrink=0.5)
    assert float(kept.min()) > 0.9


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_with_clip_search_is_never_worse_and_helps_dynamic_groups(act_order: bool, bits: int) -> None:
    w, x = _heavy_tailed(48, 128, 3), _inputs(512, 128, 4)
    hessian = 2 * x.T @ x / len(x)
    plain = gptq_quantize(w, hessian, bits=bits, group_size=32, act_order=act_order)
    clipped = gptq_quantize(w, hessian, bits=bits, group_size=32, act_order=act_order, clip_shrink=0.2)
    assert output_error(w, hessian, *clipped) <= output_error(w, hessian, *plain)
    torch.testing.assert_close(output_error(w, hessian, *plain) / 2,  # H = 2 X^T X / n: the summed error
                               _error(dequantize_groups(*plain), w, x) * 48, rtol=1e-4, atol=0)
    if not act_order:  # groups fitted to the compensated weight: clipping pays
        assert output_error(w, hessian, *clipped) < 0.97 * output_error(w, hessian, *plain)


def test_awq_with_clip_search_has_less_output_error_on_its_samples() -> None:
    w, x = _heavy_tailed(64, 128, 5), _inputs(1024, 128, 6)
    layer = torch.nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    stat = InputSample(128, 1024)
    stat.update(x)
    errors = {}
    for shrink in (0.0, 0.4):
        quantized, _ = _quantize_layer(layer, stat, AWQConfig(bits=3, group_size=32, clip_shrink=shrink), 32)
        with torch.no_grad():
            errors[shrink] = float((quantized(x) - layer(x)).pow(2).mean())
    assert errors[0.4] < 0.95 * errors[0.0]


def test_clip_shrink_outside_its_range_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"quantization.gptq: clip_shrink must be in \[0, 1\); found 1.0"):
        GPTQConfig(clip_shrink=1.0)
    with pytest.raises(ConfigError, match=r"quantization.awq: clip_shrink must be in \[0, 1\); found -0.1"):
        AWQConfig(clip_shrink=-0.1)
