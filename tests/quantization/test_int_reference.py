"""quantization/_int_reference.py: the static int8 layers compute what ONNX Runtime's int8 kernels compute."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from tiny_mobilenet import AVX2, TinyMobileNet, images
from torchslim.quantization import PTQConfig, QDQConv2d, QDQLinear, RoundedOutput
from torchslim.quantization._int_reference import (
    SumTracker,
    accumulate_conv2d,
    codes_on_grid,
    dequantize,
    fma32,
    qlinear_add,
    quantize,
    round_output,
    tag_grid,
)
from torchslim.quantization.static_modules import QuantGrid


def _int8_model() -> nn.Module:
    calib = [images(16, seed) for seed in range(4)]
    ctx = ts.Context(example_inputs=calib[0][:2], calib_data=calib, seed=0)
    return ts.apply(TinyMobileNet().eval(), PTQConfig(bias_correction=True), ctx).model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """The int8 model and its ONNX file, written once for the tests below."""
    pytest.importorskip("onnxruntime")
    from torchslim.export.onnx import export_onnx

    q, path = _int8_model(), tmp_path_factory.mktemp("int8") / "m.onnx"
    export_onnx(q, images(2, 9), path)
    return q, path


def _optimized_ops(path: Path) -> list[str]:
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]


def _float_path(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The float QDQ form: the one taken when the input needs a gradient."""
    with torch.enable_grad():
        return model(x.clone().requires_grad_(True)).detach()


@pytest.mark.skipif(not AVX2, reason="QLinearAdd's rounding is that of the AVX2 kernel")
def test_int8_model_matches_onnx_runtime_bit_for_bit(exported: tuple[nn.Module, Path]) -> None:
    from torchslim.export.onnx import OnnxModule

    q, path = exported
    assert isinstance(q.blocks[0], RoundedOutput)  # block 0's sum feeds block 1: rounded, a QLinearAdd
    ops = _optimized_ops(path)
    assert ops.count("QLinearConv") == 7 and ops.count("QLinearAdd") == 1 and ops.count("QGemm") == 1, ops
    x = images(64, 10)
    with torch.inference_mode():
        ours = q(x)
    theirs = OnnxModule(path)(x)
    assert torch.equal(ours, theirs)  # every code of every layer equal, so the float logits too
    floats = _float_path(q, x)
    assert not torch.equal(floats, theirs)  # the float form rounds some ties the other way
    torch.testing.assert_close(floats, theirs, rtol=0, atol=0.5)


def test_float_and_integer_paths_differ_only_at_rounding_ties() -> None:
    g = torch.Generator().manual_seed(0)
    layer = QDQConv2d(16, 8, 3, padding=1)
    # grids whose requantization multiplier is 0.1 * 0.3 / 0.06 = 0.5: every odd accumulator is a tie
    layer.set_quant(torch.randn(8, 16, 3, 3, generator=g), None, 8, QuantGrid(0.1, 128), QuantGrid(0.06, 0),
                    weight_scale=torch.full((8,), 0.3))
    codes_in = torch.randint(0, 256, (4, 16, 10, 10), generator=g).float()
    x = dequantize(codes_in, layer.input_scale, layer.input_zero_point)
    with torch.inference_mode():
        exact = layer(x)
    floats = _float_path(layer, x)
    codes_exact, codes_float = ((t / layer.output_scale).round() for t in (exact, floats))
    differ = codes_exact != codes_float
    assert differ.any() and (codes_exact - codes_float).abs().max() <= 1
    acc = accumulate_conv2d(codes_in, layer.input_zero_point, layer.qweight, layer.weight_zero_point,
                            layer.qbias, stride=1, padding=(1, 1), dilation=1, groups=1)
    assert (acc.remainder(2) == 1)[differ].all()  # they differ only at ties


def test_export_and_gradients_take_the_float_qdq_form(exported: tuple[nn.Module, Path]) -> None:
    import onnx

    q, path = exported
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    layers = [m for m in q.modules() if isinstance(m, QDQConv2d | QDQLinear)]
    roundings = sum(m.quantize_input + m.quantize_output for m in layers) + len(
        [m for m in q.modules() if isinstance(m, RoundedOutput)])
    assert ops.count("QuantizeLinear") == roundings and ops.count("Conv") == 7 and ops.count("Gemm") == 1, ops
    assert not {"Round", "Cast", "Floor"} & set(ops), ops  # nothing of the integer reference was traced
    layer, x = q.stem[0], images(4, 12)
    with torch.no_grad():
        floats = layer._output(layer.pre_activation(x))
    with torch.enable_grad():  # an input that needs a gradient takes the float form too
        torch.testing.assert_close(layer(x.requires_grad_(True)), floats, rtol=0, atol=0)


@pytest.mark.skipif(not AVX2, reason="the formula of ONNX Runtime's AVX2 kernel")
@pytest.mark.parametrize("scales, zero_points", [
    ((0.05, 0.031, 0.07), (128, 3, 77)),
    ((0.02, 0.04, 0.02), (0, 255, 128)),  # ratios 1 and 2: many exact ties
    ((0.0375, 0.0125, 0.025), (90, 17, 200)),
])
def test_qlinear_add_matches_onnx_runtime_on_every_pair_of_codes(
        scales: tuple[float, float, float], zero_points: tuple[int, int, int]) -> None:
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    from onnx import TensorProto, helper

    names = ("a", "b", "c")
    inits = [helper.make_tensor(f"s{n}", TensorProto.FLOAT, [], [s]) for n, s in zip(names, scales)]
    inits += [helper.make_tensor(f"z{n}", TensorProto.UINT8, [], [z]) for n, z in zip(names, zero_points)]
    node = helper.make_node("QLinearAdd", ["A", "sa", "za", "B", "sb", "zb", "sc", "zc"], ["C"], domain="com.microsoft")
    io = [helper.make_tensor_value_info(n, TensorProto.UINT8, [None]) for n in ("A", "B", "C")]
    graph = helper.make_graph([node], "add", io[:2], io[2:], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = torch.arange(256, dtype=torch.uint8).repeat_interleave(256)
    b = torch.arange(256, dtype=torch.uint8).repeat(256)
    theirs = torch.from_numpy(session.run(None, {"A": a.numpy(), "B": b.numpy()})[0])
    grids = [(torch.tensor(s), torch.tensor(z, dtype=torch.uint8)) for s, z in zip(scales, zero_points)]
    ours = qlinear_add(a.float(), grids[0], b.float(), grids[1], grids[2])
    assert torch.equal(ours.to(torch.uint8), theirs)


def test_fma32_rounds_once() -> None:
    x, y = torch.tensor(24929 / 2**14), torch.tensor(673 / 2**10)  # x * y = 1 + 2**-24: halfway between floats
    above, below = torch.tensor(2.0**-60, dtype=torch.float64), torch.tensor(-(2.0**-60), dtype=torch.float64)
    assert float(fma32(x, y, above)) == 1 + 2**-23 and float(fma32(x, y, below)) == 1.0
    g = torch.Generator().manual_seed(0)
    x, y, z = (torch.randn(10_000, generator=g) for _ in range(3))
    exact = (x.double() * y.double() + z.double()).float()  # no halfway cases among random floats
    assert torch.equal(fma32(x, y, z), exact)


@pytest.mark.parametrize("in_place", [False, True])
def test_a_residual_sum_and_its_relu_are_rounded_as_qlinear_add(in_place: bool) -> None:
    g = torch.Generator().manual_seed(0)
    grid_a, grid_b = (torch.tensor(0.05), torch.tensor(120, dtype=torch.uint8)), (torch.tensor(0.03), torch.tensor(7))
    qa, qb = (torch.randint(0, 256, (4, 8, 5, 5), generator=g).float() for _ in range(2))
    for zp_c, fused in ((0, True), (30, False)):  # ONNX Runtime drops the Relu only when the grid starts at 0
        grid_c = (torch.tensor(0.04), torch.tensor(zp_c, dtype=torch.uint8))
        a, b = (tag_grid(dequantize(q, *grid), *grid) for q, grid in ((qa, grid_a), (qb, grid_b)))
        tracker = SumTracker()
        with torch.inference_mode(), tracker:
            if in_place:  # torchvision's ResNet block: out += identity; out = relu(out)
                a += b
                y = nn.functional.relu(a, inplace=True)
            else:
                y = torch.relu(a + b)
        assert codes_on_grid(a) is None if in_place else codes_on_grid(a) is not None
        pending = tracker.sum_of(y)
        assert pending is not None and pending.activation == "relu"
        codes = round_output(y, pending, *grid_c) / grid_c[0] + zp_c
        if fused:
            expected = qlinear_add(qa, grid_a, qb, grid_b, grid_c)
        else:  # a float Add and Relu, then QuantizeLinear
            expected = quantize(torch.relu(dequantize(qa, *grid_a) + dequantize(qb, *grid_b)), *grid_c, 255)
        torch.testing.assert_close(codes, expected, rtol=0, atol=1e-3)
