"""core/structure.py: capture -> JSON -> replay rebuilds narrowed models; bad files fail clearly."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

from torchslim.core import structure
from torchslim.errors import OutputError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.fc1 = nn.Linear(16, 32)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).mean(dim=(2, 3))
        return self.fc2(self.drop(torch.relu(self.fc1(h))))


def _narrowed() -> tuple[Net, dict[str, dict[str, Any]]]:
    """A Net whose channels 8 -> 5 and hidden 32 -> 20 were cut, with fresh random weights."""
    torch.manual_seed(0)
    model = Net()
    model.features[0] = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    model.features[1] = nn.BatchNorm2d(5)
    model.features[3] = nn.Conv2d(5, 16, 3, stride=2, padding=1)
    model.fc1 = nn.Linear(16, 20)
    model.fc2 = nn.Linear(20, 10)
    with torch.no_grad():
        model.features[1].running_mean.normal_()
        model.features[1].running_var.uniform_(0.5, 2.0)
        model.features[1].weight.normal_()
    changed = ("features.0", "features.1", "features.3", "fc1", "fc2")
    changes: dict[str, dict[str, Any]] = {fqn: {} for fqn in changed}
    return model, changes


def test_narrowed_cnn_rebuilds_from_a_fresh_base_and_loads_strictly() -> None:
    model, changes = _narrowed()
    ops = json.loads(json.dumps(structure.capture(model, changes)))  # as written to structure.json
    rebuilt = structure.replay(Net(), ops)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(4, 3, 12, 12)
    model.eval()
    rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
    assert rebuilt.features[3].stride == (2, 2) and rebuilt.features[1].num_features == 5


def test_a_base_model_rejects_the_narrowed_weights_without_replay() -> None:
    model, _ = _narrowed()
    with pytest.raises(RuntimeError, match="size mismatch"):
        Net().load_state_dict(model.state_dict(), strict=True)


def test_dtype_and_recorded_attributes_are_replayed() -> None:
    model = Net()
    model.fc2 = nn.Linear(32, 10).double()
    model.drop.p = 0.1
    changes: dict[str, dict[str, Any]] = {"fc2": {}, "drop": {"attrs": ["p"], "keep_module": True}}
    ops = json.loads(json.dumps(structure.capture(model, changes)))
    rebuilt = structure.replay(Net(), ops)
    assert rebuilt.fc2.weight.dtype == torch.float64
    assert rebuilt.drop.p == 0.1


def test_capture_orders_parents_first_and_drops_vanished_fqns() -> None:
    model = Net()
    ops = structure.capture(model, {"features.0": {}, "fc1": {}, "gone": {}})
    assert [op["fqn"] for op in ops] == ["fc1", "features.0"]


class _TestScale(nn.Module):
    def __init__(self, width: int, factor: float) -> None:
        super().__init__()
        self.width, self.factor = width, factor
        self.weight = nn.Parameter(torch.full((width,), factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    def spec_kwargs(self) -> dict[str, Any]:
        return {"width": self.width, "factor": self.factor}


def test_rebuildable_classes_are_allowed_by_name() -> None:
    structure.rebuildable(_TestScale)
    model = Net()
    model.drop = _TestScale(32, 2.0)  # type: ignore[assignment]
    ops = json.loads(json.dumps(structure.capture(model, {"drop": {}})))
    assert ops[0]["module"]["cls"] == "torchslim:_TestScale"
    rebuilt = structure.replay(Net(), ops)
    assert isinstance(rebuilt.drop, _TestScale) and rebuilt.drop.width == 32
    rebuilt.load_state_dict(model.state_dict(), strict=True)


def test_capture_refuses_a_module_that_cannot_be_rebuilt() -> None:
    model = Net()
    model.drop = nn.GELU()  # type: ignore[assignment]
    with pytest.raises(OutputError, match="cannot record a GELU"):
        structure.capture(model, {"drop": {}})


@pytest.mark.parametrize("cls", ["os.system", "torch.nn.Linear", "GELU", "torchslim:Nope"])
def test_unknown_class_in_structure_raises(cls: str) -> None:
    ops = [{"fqn": "fc1", "module": {"cls": cls, "kwargs": {}}}]
    with pytest.raises(OutputError, match="unknown module class"):
        structure.replay(Net(), ops)


@pytest.mark.parametrize("fqn", ["head", "features.9", "missing.fc", "fc1.inner"])
def test_nonexistent_fqn_raises(fqn: str) -> None:
    ops = [{"fqn": fqn, "module": {"cls": "Linear", "kwargs": {"in_features": 2, "out_features": 2}}}]
    with pytest.raises(OutputError, match="has no module"):
        structure.replay(Net(), ops)


@pytest.mark.parametrize(
    ("ops", "message"),
    [
        ({"fqn": "fc1"}, "'ops' must be a list"),
        ([{"module": {}}], "non-empty 'fqn'"),
        ([{"fqn": "fc1", "module": {"cls": "Linear", "kwargs": {"in_features": "x"}}}],
         "cannot build Linear"),
        ([{"fqn": "fc1", "module": {"cls": "Linear", "kwargs": [1]}}], "'kwargs' must be a mapping"),
        ([{"fqn": "fc1", "module": {"cls": []}}], "unknown module class"),  # found by tests/test_fuzz.py
        ([{"fqn": "drop", "attrs": {"p": [0.1]}}], "'attrs' must map names"),
        ([{"fqn": "drop", "attrs": {"__class__": "Linear"}}], "cannot be set"),
        ([{"fqn": "fc1", "attrs": {"weight": 3}}], "cannot set weight=3"),
    ],
)
def test_malformed_ops_raise_output_error(ops: Any, message: str) -> None:
    with pytest.raises(OutputError, match=message):
        structure.replay(Net(), ops)


def _tied_net() -> tuple[Net, dict[str, dict[str, Any]]]:
    """A Net whose fc1 and fc2 were swapped for 32 -> 32 Linears sharing fc2's parameters."""
    torch.manual_seed(0)
    model = Net()
    model.fc2 = nn.Linear(32, 32)
    model.fc1 = nn.Linear(32, 32)
    model.fc1.weight = model.fc2.weight
    model.fc1.bias = model.fc2.bias
    return model, {"fc1": {}, "fc2": {"tie": ["fc1"]}}


class Twin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.b = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.c = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)))


def test_tie_ops_come_after_swaps_and_rebuild_the_same_sharing() -> None:
    model, changes = _tied_net()
    ops = json.loads(json.dumps(structure.capture(model, changes)))
    assert ops[-1] == {"fqn": "fc2", "tie": ["fc1"]} and len(ops) == 3  # two swaps, then the tie
    rebuilt = structure.replay(Net(), ops)
    assert rebuilt.fc1.weight is rebuilt.fc2.weight and rebuilt.fc1.bias is rebuilt.fc2.bias
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(rebuilt.fc1.weight, model.fc2.weight)


def test_a_kept_module_records_only_its_tie_and_shares_every_nested_parameter() -> None:
    ops = structure.capture(Twin(), {"a": {"tie": ["b"], "keep_module": True}})
    assert ops == [{"fqn": "a", "tie": ["b"]}]
    twin = structure.replay(Twin(), ops)
    assert twin.a[0].weight is twin.b[0].weight and twin.a[1].bias is twin.b[1].bias
    assert sum(p.numel() for p in twin.parameters()) == 20 + 8 + 15


@pytest.mark.parametrize(
    ("op", "message"),
    [
        ({"fqn": "a", "tie": "b"}, "must name a module and list distinct"),
        ({"fqn": "a", "tie": []}, "must name a module and list distinct"),
        ({"fqn": "a", "tie": ["b", "b"]}, "must name a module and list distinct"),
        ({"fqn": "a", "tie": [3]}, "must name a module and list distinct"),
        ({"fqn": "a", "tie": [""]}, "must name a module and list distinct"),
        ({"fqn": "a", "tie": ["a.0"]}, "one contains the other"),
        ({"fqn": "a.0", "tie": ["a"]}, "one contains the other"),
        ({"fqn": "a", "tie": ["zz"]}, "has no module 'zz'"),
        ({"fqn": "zz", "tie": ["a"]}, "has no module 'zz'"),
        ({"fqn": "a.0.weight", "tie": ["b.0.weight"]}, "has no module"),
        ({"fqn": "a", "tie": ["c"]}, "has no parameter '0.weight'"),
        ({"fqn": "a.0", "tie": ["c"]}, r"cannot tie c.weight \[3, 4\]"),
        ({"fqn": "a.0", "tie": ["b.0", "c"]}, r"cannot tie c.weight"),  # b.0 is checked, not tied
    ],
)
def test_malformed_tie_ops_raise_output_error_and_tie_nothing(op: dict[str, Any], message: str) -> None:
    twin = Twin()
    with pytest.raises(OutputError, match=message):
        structure.replay(twin, [op])
    assert twin.a[0].weight is not twin.b[0].weight and twin.c.weight.shape == (3, 4)


class Config:
    """Stands in for a Hugging Face config: plain attributes."""

    def __init__(self) -> None:
        self.hidden_size = 4
        self.name = "twin"


class Configured(Twin):
    def __init__(self) -> None:
        super().__init__()
        self.config = Config()
        self.a.config = self.config  # nested models share one config object
        self.c.config = Config()  # or hold a copy


def test_a_root_config_op_sets_every_config_and_comes_with_the_ties() -> None:
    ops = structure.capture(Configured(), {"": {"keep_module": True, "config": {"hidden_size": 3}},
                                           "a": {"tie": ["b"], "keep_module": True}})
    assert ops == [{"fqn": "", "config": {"hidden_size": 3}}, {"fqn": "a", "tie": ["b"]}]
    model = structure.replay(Configured(), json.loads(json.dumps(ops)))
    assert model.config.hidden_size == model.c.config.hidden_size == 3 and model.a.config is model.config


@pytest.mark.parametrize(
    ("op", "message"),
    [
        ({"fqn": "", "config": {"hidden_size": "3"}}, "must map config names to positive integers"),
        ({"fqn": "", "config": {"hidden_size": 0}}, "must map config names to positive integers"),
        ({"fqn": "", "config": {"hidden_size": True}}, "must map config names to positive integers"),
        ({"fqn": "", "config": {}}, "must map config names to positive integers"),
        ({"fqn": "", "config": {"name": 3}}, "no config with an integer 'name'"),
        ({"fqn": "", "config": {"__class__": 3}}, "no config with an integer '__class__'"),
        ({"fqn": "a", "config": {"hidden_size": 3}}, "belongs to the root"),
    ],
)
def test_malformed_config_ops_raise_output_error_and_set_nothing(op: dict[str, Any], message: str) -> None:
    model = Configured()
    with pytest.raises(OutputError, match=message):
        structure.replay(model, [op])
    assert model.config.hidden_size == 4 and model.config.name == "twin"


def test_a_model_without_a_config_refuses_a_config_op() -> None:
    with pytest.raises(OutputError, match="no config with an integer 'hidden_size'"):
        structure.replay(Twin(), [{"fqn": "", "config": {"hidden_size": 3}}])
