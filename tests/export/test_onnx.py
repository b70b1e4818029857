"""export/onnx.py: verified export, dynamic batch, unchanged model modes, OnnxModule, latency."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tiny_models import MLP, ResConcatCNN
from torchslim.errors import DataError, ExportError, OutputError
from torchslim.export import OnnxModule, export_onnx, onnx_latency

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

_INPUTS = {"mlp": lambda b: torch.randn(b, 16), "cnn": lambda b: torch.randn(b, 3, 12, 12)}
_BUILD = {"mlp": MLP, "cnn": ResConcatCNN}
Exported = dict[str, tuple[nn.Module, dict[str, Any], torch.Tensor]]  # name -> (model, info, inputs)


class DropoutMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def _trained_stats(model: nn.Module) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics, then switch to eval."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 12, 12) * 2 + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, build in _BUILD.items():
        model = build()
        if name == "cnn":
            _trained_stats(model)
        x = _INPUTS[name](4)
        out[name] = (model, export_onnx(model.eval(), x, folder / f"{name}.onnx"), x)
    return out


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_export_is_verified_against_pytorch(exported: Exported, name: str) -> None:
    _, info, _ = exported[name]
    path = Path(info["path"])
    assert path.is_file() and info["bytes"] == path.stat().st_size
    assert info["cosine"] > 0.9999
    assert info["max_abs_diff"] < 1e-4
    assert info["top1_agreement"] == 1.0
    assert isinstance(info["opset"], int) and info["opset"] >= 13
    assert info["exporter"] == "dynamo exporter" and info["dynamic_batch"]
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp files


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_onnx_module_equals_the_session_and_pytorch_at_any_batch(exported: Exported, name: str) -> None:
    model, info, _ = exported[name]
    module = OnnxModule(info["path"])
    assert module.providers == ["CPUExecutionProvider"] and module.path == Path(info["path"])
    for batch in (1, 7):
        x = _INPUTS[name](batch)
        raw = module.session.run(None, {module.session.get_inputs()[0].name: x.numpy()})[0]
        out = module(x)
        assert isinstance(out, torch.Tensor) and torch.equal(out, torch.from_numpy(raw))
        torch.testing.assert_close(out, model.eval()(x), rtol=1e-4, atol=1e-5)


def test_onnx_module_can_run_the_graph_unoptimized(exported: Exported) -> None:
    import onnxruntime as ort

    model, info, _ = exported["cnn"]
    plain, tuned = OnnxModule(info["path"], optimize=False), OnnxModule(info["path"])
    level = ort.GraphOptimizationLevel
    assert plain.session.get_session_options().graph_optimization_level == level.ORT_DISABLE_ALL
    assert tuned.session.get_session_options().graph_optimization_level != level.ORT_DISABLE_ALL
    x = _INPUTS["cnn"](5)
    torch.testing.assert_close(plain(x), model.eval()(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain(x), tuned(x), rtol=1e-4, atol=1e-5)


def test_eval_fn_scores_the_exported_model_like_the_torch_model(exported: Exported) -> None:
    model, info, _ = exported["cnn"]
    x = _INPUTS["cnn"](32)

    def eval_fn(m: nn.Module) -> dict[str, float]:
        with torch.inference_mode():
            return {"mean_top1": float(m(x).argmax(1).float().mean())}

    assert eval_fn(OnnxModule(info["path"])) == eval_fn(model.eval())


@pytest.mark.parametrize("train", [True, False])
def test_export_leaves_modes_and_requires_grad_unchanged(tmp_path: Path, train: bool) -> None:
    torch.manual_seed(0)
    model = DropoutMLP().train(train)
    model.fc1.requires_grad_(False)
    model.bn.eval()  # a frozen BatchNorm inside a model in training mode stays frozen
    modes = {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    stats = model.bn.running_mean.clone()
    info = export_onnx(model, torch.randn(1, 16), tmp_path / "m.onnx")
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert torch.equal(model.bn.running_mean, stats)
    assert info["cosine"] > 0.9999  # compared with eval-mode PyTorch: dropout is off in ONNX


def test_batch_one_example_still_gives_a_dynamic_batch(tmp_path: Path) -> None:
    model = ResConcatCNN().eval()
    info = export_onnx(model, torch.randn(1, 3, 12, 12), tmp_path / "b1.onnx")
    x = torch.randn(5, 3, 12, 12)
    torch.testing.assert_close(OnnxModule(info["path"])(x), model(x), rtol=1e-4, atol=1e-5)


def test_failed_verification_raises_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="cosine"):
        export_onnx(MLP(), torch.randn(2, 16), tmp_path / "m.onnx", min_cosine=1.5)
    assert list(tmp_path.iterdir()) == []


def test_a_model_no_exporter_handles_raises_export_error(tmp_path: Path) -> None:
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("this layer cannot run")

    with pytest.raises(ExportError, match="cannot export Broken to ONNX.*dynamo.*TorchScript"):
        export_onnx(Broken(), torch.randn(2, 4), tmp_path / "b.onnx")
    assert list(tmp_path.iterdir()) == []


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 2 if x.abs().sum().item() > 0 else 1  # Python control flow on data: dynamo refuses
        return self.fc(x) * scale


@pytest.mark.slow
def test_torchscript_exporter_is_the_fallback(tmp_path: Path) -> None:
    model = DataDependent()
    info = export_onnx(model, torch.randn(2, 4), tmp_path / "dd.onnx")
    assert info["exporter"] == "TorchScript exporter" and info["cosine"] > 0.9999
    x = torch.randn(6, 4)
    torch.testing.assert_close(OnnxModule(info["path"])(x), model(x), rtol=1e-5, atol=1e-6)


def test_verify_false_skips_the_comparison(tmp_path: Path) -> None:
    info = export_onnx(MLP(), torch.randn(2, 16), tmp_path / "m.onnx", verify=False, opset=18)
    assert info["opset"] == 18 and "cosine" not in info
    assert (tmp_path / "m.onnx").stat().st_size == info["bytes"]


def test_bad_inputs_raise_clear_errors(exported: Exported, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="tensor or a tuple of tensors"):
        export_onnx(MLP(), [np.zeros((2, 16))], tmp_path / "m.onnx")
    with pytest.raises(OutputError, match="does not exist"):
        OnnxModule(tmp_path / "absent.onnx")
    module = OnnxModule(exported["mlp"][1]["path"])
    with pytest.raises(DataError, match="takes 1 input"):
        module(torch.randn(2, 16), torch.randn(2, 16))
    with pytest.raises(DataError, match=r"failed on inputs of shape \[\[2, 15\]\]"):
        module(torch.randn(2, 15))


@pytest.mark.skipif(importlib.util.find_spec("torchslim.measure.latency") is None,
                    reason="torchslim.measure.latency has not landed yet")
def test_onnx_latency_times_the_session(exported: Exported) -> None:
    _, info, x = exported["cnn"]
    timing = onnx_latency(info["path"], x, warmup=1, repeats=5)
    assert timing["latency_ms"] > 0 and timing["repeats"] >= 5


def test_importing_export_does_not_import_onnx() -> None:
    code = ("import sys, torchslim.export; heavy = {'onnx', 'onnxruntime', 'onnxscript'}; "
            "bad = heavy & {m.split('.')[0] for m in sys.modules}; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
