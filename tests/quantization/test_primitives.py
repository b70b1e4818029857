"""quantization/primitives.py: symmetric int8 round trips, exact int8 GEMM, int8 linear accuracy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torchslim.quantization.primitives import (
    PACK_MAX_ROWS,
    PACK_MIN_WEIGHTS,
    QMAX,
    U8_ZERO_POINT,
    dequantize,
    dynamic_quantize_rows,
    int8_linear,
    int8_matmul,
    pack_int8_weight,
    quantize_per_channel_symmetric,
)


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_per_channel_round_trip_is_within_half_a_step() -> None:
    torch.manual_seed(0)
    weight = torch.randn(48, 80) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different ranges
    qweight, scale = quantize_per_channel_symmetric(weight)
    assert qweight.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (48,)
    assert int(qweight.abs().amax(dim=1).min()) == QMAX  # every row uses the full range
    assert int(qweight.min()) >= -QMAX
    error = (dequantize(qweight, scale) - weight).abs()
    assert bool((error <= scale[:, None] / 2 * (1 + 1e-5)).all())


def test_per_tensor_uses_one_scale_and_loses_small_rows() -> None:
    torch.manual_seed(0)
    weight = torch.randn(16, 32)
    weight[0] *= 1e-4  # far below one step of the shared scale
    qweight, scale = quantize_per_channel_symmetric(weight, per_channel=False)
    assert torch.equal(scale, scale[:1].expand(16))
    assert float(scale[0]) == pytest.approx(float(weight.abs().max()) / QMAX)
    assert int(qweight[0].abs().max()) == 0
    _, per_channel_scale = quantize_per_channel_symmetric(weight)
    assert float(per_channel_scale[0]) < float(scale[0]) / 1000


def test_zero_rows_quantize_to_zero_with_a_finite_scale() -> None:
    weight = torch.zeros(3, 5)
    weight[1] = torch.arange(5.0)
    qweight, scale = quantize_per_channel_symmetric(weight)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert int(qweight[0].abs().sum()) == 0 and int(qweight[2].abs().sum()) == 0
    q, row_scale = dynamic_quantize_rows(torch.zeros(2, 7))
    assert int(q.abs().sum()) == 0 and torch.isfinite(row_scale).all()


@pytest.mark.parametrize("shape", [(5, 33), (2, 3, 64), (1, 1)])
def test_dynamic_rows_round_trip_for_any_leading_shape(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape) * 3
    q, scale = dynamic_quantize_rows(x)
    assert q.dtype == torch.int8 and q.shape == x.shape and scale.shape == (*shape[:-1], 1)
    assert bool((q.abs().amax(dim=-1) == QMAX).all())  # each row's largest value maps to 127
    assert bool(((q.float() * scale - x).abs() <= scale / 2 * (1 + 1e-5)).all())


def test_dynamic_rows_never_leave_the_symmetric_range() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 97) * torch.logspace(-20, 20, 256)[:, None]
    q, _ = dynamic_quantize_rows(x)
    assert int(q.min()) >= -QMAX and int(q.max()) <= QMAX


@pytest.mark.parametrize(("m", "k", "n"), [(1, 3, 5), (7, 13, 3), (64, 300, 40)])
def test_int8_matmul_is_exact(m: int, k: int, n: int) -> None:
    torch.manual_seed(0)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    weight = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    out = int8_matmul(a, weight.t())  # the transposed view, as int8_linear passes it
    assert out.dtype == torch.int32
    assert torch.equal(out.long(), a.long() @ weight.t().long())


def test_int8_matmul_does_not_saturate_at_the_extremes() -> None:
    a = torch.full((2, 512), -128, dtype=torch.int8)
    b = torch.full((512, 3), -128, dtype=torch.int8)
    assert int(int8_matmul(a, b)[0, 0]) == 512 * 128 * 128


def test_int8_linear_equals_the_dequantized_product() -> None:
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 5, 64), torch.randn(24, 64), torch.randn(24)
    qweight, scale = quantize_per_channel_symmetric(weight)
    out = int8_linear(x, qweight, scale, bias)
    q, row_scale = dynamic_quantize_rows(x)
    expected = (q.double() * row_scale.double()) @ dequantize(qweight, scale).double().t() + bias.double()
    assert out.shape == (2, 5, 24) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_int8_linear_is_close_to_the_float_linear() -> None:
    torch.manual_seed(0)
    x, weight, bias = torch.randn(128, 256), torch.randn(96, 256) / 16, torch.randn(96)
    qweight, scale = quantize_per_channel_symmetric(weight)
    out, expected = int8_linear(x, qweight, scale, bias), F.linear(x, weight, bias)
    assert _rel_error(out, expected) < 0.02
    assert float(F.cosine_similarity(out.flatten(), expected.flatten(), dim=0)) > 0.999
    no_bias = int8_linear(x, qweight, scale)
    torch.testing.assert_close(no_bias + bias, out, rtol=1e-5, atol=1e-5)


def test_int8_linear_keeps_the_input_dtype() -> None:
    torch.manual_seed(0)
    x, weight = torch.randn(4, 32), torch.randn(8, 32)
    qweight, scale = quantize_per_channel_symmetric(weight)
    out = int8_linear(x.bfloat16(), qweight, scale)
    assert out.dtype == torch.bfloat16
    assert _rel_error(out.float(), F.linear(x, weight)) < 0.03


def test_unsigned_rows_are_the_int8_values_plus_128() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 40)
    q, scale = dynamic_quantize_rows(x)
    q_u8, scale_u8 = dynamic_quantize_rows(x, unsigned=True)
    assert q_u8.dtype == torch.uint8 and torch.equal(scale_u8, scale)
    assert torch.equal(q_u8.int() - U8_ZERO_POINT, q.int())


def test_only_large_cpu_weights_are_packed() -> None:
    assert pack_int8_weight(torch.zeros(64, 64, dtype=torch.int8)) is None
    with torch.device("meta"):
        assert pack_int8_weight(torch.zeros(2048, 1024, dtype=torch.int8)) is None


@pytest.mark.parametrize("rows", [1, 2, 37, PACK_MAX_ROWS, PACK_MAX_ROWS + 1])
def test_packed_kernel_gives_the_same_bits(rows: int) -> None:
    torch.manual_seed(0)
    weight = torch.randn(PACK_MIN_WEIGHTS // 512, 512)
    qweight, scale = quantize_per_channel_symmetric(weight)
    packed = pack_int8_weight(qweight)
    if packed is None:
        pytest.skip("this torch build has no oneDNN int8 linear")
    x, bias = torch.randn(rows, 512), torch.randn(weight.shape[0])
    torch.testing.assert_close(int8_linear(x, qweight, scale, bias, packed),
                               int8_linear(x, qweight, scale, bias), rtol=0, atol=0)
