import copy

import pytest
import torch

from tiny_models import MLP, ResConcatCNN
from torchslim.core import Context, Step, surgery
from torchslim.distillation.relational import (
    RelationalDistillation,
    RelationalDistillationConfig,
    rkd_loss,
)
from torchslim.errors import ConfigError, DataError, SelectorError


def _loss(method: RelationalDistillation, student: torch.nn.Module, teacher: torch.nn.Module,
          x: torch.Tensor) -> torch.Tensor:
    step = Step(0, x, None, student(x), student, teacher_fn=teacher)
    loss = method.extra_loss(step)
    method.on_step(step)
    return loss


def test_rkd_on_outputs_is_zero_for_a_copy_positive_otherwise_and_scale_invariant() -> None:
    torch.manual_seed(0)
    teacher, x = MLP().eval(), torch.randn(8, 16)
    student = copy.deepcopy(teacher)
    method = RelationalDistillation(RelationalDistillationConfig())
    method.on_start(student, Context(teacher=teacher))
    assert _loss(method, student, teacher, x).item() == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        student.fc2.weight.mul_(3.0)  # outputs scaled up (plus the same bias): relations barely move
        student.fc2.bias.mul_(3.0)
    assert _loss(method, student, teacher, x).item() == pytest.approx(0.0, abs=1e-4)
    with torch.no_grad():
        student.fc1.weight.add_(torch.randn_like(student.fc1.weight))
    loss = _loss(method, student, teacher, x)
    assert loss.item() > 1e-3
    loss.backward()
    assert student.fc1.weight.grad is not None and all(p.grad is None for p in teacher.parameters())
    method.on_end(student, Context())


def test_rkd_between_named_layers_of_different_widths() -> None:
    torch.manual_seed(0)
    teacher, student = ResConcatCNN(), ResConcatCNN()
    student.side = torch.nn.Conv2d(8, 2, 1)
    student.head = torch.nn.Linear(10, 10)
    method = RelationalDistillation(RelationalDistillationConfig(pairs=("side",), angle_weight=0.0))
    method.on_start(student, Context(teacher=teacher))
    loss = _loss(method, student, teacher, torch.randn(5, 3, 12, 12))
    assert torch.isfinite(loss) and loss.item() > 0
    method.on_end(student, Context())
    assert surgery.leftovers(student) == [] and surgery.leftovers(teacher) == []


def test_weights_scale_each_term() -> None:
    s, t = torch.randn(6, 4), torch.randn(6, 9)
    dist = rkd_loss(s, t, RelationalDistillationConfig(distance_weight=1.0, angle_weight=0.0))
    angle = rkd_loss(s, t, RelationalDistillationConfig(distance_weight=0.0, angle_weight=1.0))
    both = rkd_loss(s, t, RelationalDistillationConfig(distance_weight=2.0, angle_weight=3.0))
    assert both.item() == pytest.approx(2 * dist.item() + 3 * angle.item(), rel=1e-5)


def test_bad_input() -> None:
    with pytest.raises(DataError, match=r"student embeddings \(4, 3\) and teacher embeddings \(5, 3\)"):
        rkd_loss(torch.randn(4, 3), torch.randn(5, 3), RelationalDistillationConfig())
    with pytest.raises(ConfigError, match="both 0"):
        RelationalDistillationConfig(distance_weight=0.0, angle_weight=0.0)
    student, teacher = MLP(), MLP()
    with pytest.raises(SelectorError, match="student \\(MLP\\) has no module .fc.; closest names: fc2, fc1"):
        RelationalDistillation(RelationalDistillationConfig(pairs=("fc:fc1",))).on_start(
            student, Context(teacher=teacher))
    assert surgery.leftovers(student) == [] and surgery.leftovers(teacher) == []
