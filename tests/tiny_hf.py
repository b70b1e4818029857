"""Tiny Hugging Face model folders written with ``save_pretrained`` (random weights, offline)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

WORDS = ["the", "a", "minister", "said", "government", "will", "not", "is", "of", "and", "to", "in"]
VOCAB = 4 + len(WORDS)


def _transformers():  # type: ignore[no-untyped-def]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return pytest.importorskip("transformers")


def save_tokenizer(folder: Path, bert: bool = False) -> None:
    """A word-level tokenizer over ``WORDS`` (built with ``tokenizers``, no download)."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = _transformers()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if bert else ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate([*specials, *WORDS])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=specials[1]))
    tok.normalizer = tokenizers.normalizers.Lowercase()
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=specials[0], unk_token=specials[1],
                                                bos_token=specials[2], eos_token=specials[3])
    fast.save_pretrained(str(folder))


def llama_folder(folder: Path, *, tokenizer: bool = True, seed: int = 0) -> Path:
    """A random 2-layer LlamaForCausalLM (hidden 64, the tokenizer's 16 words) saved to ``folder``."""
    transformers = _transformers()
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=512, pad_token_id=0, bos_token_id=2,
                                      eos_token_id=3)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(str(folder))
    if tokenizer:
        save_tokenizer(folder)
    return folder


def bert_folder(folder: Path, *, sentence: bool = True, seed: int = 0) -> Path:
    """A random 2-layer BertModel (hidden 32), as a sentence-transformers folder when ``sentence``."""
    transformers = _transformers()
    config = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    torch.manual_seed(seed)
    transformers.BertModel(config).save_pretrained(str(folder))
    save_tokenizer(folder, bert=True)
    if sentence:
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 32, "pooling_mode_cls_token": False,
             "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False}))
    return folder
