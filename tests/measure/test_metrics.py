from __future__ import annotations

import importlib.metadata
import sys

import pytest
import torch
from torch import nn

from torchslim.core import Context
from torchslim.errors import ConfigError, DataError
from torchslim.measure.metrics import environment, measure_all
from torchslim.recipes.schema import MEASURES


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 4))


def _ctx(seen: list[bool] | None = None, **kw: object) -> Context:
    x = torch.randn(64, 16)
    y = torch.randint(0, 4, (64,))

    def evaluate(model: nn.Module) -> dict[str, float]:
        if seen is not None:
            seen.append(model.training)
        model.requires_grad_(False)  # a careless eval_fn; measure_all must undo it
        return {"accuracy": float((model(x).argmax(1) == y).float().mean()), "loss": 1.5}

    return Context(example_inputs=x[:2], eval_fn=evaluate, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("training", [True, False])
def test_measure_all_leaves_mode_and_grad_flags_unchanged(training: bool) -> None:
    model = _model().train(training)
    model[0].bias.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    seen: list[bool] = []
    values = measure_all(model, _ctx(seen), MEASURES)
    assert seen == [False]  # the task metric is measured in eval mode
    assert model.training is training and all(m.training is training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert set(values) == {"accuracy", "loss", "params", "params_nonzero", "size_bytes", "flops",
                           "latency_ms"}
    assert values["params"] == values["params_nonzero"] == 16 * 32 + 32 + 32 * 4 + 4
    assert values["flops"] == 2 * 2 * (16 * 32 + 32 * 4)
    assert values["latency_ms"] > 0 and values["size_bytes"] > 4 * values["params"]
    assert all(isinstance(v, float) for v in values.values())


def test_measures_without_their_inputs_are_skipped() -> None:
    values = measure_all(_model(), Context(), MEASURES)
    assert set(values) == {"params", "params_nonzero", "size_bytes"}
    assert measure_all(_model(), _ctx(), ["params"]).keys() == {"params", "params_nonzero"}
    assert measure_all(_model(), _ctx(), []) == {}


def test_unknown_names_and_bad_eval_results_are_errors() -> None:
    with pytest.raises(ConfigError, match="unknown names \\['latency_ms'\\]"):
        measure_all(_model(), Context(), ["latency_ms"])
    bad = Context(eval_fn=lambda model: 0.9)  # type: ignore[arg-type, return-value]
    with pytest.raises(DataError, match="found float"):
        measure_all(_model(), bad, ["accuracy"])


def test_inputs_as_a_dict_of_keyword_arguments() -> None:
    class KW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * scale

    ctx = Context(example_inputs={"x": torch.randn(3, 8), "scale": torch.ones(1)})
    assert measure_all(KW(), ctx, ["flops"])["flops"] == 2 * 3 * 8 * 8


def test_environment_describes_the_machine_without_importing_onnx() -> None:
    already = {"onnx", "onnxruntime"} & set(sys.modules)
    env = environment(Context(device="cpu"))
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert env["threads"] == torch.get_num_threads() >= 1
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["onnxruntime"] == importlib.metadata.version("onnxruntime")
    assert env["cpu"] and env["timestamp"].endswith("+00:00")
    assert {"onnx", "onnxruntime"} & set(sys.modules) == already
