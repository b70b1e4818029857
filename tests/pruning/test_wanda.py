import pytest
import torch
from torch import nn

from tiny_llama import TinyDecoder, tiny_llama, token_batches
from torchslim.core import Context, surgery
from torchslim.errors import ConfigError, DataError, SelectorError
from torchslim.pruning._calibrated import outlier_ratio, owl_sparsities, row_mask, wanda_scores
from torchslim.pruning.wanda import WandaPruningConfig, apply


def _linears(model: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    return {f: m for f, m in model.named_modules() if isinstance(m, nn.Linear) and f.startswith(prefix)}


def test_row_mask_drops_exactly_the_lowest_scores_of_each_row() -> None:
    scores = torch.rand(8, 20, generator=torch.Generator().manual_seed(0))
    keep = row_mask(scores, 0.3)
    assert (keep.sum(dim=1) == 14).all()
    lowest_kept = torch.where(keep, scores, torch.inf).min(dim=1).values
    highest_dropped = torch.where(keep, -torch.inf, scores).max(dim=1).values
    assert (lowest_kept > highest_dropped).all()
    assert row_mask(scores, 0.0).all()


def test_llama_rows_have_exact_sparsity_and_mask_follows_wanda_scores() -> None:
    model = tiny_llama()
    batches = token_batches(vocab=128)
    target = model.model.layers[0].mlp.down_proj
    inputs = []
    handle = target.register_forward_hook(lambda m, a, o: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for x in batches:  # block 0 sees the dense embeddings, so its inputs are known up front
            model(x, use_cache=False)
    handle.remove()
    x = torch.cat(inputs)
    expected = row_mask(target.weight.abs() * x.norm(dim=0)[None, :], 0.5)
    out = apply(model, WandaPruningConfig(sparsity=0.5), Context(calib_data=batches))
    linears = _linears(model, "model.layers.")
    assert set(out.touched) == set(linears) and out.stats["sparsity"] == 0.5
    for layer in linears.values():
        keep = surgery.get_mask(layer, "weight")
        assert keep is not None and (keep.sum(dim=1) == layer.in_features // 2).all()
    torch.testing.assert_close(surgery.get_mask(target, "weight"), expected, rtol=0, atol=0)
    assert surgery.get_mask(model.lm_head, "weight") is None  # outside the decoder blocks


def test_two_four_pattern_is_exact() -> None:
    model = tiny_llama()
    out = apply(model, WandaPruningConfig(pattern="2:4"), Context(calib_data=token_batches(vocab=128)))
    assert out.stats["sparsity"] == 0.5
    for layer in _linears(model, "model.layers.").values():
        surgery.finalize(layer)
        groups = layer.weight.reshape(layer.out_features, -1, 4)
        assert ((groups != 0).sum(dim=-1) <= 2).all()
        assert ((groups == 0).sum(dim=-1) >= 2).all()


def test_wanda_scores_weigh_each_input_by_its_norm() -> None:
    weight = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    scores = wanda_scores(weight, torch.tensor([4.0, 1.0]))  # norms 2 and 1
    torch.testing.assert_close(scores, torch.tensor([[2.0, 2.0], [6.0, 0.5]]))


def test_owl_sparsities_keep_the_mean_and_spread() -> None:
    out = owl_sparsities([0.01, 0.05, 0.02, 0.03], sparsity=0.6, spread=0.1)
    assert sum(out) / 4 == pytest.approx(0.6)
    assert max(out) - min(out) == pytest.approx(0.2)
    assert out[1] == min(out) and out[0] == max(out)  # more outliers -> fewer weights removed
    assert owl_sparsities([0.1, 0.1], 0.5, 0.1) == [0.5, 0.5]


def test_outlier_ratio_counts_scores_far_above_the_mean() -> None:
    scores = torch.ones(100)
    scores[:3] = 50.0
    assert outlier_ratio([scores[:50], scores[50:]], threshold=5.0) == pytest.approx(0.03)


def test_owl_gives_blocks_different_sparsities_with_the_same_mean() -> None:
    model = TinyDecoder(depth=3).eval()
    with torch.no_grad():
        model.layers[2].up.weight[:, :2] *= 40  # outliers in the last block only
    out = apply(model, WandaPruningConfig(sparsity=0.5, owl=0.1), Context(calib_data=token_batches()))
    block = {i: surgery.get_mask(model.layers[i].up, "weight") for i in range(3)}
    zero = {i: 1 - float(block[i].float().mean()) for i in range(3)}
    assert zero[2] == min(zero.values()) and zero[2] < 0.45
    assert out.stats["owl_max_sparsity"] - out.stats["owl_min_sparsity"] == pytest.approx(0.2)
    assert sum(zero.values()) / 3 == pytest.approx(0.5, abs=1 / 32)  # rows round down to whole weights


def test_non_decoder_model_is_pruned_as_one_block() -> None:
    from tiny_models import MLP

    model = MLP().eval()
    out = apply(model, WandaPruningConfig(sparsity=0.25), Context(calib_data=[torch.randn(8, 16)]))
    assert set(out.touched) == {"fc1", "fc2"}
    assert (surgery.get_mask(model.fc1, "weight").sum(dim=1) == 12).all()


@pytest.mark.parametrize("fields", [{"sparsity": 1.0}, {"sparsity": -0.1}, {"pattern": "4:4"},
                                    {"pattern": "4:2"}, {"pattern": "2-4"}, {"owl": 0.1, "pattern": "2:4"},
                                    {"owl": 0.3}, {"batches": 0}, {"owl_threshold": 0}])
def test_bad_config_is_a_config_error(fields: dict) -> None:
    with pytest.raises(ConfigError, match="pruning.wanda"):
        WandaPruningConfig(**fields)


def test_missing_or_empty_calibration_data_is_a_data_error() -> None:
    with pytest.raises(DataError, match="calib"):
        apply(TinyDecoder(), WandaPruningConfig(), Context())
    with pytest.raises(DataError, match="calibration batch"):
        apply(TinyDecoder(), WandaPruningConfig(), Context(calib_data=[]))


def test_unknown_target_is_a_selector_error() -> None:
    with pytest.raises(SelectorError):
        apply(TinyDecoder(), WandaPruningConfig(targets=("layers.9.up",)), Context(calib_data=token_batches()))
