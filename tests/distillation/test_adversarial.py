import copy

import pytest
import torch

from tiny_models import MLP
from torchslim.core import Context, Step
from torchslim.distillation.adversarial import (
    AdversarialDistillation,
    AdversarialDistillationConfig,
    discriminator,
    fooling_loss,
)
from torchslim.distillation.logits import soft_target_loss
from torchslim.errors import ConfigError


def _started(cfg: AdversarialDistillationConfig, student: torch.nn.Module,
             teacher: torch.nn.Module) -> AdversarialDistillation:
    method = AdversarialDistillation(cfg)
    method.on_start(student, Context(teacher=teacher, seed=0))
    return method


def _step(student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor, index: int = 0) -> Step:
    return Step(index, x, None, student(x), student, teacher_fn=teacher)


def test_discriminator_tells_teacher_from_student_early() -> None:
    torch.manual_seed(0)
    teacher, student = MLP().eval(), MLP()
    method = _started(AdversarialDistillationConfig(lr=1e-2, temperature=1.0), student, teacher)
    accuracies = []
    for i in range(15):
        x = torch.randn(32, 16)
        method.extra_loss(_step(student, teacher, x, i))
        accuracies.append(method.accuracy)
    assert sum(accuracies[-5:]) / 5 > 0.6  # accuracy measured before each update, on a new batch
    assert method.on_end(student, Context()).stats["discriminator_accuracy"] == accuracies[-1]


def test_fooling_term_is_zero_for_a_copy_and_does_not_train_the_discriminator() -> None:
    torch.manual_seed(0)
    teacher = MLP().eval()
    student = copy.deepcopy(teacher)
    cfg = AdversarialDistillationConfig(alpha=0.5)
    method = _started(cfg, student, teacher)
    x = torch.randn(8, 16)
    assert method.extra_loss(_step(student, teacher, x)).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        student.fc1.weight.add_(0.3)
    step = _step(student, teacher, x, 1)
    loss = method.extra_loss(step)
    soft = 0.5 * soft_target_loss(step.outputs, step.teacher_outputs(), 4.0)
    assert loss.item() != pytest.approx(soft.item())  # the fooling term contributes
    assert method.disc is not None
    frozen = [p.detach().clone() for p in method.disc.parameters()]
    loss.backward()
    assert student.fc1.weight.grad is not None and student.fc1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.disc.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    for before, after in zip(frozen, method.disc.parameters()):
        torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_fooling_loss_sign_follows_the_discriminator() -> None:
    torch.manual_seed(0)
    disc = discriminator(3, 8)
    rows = torch.rand(5, 3)
    assert fooling_loss(disc, rows, rows).item() == 0.0
    with torch.no_grad():
        disc[2].bias.fill_(0.0)
        disc[2].weight.zero_()
        disc[2].weight[0, 0] = 1.0
        disc[0].weight.zero_()
        disc[0].weight[0, 0] = 10.0
        disc[0].bias.zero_()
    teacher_like, student_like = torch.tensor([[1.0, 0, 0]]), torch.tensor([[0.0, 1, 0]])
    assert fooling_loss(disc, student_like, teacher_like).item() > 0


def test_state_round_trip_and_seeded_build_leave_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    teacher, student, x = MLP().eval(), MLP(), torch.randn(8, 16)
    a = _started(AdversarialDistillationConfig(), student, teacher)
    assert a.state_dict() == {}
    rng = torch.get_rng_state()
    a.extra_loss(_step(student, teacher, x))
    assert torch.equal(rng, torch.get_rng_state())
    b = _started(AdversarialDistillationConfig(), student, teacher)
    b.load_state_dict(a.state_dict())
    assert a.disc is not None and b.disc is not None
    for pa, pb in zip(a.disc.parameters(), b.disc.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_bad_values() -> None:
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        AdversarialDistillationConfig(temperature=-1.0)
    with pytest.raises(ConfigError, match="needs a teacher"):
        AdversarialDistillation(AdversarialDistillationConfig()).on_start(MLP(), Context())
