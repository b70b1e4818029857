"""Tiny decoder-style language models for the layer-by-layer (LLM) tests.

``TinyDecoder`` is pure torch: embeddings, a ModuleList of pre-norm blocks called with keyword
arguments (a causal mask and a cache argument that must be ignored), a final norm and a head.
``tiny_llama`` builds a random transformers ``LlamaForCausalLM`` (skips the test without
transformers).
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, hidden: torch.Tensor, *, mask: torch.Tensor, past_key_values: Any = None,
                use_cache: bool = False) -> tuple[torch.Tensor, None]:
        q, k, v = self.qkv(self.norm(hidden)).chunk(3, dim=-1)
        if past_key_values is not None:
            past_key_values.append(k)  # a cache grows on every call; calibration must never pass one
        att = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~mask, float("-inf"))
        hidden = hidden + self.proj(att.softmax(dim=-1) @ v)
        return hidden + self.down(torch.relu(self.up(hidden))), None


class TinyDecoder(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor, use_cache: bool = True) -> SimpleNamespace:
        hidden = self.embed(ids)
        n = ids.shape[-1]
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        cache: list[torch.Tensor] | None = [] if use_cache else None
        for layer in self.layers:
            hidden, _ = layer(hidden, mask=mask, past_key_values=cache, use_cache=use_cache)
        return SimpleNamespace(logits=self.head(self.norm(hidden)))


def token_batches(n: int = 3, batch: int = 2, length: int = 16, vocab: int = 64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, length), generator=g) for _ in range(n)]


def tiny_llama(layers: int = 2, seed: int = 0, *, vocab: int = 128, tied: bool = False) -> nn.Module:
    """A random LlamaForCausalLM: hidden 64, 4 heads (2 KV heads), FFN 128, ``vocab`` tokens; with
    ``tied`` its lm_head is its embedding table (as SmolLM2's)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                      max_position_embeddings=64, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model: nn.Module = transformers.LlamaForCausalLM(config)
    return model.eval()
