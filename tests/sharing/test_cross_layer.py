"""sharing.cross_layer: tied layers hold the same parameters, counts fall, training and reload keep ties."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from tiny_models import MLP, TinyLM
from torchslim.core.storage import serialized_size
from torchslim.errors import ConfigError, UnsupportedModuleError
from torchslim.export import load, save
from torchslim.sharing import CrossLayerSharingConfig
from torchslim.sharing.cross_layer import find_stacks, layer_groups

DIM, VOCAB, LAYERS = 16, 20, 4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.norm1 = nn.LayerNorm(DIM)
        self.ffn = nn.Sequential(nn.Linear(DIM, 32), nn.GELU(), nn.Linear(32, DIM))
        self.norm2 = nn.LayerNorm(DIM)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a, _ = self.attn(h, h, h, need_weights=False)
        h = self.norm1(h + a)
        return self.norm2(h + self.ffn(h))


class StackLM(nn.Module):
    """Embedding, a ModuleList of 4 identical blocks, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def _model(seed: int = 0) -> StackLM:
    torch.manual_seed(seed)
    model = StackLM().eval()
    with torch.no_grad():  # LayerNorm starts at 1/0; make it differ between layers too
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(1))


def _apply(model: nn.Module, **fields: object) -> ts.Result:
    return ts.apply(model, CrossLayerSharingConfig(**fields), ts.Context())  # type: ignore[arg-type]


def _unique(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _params(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters())


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(p is q for p, q in zip(_params(a), _params(b), strict=True))


def test_all_layers_share_one_set_and_the_count_falls_by_three_layers() -> None:
    model = _model()
    before, block = _unique(model), _unique(model.layers[0])
    result = _apply(model)
    layers = result.model.layers
    assert all(_same(layers[0], layers[i]) for i in range(1, LAYERS))
    assert _unique(result.model) == before - (LAYERS - 1) * block
    stats = result.record.outcomes[0].stats
    assert (stats["params_before"], stats["params_after"]) == (before, before - 3 * block)
    assert torch.isfinite(result.model(_tokens())).all()


def test_groups_share_within_and_not_across() -> None:
    model = _model()
    before, block = _unique(model), _unique(model.layers[0])
    layers = _apply(model, groups=2).model.layers
    assert _same(layers[0], layers[1]) and _same(layers[2], layers[3])
    assert not any(p is q for p in _params(layers[0]) for q in _params(layers[2]))
    assert _unique(model) == before - 2 * block


@pytest.mark.parametrize(("share", "shared", "own"), [("attention", "attn", "ffn"), ("ffn", "ffn", "attn")])
def test_attention_or_ffn_variants_share_only_that_part(share: str, shared: str, own: str) -> None:
    model = _model()
    before, part = _unique(model), _unique(model.layers[0].get_submodule(shared))
    layers = _apply(model, share=share).model.layers
    for i in range(1, LAYERS):
        assert _same(layers[0].get_submodule(shared), layers[i].get_submodule(shared))
        assert not any(p is q for p in _params(layers[0].get_submodule(own))
                       for q in _params(layers[i].get_submodule(own)))
        assert layers[i].norm1.weight is not layers[0].norm1.weight
    assert _unique(model) == before - (LAYERS - 1) * part


def test_mean_init_averages_the_group_and_first_init_keeps_layer_zero() -> None:
    model = _model()
    stacked = torch.stack([layer.ffn[0].weight.detach().clone() for layer in model.layers])
    first = copy.deepcopy(model.layers[0].state_dict())
    meaned = _apply(copy.deepcopy(model), groups=1, init="mean").model
    torch.testing.assert_close(meaned.layers[3].ffn[0].weight, stacked.mean(0), rtol=0, atol=1e-7)
    kept = _apply(model, init="first").model
    for name, value in first.items():
        assert torch.equal(kept.layers[2].state_dict()[name], value)


def test_identical_layers_share_without_changing_the_output() -> None:
    model = _model()
    for i in range(1, LAYERS):
        model.layers[i].load_state_dict(model.layers[0].state_dict())
    x = _tokens()
    reference = model(x)
    for init in ("first", "mean"):
        out = _apply(copy.deepcopy(model), init=init).model(x)
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)


def test_as_many_groups_as_layers_shares_nothing() -> None:
    model = _model()
    x = _tokens()
    reference = model(x)
    result = _apply(model, groups=LAYERS)
    assert result.record.structure == {} and result.record.outcomes[0].touched == []
    torch.testing.assert_close(result.model(x), reference, rtol=0, atol=0)


def test_save_and_load_restore_the_sharing_bit_exactly(tmp_path: Path) -> None:
    model = _model()
    size_before = serialized_size(model)
    result = _apply(model, groups=2, share="all")
    save(result, tmp_path / "run")
    reloaded = load(tmp_path / "run", lambda: _model(seed=5))
    assert _same(reloaded.layers[0], reloaded.layers[1]) and _same(reloaded.layers[2], reloaded.layers[3])
    assert not _same(reloaded.layers[0], reloaded.layers[2])
    x = _tokens()
    torch.testing.assert_close(reloaded(x), result.model(x), rtol=0, atol=0)
    block_bytes = 4 * _unique(model.layers[0])
    saved = (tmp_path / "run" / "model.safetensors").stat().st_size
    assert saved < size_before - 1.9 * block_bytes  # two layers' weights are stored once


def test_a_training_step_updates_each_shared_weight_once_with_the_summed_gradient() -> None:
    model = _model()
    shared = _apply(model).model.train()
    untied = copy.deepcopy(shared)  # deepcopy keeps the ties; rebuild the layers as separate copies
    untied.layers = nn.ModuleList(copy.deepcopy(shared.layers[0]) for _ in range(LAYERS))
    x = _tokens()
    for net in (shared, untied):
        net.zero_grad()
        torch.manual_seed(0)  # the same dropout (none here) and order in both
        net(x).square().mean().backward()
    weight = shared.layers[0].ffn[0].weight
    summed = sum(layer.ffn[0].weight.grad for layer in untied.layers)
    assert weight.grad is not None
    torch.testing.assert_close(weight.grad, summed, rtol=1e-5, atol=1e-7)
    optimizer = torch.optim.SGD(shared.parameters(), lr=0.1)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(shared.parameters()))
    before = weight.detach().clone()
    optimizer.step()
    torch.testing.assert_close(weight.detach(), before - 0.1 * summed, rtol=1e-5, atol=1e-7)
    assert all(layer.ffn[0].weight is weight for layer in shared.layers)


def test_the_longest_same_class_stack_is_found_and_targets_can_name_one() -> None:
    model = _model()
    model.side = nn.Sequential(nn.Linear(DIM, DIM), nn.Linear(DIM, DIM))  # shorter: not chosen
    assert [f for f, _ in find_stacks(model)] == ["layers"]
    assert [f for f, _ in find_stacks(model, ("side",))] == ["side"]
    assert layer_groups(5, 2) == [[0, 1, 2], [3, 4]]


def test_a_named_target_that_is_not_a_stack_is_unsupported() -> None:
    with pytest.raises(UnsupportedModuleError, match="head is a Linear, expected a ModuleList"):
        _apply(_model(), targets=("head",))
    model = _model()
    model.mixed = nn.Sequential(nn.Linear(DIM, 8), nn.Linear(8, DIM))
    with pytest.raises(UnsupportedModuleError, match="other parameter shapes"):
        _apply(model, targets=("mixed",))


@pytest.mark.parametrize("build", [MLP, TinyLM])
def test_model_without_a_stack_of_layers_is_unsupported(build: type[nn.Module]) -> None:
    with pytest.raises(UnsupportedModuleError, match="no stack of layers"):
        _apply(build())


def test_share_attention_on_layers_without_attention_is_unsupported() -> None:
    model = nn.Sequential(*(nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3)))
    with pytest.raises(UnsupportedModuleError, match="share=attention found no attention sub-module"):
        _apply(model, share="attention")
    shared = _apply(model, share="all").model  # the root itself is the stack
    assert shared[2][0].weight is shared[0][0].weight


def test_more_groups_than_layers_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="groups 5 exceeds the 4 layers of layers"):
        _apply(_model(), groups=5)


@pytest.mark.parametrize(("fields", "message"), [
    ({"groups": 0}, "groups must be"), ({"share": "heads"}, "share must be"), ({"init": "random"}, "init must be"),
])
def test_bad_config_values_are_config_errors(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CrossLayerSharingConfig(**fields)  # type: ignore[arg-type]


def test_sharing_survives_a_distillation_stage_and_its_reload(tmp_path: Path) -> None:
    model = _model()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, VOCAB, (4, 5), generator=g),) * 2 for _ in range(3)]
    recipe = """
version: 1
stages:
  - name: share
    methods: [{method: sharing.cross_layer}]
  - name: recover
    train: {steps: 3, lr: 1.0e-3}
    methods: [{method: distillation.logits, temperature: 2.0}]
measure: []
export: []
"""
    ctx = ts.Context(example_inputs=batches[0][0], train_data=batches, teacher=copy.deepcopy(model), seed=0)
    result = ts.compress(model, recipe, ctx)
    layers = result.model.layers
    assert all(_same(layers[0], layers[i]) for i in range(1, LAYERS))
    save(result, tmp_path / "run")
    reloaded = load(tmp_path / "run", lambda: _model(seed=3))
    assert all(_same(reloaded.layers[0], reloaded.layers[i]) for i in range(1, LAYERS))
    x = _tokens()
    torch.testing.assert_close(reloaded(x), result.model(x), rtol=0, atol=0)
