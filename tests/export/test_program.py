"""export/program.py: TorchScript and torch.export round trips, verified; failures are ExportError."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from tiny_models import CASES, TinyCase
from torchslim.errors import ExportError
from torchslim.export.artifacts import example_inputs_of, export_artifact
from torchslim.export.program import compare, export_program, load_program
from torchslim.quantization import WeightOnlyConfig


@pytest.mark.parametrize("fmt", ["torchscript", "torch_export"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_round_trip_matches_pytorch(case: TinyCase, fmt: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = case.build().train()
    x = case.make_input(3)
    info = export_program(model, x, tmp_path / "m.bin", fmt)
    assert model.training  # mode restored
    assert info["cosine"] > 0.99999 and info["max_abs_diff"] < 1e-4 and info["bytes"] > 0
    loaded = load_program(tmp_path / "m.bin", fmt)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["m.bin"]  # no temporary file left


@pytest.mark.parametrize("fmt", ["torchscript", "torch_export", "onnx"])
def test_weight_only_int4_model_exports(fmt: str, tmp_path: Path) -> None:
    case = CASES[0]
    torch.manual_seed(0)
    model = ts.apply(case.build(), WeightOnlyConfig(bits=4, group_size=16), ts.Context()).model
    info = export_artifact(model, case.make_input(2), tmp_path, fmt)
    assert info["cosine"] > 0.9999 and info["latency_ms"] > 0
    if fmt == "onnx":
        onnx = pytest.importorskip("onnx")
        ops = {node.op_type for node in onnx.load(info["path"]).graph.node}
        assert "MatMulNBits" in ops


class DictOutput(nn.Module):
    """Returns its logits inside a mapping, as Hugging Face models return output objects."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.linear(x), "hidden": x}


def test_onnx_artifact_of_a_model_returning_a_mapping(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model = DictOutput()
    x = torch.randn(2, 4)
    info = export_artifact(model, x, tmp_path, "onnx")
    assert info["cosine"] > 0.99999
    from torchslim.export.onnx import OnnxModule

    torch.testing.assert_close(OnnxModule(info["path"])(x), model(x)["logits"], rtol=1e-5, atol=1e-5)


class Branchy(nn.Module):
    """Data-dependent control flow: a trace records one branch, so the reloaded file disagrees."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if float(x.sum()) > 0 else -x * 3


class NoTensor(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, int]:
        return {"n": x.shape[0]}


def test_failures_are_export_errors(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export_program(nn.Linear(2, 2), torch.randn(1, 2), tmp_path / "x", "tflite")
    with pytest.raises(ExportError, match="torch_export export of Branchy failed"):
        export_program(Branchy(), torch.ones(1, 4), tmp_path / "b.pt2", "torch_export")
    with pytest.raises(ExportError, match="holding no tensor"):
        export_program(NoTensor(), torch.ones(1, 4), tmp_path / "n.pt", "torchscript")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_compare_and_example_inputs() -> None:
    a = torch.tensor([1.0, 2.0, 3.0])
    assert compare(a, a) == {"max_abs_diff": 0.0, "cosine": pytest.approx(1.0)}
    assert compare(a, -a)["cosine"] == pytest.approx(-1.0)
    with pytest.raises(ExportError, match=r"shape \(2,\).*\(3,\)"):
        compare(a, a[:2])
    with pytest.raises(ExportError, match="NaN"):
        compare(a, torch.tensor([1.0, float("nan"), 3.0]))
    assert compare(torch.zeros(3), torch.zeros(3))["cosine"] == 1.0
    x = example_inputs_of({"example_input_shape": [1, 5]})
    assert x is not None and x.dtype == torch.float32 and x.shape == (1, 5)
    assert example_inputs_of({"example_input_shape": [1, 5], "example_input_dtype": "int64"}) is None
    assert example_inputs_of({}) is None
