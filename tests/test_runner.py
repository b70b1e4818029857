from pathlib import Path

import pytest
import torch

import torchslim as ts
from tiny_models import CASES, MLP
from torchslim.pruning.magnitude import MagnitudePruningConfig

RECIPE = """
stages:
  - name: prune
    methods:
      - {method: pruning.magnitude, sparsity: 0.5}
      - {method: distillation.logits}
    train: {epochs: 2, batch_size: 16}
  - name: prune-more
    methods:
      - {method: pruning.magnitude, sparsity: 0.8}
measure: [accuracy, params, size]
"""


def _ctx(**kw: object) -> ts.Context:
    case = CASES[0]
    data = case.batches(n=6, batch=16)
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return {"accuracy": float((model(x).argmax(1) == y).float().mean())}

    return ts.Context(example_inputs=x[:1], train_data=data, eval_fn=evaluate, **kw)  # type: ignore[arg-type]


def test_compress_runs_stages_and_records_metrics() -> None:
    torch.manual_seed(0)
    result = ts.compress(MLP(), RECIPE, _ctx())
    record = result.record
    assert [m.label for m in record.metrics] == ["before", "prune", "prune-more"]
    assert record.metrics[0].values["params_nonzero"] == record.metrics[0].values["params"]
    assert record.after()["params_nonzero"] < 0.25 * record.before()["params"]
    assert record.after()["size_bytes"] < record.before()["size_bytes"]
    assert [o.method for o in record.outcomes] == ["pruning.magnitude", "distillation.logits", "pruning.magnitude"]
    assert record.recipe["stages"][0]["methods"][0]["sparsity"] == 0.5
    assert "accuracy" in record.after()


def test_masks_hold_during_the_training_of_the_same_stage() -> None:
    torch.manual_seed(0)
    recipe = ts.load_recipe(RECIPE)
    first = ts.Recipe(stages=recipe.stages[:1], measure=())
    model = ts.compress(MLP(), first, _ctx()).model
    for layer in (model.fc1, model.fc2):
        assert float((layer.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_the_input_models_mode_is_kept() -> None:
    model = MLP().train()
    assert ts.compress(model, RECIPE, _ctx()).model.training
    model = MLP().eval()
    assert not ts.compress(model, RECIPE, _ctx()).model.training


def test_a_user_teacher_teaches_frozen_and_gets_its_flags_back() -> None:
    torch.manual_seed(0)
    teacher = MLP().train()
    teacher.fc1.weight.requires_grad_(False)  # the user's own mix of flags
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    grads = [p.requires_grad for p in teacher.parameters()]
    ts.compress(MLP(), RECIPE, _ctx(teacher=teacher))
    assert teacher.training and all(m.training for m in teacher.modules())
    assert [p.requires_grad for p in teacher.parameters()] == grads
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), f"the teacher changed while teaching: {key}"


def test_apply_runs_one_method() -> None:
    model = MLP()
    result = ts.apply(model, MagnitudePruningConfig(sparsity=0.5), ts.Context())
    assert result.record.outcomes[0].stats["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_resume_skips_finished_stages(tmp_path: Path) -> None:
    torch.manual_seed(0)
    full = ts.compress(MLP(), RECIPE, _ctx(workdir=tmp_path / "a")).model
    # Simulate a run that finished stage 1 only, then resume it from a fresh model.
    recipe = ts.load_recipe(RECIPE)
    torch.manual_seed(0)
    ts.compress(MLP(), ts.Recipe(stages=recipe.stages[:1], measure=recipe.measure),
                _ctx(workdir=tmp_path / "b"))
    torch.manual_seed(99)
    resumed = ts.compress(MLP(), recipe, _ctx(workdir=tmp_path / "b"), resume=True)
    assert [m.label for m in resumed.record.metrics] == ["before", "prune", "prune-more"]
    for a, b in zip(resumed.model.parameters(), full.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
