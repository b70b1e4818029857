"""Text data for Hugging Face models, tokenized with the model folder's own tokenizer.

``lee_windows``: a causal LM's data (ASSETS.md 3.1): calibration is the 32 Lee background
windows of 512 tokens after the 24 evaluation windows, one window per batch; quality is
perplexity on the evaluation windows; the sample is a greedy continuation of a fixed prompt.

``lee_similarity``: a sentence encoder's data (ASSETS.md 3.2): calibration is the tokenized
Lee background sentences (batches of ``{"input_ids", "attention_mask"}``); quality is
``zoo.minilm.evaluate_minilm`` (Lee Pearson, WordSim-353 and SimLex-999 Spearman).

``quick`` keeps 4 evaluation and 8 calibration windows, or 256 sentences.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from torchslim.zoo import llm, minilm

__all__ = ["SAMPLE_PROMPT", "TEXT_DATASETS", "lee_similarity", "lee_windows"]

SAMPLE_PROMPT = "The Prime Minister said that the government"
SAMPLE_TOKENS = 24
QUICK_WINDOWS, QUICK_CALIB, QUICK_SENTENCES = 4, 8, 256
SENTENCE_BATCH, SENTENCE_TOKENS = 32, 128


def _perplexity(windows: torch.Tensor, model: nn.Module) -> dict[str, float]:
    return {"perplexity": llm.perplexity(model, windows)}


def _sample(tokenizer: Any, model: nn.Module) -> dict[str, str]:
    from torchslim.hf import generate

    return {SAMPLE_PROMPT: generate(model, tokenizer, SAMPLE_PROMPT, SAMPLE_TOKENS)}


def lee_windows(tokenizer: Any, quick: bool = False) -> dict[str, Any]:
    """Fields of a ``DataBundle`` for a causal LM (see the module docstring)."""
    ids = tokenizer(llm.lee_background_text(), add_special_tokens=False)["input_ids"]
    evals, calib = llm.token_windows(ids, "eval"), llm.token_windows(ids, "calib")
    if quick:
        evals, calib = evals[:QUICK_WINDOWS], calib[:QUICK_CALIB]
    return {"train": TensorDataset(calib), "test": TensorDataset(evals),
            "example_inputs": evals[:1].clone(), "calib": list(torch.split(calib, 1)),
            "eval_fn": functools.partial(_perplexity, evals),
            "samples_fn": functools.partial(_sample, tokenizer)}


def _similarity(tokenizer: Any, model: nn.Module) -> dict[str, float]:
    return minilm.evaluate_minilm(model, tokenizer)


def lee_similarity(tokenizer: Any, quick: bool = False) -> dict[str, Any]:
    """Fields of a ``DataBundle`` for a sentence encoder (see the module docstring)."""
    sentences = list(minilm.lee_background_sentences())
    if quick:
        sentences = sentences[:QUICK_SENTENCES]
    calib = minilm.token_batches(tokenizer, sentences[:16 * SENTENCE_BATCH], SENTENCE_BATCH, SENTENCE_TOKENS)
    ids, mask = minilm.tokenize(tokenizer, sentences, SENTENCE_TOKENS)
    first = minilm.tokenize(tokenizer, sentences[:1], SENTENCE_TOKENS)
    return {"train": TensorDataset(ids, mask), "test": TensorDataset(ids, mask),
            "example_inputs": first, "calib": calib,
            "eval_fn": functools.partial(_similarity, tokenizer), "samples_fn": None}


TEXT_DATASETS: dict[str, Callable[..., dict[str, Any]]] = {
    "lee_windows": lee_windows,
    "lee_similarity": lee_similarity,
}
