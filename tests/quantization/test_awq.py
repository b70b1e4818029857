"""quantization.awq: never worse than round-to-nearest on activations with outlier channels; reloads."""

from __future__ import annotations

from pathlib import Path

import torch

import torchslim as ts
from tiny_llama import tiny_llama, token_batches
from torchslim.export import load, save
from torchslim.quantization import AWQConfig, WeightOnlyConfig, WeightOnlyLinear
from torchslim.quantization.awq import awq_search
from torchslim.quantization.packed import dequantize_groups, quantize_groups
from torchslim.recipes import Recipe


def test_scaling_beats_round_to_nearest_when_a_few_input_channels_dominate() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    x = torch.randn(512, 128, generator=g)
    x[:, :4] *= 30  # outlier channels, as in LLM activations
    s, alpha = awq_search(w, x.abs().mean(0), x, bits=3, group_size=32, symmetric=False, grid=20)
    rtn = dequantize_groups(*quantize_groups(w, 3, 32, False))
    awq = dequantize_groups(*quantize_groups(w * s, 3, 32, False)) / s
    def err(q: torch.Tensor) -> float:
        return float((x @ (q - w).T).pow(2).mean())
    assert alpha > 0 and err(awq) < 0.8 * err(rtn)


def test_tiny_llama_awq_is_closer_than_rtn_and_reloads(tmp_path: Path) -> None:
    build = lambda: tiny_llama(layers=2)  # noqa: E731
    batches = token_batches(vocab=128)
    x = batches[0]
    with torch.no_grad():
        dense = build()(x).logits
    ctx = ts.Context(calib_data=batches)
    rtn = ts.compress(build(), Recipe.single(WeightOnlyConfig(bits=3, group_size=32)), ctx).model
    result = ts.compress(build(), Recipe.single(AWQConfig(bits=3, group_size=32)), ctx)
    layers = [m for m in result.model.modules() if isinstance(m, WeightOnlyLinear)]
    assert layers and all(m.input_scale is not None for m in layers)
    with torch.no_grad():
        out = result.model(x).logits
        assert float((out - dense).pow(2).mean()) <= float((rtn(x).logits - dense).pow(2).mean())
    save(result, tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "run", build)(x).logits, out, rtol=0, atol=0)
