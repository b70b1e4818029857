"""sharing.embedding: exact at full rank, error falls with rank, tied heads follow, reload exact."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from tiny_models import MLP, TinyLM
from torchslim.errors import ConfigError, UnsupportedModuleError
from torchslim.export import load, save
from torchslim.sharing import EmbeddingFactorizationConfig, FactorizedEmbedding, FactorizedTiedHead
from torchslim.sharing.embedding import embedding_factors


class Encoder(nn.Module):
    """An untied embedding with a padding row, then a Linear."""

    def __init__(self, vocab: int = 40, dim: int = 24) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.out = nn.Linear(dim, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(tokens))


class Seq2Seq(nn.Module):
    """Encoder and decoder embeddings and the output head all share one table (T5 / BART style)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Embedding(30, 16)
        self.dec = nn.Embedding(30, 16)
        self.head = nn.Linear(16, 30, bias=True)
        self.dec.weight = self.enc.weight
        self.head.weight = self.enc.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(tokens) + self.dec(tokens.flip(-1)))


def _tiny_lm() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM().eval()


def _tokens(vocab: int = 50) -> torch.Tensor:
    return torch.randint(0, vocab, (3, 7), generator=torch.Generator().manual_seed(1))


def _apply(model: nn.Module, **fields: object) -> ts.Result:
    return ts.apply(model, EmbeddingFactorizationConfig(**fields), ts.Context())  # type: ignore[arg-type]


def _low_rank_(weight: torch.Tensor, rank: int) -> None:
    """Overwrite ``weight`` (V, H) by a random matrix of exactly ``rank``."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape[0], rank, generator=g) @ torch.randn(rank, weight.shape[1], generator=g))


def test_full_rank_factors_reproduce_the_embedding_and_its_tied_head() -> None:
    table = nn.Embedding(50, 32)
    codes, proj = embedding_factors(table.weight, 32)
    embed, head = FactorizedEmbedding(50, 32, 32), FactorizedTiedHead(32, 50, 32)
    with torch.no_grad():
        embed.weight.copy_(codes)
        embed.proj.copy_(proj)
    head.weight, head.proj = embed.weight, embed.proj
    x, h = _tokens(), torch.randn(4, 32)
    torch.testing.assert_close(embed(x), table(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(head(h), h @ table.weight.T, rtol=0, atol=1e-5)


def test_a_table_of_rank_e_is_reproduced_exactly_including_its_tied_head() -> None:
    model = _tiny_lm()
    _low_rank_(model.embed.weight, 8)
    x = _tokens()
    reference = model(x)
    out = _apply(model, rank=8).model
    assert isinstance(out.embed, FactorizedEmbedding) and isinstance(out.lm_head, FactorizedTiedHead)
    assert out.lm_head.weight is out.embed.weight and out.lm_head.proj is out.embed.proj
    torch.testing.assert_close(out(x), reference, rtol=0, atol=1e-4)


def test_a_rank_that_would_not_shrink_the_table_leaves_it_alone(caplog: pytest.LogCaptureFixture) -> None:
    model = _tiny_lm()
    with caplog.at_level(logging.WARNING, logger="torchslim.sharing.embedding"):
        result = _apply(model, rank=32)  # 32 * (50 + 32) > 50 * 32
    assert type(result.model.embed) is nn.Embedding and result.record.structure == {}
    assert "would not reduce" in caplog.text


def test_error_falls_as_rank_rises_and_matches_the_discarded_singular_values() -> None:
    weight = torch.randn(60, 32, generator=torch.Generator().manual_seed(0))
    singular = torch.linalg.svdvals(weight.double())
    errors = []
    for rank in (2, 4, 8, 16, 32):
        codes, proj = embedding_factors(weight, rank)
        assert codes.shape == (60, rank) and proj.shape == (32, rank)
        error = float((codes.double() @ proj.double().T - weight.double()).norm())
        expected = float(singular[rank:].pow(2).sum().sqrt())  # Eckart-Young: the best rank-r error
        assert error == pytest.approx(expected, abs=1e-4)
        errors.append(error)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-4


def test_parameter_count_falls_to_rank_times_vocab_plus_width() -> None:
    model = _tiny_lm()
    before = sum(p.numel() for p in model.parameters())
    result = _apply(model)  # default rank 0.25 of 32 -> 8
    after = sum(p.numel() for p in result.model.parameters())
    assert result.model.embed.rank == 8
    assert before - after == 50 * 32 - 8 * (50 + 32)  # the tied head adds nothing of its own
    stats = result.record.outcomes[0]
    assert stats.stats["weight_ratio"] == pytest.approx(8 * 82 / 1600, abs=1e-4)
    assert stats.layers["embed"]["rank"] == 8


def test_padding_row_stays_zero_and_gets_no_gradient() -> None:
    torch.manual_seed(0)
    model = Encoder()
    result = _apply(model, rank=6)
    embed = result.model.embed
    assert embed.padding_idx == 0
    assert torch.equal(embed.weight[0], torch.zeros(6))
    tokens = torch.tensor([[0, 3, 0, 5]])
    assert torch.equal(embed(tokens)[0, 0], torch.zeros(24))
    result.model(tokens).sum().backward()
    assert embed.weight.grad is not None
    assert torch.equal(embed.weight.grad[0], torch.zeros(6)) and embed.weight.grad[3].abs().sum() > 0


def test_tied_embeddings_and_head_share_the_factors() -> None:
    torch.manual_seed(0)
    model = Seq2Seq()
    _low_rank_(model.enc.weight, 4)
    x = _tokens(30)
    reference = model(x)
    result = _apply(model, rank=4)
    out = result.model
    assert isinstance(out.dec, FactorizedEmbedding) and isinstance(out.head, FactorizedTiedHead)
    assert out.dec.weight is out.enc.weight and out.head.proj is out.enc.proj
    assert out.head.bias is not None
    torch.testing.assert_close(out(x), reference, rtol=0, atol=1e-4)
    assert result.record.structure["enc"] == {"tie": ["dec", "head"]}


@pytest.mark.parametrize("build", [_tiny_lm, Seq2Seq, Encoder])
def test_save_and_load_restore_the_factors_and_ties_bit_exactly(build: type[nn.Module], tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build().eval()
    result = _apply(model, rank=0.25)
    save(result, tmp_path / "run")
    reloaded = load(tmp_path / "run", build)
    x = _tokens(30)
    torch.testing.assert_close(reloaded(x), result.model(x), rtol=0, atol=0)
    factorised = [m for m in reloaded.modules() if isinstance(m, (FactorizedEmbedding, FactorizedTiedHead))]
    assert factorised and all(m.weight is factorised[0].weight for m in factorised)


def test_the_caller_keeps_an_untouched_copy_if_it_makes_one() -> None:
    model = _tiny_lm()
    original = copy.deepcopy(model)
    _apply(model)
    assert isinstance(original.embed, nn.Embedding) and original.lm_head.weight is original.embed.weight


@pytest.mark.parametrize("rank", [0, -1, 1.5, 2.5, -0.25])
def test_bad_rank_is_a_config_error(rank: float) -> None:
    with pytest.raises(ConfigError, match="rank must be"):
        EmbeddingFactorizationConfig(rank=rank)


def test_rank_above_the_width_is_a_config_error_naming_the_layer() -> None:
    with pytest.raises(ConfigError, match="exceeds the width 32 of embedding embed"):
        _apply(_tiny_lm(), rank=33)


def test_model_without_embedding_is_unsupported() -> None:
    with pytest.raises(UnsupportedModuleError, match="nn.Embedding"):
        _apply(MLP())


def test_weight_held_by_another_kind_of_module_is_left_alone_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    model = Encoder()
    model.extra = nn.Module()  # a module of another kind holding the table
    model.extra.weight = model.embed.weight  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING, logger="torchslim.sharing.embedding"):
        result = _apply(model)
    assert type(result.model.embed) is nn.Embedding and result.model.extra.weight is result.model.embed.weight
    assert "weight tied to extra.weight" in caplog.text
