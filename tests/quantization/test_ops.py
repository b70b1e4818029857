"""quantization/ops.py: the int8 custom op exports to integer ONNX ops that ONNX Runtime runs
with the same results as PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim.core import Context
from torchslim.core.onnx_ops import translation_table
from torchslim.quantization.dynamic import DynamicQuantizationConfig, apply
from torchslim.quantization.modules import DynamicQuantLinear

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    apply(model, DynamicQuantizationConfig(), Context())
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Any, Any]:
    """(quantized model, loaded ONNX proto, ORT session) exported with a dynamic batch."""
    model = _classifier()
    path = tmp_path_factory.mktemp("dq") / "mlp.onnx"
    program = torch.onnx.export(model, (torch.randn(4, 64),), dynamo=True, verbose=False,
                                dynamic_shapes=({0: torch.export.Dim("batch")},),
                                custom_translation_table=translation_table())
    assert program is not None
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return model, onnx.load(str(path)), session


def test_the_op_is_registered_for_onnx() -> None:
    assert torch.ops.torchslim.dynamic_quant_linear.default in translation_table()


def test_graph_multiplies_in_integers(exported: tuple[nn.Module, Any, Any]) -> None:
    _, proto, _ = exported
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count("MatMulInteger") == 3
    assert not {"MatMul", "Gemm"} & set(ops), "a float matmul is left in the graph"


def test_onnx_weights_are_ours_bit_for_bit(exported: tuple[nn.Module, Any, Any]) -> None:
    model, proto, _ = exported
    int8 = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    ours = [m.qweight.numpy() for m in model.modules() if isinstance(m, DynamicQuantLinear)]
    assert len(int8) == len(ours) == 3
    for weight in ours:  # stored transposed, (in, out), for MatMulInteger
        assert any(w.shape == weight.T.shape and np.array_equal(w, weight.T) for w in int8)


def test_onnx_runtime_agrees_with_pytorch(exported: tuple[nn.Module, Any, Any]) -> None:
    model, _, session = exported
    torch.manual_seed(1)
    x = torch.randn(512, 64) * 2
    with torch.no_grad():
        expected = model(x)
    found = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert found.shape == expected.shape == (512, 10)
    assert float((found.argmax(1) == expected.argmax(1)).float().mean()) >= 0.99
    assert float(F.cosine_similarity(found.flatten(), expected.flatten(), dim=0)) >= 0.999
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5)  # same arithmetic, same order


def test_export_onnx_handles_sequence_inputs(tmp_path: Path) -> None:
    from torchslim.export import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    apply(model, DynamicQuantizationConfig(), Context())
    info = export_onnx(model.eval(), torch.randn(2, 7, 32), tmp_path / "seq.onnx")
    assert info["exporter"] == "dynamo exporter" and info["dynamic_batch"]
    assert info["cosine"] >= 0.999
    ops = {node.op_type for node in onnx.load(str(tmp_path / "seq.onnx")).graph.node}
    assert "MatMulInteger" in ops


def test_flop_counter_counts_the_int8_gemm_like_a_float_linear() -> None:
    from torchslim.measure.flops import count_flops
    from torchslim.quantization.modules import DynamicQuantLinear

    linear = torch.nn.Linear(64, 32)
    x = torch.randn(2, 4, 64)
    assert count_flops(DynamicQuantLinear.from_linear(linear, True), x) == count_flops(linear, x) == 2 * 8 * 64 * 32


def test_smoothed_layers_export_their_input_scale_as_a_mul(tmp_path: Path) -> None:
    from torchslim.export import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    gain = torch.ones(32)
    gain[5] = 50.0
    calib = [torch.randn(64, 32) * gain for _ in range(2)]
    apply(model, DynamicQuantizationConfig(smooth=0.7), Context(calib_data=calib))
    x = torch.randn(16, 32) * gain
    export_onnx(model.eval(), x, tmp_path / "smooth.onnx")
    session = ort.InferenceSession(str(tmp_path / "smooth.onnx"), providers=["CPUExecutionProvider"])
    found = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(found, model(x), rtol=1e-4, atol=1e-4)


def test_per_tensor_activations_run_fused_and_export_the_same_arithmetic(tmp_path: Path) -> None:
    from torchslim.export import export_onnx
    from torchslim.quantization.primitives import (
        fbgemm_linear_per_tensor,
        int8_linear_per_tensor,
        pack_fbgemm_weight,
        pack_int8_weight,
    )

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    apply(model, DynamicQuantizationConfig(activation_scale="tensor"), Context())
    layer = model[0]
    assert isinstance(layer, DynamicQuantLinear) and layer.per_tensor
    x = torch.randn(16, 32)
    with torch.no_grad():  # oneDNN's fused epilogue against the plain int8 product rescaled afterwards
        fused = int8_linear_per_tensor(x, layer.qweight, layer.scale, layer.bias,
                                       pack_int8_weight(layer.qweight, always=True))
        plain = int8_linear_per_tensor(x, layer.qweight, layer.scale, layer.bias, None)
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
        fbgemm = pack_fbgemm_weight(layer.qweight, layer.scale, layer.bias)
        if fbgemm is not None:  # x86 builds: fbgemm rounds the input while packing it, same codes
            torch.testing.assert_close(fbgemm_linear_per_tensor(x, fbgemm), plain, rtol=1e-5, atol=1e-5)
        step = float(x.abs().max()) / 127  # one step for every row, the largest row's
        exact = F.linear(torch.round(x / step) * step, layer.qweight.float() * layer.scale[:, None], layer.bias)
        torch.testing.assert_close(plain, exact, rtol=1e-4, atol=1e-4)
    export_onnx(model.eval(), x, tmp_path / "pt.onnx")
    session = ort.InferenceSession(str(tmp_path / "pt.onnx"), providers=["CPUExecutionProvider"])
    found = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(found, model(x), rtol=1e-4, atol=1e-4)


def test_a_fused_activation_exports_as_its_own_node_with_the_same_outputs(tmp_path: Path) -> None:
    from torchslim.export import export_onnx
    from torchslim.quantization.primitives import (
        int8_linear_per_tensor,
        onednn_linear_per_tensor,
        pack_int8_weight,
    )

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    x = torch.randn(16, 32)
    outcome = apply(model, DynamicQuantizationConfig(activation_scale="tensor"), Context(calib_data=[x]))
    layer = model[0]
    assert outcome.stats["fused_activations"] == 1 and isinstance(model[1], nn.Identity)
    assert isinstance(layer, DynamicQuantLinear) and layer.activation == "gelu"
    packed = pack_int8_weight(layer.qweight, always=True)
    with torch.no_grad():
        if packed is not None:  # oneDNN's GELU epilogue against the int8 product, then F.gelu
            plain = F.gelu(int8_linear_per_tensor(x, layer.qweight, layer.scale, layer.bias, None))
            torch.testing.assert_close(onednn_linear_per_tensor(x, packed, layer.scale, layer.bias, "gelu"),
                                       plain, rtol=1e-5, atol=1e-5)
    export_onnx(model.eval(), x, tmp_path / "gelu.onnx")
    graph = onnx.load(str(tmp_path / "gelu.onnx")).graph
    assert {"MatMulInteger", "Gelu"} <= {n.op_type for n in graph.node}  # the activation after the integer GEMM
    session = ort.InferenceSession(str(tmp_path / "gelu.onnx"), providers=["CPUExecutionProvider"])
    found = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(found, model(x), rtol=1e-4, atol=1e-4)
