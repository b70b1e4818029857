"""quantization/nbits.py: packed 4/8-bit linears export to ONNX Runtime's MatMulNBits and compute
there what they compute in PyTorch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from torchslim.export.onnx import OnnxModule, export_onnx
from torchslim.quantization.nbits import exports_as_nbits, matmul_nbits
from torchslim.quantization.packed import WeightOnlyLinear, quantize_groups

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _packed(in_f: int, out_f: int, bits: int, group: int, symmetric: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    codes, scale, zero = quantize_groups(lin.weight, bits, group, symmetric)
    return nn.Sequential(WeightOnlyLinear.from_codes(codes, scale, zero, bits, lin.bias), nn.GELU()).eval()


def test_op_computes_what_the_layer_computes() -> None:
    model = _packed(256, 96, 4, 64, symmetric=False)
    layer = model[0]
    x = torch.randn(3, 7, 256)
    expected = layer(x)
    got = matmul_nbits(x, layer.packed, layer.scale, layer.zero, 256, 4) + layer.bias
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("bits", "group", "symmetric", "in_f"), [
    (4, 64, False, 256),
    (4, 64, True, 192),   # three groups per row: the packed zero points need a pad nibble
    (4, 128, False, 384),
    (8, 32, False, 256),
])
def test_export_uses_matmul_nbits_and_matches(tmp_path: Path, bits: int, group: int, symmetric: bool,
                                              in_f: int) -> None:
    model = _packed(in_f, 130, bits, group, symmetric)
    x = torch.randn(2, 5, in_f)
    info = export_onnx(model, x, tmp_path / "m.onnx")
    ops = [node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert "MatMulNBits" in ops and "MatMul" not in ops and "Gemm" not in ops
    assert info["max_abs_diff"] < 1e-4
    # the file holds the packed codes, not a float weight
    assert info["bytes"] < 130 * in_f * 4 / 2
    other = torch.randn(9, 5, in_f)  # another batch size through the dynamic batch dimension
    torch.testing.assert_close(OnnxModule(tmp_path / "m.onnx")(other), model(other), rtol=0, atol=1e-4)


def test_other_widths_keep_the_plain_export(tmp_path: Path) -> None:
    assert not exports_as_nbits(3, 64) and not exports_as_nbits(4, 48) and not exports_as_nbits(4, 8)
    model = _packed(96, 32, 3, 48, symmetric=False)
    info = export_onnx(model, torch.randn(2, 96), tmp_path / "m.onnx")
    ops = [node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert "MatMulNBits" not in ops
    assert info["max_abs_diff"] < 1e-4


def test_eager_forward_never_uses_the_op() -> None:
    """Outside export the layer keeps its blockwise dequantisation, which supports autograd."""
    model = _packed(128, 16, 4, 64, symmetric=True)
    x = torch.randn(4, 128, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
