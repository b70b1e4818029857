"""Every registered method on every tiny model: builds, round-trips, runs, cleans up, reloads."""

from pathlib import Path

import pytest
import torch

import torchslim as ts
from tiny_models import CASES, TinyCase
from torchslim.core import config_from_dict, get_config_class, is_trained, list_methods, surgery
from torchslim.errors import DataError, UnsupportedModuleError
from torchslim.export import load, save
from torchslim.recipes import Recipe, TrainSpec

# (method, tiny model) pairs where the method cannot apply to the whole model: it must say so
# with this error (and leave no hooks behind) instead of running.
NOT_APPLICABLE: dict[tuple[str, str], type[Exception]] = {
    # judges candidates with ctx.eval_fn, which this generic context does not have (tests/nas covers it)
    **{("nas.autocompress", name): DataError for name in ("mlp", "cnn", "lm")},
    ("distillation.attention", "mlp"): UnsupportedModuleError,  # no attention, no feature maps
    # a generator makes continuous inputs; the LM takes token ids
    ("distillation.datafree", "lm"): UnsupportedModuleError,
    # inversion matches the teacher's BatchNorm statistics; these teachers have none
    **{("distillation.inversion", name): UnsupportedModuleError for name in ("mlp", "lm")},
    # Tucker-2 and depthwise-separable factorisation need KxK Conv2d layers; these models have none
    **{(key, name): UnsupportedModuleError for key in ("lowrank.separable", "lowrank.tucker")
       for name in ("mlp", "lm")},
    # no stack of same-class blocks and no identity-shortcut residual block to remove
    **{("pruning.layers", name): UnsupportedModuleError for name in ("mlp", "cnn", "lm")},
    # no attention module whose heads could be removed
    **{("pruning.heads", name): UnsupportedModuleError for name in ("mlp", "cnn")},
    # codes the indices of sharing.kmeans layers; a model without any must say so
    **{("sharing.huffman", name): UnsupportedModuleError for name in ("mlp", "cnn", "lm")},
    # one set of weights for a stack of same-class layers; none of the tiny models has such a stack
    **{("sharing.cross_layer", name): UnsupportedModuleError for name in ("mlp", "cnn", "lm")},
    # searches its own CNN space and swaps the body of a torchslim.nas.SearchableCNN
    **{("nas.search", name): UnsupportedModuleError for name in ("mlp", "cnn", "lm")},
    # factorises nn.Embedding tables; only the LM has one
    **{("sharing.embedding", name): UnsupportedModuleError for name in ("mlp", "cnn")},
    # two layers only, both kept float by keep_first_last (the default, as in the papers)
    **{(key, "mlp"): UnsupportedModuleError for key in ("quantization.binary", "quantization.ternary")},
}


def _ctx(case: TinyCase) -> ts.Context:
    batches = case.batches()
    return ts.Context(example_inputs=batches[0][0], calib_data=[b[0] for b in batches],
                      train_data=batches, seed=0)


@pytest.mark.parametrize("key", list_methods())
def test_default_config_builds_and_round_trips(key: str) -> None:
    cfg = get_config_class(key)()
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("key", list_methods())
def test_method_runs_cleans_up_and_reloads(key: str, case: TinyCase, tmp_path: Path) -> None:
    cfg = get_config_class(key)()
    torch.manual_seed(0)
    model = case.build().eval()
    ctx = _ctx(case)
    recipe = Recipe.single(cfg, TrainSpec(steps=2) if is_trained(cfg) else None)
    if (key, case.name) in NOT_APPLICABLE:
        with pytest.raises(NOT_APPLICABLE[key, case.name]):
            ts.compress(model, recipe, ctx)
        assert surgery.leftovers(model) == []
        return
    result = ts.compress(model, recipe, ctx)
    x = case.make_input(3)
    with torch.no_grad():
        out = result.model(x)
    assert out.shape == case.output_shape(3)
    assert torch.isfinite(out).all()
    assert surgery.leftovers(result.model) == [], "hooks or parametrizations survived finalize"
    assert not result.model.training, "the model's eval mode must be kept"
    save(result, tmp_path / "run")
    reloaded = load(tmp_path / "run", case.build)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), out, rtol=0, atol=0)
