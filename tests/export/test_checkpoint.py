"""export/checkpoint.py: save -> load round trips, compact sparse files, safe folders."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import torchslim
from torchslim.core import surgery
from torchslim.export import load, save
from torchslim.export.checkpoint import FILES
from torchslim.pruning.magnitude import MagnitudePruningConfig
from torchslim.report.record import RunRecord
from torchslim.runner import Result


class WideMLP(nn.Module):
    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _build() -> WideMLP:
    torch.manual_seed(0)
    return WideMLP()


def _pruned(sparsity: float) -> Result:
    model = _build()
    ctx = torchslim.Context(example_inputs=torch.randn(4, 64))
    return torchslim.apply(model, MagnitudePruningConfig(sparsity=sparsity), ctx)


def _narrowed() -> Result:
    """The hidden layer cut from 256 to 100 units, recorded as a structure change."""
    model = _build()
    model.fc2 = nn.Linear(256, 100)
    model.fc3 = nn.Linear(100, 10)
    record = RunRecord(recipe={"version": 1, "stages": []}, environment={})
    record.structure = {"fc2": {}, "fc3": {}}
    return Result(model=model, record=record)


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_magnitude_pruned_model_round_trips_exactly(tmp_path: Path) -> None:
    result = _pruned(0.9)
    assert save(result, tmp_path / "out") == tmp_path / "out"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(FILES)
    loaded = load(tmp_path / "out", _build)
    assert not loaded.training
    for name, tensor in result.model.state_dict().items():  # bit for bit, -0.0 included
        assert torch.equal(loaded.state_dict()[name].view(torch.int32), tensor.view(torch.int32)), name
    x = torch.randn(8, 64)
    result.model.eval()
    assert torch.equal(loaded(x), result.model(x))
    assert float((loaded.fc2.weight == 0).float().mean()) == pytest.approx(0.9, abs=1e-3)


def test_recipe_and_record_are_written_as_plain_data(tmp_path: Path) -> None:
    result = _pruned(0.5)
    save(result, tmp_path)
    recipe = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert recipe == result.record.recipe
    assert recipe["stages"][0]["methods"][0]["method"] == "pruning.magnitude"
    record = RunRecord.from_dict(json.loads((tmp_path / "record.json").read_text()))
    assert record.outcomes[0].stats == result.record.outcomes[0].stats
    assert json.loads((tmp_path / "structure.json").read_text())["format"] == "torchslim-structure"


def test_ninety_percent_sparse_file_is_at_most_a_fifth_of_the_dense_one(tmp_path: Path) -> None:
    dense = Result(model=_build(), record=RunRecord(recipe={}, environment={}))
    save(dense, tmp_path / "dense")
    save(_pruned(0.9), tmp_path / "sparse")
    dense_bytes = (tmp_path / "dense" / "model.safetensors").stat().st_size
    sparse_bytes = (tmp_path / "sparse" / "model.safetensors").stat().st_size
    assert sparse_bytes <= 0.2 * dense_bytes


def test_narrowed_model_rebuilds_from_the_base_factory(tmp_path: Path) -> None:
    result = _narrowed()
    save(result, tmp_path)
    loaded = load(tmp_path, _build)
    assert loaded.fc2.out_features == 100
    x = torch.randn(3, 64)
    assert torch.equal(loaded(x), result.model.eval()(x))


def test_weights_that_do_not_fit_name_the_first_key(tmp_path: Path) -> None:
    save(_narrowed(), tmp_path)
    (tmp_path / "structure.json").write_text(json.dumps({"format": "torchslim-structure", "version": 1,
                                                         "ops": []}))
    with pytest.raises(torchslim.errors.OutputError, match=r"'fc2.weight' has shape \[100, 256\]"):
        load(tmp_path, _build)


def test_save_into_a_foreign_folder_needs_overwrite_and_keeps_other_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(torchslim.errors.OutputError, match="--overwrite"):
        save(_pruned(0.5), tmp_path)
    assert _listing(tmp_path) == {"notes.txt": b"mine"}
    save(_pruned(0.5), tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*FILES, "notes.txt"])
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_torchslim_run_folder_can_be_saved_again(tmp_path: Path) -> None:
    save(_pruned(0.5), tmp_path)
    (tmp_path / "report.md").write_text("report")
    save(_narrowed(), tmp_path)
    assert load(tmp_path, _build).fc2.out_features == 100
    assert (tmp_path / "report.md").read_text() == "report"


def test_save_to_a_file_path_raises(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(torchslim.errors.OutputError, match="is a file"):
        save(_pruned(0.5), tmp_path / "file")


def test_failed_save_leaves_nothing_behind(tmp_path: Path) -> None:
    broken = _narrowed()
    broken.model.fc1 = nn.Sequential(nn.Linear(64, 256))  # type: ignore[assignment]
    broken.record.structure["fc1"] = {}  # a Sequential cannot be rebuilt from structure.json
    with pytest.raises(torchslim.errors.OutputError, match="cannot record a Sequential"):
        save(broken, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    save(_pruned(0.5), tmp_path / "old")
    before = _listing(tmp_path / "old")
    with pytest.raises(torchslim.errors.OutputError):
        save(broken, tmp_path / "old")
    assert _listing(tmp_path / "old") == before  # old files intact, no temporary files


def test_a_model_still_holding_masks_is_refused(tmp_path: Path) -> None:
    result = _narrowed()
    surgery.add_mask(result.model.fc1, "weight", torch.rand(256, 64) > 0.5)
    with pytest.raises(torchslim.errors.OutputError, match="fc1 still holds masks.*finalize"):
        save(result, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "structure.json").unlink(), "structure.json does not exist"),
        (lambda d: (d / "model.safetensors").unlink(), "does not exist"),
        (lambda d: (d / "structure.json").write_text("{oops"), "not readable JSON"),
        (lambda d: (d / "structure.json").write_text('{"format": "x", "version": 1, "ops": []}'),
         "expected 'format: torchslim-structure'"),
        (lambda d: (d / "structure.json").write_text(
            '{"format": "torchslim-structure", "version": 7, "ops": []}'), "unsupported version 7"),
        (lambda d: (d / "structure.json").write_text(
            '{"format": "torchslim-structure", "version": 1, "ops": {}}'), "'ops' must be a list"),
        (lambda d: (d / "structure.json").write_text(json.dumps({
            "format": "torchslim-structure", "version": 1,
            "ops": [{"fqn": "fc2", "module": {"cls": "builtins.eval", "kwargs": {}}}]})),
         "unknown module class"),
        (lambda d: (d / "model.safetensors").write_bytes(b"garbage" * 20), "not a readable safetensors"),
    ],
)
def test_load_of_a_damaged_folder_raises_output_error(
    tmp_path: Path, damage: Callable[[Path], object], message: str
) -> None:
    save(_narrowed(), tmp_path)
    damage(tmp_path)
    with pytest.raises(torchslim.errors.OutputError, match=message):
        load(tmp_path, _build)


def test_load_of_a_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(torchslim.errors.OutputError, match="no such folder"):
        load(tmp_path / "absent", _build)
