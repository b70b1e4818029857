"""Tiny models covering the hard cases: an MLP, a CNN with BN + residual add + concat,
and a transformer block with multi-head attention and tied embeddings."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ResConcatCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.res = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.side = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(h + self.res(h))  # residual add
        h = torch.cat([h, self.side(h)], dim=1)  # concat: 8 + 4 channels
        return self.head(h.mean(dim=(2, 3)))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, num_heads=4, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied, as in GPT-2 / nanoGPT

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        a, _ = self.attn(h, h, h, need_weights=False)
        h = self.norm1(h + a)
        h = self.norm2(h + self.ffn(h))
        return self.lm_head(h)


@dataclasses.dataclass(frozen=True)
class TinyCase:
    name: str
    build: Callable[[], nn.Module]
    make_input: Callable[[int], torch.Tensor]
    make_target: Callable[[int], torch.Tensor]
    output_shape: Callable[[int], tuple[int, ...]]

    def batches(self, n: int = 4, batch: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        torch.manual_seed(seed)
        return [(self.make_input(batch), self.make_target(batch)) for _ in range(n)]


CASES = (
    TinyCase("mlp", MLP, lambda b: torch.randn(b, 16), lambda b: torch.randint(0, 10, (b,)),
             lambda b: (b, 10)),
    TinyCase("cnn", ResConcatCNN, lambda b: torch.randn(b, 3, 12, 12), lambda b: torch.randint(0, 10, (b,)),
             lambda b: (b, 10)),
    TinyCase("lm", TinyLM, lambda b: torch.randint(0, 50, (b, 6)), lambda b: torch.randint(0, 50, (b, 6)),
             lambda b: (b, 6, 50)),
)
