"""quantization.fixed_point: the integer path equals exact Qm.n arithmetic, error falls with bits,
overflow saturates, formats fit the ranges, reload is bit-exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim as ts
from torchslim.core.storage import serialized_size
from torchslim.errors import ConfigError, DataError
from torchslim.export import load, save
from torchslim.quantization import FixedPointConfig, FixedPointConv2d, FixedPointLinear
from torchslim.quantization.fixed import MAX_FRAC, frac_bits_for, round_shift
from torchslim.recipes import Recipe


def _qf(v: torch.Tensor, bits: int, frac: int) -> torch.Tensor:
    """Exact float64 value of ``v`` rounded to nearest (halves up) into Q(frac), saturated."""
    q = torch.floor(v.double() * 2.0**frac + 0.5).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return q * 2.0**-frac


def _reference(layer: FixedPointLinear | FixedPointConv2d, x: torch.Tensor) -> torch.Tensor:
    """Same Qm.n rounding, computed in float64 (exact for these sizes)."""
    w = layer.weight_int.double() * 2.0**-layer.weight_frac
    b = None if layer.bias_int is None else layer.bias_int.double() * 2.0 ** -(layer.weight_frac + layer.input_frac)
    xq = _qf(x, layer.total_bits, layer.input_frac)
    if isinstance(layer, FixedPointLinear):
        y = F.linear(xq, w, b)
    else:
        y = F.conv2d(xq, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)
    return _qf(y, layer.total_bits, layer.output_frac).float()


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=2, dilation=2, stride=2, groups=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


@pytest.mark.parametrize("bits", [6, 8, 12, 16])
def test_integer_path_equals_exact_fixed_point_reference(bits: int) -> None:
    torch.manual_seed(bits)
    x = torch.randn(4, 3, 8, 8) * 2
    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1, groups=3)
    fc = nn.Linear(3 * 4 * 4 * 2, 5)
    for layer, inp in ((conv, x), (fc, x[:, :, :4].reshape(4, -1).repeat(1, 2)[:, :96])):
        fmt = {"weight_frac": frac_bits_for(float(layer.weight.detach().abs().max()), bits),
               "input_frac": bits - 4, "output_frac": bits - 5}
        if isinstance(layer, nn.Linear):
            fixed: FixedPointLinear | FixedPointConv2d = FixedPointLinear(96, 5, True, bits, **fmt)
        else:
            fixed = FixedPointConv2d(3, 6, (3, 3), (2, 2), (1, 1), (1, 1), 3, True, bits, **fmt)
        fixed.set_float(layer.weight, layer.bias)
        out = fixed(inp)
        torch.testing.assert_close(out, _reference(fixed, inp), rtol=0, atol=0)
        assert out.dtype == torch.float32
        assert fixed.weight_int.dtype == (torch.int8 if bits <= 8 else torch.int16)


def test_rounding_shift_is_round_half_up_and_formats_fit_the_range() -> None:
    acc = torch.tensor([-3, -2, -1, 0, 1, 2, 3, 5])
    assert round_shift(acc, 1).tolist() == [-1, -1, 0, 0, 1, 1, 2, 3]
    assert round_shift(acc, 2).tolist() == [-1, 0, 0, 0, 0, 1, 1, 1]
    assert frac_bits_for(1.0, 8) == 6  # 1.0 * 2**7 = 128 would overflow int8
    assert frac_bits_for(0.99, 8) == 7  # round(0.99 * 128) = 127 fits
    assert frac_bits_for(127.5 / 128, 8) == 6  # rounds up to 128 at 7 bits
    assert frac_bits_for(3.0, 16) == 13
    assert frac_bits_for(0.0, 8) == MAX_FRAC


def test_overflow_saturates_instead_of_wrapping() -> None:
    layer = FixedPointLinear(2, 2, False, 8, weight_frac=6, input_frac=4, output_frac=4)
    layer.set_float(torch.tensor([[1.9, 0.0], [0.0, -1.9]]), None)
    assert layer.weight_int.tolist() == [[122, 0], [0, -122]]
    # input 1000 saturates to 127/16; 7.5 * 1.9 = 14.3 is beyond Q3.4 and saturates to its ends
    out = layer(torch.tensor([[1000.0, -1000.0], [7.5, 7.5]]))
    assert out.tolist() == [[127 / 16, 127 / 16], [127 / 16, -8.0]]


def _calib(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(n)]


def test_error_against_float_falls_as_total_bits_rise() -> None:
    x = torch.cat(_calib()[:2])  # inside the calibrated ranges: rounding error only, no saturation
    reference = _cnn()(x)
    errors = []
    for bits in (8, 12, 16):
        result = ts.apply(_cnn(), FixedPointConfig(total_bits=bits), ts.Context(calib_data=_calib()))
        assert isinstance(result.model[0], FixedPointConv2d) and isinstance(result.model[8], FixedPointLinear)
        with torch.no_grad():
            errors.append(float((result.model(x) - reference).abs().max() / reference.abs().max()))
    assert errors[0] > 4 * errors[1] > 16 * errors[2], errors
    assert errors[0] < 0.1 and errors[2] < 1e-3, errors


def test_fixed_frac_bits_need_no_calibration_and_reload_bit_exact(tmp_path: Path) -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))

    model = build()
    dense = serialized_size(model)
    result = ts.compress(model, Recipe.single(FixedPointConfig(total_bits=8, frac_bits=5)), ts.Context())
    layers = result.record.outcomes[0].layers
    assert layers["0"] == {"total_bits": 8, "weight_frac": 5, "input_frac": 5, "output_frac": 5}
    assert serialized_size(result.model) < 0.3 * dense  # int8 weights, int64 biases
    x = torch.randn(5, 64)
    save(result, tmp_path / "run")
    reloaded = load(tmp_path / "run", build)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), result.model(x), rtol=0, atol=0)


def test_bad_config_and_missing_calibration_are_errors() -> None:
    with pytest.raises(ConfigError, match="total_bits must be an integer in 2..16"):
        FixedPointConfig(total_bits=32)
    with pytest.raises(ConfigError, match="frac_bits must be null"):
        FixedPointConfig(frac_bits=-1)
    with pytest.raises(DataError, match="calib"):
        ts.apply(_cnn(), FixedPointConfig(), ts.Context())
