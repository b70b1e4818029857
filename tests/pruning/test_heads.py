"""pruning.heads: the cut model equals the original with the removed heads zeroed, and reloads exactly."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from tiny_llama import tiny_llama, token_batches
from tiny_models import TinyLM
from torchslim.errors import ConfigError, UnsupportedModuleError
from torchslim.export import load, save
from torchslim.pruning import HeadPruningConfig
from torchslim.pruning._attention import PrunedMultiheadAttention
from torchslim.pruning.heads import plan
from torchslim.recipes import Recipe


def tiny_bert(seed: int = 0) -> nn.Module:
    """A random BertModel: hidden 32, 4 heads of 8, 2 layers."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                                     intermediate_size=64, vocab_size=100, max_position_embeddings=32)
    torch.manual_seed(seed)
    model: nn.Module = transformers.BertModel(config, add_pooling_layer=False)
    return model.eval()


def _zero_heads(model: nn.Module, cfg: HeadPruningConfig, ctx: ts.Context) -> nn.Module:
    """A copy of ``model`` with the output-projection columns of the heads ``cfg`` removes set to zero."""
    sites, removed = plan(model, cfg, ctx)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for site in sites:
            part = next(p for p in site.parts if p.output)
            if removed[site.fqn]:
                zeroed.get_submodule(part.fqn).weight[:, part.indices(removed[site.fqn])] = 0
    return zeroed


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _prune(model: nn.Module, cfg: HeadPruningConfig, ctx: ts.Context) -> ts.Result:
    return ts.compress(model, Recipe.single(cfg), ctx)


def _lm_output(out: object) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        if hasattr(out, name):
            return getattr(out, name)  # type: ignore[no-any-return]
    assert isinstance(out, torch.Tensor)
    return out


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "mha": (lambda: (torch.manual_seed(0), TinyLM().eval())[1], lambda: torch.randint(0, 50, (3, 7))),
    "bert": (tiny_bert, lambda: torch.randint(0, 100, (3, 9))),
    "llama_gqa": (tiny_llama, lambda: token_batches(n=1, batch=3, length=9, vocab=128)[0]),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("importance", ["l1", "taylor", "output"])
def test_cut_model_equals_original_with_those_heads_zeroed(name: str, importance: str, tmp_path: Path) -> None:
    build, make_input = CASES[name]
    model, x = build(), make_input()
    ctx = ts.Context(example_inputs=x, calib_data=[make_input(), make_input()])
    cfg = HeadPruningConfig(ratio=0.5, importance=importance)  # type: ignore[arg-type]
    reference = _zero_heads(model, cfg, ctx)
    before = _params(model)
    result = _prune(model, cfg, ctx)
    with torch.no_grad():
        got, want = _lm_output(result.model(x)), _lm_output(reference(x))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    stats = result.record.outcomes[0].stats
    assert stats["heads_removed"] == stats["heads"] / 2
    # every removed head takes its q/k/v rows and o columns: 4 * hidden * head_dim weights (+ q/k/v biases)
    hidden, head_dim = {"mha": (32, 8), "bert": (32, 8), "llama_gqa": (64, 16)}[name]
    group = 2 if name == "llama_gqa" else 1  # a KV head goes with its 2 query heads
    per_unit = group * 2 * hidden * head_dim + 2 * hidden * head_dim  # q, o for the group; k, v once
    per_unit += {"mha": 3 * head_dim, "bert": 3 * head_dim, "llama_gqa": 0}[name]  # biases
    assert before - _params(result.model) == stats["params_removed"] == per_unit * stats["heads_removed"] / group
    save(result, tmp_path / "run")
    reloaded = load(tmp_path / "run", build)
    with torch.no_grad():
        torch.testing.assert_close(_lm_output(reloaded(x)), got, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_zero_ratio_changes_nothing(name: str) -> None:
    build, make_input = CASES[name]
    model, x = build(), make_input()
    with torch.no_grad():
        want = _lm_output(model(x))
    result = _prune(model, HeadPruningConfig(ratio=0.0), ts.Context(example_inputs=x))
    assert result.record.outcomes[0].touched == []
    with torch.no_grad():
        torch.testing.assert_close(_lm_output(result.model(x)), want, rtol=0, atol=0)


def test_mha_shrinks_to_a_pruned_module_that_matches_multihead_attention_calls() -> None:
    torch.manual_seed(0)
    for batch_first in (True, False):
        mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=12, vdim=10).eval()
        keep = [0, 2]
        zeroed = copy.deepcopy(mha)
        with torch.no_grad():
            zeroed.out_proj.weight[:, 4:8] = 0
            zeroed.out_proj.weight[:, 12:16] = 0
        pruned = PrunedMultiheadAttention.from_multihead_attention(mha, keep).eval()
        shape = (2, 5) if batch_first else (5, 2)
        q = torch.randn(*shape, 16)
        k = torch.randn(2, 6, 12) if batch_first else torch.randn(6, 2, 12)
        v = torch.randn(2, 6, 10) if batch_first else torch.randn(6, 2, 10)
        pad = torch.tensor([[False] * 5 + [True], [False] * 6])
        mask = torch.randn(5, 6)
        for kwargs in ({}, {"key_padding_mask": pad, "attn_mask": mask}, {"need_weights": False}):
            torch.testing.assert_close(pruned(q, k, v, **kwargs)[0], zeroed(q, k, v, **kwargs)[0],
                                       atol=1e-5, rtol=1e-5)
        restored = pruned.to_multihead_attention()
        torch.testing.assert_close(restored(q, k, v)[0], zeroed(q, k, v)[0], atol=1e-6, rtol=1e-6)
        assert _params(pruned) < _params(mha)


def test_global_scope_ranks_across_layers_and_keeps_a_head_per_layer() -> None:
    model, x = tiny_bert(), torch.randint(0, 100, (2, 5))
    with torch.no_grad():  # layer 0's heads all tiny: a global ranking takes them first
        for lin in (model.encoder.layer[0].attention.self.query, model.encoder.layer[0].attention.output.dense):
            lin.weight.mul_(1e-3)
    cfg = HeadPruningConfig(ratio=0.5, scope="global")
    sites, removed = plan(model, cfg, ts.Context())
    assert [len(removed[s.fqn]) for s in sites] == [3, 1]  # 4 of 8 heads; layer 0 keeps one
    result = _prune(model, cfg, ts.Context(example_inputs=x))
    assert result.model.encoder.layer[0].attention.self.num_attention_heads == 1
    assert result.model.encoder.layer[1].attention.self.all_head_size == 24


def test_targets_limit_the_layers_and_a_second_cut_indexes_the_original_heads() -> None:
    torch.manual_seed(0)
    original = nn.Sequential(TinyLM(), TinyLM().attn).eval()  # "0.attn" and an unused "1"
    x = torch.randint(0, 50, (2, 5))
    model = ts.apply(copy.deepcopy(original), HeadPruningConfig(ratio=0.25, targets=("0",)), ts.Context()).model
    first = model.get_submodule("0.attn")
    assert isinstance(first, PrunedMultiheadAttention) and first.num_heads == 3
    assert isinstance(model.get_submodule("1"), nn.MultiheadAttention)
    model = ts.apply(model, HeadPruningConfig(ratio=0.5, ignore=("1",)), ts.Context()).model
    second = model.get_submodule("0.attn")
    assert len(second.kept_heads) == 1 and set(second.kept_heads) < set(first.kept_heads)
    with torch.no_grad():
        for h in set(range(4)) - set(second.kept_heads):
            original.get_submodule("0.attn").out_proj.weight[:, h * 8:(h + 1) * 8] = 0
        torch.testing.assert_close(model[0](x), original[0](x), atol=1e-5, rtol=1e-5)


def test_layer_ratio_rounding_to_every_head_keeps_one_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_llama()  # 2 KV groups per layer: ratio 0.8 rounds to both
    with caplog.at_level(logging.WARNING):
        result = _prune(model, HeadPruningConfig(ratio=0.8), ts.Context())
    assert "would remove all 4 heads" in caplog.text
    attn = result.model.model.layers[0].self_attn
    assert attn.k_proj.out_features == 16 and attn.q_proj.out_features == 32 and attn.o_proj.in_features == 32


def test_bad_input_is_reported() -> None:
    with pytest.raises(ConfigError, match="ratio must be in"):
        HeadPruningConfig(ratio=1.0)
    with pytest.raises(ConfigError, match="importance must be"):
        HeadPruningConfig(importance="entropy")  # type: ignore[arg-type]
    with pytest.raises(UnsupportedModuleError, match="found none"):
        ts.apply(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), HeadPruningConfig(), ts.Context())
    with pytest.raises(UnsupportedModuleError, match="leave none"):
        ts.apply(TinyLM(), HeadPruningConfig(ignore=("attn",)), ts.Context())
