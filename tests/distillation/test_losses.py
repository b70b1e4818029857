import pytest
import torch
import torch.nn.functional as F

from torchslim.distillation.losses import (
    attention_map,
    attention_transfer_loss,
    feature_loss,
    masked_mean,
    pairwise_distances,
    relation_kl,
    relation_log_probs,
    rkd_angle_loss,
    rkd_distance_loss,
    soft_target_loss,
)
from torchslim.errors import DataError


def _pair(*shape: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


LOSSES = {
    "soft_target": lambda s, t: soft_target_loss(s, t, 2.0),
    "mse": lambda s, t: feature_loss(s, t, "mse"),
    "cosine": lambda s, t: feature_loss(s, t, "cosine"),
    "attention_transfer": lambda s, t: attention_transfer_loss(s.reshape(4, 2, 3, 4), t.reshape(4, 2, 3, 4)),
    "rkd_distance": rkd_distance_loss,
    "rkd_angle": rkd_angle_loss,
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_is_zero_for_equal_inputs_positive_otherwise_and_only_the_student_gets_gradients(name: str) -> None:
    fn = LOSSES[name]
    s, t = _pair(4, 24)
    assert fn(t.clone(), t).item() == pytest.approx(0.0, abs=1e-6)
    s.requires_grad_(True)
    t.requires_grad_(True)
    loss = fn(s, t)
    assert loss.item() > 1e-4
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and torch.isfinite(s.grad).all()
    assert t.grad is None


def test_masked_soft_targets_average_only_real_tokens() -> None:
    s, t = _pair(2, 5, 7)
    mask = torch.tensor([[True, True, False, True, False], [True, False, False, False, False]])
    expected = soft_target_loss(s[mask], t[mask], 3.0)
    assert soft_target_loss(s, t, 3.0, mask=mask).item() == pytest.approx(expected.item(), rel=1e-6)
    s2 = s.clone()
    s2[~mask] += 10.0  # padding may hold anything
    assert soft_target_loss(s2, t, 3.0, mask=mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_masked_mean_of_an_all_padding_batch_is_zero_not_nan() -> None:
    v = torch.randn(3, requires_grad=True)
    out = masked_mean(v, torch.zeros(3, dtype=torch.bool))
    assert out.item() == 0.0
    out.backward()
    assert v.grad is not None


def test_mse_matches_torch_and_cosine_ignores_scale_and_uses_the_channel_dim() -> None:
    s, t = _pair(2, 6, 3, 3)
    assert feature_loss(s, t, "mse", channel_dim=1).item() == pytest.approx(F.mse_loss(s, t).item(), rel=1e-6)
    cos = feature_loss(s, t, "cosine", channel_dim=1)
    assert feature_loss(s * 7.0, t, "cosine", channel_dim=1).item() == pytest.approx(cos.item(), rel=1e-5)
    manual = (1 - F.cosine_similarity(s, t, dim=1)).mean()
    assert cos.item() == pytest.approx(manual.item(), rel=1e-6)


def test_attention_maps_are_unit_vectors_and_channel_counts_may_differ() -> None:
    maps = attention_map(torch.randn(3, 5, 4, 4))
    assert maps.shape == (3, 16)
    torch.testing.assert_close(maps.norm(dim=1), torch.ones(3))
    assert attention_transfer_loss(torch.randn(3, 5, 4, 4), torch.randn(3, 9, 4, 4)).item() > 0
    with pytest.raises(DataError, match=r"\(3, 5, 4, 4\).*\(3, 5, 2, 2\)"):
        attention_transfer_loss(torch.randn(3, 5, 4, 4), torch.randn(3, 5, 2, 2))


def test_query_key_relation_with_the_models_heads_is_its_attention_distribution() -> None:
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, num_heads=4, batch_first=True)
    x = torch.randn(2, 5, 16)
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])  # True = pad
    _, weights = mha(x, x, x, key_padding_mask=padding, average_attn_weights=False)  # (B, H, T, S)
    w_q, w_k, _ = mha.in_proj_weight.chunk(3)
    b_q, b_k, _ = mha.in_proj_bias.chunk(3)
    q, k = F.linear(x, w_q, b_q), F.linear(x, w_k, b_k)
    log_probs = relation_log_probs(q, k, 4, allowed=~padding[:, None, :])
    torch.testing.assert_close(log_probs.exp(), weights, atol=1e-6, rtol=1e-5)


def test_relation_heads_compare_models_of_different_widths_and_skip_padding_rows() -> None:
    a, b = torch.randn(2, 5, 8), torch.randn(2, 5, 12)
    ls, lt = relation_log_probs(a, a, 4), relation_log_probs(b, b, 4)
    assert ls.shape == lt.shape == (2, 4, 5, 5)
    assert relation_kl(lt, lt).item() == pytest.approx(0.0, abs=1e-6)
    assert relation_kl(ls, lt).item() > 0
    rows = torch.tensor([[True] * 5, [True, True, False, False, False]])
    changed = ls.clone()
    changed[1, :, 2:] = lt[1, :, 2:]  # only padding rows differ from ls -> the masked loss ignores them
    assert relation_kl(changed, lt, query_mask=rows).item() == pytest.approx(
        relation_kl(ls, lt, query_mask=rows).item(), rel=1e-6)
    with pytest.raises(DataError, match="heads must divide"):
        relation_log_probs(a, a, 3)


def test_relational_losses_are_invariant_to_scale() -> None:
    s, t = _pair(6, 10)
    for fn in (rkd_distance_loss, rkd_angle_loss):
        base = fn(s, t).item()
        assert fn(s * 5.0, t).item() == pytest.approx(base, rel=1e-4)
        assert fn(s, t * 0.1).item() == pytest.approx(base, rel=1e-4)


def test_pairwise_distances_match_cdist_and_have_finite_gradients_for_duplicates() -> None:
    e = torch.randn(5, 3)
    torch.testing.assert_close(pairwise_distances(e), torch.cdist(e, e), atol=1e-5, rtol=1e-4)
    dup = torch.cat([e[:2], e[:2]]).requires_grad_(True)
    rkd_distance_loss(dup, torch.randn(4, 7)).backward()
    assert torch.isfinite(dup.grad).all()


def test_relational_losses_need_enough_samples() -> None:
    one = torch.randn(1, 4, requires_grad=True)
    assert rkd_distance_loss(one, torch.randn(1, 4)).item() == 0.0
    assert rkd_angle_loss(torch.randn(2, 4), torch.randn(2, 4)).item() == 0.0
