from pathlib import Path

import pytest
import torch

from interrupt import KillAt, Stop
from tiny_models import CASES, MLP
from torchslim.core import Context, Step, TrainedMethod
from torchslim.distillation.logits import LogitDistillation, LogitDistillationConfig
from torchslim.errors import DataError
from torchslim.recipes import TrainSpec
from torchslim.train import fit


def _data(n: int = 256) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :10].argmax(dim=1))  # learnable rule
    return torch.utils.data.TensorDataset(x, y)


def _accuracy(model: torch.nn.Module, data: torch.utils.data.TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_fit_learns_a_simple_rule() -> None:
    torch.manual_seed(0)
    data = _data()
    model = MLP()
    before = _accuracy(model, data)
    fit(model, TrainSpec(epochs=15, lr=1e-2, batch_size=32), [], Context(train_data=data))
    assert _accuracy(model, data) > max(0.8, before + 0.3)


def test_fit_restores_training_mode_and_is_seeded() -> None:
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = MLP().eval()
        fit(model, TrainSpec(steps=5, batch_size=16), [], Context(train_data=_data(), seed=3))
        assert not model.training
        results.append(model.fc1.weight.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_resume_after_a_kill_mid_epoch_matches_uninterrupted(tmp_path: Path) -> None:
    data, spec = _data(), TrainSpec(epochs=3, batch_size=32)
    torch.manual_seed(0)
    full = MLP()
    fit(full, spec, [], Context(train_data=data, seed=1), checkpoint_dir=tmp_path / "full")
    torch.manual_seed(0)
    model = MLP()
    with pytest.raises(Stop):  # killed in the middle of epoch 2
        fit(model, spec, [KillAt(len(data) // 32 + 2)], Context(train_data=data, seed=1),
            checkpoint_dir=tmp_path / "killed")
    assert [p.name for p in (tmp_path / "killed").glob("train-*.pt")] == ["train-1.pt"]
    torch.manual_seed(123)  # a new process starts with other random state and a fresh model
    resumed = MLP()
    fit(resumed, spec, [KillAt(-1)], Context(train_data=data, seed=1), checkpoint_dir=tmp_path / "killed")
    for a, b in zip(resumed.parameters(), full.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_distillation_from_a_teacher_moves_the_student_towards_it() -> None:
    torch.manual_seed(0)
    teacher, student = MLP(), MLP()
    x = torch.randn(128, 16)
    data = torch.utils.data.TensorDataset(x, torch.zeros(128, dtype=torch.long))
    gap = lambda: float((student(x) - teacher(x)).abs().mean())  # noqa: E731
    before = gap()
    method = LogitDistillation(LogitDistillationConfig(alpha=1.0, temperature=1.0))
    fit(student, TrainSpec(epochs=20, lr=1e-2, batch_size=32), [method], Context(train_data=data),
        teacher=teacher)
    assert gap() < 0.5 * before


def test_every_tiny_model_trains_one_step() -> None:
    for case in CASES:
        model = case.build()
        fit(model, TrainSpec(steps=2), [], Context(train_data=case.batches()))
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_missing_training_data_is_a_data_error() -> None:
    with pytest.raises(DataError, match="ctx.train_data is None"):
        fit(MLP(), TrainSpec(), [], Context())


class _SeesTeacher(TrainedMethod):
    def on_start(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        self.cfg.append(ctx.teacher)
        return model


def test_methods_find_the_stage_teacher_in_the_context_at_start() -> None:
    teacher, seen = MLP(), []
    fit(MLP(), TrainSpec(steps=1), [_SeesTeacher(seen)], Context(train_data=_data(32)), teacher=teacher)
    assert seen == [teacher]


class _Shift(TrainedMethod):
    """Adds a parameter whose loss gradient is 1 everywhere: one SGD step moves it by -lr exactly."""

    def __init__(self, default_lr: float | None) -> None:
        super().__init__(None)
        self.default_lr = default_lr
        self.shift = torch.nn.Parameter(torch.zeros(3))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.shift]

    def extra_loss(self, step: Step) -> torch.Tensor:
        return self.shift.sum()


@pytest.mark.parametrize(("lr", "defaults", "expected"), [
    (None, (None,), 1e-3),  # nobody says: 1e-3
    (None, (0.05, None, 0.02), 0.05),  # the largest method default
    (0.01, (0.05,), 0.01),  # the train block wins
])
def test_peak_lr_is_the_train_blocks_else_the_methods_default(
        lr: float | None, defaults: tuple[float | None, ...], expected: float) -> None:
    methods = [_Shift(d) for d in defaults]
    spec = TrainSpec(steps=1, lr=lr, optimizer="sgd", batch_size=32)
    fit(MLP(), spec, methods, Context(train_data=_data(32)))
    for method in methods:  # first step: no warm-up left (1 step) and momentum has nothing to add
        torch.testing.assert_close(method.shift.detach(), torch.full((3,), -expected))


def test_bf16_precision_runs_forwards_in_bfloat16_and_keeps_float32_weights() -> None:
    torch.manual_seed(0)
    data, teacher = _data(), MLP()
    fit(teacher, TrainSpec(epochs=15, lr=1e-2, batch_size=32), [], Context(train_data=data))
    seen: dict[str, set[torch.dtype]] = {"student": set(), "teacher": set()}
    student = MLP()
    for name, model in (("student", student), ("teacher", teacher)):
        model.fc1.register_forward_hook(lambda m, a, out, name=name: seen[name].add(out.dtype))
    spec = TrainSpec(epochs=15, lr=1e-2, batch_size=32, precision="bf16")
    fit(student, spec, [LogitDistillation(LogitDistillationConfig(alpha=0.5, temperature=2.0))],
        Context(train_data=data), teacher=teacher)
    assert seen == {"student": {torch.bfloat16}, "teacher": {torch.bfloat16}}
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert _accuracy(student, data) > 0.8  # it learns as the fp32 run of test_fit_learns_a_simple_rule does
    with torch.no_grad():  # and after training the model runs in float32 again
        assert student(data.tensors[0][:4]).dtype == torch.float32


@pytest.mark.parametrize("name", ["logits", "features", "relational", "adversarial"])
def test_distillation_methods_train_under_bf16(name: str) -> None:
    from torchslim.distillation import adversarial, features, relational

    method = {"logits": lambda: LogitDistillation(LogitDistillationConfig()),
              "features": lambda: features.FeatureDistillation(features.FeatureDistillationConfig()),
              "relational": lambda: relational.RelationalDistillation(relational.RelationalDistillationConfig()),
              "adversarial": lambda: adversarial.AdversarialDistillation(
                  adversarial.AdversarialDistillationConfig())}[name]()
    data, student = _data(64), MLP()
    before = [p.detach().clone() for p in student.parameters()]
    fit(student, TrainSpec(steps=3, batch_size=16, precision="bf16"), [method],
        Context(train_data=data, example_inputs=data.tensors[0][:2]), teacher=MLP().eval())
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))  # it trained
