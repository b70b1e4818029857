"""quantization.weight_only: packed codes round-trip, RTN error bounds, group rules, exact reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.core.storage import serialized_size
from torchslim.errors import ConfigError
from torchslim.export import load, save
from torchslim.quantization import WeightOnlyConfig, WeightOnlyLinear
from torchslim.quantization.packed import dequantize_groups, pack_codes, quantize_groups, unpack_codes
from torchslim.recipes import Recipe


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("width", [64, 63])
def test_packing_round_trips_every_code(bits: int, width: int) -> None:
    codes = torch.randint(0, 2**bits, (5, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.shape[1] == (width // 2 if bits <= 4 and width % 2 == 0 else width)
    assert torch.equal(unpack_codes(packed, bits, width), codes)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_rounding_error_is_at_most_half_a_step(bits: int, symmetric: bool) -> None:
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    codes, scale, zero = quantize_groups(w, bits, 32, symmetric)
    assert int(codes.max()) < 2**bits
    err = (dequantize_groups(codes, scale, zero) - w).abs().reshape(16, 4, 32)
    step = scale[..., None].expand_as(err)
    assert bool((err <= 0.5 * step + 1e-6).all())


def test_more_bits_and_smaller_groups_are_more_accurate() -> None:
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    def err(bits: int, group: int) -> float:
        return float((dequantize_groups(*quantize_groups(w, bits, group, False)) - w).pow(2).mean())
    assert err(8, 64) < err(4, 64) < err(3, 64) < err(2, 64)
    assert err(4, 32) < err(4, 128) < err(4, 256)


def test_layer_computes_with_the_dequantised_weight_in_blocks() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 2100)  # more output rows than one dequantisation block
    codes, scale, zero = quantize_groups(lin.weight, 4, 32, False)
    layer = WeightOnlyLinear.from_codes(codes, scale, zero, 4, lin.bias)
    x = torch.randn(3, 7, 64)
    expected = torch.nn.functional.linear(x, dequantize_groups(codes, scale, zero), lin.bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 10))


def test_int4_file_shrinks_and_reloads_exactly(tmp_path: Path) -> None:
    model, x = _model(), torch.randn(4, 128)
    dense = serialized_size(model)
    reference = model(x)
    result = ts.compress(model, Recipe.single(WeightOnlyConfig(bits=4, group_size=64)), ts.Context())
    out = result.model(x)
    assert serialized_size(result.model) < 0.2 * dense
    assert float((out - reference).pow(2).mean()) < 5e-2 * float(reference.pow(2).mean())  # int4 g64: ~1%
    save(result, tmp_path / "run")
    torch.testing.assert_close(load(tmp_path / "run", _model)(x), out, rtol=0, atol=0)


def test_a_group_size_that_does_not_divide_a_layer_names_it() -> None:
    model = nn.Sequential(nn.Linear(96, 8))
    with pytest.raises(ConfigError, match="group_size 64 does not divide the input width 96 of layer '0'"):
        ts.apply(model, WeightOnlyConfig(group_size=64), ts.Context())
    with pytest.raises(ConfigError, match="bits must be"):
        WeightOnlyConfig(bits=1)
