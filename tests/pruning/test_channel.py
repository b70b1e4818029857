"""pruning/channel.py: physical channel removal is exact, reloads, and refuses bad input clearly."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim as ts
from tiny_llama import tiny_llama
from tiny_models import MLP, ResConcatCNN, TinyLM
from torchslim.errors import ConfigError, DataError, SelectorError, UnsupportedModuleError
from torchslim.pruning.channel import ChannelPruningConfig, apply, plan
from torchslim.pruning.structured.prune import removed_positions


class Block(nn.Module):
    """Residual add, depthwise and grouped convs, a concat and a flatten into a Linear."""

    def __init__(self) -> None:
        super().__init__()

        def cbn(cin: int, cout: int, k: int, groups: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                                 nn.BatchNorm2d(cout))

        self.stem, self.pw, self.dw = cbn(3, 16, 3), cbn(16, 16, 1), cbn(16, 16, 3, groups=16)
        self.back, self.grouped = cbn(16, 16, 1), cbn(16, 16, 3, groups=4)
        self.side = nn.Conv2d(16, 8, 1)
        self.fc1, self.fc2 = nn.Linear(24 * 2 * 2, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = F.relu(h + self.back(F.relu(self.dw(F.relu(self.pw(h))))))
        h = torch.cat([F.relu(self.grouped(h)), self.side(h)], dim=1)
        return self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(h, 2).flatten(1))))


def _block() -> Block:
    torch.manual_seed(0)
    model = Block()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics and affine terms
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    return model.eval()


def _ctx(x: torch.Tensor, **kw: object) -> ts.Context:
    return ts.Context(example_inputs=x, **kw)  # type: ignore[arg-type]


@torch.no_grad()
def _zero(model: nn.Module, positions: dict[tuple[str, str], dict[int, object]]) -> None:
    """Zero the given positions of every parameter (buffers stay: they only scale zeros)."""
    for (fqn, name), dims in positions.items():
        t = getattr(model.get_submodule(fqn), name)
        if isinstance(t, nn.Parameter):
            for dim, pos in dims.items():
                t.index_fill_(dim, torch.as_tensor(pos), 0.0)


@pytest.mark.parametrize("importance", ["l2", "taylor", "bn_scale"])
def test_pruned_model_equals_the_masked_original(importance: str) -> None:
    x = torch.randn(4, 3, 8, 8)
    model = _block()
    cfg = ChannelPruningConfig(ratio=0.5, importance=importance)
    ctx = _ctx(x, calib_data=[x])
    chosen = plan(model, cfg, ctx)
    assert len(chosen.groups) >= 3 and all(chosen.removed)
    masked = copy.deepcopy(model)
    _zero(masked, removed_positions(chosen.groups, chosen.removed))
    out = apply(model, cfg, ctx)
    assert out.stats["flops_ratio"] < 0.5 and out.stats["params_removed"] > 0
    assert out.layers["side"] == {"kept": 4.0, "ratio": 0.5} and out.structure["fc1"] == {}
    torch.testing.assert_close(model(x), masked(x), rtol=1e-5, atol=1e-5)
    assert model.grouped[0].groups < 4 and model.dw[0].groups == model.dw[0].in_channels < 16


@pytest.mark.parametrize("build, x", [(_block, torch.randn(2, 3, 8, 8)),
                                      (ResConcatCNN, torch.randn(2, 3, 8, 8)), (MLP, torch.randn(5, 16))])
def test_channels_of_zero_importance_are_removed_without_changing_outputs(build: type, x: torch.Tensor) -> None:
    model = build().eval()
    cfg = ChannelPruningConfig(ratio=0.5, importance="l1")
    groups = plan(model, cfg, _ctx(x)).groups
    doomed = [tuple(range(1, g.size, 2))[: round(g.size * 0.5)] for g in groups]  # every other channel
    _zero(model, removed_positions(groups, doomed))
    reference = model(x)
    apply(model, cfg, _ctx(x))
    assert plan(model, ChannelPruningConfig(ratio=0.0), _ctx(x)).groups[0].size < groups[0].size
    torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5)


def test_compress_save_load_round_trip(tmp_path: Path) -> None:
    x = torch.randn(2, 3, 8, 8)
    result = ts.apply(_block(), ChannelPruningConfig(ratio=0.5), _ctx(x))
    ts.save(result, tmp_path / "run")
    reloaded = ts.load(tmp_path / "run", build=Block)
    assert reloaded.fc1.in_features == result.model.fc1.in_features < 96
    torch.testing.assert_close(reloaded(x), result.model(x), rtol=0, atol=0)


class ScaledNorm(nn.Module):
    """GroupNorm, PReLU and a bare per-channel parameter (like ConvNeXt's layer scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.act = nn.PReLU(8)
        self.scale = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.act(self.norm(self.conv(x))) * self.scale).mean((2, 3)))


def test_layers_outside_the_rebuild_list_reload_through_recorded_shapes(tmp_path: Path) -> None:
    x = torch.randn(2, 3, 6, 6)
    result = ts.apply(ScaledNorm().eval(), ChannelPruningConfig(ratio=0.5), _ctx(x))
    model = result.model
    assert model.norm.num_channels == model.act.num_parameters == model.scale.shape[0] == 4
    assert model.norm.num_groups == 2
    ts.save(result, tmp_path / "run")
    reloaded = ts.load(tmp_path / "run", build=ScaledNorm)
    torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)


def test_tiny_lm_prunes_its_ffn_and_keeps_attention_and_tied_embedding() -> None:
    model = TinyLM().eval()
    tokens = torch.randint(0, 50, (2, 6))
    out = apply(model, ChannelPruningConfig(ratio=0.5), _ctx(tokens))
    assert model.ffn[0].out_features == model.ffn[2].in_features == 32
    assert model.lm_head.weight is model.embed.weight and model.embed.embedding_dim == 32
    assert model.attn.embed_dim == 32 and set(out.touched) == {"ffn.0", "ffn.2"}
    assert model(tokens).shape == (2, 6, 50)


def test_targets_and_ignore_choose_the_layers() -> None:
    x = torch.randn(2, 3, 8, 8)
    model = _block()
    apply(model, ChannelPruningConfig(ratio=0.5, targets=("side",)), _ctx(x))
    assert model.side.out_channels == 4 and model.stem[0].out_channels == 16
    model = _block()
    apply(model, ChannelPruningConfig(ratio=0.5, ignore=("re:fc.*",)), _ctx(x))
    assert model.fc1.in_features == 96 and model.fc1.out_features == 32  # kept exactly as they were
    assert model.pw[0].out_channels == 8


def test_round_to_and_min_channels() -> None:
    x = torch.randn(2, 16)
    model = MLP().eval()
    apply(model, ChannelPruningConfig(ratio=0.6, round_to=8), _ctx(x))
    assert model.fc1.out_features == 16
    model = MLP().eval()
    apply(model, ChannelPruningConfig(ratio=0.99, min_channels=3), _ctx(x))
    assert model.fc1.out_features == 3


def test_eval_mode_and_unpruned_layers_are_left_alone() -> None:
    model = _block().train()
    x = torch.randn(2, 3, 8, 8)
    stem = model.stem[1].running_mean.clone()
    apply(model, ChannelPruningConfig(ratio=0.0), _ctx(x))
    assert model.training and torch.equal(model.stem[1].running_mean, stem)


@pytest.mark.parametrize("kwargs, match", [
    ({"ratio": 1.0}, r"ratio must be in \[0, 1\), got 1.0"),
    ({"ratio": -0.1}, r"ratio must be in \[0, 1\)"),
    ({"importance": "l3"}, r"importance must be one of .*l1.*l2"),
    ({"round_to": 0}, "round_to"),
])
def test_bad_settings_are_config_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ChannelPruningConfig(**kwargs)  # type: ignore[arg-type]


def test_selector_matching_nothing_lists_close_names() -> None:
    with pytest.raises(SelectorError, match=r"'fc3'.*closest names: (fc2, fc1|fc1, fc2)"):
        apply(MLP(), ChannelPruningConfig(targets=("fc3",)), _ctx(torch.randn(2, 16)))


def test_zero_channels_is_an_error_naming_the_layer() -> None:
    model = MLP()
    with pytest.raises(ConfigError, match=r"'fc1' with 0 of its 32 channels"):
        apply(model, ChannelPruningConfig(ratio=0.99, min_channels=0), _ctx(torch.randn(2, 16)))
    assert model.fc1.out_features == 32


def test_calibration_importance_needs_data() -> None:
    with pytest.raises(DataError, match="calib_data"):
        apply(MLP(), ChannelPruningConfig(importance="apoz"), _ctx(torch.randn(2, 16)))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_module_the_tracer_cannot_follow_is_named_and_can_be_ignored() -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), torch.jit.script(nn.Conv2d(8, 8, 1)),
                             nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1)).eval()

    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(UnsupportedModuleError, match=r"cannot follow 2.*add '2' to `ignore`"):
        apply(build(), ChannelPruningConfig(), _ctx(x))
    model = build()
    apply(model, ChannelPruningConfig(ignore=("2",)), _ctx(x))
    assert model[0].out_channels == 8 and model[3].out_channels == 4


class CountsChannels(nn.Module):
    """Takes another path when a layer's width changes: the cut cannot be verified."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h if self.a.out_channels == 8 else torch.sigmoid(h))


def test_a_cut_that_changes_the_traced_operations_is_undone_and_named() -> None:
    model = CountsChannels().eval()
    x = torch.randn(1, 3, 4, 4)
    before = model(x)
    with pytest.raises(UnsupportedModuleError, match=r"sigmoid in '<model>' runs.*control flow.*model is unchanged"):
        apply(model, ChannelPruningConfig(), _ctx(x))
    assert model.a.out_channels == 8 and model.a.weight.shape == (8, 3, 1, 1)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


class Attention(nn.Module):
    """Self-attention written with Linears and SDPA; the width is read from the input's shape."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.embed, self.norm = nn.Embedding(20, dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down, self.head = nn.Linear(dim, 32), nn.Linear(32, dim), nn.Linear(dim, 20)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        b, t, c = h.shape
        x = self.norm(h)
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c)
        h = h + self.o(a)
        return self.head(h + self.down(F.gelu(self.up(h))))


def test_a_width_read_from_a_shape_is_kept_after_one_retry(tmp_path: Path) -> None:
    tokens = torch.randint(0, 20, (2, 5))
    torch.manual_seed(0)
    result = ts.apply(Attention().eval(), ChannelPruningConfig(ratio=0.5), _ctx(tokens))
    model = result.model
    assert model.up.out_features == model.down.in_features == 16  # the MLP hidden dim is cut
    assert model.embed.embedding_dim == model.o.out_features == 16  # the reshape needs it whole
    assert model.q.out_features == 16  # head dims are pruning.heads' business
    ts.save(result, tmp_path / "run")
    torch.manual_seed(0)
    torch.testing.assert_close(ts.load(tmp_path / "run", build=Attention)(tokens), model(tokens), rtol=0, atol=0)


def _tiny_bert_encoder() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A random 2-layer BERT sentence encoder (hidden 32, FFN 64) and a batch of 2 x 12 tokens."""
    transformers = pytest.importorskip("transformers")
    from torchslim.zoo.minilm import MiniLMEncoder

    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = MiniLMEncoder(transformers.BertModel(config)).eval()
    return model, {"input_ids": torch.randint(0, 50, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}


def test_bert_ffn_channels_shrink_both_dense_layers_and_zero_channels_go_first() -> None:
    model, batch = _tiny_bert_encoder()
    doomed = torch.arange(0, 64, 4)  # a quarter of each FFN, made worthless
    for layer in model.bert.encoder.layer:
        with torch.no_grad():
            layer.intermediate.dense.weight[doomed] = 0
            layer.intermediate.dense.bias[doomed] = 0
            layer.output.dense.weight[:, doomed] = 0
    reference = model(batch)
    cfg = ChannelPruningConfig(ratio=0.25, importance="l2", targets=(r"re:.*intermediate\.dense",))
    out = ts.apply(model, cfg, ts.Context(example_inputs=batch, calib_data=[batch]))
    for layer in out.model.bert.encoder.layer:
        assert layer.intermediate.dense.weight.shape == (48, 32)
        assert layer.output.dense.weight.shape == (32, 48)
        assert layer.attention.self.query.weight.shape == (32, 32)  # attention untouched
    torch.testing.assert_close(out.model(batch), reference, rtol=1e-5, atol=1e-5)


def _tied_llama() -> nn.Module:
    return tiny_llama(tied=True)


def test_a_llamas_hidden_size_shrinks_and_its_tied_head_follows(tmp_path: Path) -> None:
    model = _tied_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 128, (2, 10))
    targets = ("type:Embedding", r"re:.*(o_proj|down_proj)$")  # every layer writing to the residual stream
    untouched = ts.apply(copy.deepcopy(model), ChannelPruningConfig(ratio=0.25, targets=targets), _ctx(ids)).model
    assert untouched.model.embed_tokens.embedding_dim == 64, "lm_head shares the table: it must be a target too"
    result = ts.apply(model, ChannelPruningConfig(ratio=0.25, targets=(*targets, "lm_head")), _ctx(ids))
    pruned = result.model
    embed = pruned.model.embed_tokens
    assert embed.weight.shape == (128, 48) and pruned.lm_head.weight is embed.weight
    layer = pruned.model.layers[0]
    assert layer.self_attn.q_proj.in_features == layer.mlp.up_proj.in_features == 48
    assert layer.self_attn.o_proj.out_features == layer.mlp.down_proj.out_features == 48
    assert layer.input_layernorm.weight.shape == pruned.model.norm.weight.shape == (48,)
    assert layer.self_attn.q_proj.out_features == 64, "heads keep their size"
    assert pruned.config.hidden_size == 48 and result.record.structure[""]["config"] == {"hidden_size": 48}
    logits = pruned(input_ids=ids).logits
    assert logits.shape == (2, 10, 128) and torch.isfinite(logits).all()  # the vocabulary is the output
    ts.save(result, tmp_path / "run")
    reloaded = ts.load(tmp_path / "run", build=_tied_llama)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert reloaded.config.hidden_size == reloaded.model.config.hidden_size == 48, "structure.json sets the config"
    torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, rtol=0, atol=0)


def test_outputs_prune_lets_an_encoders_output_width_go() -> None:
    model, batch = _tiny_bert_encoder()
    targets = ("type:Embedding", r"re:.*\.output\.dense$")
    kept = ts.apply(copy.deepcopy(model), ChannelPruningConfig(ratio=0.25, targets=targets), _ctx(batch)).model
    assert kept.bert.embeddings.word_embeddings.embedding_dim == 32, "the sentence embedding keeps its width"
    assert kept.bert.config.hidden_size == 32
    cut = ts.apply(model, ChannelPruningConfig(ratio=0.25, targets=targets, outputs="prune"), _ctx(batch)).model
    assert cut.bert.embeddings.word_embeddings.embedding_dim == 24 and cut(batch).shape == (2, 24)
    assert cut.bert.config.hidden_size == 24
