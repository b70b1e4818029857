import pytest
import torch
from torch import nn

from tiny_llama import TinyDecoder, tiny_llama, token_batches
from torchslim.core import Context, surgery
from torchslim.errors import ConfigError, DataError
from torchslim.pruning._calibrated import row_mask, wanda_scores
from torchslim.pruning._obs import sparsegpt_prune
from torchslim.pruning.nm import nm_mask
from torchslim.pruning.sparsegpt import SparseGPTPruningConfig, apply


def _correlated(tokens: int, features: int, seed: int) -> torch.Tensor:
    """Inputs with strongly correlated features and uneven scales, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, features // 4, generator=g)
    mix = torch.randn(features // 4, features, generator=g)
    scale = torch.rand(features, generator=g) * 3 + 0.1
    return (latent @ mix + 0.1 * torch.randn(tokens, features, generator=g)) * scale


def _error(w: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - pruned) @ x.T).pow(2).mean())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_obs_updates_reconstruct_outputs_better_than_magnitude_and_wanda(pattern: str) -> None:
    x = _correlated(512, 64, seed=0)  # calibration inputs
    held_out = _correlated(512, 64, seed=0)[256:]  # same distribution, error measured on all
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    nm = (2, 4) if pattern == "2:4" else None
    hessian = 2 * x.T @ x / x.shape[0]
    pruned, keep = sparsegpt_prune(w, hessian, sparsity=0.5, nm=nm, block_size=16)
    squares = x.pow(2).sum(dim=0)

    def mask_of(scores: torch.Tensor) -> torch.Tensor:
        return nm_mask(scores, 2, 4) if nm else row_mask(scores, 0.5)

    magnitude = w * mask_of(w.abs())
    wanda = w * mask_of(wanda_scores(w, squares))
    ours = _error(w, pruned, held_out)
    assert ours < 0.6 * _error(w, wanda, held_out)
    assert ours < 0.6 * _error(w, magnitude, held_out)
    assert (pruned[~keep] == 0).all() and 1 - float(keep.float().mean()) == 0.5


def test_unstructured_mask_is_exact_per_block_of_columns() -> None:
    x = _correlated(256, 64, seed=2)
    w = torch.randn(10, 64)
    pruned, keep = sparsegpt_prune(w, 2 * x.T @ x / 256, sparsity=0.3, block_size=32)
    for start in (0, 32):
        assert int((~keep[:, start:start + 32]).sum()) == int(10 * 32 * 0.3)
    assert (pruned[~keep] == 0).all()


def test_two_four_mask_keeps_two_of_every_four_inputs() -> None:
    x = _correlated(256, 64, seed=3)
    _, keep = sparsegpt_prune(torch.randn(12, 64), 2 * x.T @ x / 256, sparsity=0.5, nm=(2, 4), block_size=8)
    assert (keep.view(12, 16, 4).sum(dim=-1) == 2).all()


def test_zero_sparsity_leaves_weights_unchanged() -> None:
    x = _correlated(128, 32, seed=4)
    w = torch.randn(8, 32)
    pruned, keep = sparsegpt_prune(w, 2 * x.T @ x / 128, sparsity=0.0)
    assert keep.all()
    torch.testing.assert_close(pruned, w)


def test_inputs_never_active_are_pruned_first() -> None:
    x = _correlated(128, 32, seed=5)
    x[:, :4] = 0  # four dead inputs: a singular Hessian
    w = torch.randn(8, 32)
    pruned, keep = sparsegpt_prune(w, 2 * x.T @ x / 128, sparsity=0.25, block_size=32)
    assert not keep[:, :4].any() and torch.isfinite(pruned).all()


def test_llama_layers_are_updated_pruned_and_kept_by_finalize() -> None:
    model = tiny_llama()
    before = {f: m.weight.detach().clone() for f, m in model.named_modules() if isinstance(m, nn.Linear)}
    out = apply(model, SparseGPTPruningConfig(sparsity=0.5, block_size=32), Context(calib_data=token_batches(vocab=128)))
    pruned = [f for f in before if f.startswith("model.layers.")]
    assert set(out.touched) == set(pruned) and out.stats["sparsity"] == 0.5
    for fqn in pruned:
        layer = model.get_submodule(fqn)
        keep = surgery.get_mask(layer, "weight")
        kept_changed = (layer.weight[keep] != before[fqn][keep]).float().mean()
        assert kept_changed > 0.5  # OBS moved the surviving weights
    surgery.finalize(model)
    assert all(float((model.get_submodule(f).weight == 0).float().mean()) >= 0.5 for f in pruned)
    torch.testing.assert_close(model.lm_head.weight, before["lm_head"], rtol=0, atol=0)


def test_two_four_on_a_decoder_and_owl_on_unstructured() -> None:
    model = TinyDecoder().eval()
    apply(model, SparseGPTPruningConfig(pattern="2:4", block_size=16), Context(calib_data=token_batches()))
    keep = surgery.get_mask(model.layers[1].down, "weight")
    assert (keep.view(keep.shape[0], -1, 4).sum(dim=-1) == 2).all()
    model = TinyDecoder().eval()
    with torch.no_grad():
        model.layers[2].up.weight[:, :2] *= 40  # outliers in the last block only
    out = apply(model, SparseGPTPruningConfig(owl=0.1), Context(calib_data=token_batches()))
    zero = 1 - float(surgery.get_mask(model.layers[2].up, "weight").float().mean())
    assert out.stats["owl_max_sparsity"] - out.stats["owl_min_sparsity"] == pytest.approx(0.2)
    assert zero == pytest.approx(out.stats["owl_min_sparsity"], abs=0.01)


@pytest.mark.parametrize("fields", [{"sparsity": 1.0}, {"sparsity": -0.5}, {"pattern": "2:2"},
                                    {"pattern": "3:4", "block_size": 6}, {"block_size": 0},
                                    {"damping": -0.1}, {"owl": 0.05, "pattern": "2:4"}])
def test_bad_config_is_a_config_error(fields: dict) -> None:
    with pytest.raises(ConfigError, match="pruning.sparsegpt"):
        SparseGPTPruningConfig(**fields)


def test_missing_calibration_data_is_a_data_error() -> None:
    with pytest.raises(DataError, match="pruning.sparsegpt"):
        apply(TinyDecoder(), SparseGPTPruningConfig(), Context())


def test_non_finite_activations_are_a_data_error_naming_the_layer() -> None:
    model = TinyDecoder().eval()
    with torch.no_grad():
        model.embed.weight[:, 0] = float("nan")
    with pytest.raises(DataError, match="layers.0.qkv"):
        apply(model, SparseGPTPruningConfig(), Context(calib_data=token_batches()))



def test_distillation_in_the_same_stage_keeps_the_zeros_and_moves_towards_the_teacher() -> None:
    import copy

    import torchslim as ts
    from torchslim.distillation import LogitDistillationConfig
    from torchslim.recipes import Recipe, Stage, TrainSpec

    def kl_to(teacher: nn.Module, student: nn.Module, batches: list[torch.Tensor]) -> float:
        with torch.no_grad():
            return sum(float(torch.nn.functional.kl_div(student(b).logits.log_softmax(-1), teacher(b).logits.softmax(-1),
                                                        reduction="batchmean")) for b in batches)

    dense, calib = tiny_llama(), token_batches(vocab=128, n=4)
    oneshot = apply(copy.deepcopy(dense), SparseGPTPruningConfig(sparsity=0.5), Context(calib_data=calib)).model
    surgery.finalize(oneshot)
    stage = Stage(name="recover", methods=(SparseGPTPruningConfig(sparsity=0.5),
                                           LogitDistillationConfig(temperature=1.0, alpha=1.0)),
                  train=TrainSpec(steps=12, lr=3e-4, batch_size=2))
    ctx = ts.Context(calib_data=calib, train_data=calib, progress=False)  # no labels: alpha 1 ignores them
    recovered = ts.compress(copy.deepcopy(dense), Recipe(stages=(stage,), measure=()), ctx).model
    for fqn, layer in recovered.named_modules():
        if isinstance(layer, nn.Linear) and fqn.startswith("model.layers."):
            assert not surgery.leftovers(recovered)
            zeros = layer.weight == 0
            assert int(zeros.sum()) == layer.weight.numel() // 2  # still exactly 50%
            assert torch.equal(zeros, oneshot.get_submodule(fqn).weight == 0)  # the same zeros
            assert not torch.equal(layer.weight, oneshot.get_submodule(fqn).weight)  # the kept weights trained
    # random tokens carry nothing to generalize from: the KL is measured on the training batches
    assert kl_to(dense, recovered, calib) < 0.6 * kl_to(dense, oneshot, calib)
