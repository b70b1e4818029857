import pytest
import torch
import torch.nn.functional as F

from torchslim.core import Step
from torchslim.distillation.logits import LogitDistillation, LogitDistillationConfig, soft_target_loss
from torchslim.errors import ConfigError, DataError


def test_soft_target_loss_is_zero_for_equal_logits_and_scales_with_t_squared() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    assert soft_target_loss(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-6)
    manual = F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction="batchmean") * 4
    assert soft_target_loss(s, t, 2.0).item() == pytest.approx(manual.item(), rel=1e-5)


def test_gradient_flows_to_student_only() -> None:
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    soft_target_loss(s, t, 4.0).backward()
    assert s.grad is not None and t.grad is None


def test_alpha_splits_task_and_distillation_weights() -> None:
    method = LogitDistillation(LogitDistillationConfig(alpha=0.7, temperature=1.0))
    assert method.task_weight() == pytest.approx(0.3)
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    step = Step(0, None, None, s, torch.nn.Identity(), teacher_fn=lambda x: t)
    assert method.extra_loss(step).item() == pytest.approx(0.7 * soft_target_loss(s, t, 1.0).item(), rel=1e-6)


def test_sequence_outputs_average_over_tokens() -> None:
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    assert soft_target_loss(s, t, 2.0).item() == pytest.approx(
        soft_target_loss(s.reshape(6, 7), t.reshape(6, 7), 2.0).item(), rel=1e-6)


def test_bad_values_and_mismatched_shapes() -> None:
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        LogitDistillationConfig(temperature=0.0)
    method = LogitDistillation(LogitDistillationConfig())
    step = Step(0, None, None, torch.randn(2, 10), torch.nn.Identity(), teacher_fn=lambda x: torch.randn(2, 5))
    with pytest.raises(DataError, match=r"student outputs \(2, 10\) and teacher outputs \(2, 5\)"):
        method.extra_loss(step)


def test_temperature_schedule_moves_linearly_then_stays() -> None:
    from torchslim.distillation.logits import scheduled_temperature

    cfg = LogitDistillationConfig(temperature=8.0, temperature_end=2.0, anneal_steps=100)
    assert [scheduled_temperature(cfg, s) for s in (0, 50, 100, 500)] == [8.0, 5.0, 2.0, 2.0]
    assert scheduled_temperature(LogitDistillationConfig(temperature=3.0), 10_000) == 3.0
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    method = LogitDistillation(LogitDistillationConfig(alpha=1.0, temperature=8.0, temperature_end=2.0,
                                                       anneal_steps=100))
    late = Step(100, None, None, s, torch.nn.Identity(), teacher_fn=lambda x: t)
    assert method.extra_loss(late).item() == pytest.approx(soft_target_loss(s, t, 2.0).item(), rel=1e-6)
    with pytest.raises(ConfigError, match="temperature_end must be > 0"):
        LogitDistillationConfig(temperature_end=0.0)


def test_sequence_padding_from_ignore_index_targets_or_an_attention_mask() -> None:
    s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    targets = torch.tensor([[1, 2, -100, -100], [3, -100, -100, -100]])
    real = targets != -100
    expected = soft_target_loss(s[real], t[real], 4.0).item()
    method = LogitDistillation(LogitDistillationConfig(alpha=1.0))
    by_targets = Step(0, None, targets, s, torch.nn.Identity(), teacher_fn=lambda x: t)
    assert method.extra_loss(by_targets).item() == pytest.approx(expected, rel=1e-6)
    inputs = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": real.long()}
    by_mask = Step(0, inputs, None, s, torch.nn.Identity(), teacher_fn=lambda x: t)
    assert method.extra_loss(by_mask).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_embedding_outputs_use_mse_or_cosine(loss: str) -> None:
    e = torch.randn(6, 12)
    method = LogitDistillation(LogitDistillationConfig(alpha=1.0, loss=loss))
    same = Step(0, None, None, e.clone(), torch.nn.Identity(), teacher_fn=lambda x: e)
    assert method.extra_loss(same).item() == pytest.approx(0.0, abs=1e-6)
    other = Step(0, None, None, torch.randn(6, 12), torch.nn.Identity(), teacher_fn=lambda x: e)
    assert method.extra_loss(other).item() > 0
