import copy

import pytest
import torch
from torch import nn

import torchslim as ts
from tiny_models import MLP, ResConcatCNN, TinyLM
from torchslim.core import Context, Step, surgery
from torchslim.distillation import (
    AttentionDistillationConfig,
    FeatureDistillationConfig,
    LogitDistillationConfig,
    RelationalDistillationConfig,
)
from torchslim.distillation._taps import map_layers
from torchslim.distillation.features import FeatureDistillation
from torchslim.errors import ConfigError, DataError, RecipeError, SelectorError
from torchslim.recipes import Recipe, Stage, TrainSpec


def _mlp(hidden: int, depth: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = 16
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, 10))


def _started(cfg: FeatureDistillationConfig, student: nn.Module, teacher: nn.Module,
             x: torch.Tensor) -> FeatureDistillation:
    method = FeatureDistillation(cfg)
    method.on_start(student, Context(example_inputs=x, teacher=teacher))
    return method


def _loss(method: FeatureDistillation, student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    step = Step(0, x, None, student(x), student, teacher_fn=teacher)
    loss = method.extra_loss(step)
    method.on_step(step)
    return loss


def test_auto_hint_is_zero_for_a_copy_of_the_teacher_and_positive_otherwise() -> None:
    torch.manual_seed(0)
    teacher, x = MLP().eval(), torch.randn(8, 16)
    student = copy.deepcopy(teacher)
    method = _started(FeatureDistillationConfig(), student, teacher, x)
    assert method._names == ["fc2:fc2"] and not method.parameters()  # the last hidden features, same width
    assert _loss(method, student, teacher, x).item() == 0.0
    with torch.no_grad():
        student.fc1.weight.add_(0.1)
    assert _loss(method, student, teacher, x).item() > 0
    method.on_end(student, Context())
    assert surgery.leftovers(student) == [] and surgery.leftovers(teacher) == []


def test_gradients_reach_the_student_and_the_projection_but_not_the_teacher() -> None:
    torch.manual_seed(0)
    teacher, student, x = _mlp(32), _mlp(8), torch.randn(8, 16)
    teacher.requires_grad_(False)
    method = _started(FeatureDistillationConfig(), student, teacher, x)
    (projection,) = method.projections.values()
    assert isinstance(projection, nn.Linear) and projection.weight.shape == (32, 8)
    _loss(method, student, teacher, x).backward()
    assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    assert student[0].weight.grad is not None and student[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    method.on_end(student, Context())


def test_conv_features_get_a_1x1_projection() -> None:
    teacher, student = ResConcatCNN(), ResConcatCNN()
    student.stem = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU())  # 5 channels instead of 8
    student.res = nn.Sequential(nn.Conv2d(5, 5, 3, padding=1))
    student.side, student.head = nn.Conv2d(5, 4, 1), nn.Linear(9, 10)
    x = torch.randn(2, 3, 12, 12)
    method = _started(FeatureDistillationConfig(pairs=("stem",)), student, teacher, x)
    (projection,) = method.projections.values()
    assert isinstance(projection, nn.Conv2d) and projection.weight.shape == (8, 5, 1, 1)
    assert _loss(method, student, teacher, x).item() > 0
    method.on_end(student, Context())


def test_hint_training_reduces_the_feature_gap() -> None:
    torch.manual_seed(0)
    teacher, student = _mlp(32).eval(), _mlp(12)
    x = torch.randn(64, 16)
    method = _started(FeatureDistillationConfig(), student, teacher, x)
    optimizer = torch.optim.Adam([*student.parameters(), *method.parameters()], lr=1e-2)
    before = _loss(method, student, teacher, x).item()
    for _ in range(60):
        optimizer.zero_grad()
        _loss(method, student, teacher, x).backward()
        optimizer.step()
    assert _loss(method, student, teacher, x).item() < 0.3 * before
    method.on_end(student, Context())


def test_layer_mapping_rules_for_students_with_fewer_layers() -> None:
    assert map_layers(2, 6, "uniform") == [2, 5]
    assert map_layers(3, 12, "uniform") == [3, 7, 11]
    assert map_layers(2, 6, "last") == [4, 5]
    teacher, student, x = _mlp(16, depth=4), _mlp(16, depth=2), torch.randn(4, 16)
    cfg = FeatureDistillationConfig(mapping="uniform", targets=("type:ReLU",))
    method = _started(cfg, student, teacher, x)
    assert method._names == ["1:3", "3:7"]  # student relu 1 -> teacher relu 2, last -> last
    method.on_end(student, Context())
    method = _started(FeatureDistillationConfig(mapping="last", targets=("type:ReLU",)), student, teacher, x)
    assert method._names == ["1:5", "3:7"]
    method.on_end(student, Context())


def test_state_dict_restores_the_projections() -> None:
    teacher, x = _mlp(32), torch.randn(4, 16)
    a = _started(FeatureDistillationConfig(), _mlp(8), teacher, x)
    torch.manual_seed(1)
    b = _started(FeatureDistillationConfig(), _mlp(8), teacher, x)
    with torch.no_grad():
        next(iter(a.projections.values())).weight.add_(1.0)
    b.load_state_dict(a.state_dict())
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_bad_hints_say_what_and_where_and_leave_no_hooks() -> None:
    teacher, student, x = MLP(), MLP(), torch.randn(4, 16)
    with pytest.raises(SelectorError, match=r"teacher \(MLP\) has no module 'fc3'; closest names: fc2, fc1"):
        _started(FeatureDistillationConfig(pairs=("fc1:fc3",)), student, teacher, x)
    assert surgery.leftovers(student) == [] and surgery.leftovers(teacher) == []
    cnn_student, cnn_teacher = ResConcatCNN(), ResConcatCNN()
    cnn_student.stem.append(nn.MaxPool2d(2))  # (B, 8, 6, 6) against (B, 8, 12, 12)
    with pytest.raises(DataError, match=r"\(1, 8, 6, 6\) and teacher features \(1, 8, 12, 12\).*projection"):
        _started(FeatureDistillationConfig(pairs=("stem",)), cnn_student, cnn_teacher, torch.randn(1, 3, 12, 12))
    assert surgery.leftovers(cnn_student) == [] and surgery.leftovers(cnn_teacher) == []
    with pytest.raises(ConfigError, match="needs 'targets'"):
        _started(FeatureDistillationConfig(mapping="uniform"), student, teacher, x)
    with pytest.raises(ConfigError, match="student_fqn:teacher_fqn"):
        FeatureDistillationConfig(pairs=("a:b:c",))
    with pytest.raises(ConfigError, match="teacher is the student module itself"):
        _started(FeatureDistillationConfig(), student, student, x)


def test_trained_methods_need_a_train_block() -> None:
    for key in ("features", "attention", "relational", "adversarial"):
        text = f"version: 1\nstages:\n  - name: s\n    methods: [{{method: distillation.{key}}}]\n"
        with pytest.raises(RecipeError, match="needs a 'train' block"):
            ts.load_recipe(text)


def test_teacher_runs_once_per_step_in_eval_mode_without_gradients_for_several_methods() -> None:
    torch.manual_seed(0)
    model, teacher = ResConcatCNN(), ResConcatCNN()
    calls: list[tuple[bool, bool]] = []
    counter = teacher.register_forward_hook(lambda m, a, o: calls.append((m.training, torch.is_grad_enabled())))
    batches = [(torch.randn(4, 3, 12, 12), torch.randint(0, 10, (4,))) for _ in range(3)]
    methods = (LogitDistillationConfig(), FeatureDistillationConfig(), AttentionDistillationConfig(),
               RelationalDistillationConfig())
    recipe = Recipe(stages=(Stage(name="kd", methods=methods, train=TrainSpec(steps=3)),), measure=())
    result = ts.compress(model, recipe, Context(train_data=batches, example_inputs=batches[0][0], teacher=teacher))
    counter.remove()
    assert len(calls) == 3 + 1  # one pass per step, plus the feature method's sizing pass
    assert calls and all(not training and not grad for training, grad in calls)
    assert surgery.leftovers(result.model) == [] and surgery.leftovers(teacher) == []


def test_sequence_features_of_a_language_model() -> None:
    torch.manual_seed(0)
    teacher = TinyLM().eval()
    student = copy.deepcopy(teacher)
    tokens = torch.randint(0, 50, (2, 6))
    method = _started(FeatureDistillationConfig(loss="cosine"), student, teacher, tokens)
    assert method._names == ["lm_head:lm_head"]
    assert _loss(method, student, teacher, tokens).item() == pytest.approx(0.0, abs=1e-6)
    method.on_end(student, Context())
