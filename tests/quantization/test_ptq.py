"""Static int8 (quantization.ptq) and QAT: folding, observers, grids, ONNX Runtime int8 kernels."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from tiny_mobilenet import trained_batchnorms
from torchslim.errors import ConfigError, DataError
from torchslim.quantization import PTQConfig, QDQConv2d, QDQLinear
from torchslim.quantization._static import fuse
from torchslim.quantization.observers import Observer, choose_range
from torchslim.quantization.qat import QATConfig
from torchslim.recipes import Recipe, TrainSpec


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    trained_batchnorms(model)
    return model.eval()


def _batches(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 12, 12, generator=g) for _ in range(n)]


def _ctx() -> ts.Context:
    b = _batches()
    return ts.Context(example_inputs=b[0][:2], calib_data=b, seed=0)


def test_folding_batchnorm_and_relu_is_exact_in_float() -> None:
    model = _cnn()
    fused = copy.deepcopy(model)
    fusions = fuse(fused, ("type:Conv2d", "type:Linear"), (), "test")
    assert [f.activation for f in fusions.values()] == ["relu", "relu6", "none", "none"]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) == 0
    x = _batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


class _Block(nn.Module):
    """A ResNet-style block: its BatchNorms are called from ``forward``, not from a Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(8, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return self.head(torch.relu(h + x).mean(dim=(2, 3)))


def test_traced_blocks_fuse_batchnorms_called_from_forward() -> None:
    torch.manual_seed(0)
    model = _Block().eval()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    fused = copy.deepcopy(model)
    fusions = fuse(fused, ("type:Conv2d", "type:Linear"), (), "test")
    assert (fusions["conv1"].norm, fusions["conv1"].activation) == ("bn1", "relu")
    assert (fusions["conv2"].norm, fusions["conv2"].activation) == ("bn2", "none")  # the add comes first
    x = _batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_ptq_grids_are_shared_and_outputs_stay_close() -> None:
    model = _cnn()
    x = _batches(1)[0]
    with torch.no_grad():
        ref = model(x)
    q = ts.apply(copy.deepcopy(model), PTQConfig(observer="minmax"), _ctx()).model
    layers = [m for m in q.modules() if isinstance(m, QDQConv2d | QDQLinear)]
    assert len(layers) == 4
    assert layers[0].quantize_input and not layers[1].quantize_input  # conv1's output grid is reused
    assert not layers[3].quantize_output  # the logits stay float
    assert layers[0].qweight.dtype == torch.int8 and layers[0].qbias.dtype == torch.int32
    assert int(layers[0].output_zero_point) == 0  # fused ReLU: the grid starts at 0
    with torch.no_grad():
        out = q(x)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05, f"int8 relative error {rel:.4f}"
    # 4-bit activations and weights are markedly worse: the grids really round
    q4 = ts.apply(copy.deepcopy(model), PTQConfig(observer="minmax", weight_bits=4, activation_bits=4),
                  _ctx()).model
    with torch.no_grad():
        rel4 = (q4(x) - ref).norm() / ref.norm()
    assert rel4 > 2 * rel


def test_observers_clip_outliers_and_lower_the_rounding_error() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=g)
    x[0] = 60.0  # one outlier stretches the min/max range
    obs = Observer()
    obs.see_range(x)
    obs.see_values(x)
    ranges = {m: choose_range(obs, m) for m in ("minmax", "percentile", "mse", "histogram")}
    assert ranges["minmax"] == pytest.approx((float(x.min()), 60.0))
    for method in ("percentile", "histogram"):  # both drop the lone outlier
        assert ranges[method][1] < 30, (method, ranges[method])
    assert ranges["mse"][1] <= 60.0  # MSE clips only where the rounding error saved pays for it

    def error(lo: float, hi: float) -> float:
        scale = (hi - lo) / 255
        zp = round(-lo / scale)
        q = (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale
        return float(((q - x) ** 2).mean())

    assert error(*ranges["mse"]) < error(*ranges["minmax"])
    # a heavy-tailed (Laplace) distribution: MSE clips its tails and beats min/max
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((100_000,))
    obs = Observer()
    obs.see_range(laplace)
    obs.see_values(laplace)
    lo, hi = choose_range(obs, "mse", bits=4)
    assert hi < 0.8 * float(laplace.max()) and lo > 0.8 * float(laplace.min())


def _ort_ops(path: Path, tmp: Path) -> list[str]:
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp / "optimized.onnx")).graph.node]


def test_onnx_runtime_runs_int8_kernels_and_matches_pytorch(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from torchslim.export.onnx import OnnxModule, export_onnx

    q = ts.apply(_cnn(), PTQConfig(observer="histogram"), _ctx()).model
    x = _batches(1)[0]
    export_onnx(q, x[:2], tmp_path / "m.onnx")
    ops = _ort_ops(tmp_path / "m.onnx", tmp_path)
    assert ops.count("QLinearConv") == 3, ops  # every conv runs as an int8 kernel
    with torch.no_grad():
        ours = q(x)
    theirs = OnnxModule(tmp_path / "m.onnx")(x)
    # the same grids; integer vs float accumulation may move a value by one output step
    step = float(max(m.output_scale for m in q.modules() if isinstance(m, QDQConv2d)))
    assert (theirs - ours).abs().max() < 4 * step
    assert (theirs.argmax(1) == ours.argmax(1)).float().mean() >= 0.99


def test_bias_correction_removes_the_mean_shift_of_every_channel() -> None:
    model = _cnn()
    batches = _batches()
    ctx = ts.Context(example_inputs=batches[0][:2], calib_data=batches, seed=0)
    cfg = dict(weight_bits=4, activation_bits=4, observer="minmax")
    plain = ts.apply(copy.deepcopy(model), PTQConfig(**cfg), ctx).model
    corrected = ts.apply(copy.deepcopy(model), PTQConfig(**cfg, bias_correction=True), ctx)
    assert corrected.record.outcomes[-1].stats["bias_corrected"] == 4
    with torch.no_grad():
        ref = torch.cat([model(b) for b in batches])
        shift_plain = (torch.cat([plain(b) for b in batches]) - ref).mean(0).abs().max()
        shift = (torch.cat([corrected.model(b) for b in batches]) - ref).mean(0).abs().max()
    # the logits are the last layer's pre-activation: their mean now matches up to half a bias step
    half_step = 0.5 * float(corrected.model[-1].bias_scale.max()) + 1e-6
    assert shift <= half_step < shift_plain / 4, (float(shift_plain), float(shift), half_step)
    fresh = _batches(2)  # and the correction is not only fitted to the calibration batches
    with torch.no_grad():
        err = sum(float((plain(x) - model(x)).norm()) for x in fresh)
        err_corrected = sum(float((corrected.model(x) - model(x)).norm()) for x in fresh)
    assert err_corrected < err


class _PoolNet(nn.Module):
    """conv -> max-pool -> residual block -> conv -> max-pool -> flatten -> linear, like fashion_cnn."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(16 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(self.down(x), 1))


def test_layers_after_max_pooling_reuse_the_grid_and_run_in_uint8(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from torchslim.export.onnx import OnnxModule, export_onnx
    from torchslim.export.qdq_graph import share_grids

    q = ts.apply(_PoolNet().eval(), PTQConfig(), _ctx()).model
    # conv1 reads the stem's max-pooled output, fc the flattened pooled output of down
    for layer, source in ((q.conv1, q.stem[0]), (q.fc, q.down[0])):
        assert layer.quantize_input
        assert float(layer.input_scale) == float(source.output_scale)
        assert int(layer.input_zero_point) == int(source.output_zero_point)
    x = _batches(1)[0]
    with torch.no_grad():
        ours = q(x)
        for layer in (q.conv1, q.fc):  # rounding to the source's grid is the identity there
            layer.quantize_input = False
        assert torch.equal(q(x), ours)
        for layer in (q.conv1, q.fc):
            layer.quantize_input = True
    export_onnx(q, x[:2], tmp_path / "m.onnx")
    assert share_grids(tmp_path / "m.onnx") == 0  # export_onnx has already rewritten it
    ops = _ort_ops(tmp_path / "m.onnx", tmp_path)
    assert "QLinearAdd" in ops, ops  # both inputs of the residual add are now int8
    assert "MaxPool" not in ops and ops.count("NhwcMaxPool") == 2, ops
    assert ops.count("DequantizeLinear") <= 1, ops
    theirs = OnnxModule(tmp_path / "m.onnx")(x)
    assert (theirs.argmax(1) == ours.argmax(1)).float().mean() >= 0.99
    assert torch.nn.functional.cosine_similarity(theirs, ours).min() > 0.99


def test_qat_keeps_the_grid_shared_across_max_pooling() -> None:
    model = _PoolNet().eval()
    data = [(x, model(x).argmax(1).detach()) for x in _batches(4)]
    ctx = ts.Context(example_inputs=data[0][0][:2], train_data=data, calib_data=[x for x, _ in data], seed=0)
    q = ts.compress(model, Recipe.single(QATConfig(estimator="lsq"), TrainSpec(epochs=1, lr=1e-3)), ctx).model
    x = data[0][0]
    with torch.no_grad():
        ours = q(x)
        for layer, source in ((q.conv1, q.stem[0]), (q.fc, q.down[0])):  # the learned output grid is reused
            assert float(layer.input_scale) == float(source.output_scale)
            layer.quantize_input = False
        assert torch.equal(q(x), ours)


def test_grid_sharing_leaves_float_graphs_alone(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import onnx

    from torchslim.export.onnx import export_onnx
    from torchslim.export.qdq_graph import share_grids

    export_onnx(_PoolNet().eval(), _batches(1)[0][:2], tmp_path / "f.onnx")
    before = onnx.load(str(tmp_path / "f.onnx")).SerializeToString()
    assert share_grids(tmp_path / "f.onnx") == 0
    assert onnx.load(str(tmp_path / "f.onnx")).SerializeToString() == before


def test_ptq_bad_input() -> None:
    with pytest.raises(ConfigError, match="weight_bits"):
        PTQConfig(weight_bits=9)
    with pytest.raises(ConfigError, match="observer"):
        PTQConfig(observer="kl")
    with pytest.raises(DataError, match="calibration"):
        ts.apply(_cnn(), PTQConfig(), ts.Context(example_inputs=_batches(1)[0]))
    with pytest.raises(ConfigError, match="estimator"):
        QATConfig(estimator="pact")


@pytest.mark.parametrize("estimator", ["ste", "lsq"])
def test_qat_trains_and_converts_to_the_same_arithmetic(estimator: str) -> None:
    torch.manual_seed(0)
    model = _cnn()
    teacher = copy.deepcopy(model)
    data = [(x, teacher(x).argmax(1).detach()) for x in _batches(8)]
    ctx = ts.Context(example_inputs=data[0][0][:2], train_data=data, calib_data=[x for x, _ in data], seed=0)
    cfg = QATConfig(estimator=estimator, weight_bits=4, activation_bits=4)
    history: list[dict[str, float]] = []
    recipe = Recipe.single(cfg, TrainSpec(epochs=3, lr=1e-3))
    result = ts.compress(copy.deepcopy(model), recipe, ctx)
    layers = [m for m in result.model.modules() if isinstance(m, QDQConv2d | QDQLinear)]
    assert len(layers) == 4 and not result.model.training
    x = data[0][0]
    ptq = ts.apply(copy.deepcopy(model), PTQConfig(weight_bits=4, activation_bits=4, observer="minmax"), ctx).model
    with torch.no_grad():
        agree_qat = (result.model(x).argmax(1) == data[0][1]).float().mean()
        agree_ptq = (ptq(x).argmax(1) == data[0][1]).float().mean()
    assert agree_qat >= agree_ptq, (float(agree_qat), float(agree_ptq))
    del history


class _InvertedBlock(nn.Module):
    """A MobileNetV2-style residual block: the sum leaves the block and feeds the next one twice."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(width, 2 * width, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(2 * width, width, 1, bias=False), nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.expand(x))


class _ResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.blocks = nn.Sequential(_InvertedBlock(8), _InvertedBlock(8))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def test_residual_sums_are_rounded_once_and_run_as_uint8_adds(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from torchslim.export import load, save
    from torchslim.export.onnx import OnnxModule, export_onnx
    from torchslim.quantization import RoundedOutput

    model = _ResidualNet().eval()
    ctx = _ctx()
    result = ts.compress(copy.deepcopy(model), Recipe.single(PTQConfig(bias_correction=True)), ctx)
    q = result.model
    assert result.record.outcomes[0].stats["rounded_outputs"] == 1  # block 0's sum feeds block 1
    wrapped = q.blocks[0]
    assert isinstance(wrapped, RoundedOutput) and not isinstance(q.blocks[1], RoundedOutput)  # 1 feeds the head
    reader = q.blocks[1].expand[0]
    assert not reader.quantize_input and float(reader.input_scale) == float(wrapped.scale)
    x = _batches(1)[0]
    with torch.no_grad():
        ours = q(x)
        sums = wrapped(q.stem(x))  # the sum itself lies on the grid the next block reads
        codes = sums / wrapped.scale + wrapped.zero_point.float()
        torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)
        assert torch.nn.functional.cosine_similarity(ours, model(x)).min() > 0.98
    save(result, tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "run", _ResidualNet)(x), ours, rtol=0, atol=0)
    export_onnx(q, x[:2], tmp_path / "m.onnx")
    ops = _ort_ops(tmp_path / "m.onnx", tmp_path)
    assert ops.count("QLinearAdd") == 1 and ops.count("Add") == 1, ops  # block 1's sum: the head's float input
    theirs = OnnxModule(tmp_path / "m.onnx")(x)
    assert torch.nn.functional.cosine_similarity(theirs, ours).min() > 0.99
    plain = ts.apply(copy.deepcopy(model), PTQConfig(round_outputs=False), ctx).model
    assert not any(isinstance(m, RoundedOutput) for m in plain.modules())
    export_onnx(plain, x[:2], tmp_path / "plain.onnx")
    ops = _ort_ops(tmp_path / "plain.onnx", tmp_path)
    assert "QLinearAdd" not in ops and ops.count("Add") == 2, ops  # both sums stay float


def test_a_wrap_op_naming_a_module_that_wraps_nothing_is_refused() -> None:
    from torchslim.core.structure import replay
    from torchslim.errors import OutputError

    ops = [{"fqn": "blocks.0", "wrap": {"cls": "Identity", "kwargs": {}}}]
    with pytest.raises(OutputError, match=r"ops\[0\]: 'Identity' is not a wrapper module"):
        replay(_ResidualNet(), ops)
    ops = [{"fqn": "blocks.0", "wrap": {"cls": "torchslim:RoundedOutput", "kwargs": {"activation_bits": 99}}}]
    with pytest.raises(OutputError, match="activation_bits must be an integer in 2..8, found 99"):
        replay(_ResidualNet(), ops)


class _SharedReluBlock(nn.Module):
    """torchvision's BasicBlock pattern: one ReLU module applied twice, the second after the add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


def test_a_module_run_twice_is_not_wrapped_its_block_is() -> None:
    from torchslim.quantization import RoundedOutput

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _SharedReluBlock(), _SharedReluBlock(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    q = ts.apply(copy.deepcopy(model), PTQConfig(), _ctx()).model
    assert isinstance(q[1], RoundedOutput) and not isinstance(q[1].inner.relu, RoundedOutput)
    assert not isinstance(q[2], RoundedOutput)  # its output reaches the head through pooling, in float
    x = _batches(1)[0]
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(q(x), model(x)).min() > 0.98
