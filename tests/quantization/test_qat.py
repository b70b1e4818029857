"""quantization/qat.py: residual sums fake-quantized while training, rounded (RoundedOutput) after it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from interrupt import KillAt, Stop
from tiny_mobilenet import AVX2, TinyMobileNet, images
from torchslim.quantization import QDQConv2d, RoundedOutput
from torchslim.quantization.qat import QAT, FakeQuantLayer, FakeRoundedOutput, QATConfig
from torchslim.recipes import TrainSpec
from torchslim.train import fit


def _ctx() -> ts.Context:
    teacher = TinyMobileNet().eval()
    with torch.no_grad():
        data = [(x, teacher(x).argmax(1)) for x in (images(16, seed) for seed in range(4))]
    return ts.Context(example_inputs=data[0][0][:2], train_data=data, calib_data=[x for x, _ in data], seed=0)


def _trained(estimator: str) -> tuple[nn.Module, QAT, ts.Context]:
    """The fake-quantized model after a few QAT steps (before ``on_end``)."""
    method, ctx = QAT(QATConfig(estimator=estimator)), _ctx()
    model = fit(TinyMobileNet().eval(), TrainSpec(steps=6, lr=1e-3), [method], ctx)
    return model, method, ctx


@pytest.mark.parametrize("estimator", ["ste", "lsq"])
def test_the_residual_sum_is_fake_quantized_on_the_grid_its_reader_keeps(estimator: str) -> None:
    model, method, ctx = _trained(estimator)
    wrapper, reader = model.blocks[0], model.blocks[1].expand[0]
    assert isinstance(wrapper, FakeRoundedOutput) and not isinstance(model.blocks[1], FakeRoundedOutput)
    assert isinstance(reader, FakeQuantLayer) and not reader.quantize_input  # the wrapper rounds for it
    assert isinstance(wrapper.inner.project[0], FakeQuantLayer)
    assert method.cal is not None and "blocks.0.inner.project.0" in method.fusions
    start, trained = method.cal.rounded["blocks.0"], wrapper.grid()
    assert trained.scale != start.scale  # the grid moved while training (moving average or LSQ)
    x = images(8, 20)
    with torch.no_grad():
        codes = wrapper(model.stem(x)) / wrapper.scale + wrapper.zero_point
        torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)  # on the grid
        fake = model.eval()(x)
    outcome = method.on_end(model, ctx)
    q = outcome.model
    assert outcome.stats["rounded_outputs"] == 1 and outcome.structure["blocks.0"] == {"wrap": True}
    assert "blocks.0.inner.project.0" in outcome.touched and "blocks.0.inner.project.1" in outcome.structure
    rounded, reader = q.blocks[0], q.blocks[1].expand[0]
    assert isinstance(rounded, RoundedOutput) and isinstance(reader, QDQConv2d)
    assert float(rounded.scale) == float(reader.input_scale) == pytest.approx(trained.scale, rel=1e-6)
    assert int(rounded.zero_point) == int(reader.input_zero_point) == trained.zero_point
    assert not reader.quantize_input
    with torch.enable_grad():  # the float QDQ form: the trained arithmetic, up to the int32 bias
        converted = q(x.clone().requires_grad_(True)).detach()
    torch.testing.assert_close(converted, fake, rtol=0, atol=0.05)


def test_gradients_pass_the_rounded_sum_and_reach_its_step_size() -> None:
    method, ctx = QAT(QATConfig(estimator="lsq")), _ctx()
    model = method.on_start(TinyMobileNet().train(), ctx)
    wrapper = model.blocks[0]
    assert isinstance(wrapper, FakeRoundedOutput) and isinstance(wrapper.scale, nn.Parameter)
    model(images(8, 21)).square().sum().backward()
    assert wrapper.scale.grad is not None and float(wrapper.scale.grad.abs()) > 0
    for layer in (model.stem[0], wrapper.inner.project[0]):  # straight through the sum's rounding
        assert float(layer.layer.weight.grad.abs().sum()) > 0


def _optimized_ops(path: Path) -> list[str]:
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]


@pytest.mark.skipif(not AVX2, reason="QLinearAdd's rounding is that of the AVX2 kernel")
@pytest.mark.parametrize("estimator", ["ste", "lsq"])
def test_qat_model_matches_onnx_runtime_bit_for_bit_and_reloads(estimator: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from torchslim.export import load, save
    from torchslim.export.onnx import OnnxModule, export_onnx

    result = ts.apply(TinyMobileNet().eval(), QATConfig(estimator=estimator), _ctx(), steps=6, lr=1e-3)
    q = result.model
    assert isinstance(q.blocks[0], RoundedOutput) and not isinstance(q.blocks[1], RoundedOutput)
    export_onnx(q, images(2, 9), tmp_path / "m.onnx")
    ops = _optimized_ops(tmp_path / "m.onnx")
    assert ops.count("QLinearConv") == 7 and ops.count("QGemm") == 1, ops
    assert ops.count("QLinearAdd") == 1 and ops.count("Add") == 1, ops  # block 1's sum: pooled in float
    x = images(64, 10)
    with torch.inference_mode():
        ours = q(x)
    assert torch.equal(ours, OnnxModule(tmp_path / "m.onnx")(x))  # every code of every layer equal
    save(result, tmp_path / "run")
    reloaded = load(tmp_path / "run", TinyMobileNet)
    assert isinstance(reloaded.blocks[0], RoundedOutput)
    with torch.inference_mode():
        assert torch.equal(reloaded(x), ours)


def test_round_outputs_false_keeps_the_sums_float() -> None:
    result = ts.apply(TinyMobileNet().eval(), QATConfig(round_outputs=False), _ctx(), steps=2, lr=1e-3)
    assert not any(isinstance(m, RoundedOutput) for m in result.model.modules())
    assert result.model.blocks[1].expand[0].quantize_input  # the reader rounds the float sum itself
    assert result.record.outcomes[-1].stats["rounded_outputs"] == 0


@pytest.mark.parametrize("estimator", ["ste", "lsq"])
def test_a_killed_qat_run_resumes_to_the_same_grids_and_weights(estimator: str, tmp_path: Path) -> None:
    ctx, spec, cfg = _ctx(), TrainSpec(epochs=2, lr=1e-3), QATConfig(estimator=estimator)
    full = fit(TinyMobileNet().eval(), spec, [QAT(cfg), KillAt(-1)], ctx, checkpoint_dir=tmp_path / "full")
    steps = len(ctx.train_data)
    with pytest.raises(Stop):  # killed in the middle of epoch 2
        fit(TinyMobileNet().eval(), spec, [QAT(cfg), KillAt(steps + 1)], ctx, checkpoint_dir=tmp_path / "killed")
    assert [p.name for p in (tmp_path / "killed").glob("train-*.pt")] == ["train-1.pt"]
    resumed = fit(TinyMobileNet().eval(), spec, [QAT(cfg), KillAt(-1)], ctx, checkpoint_dir=tmp_path / "killed")
    assert isinstance(resumed.blocks[0], FakeRoundedOutput)
    expected = full.state_dict()
    assert "blocks.0.scale" in expected and expected.keys() == resumed.state_dict().keys()
    for name, tensor in resumed.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
