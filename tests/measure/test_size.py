from __future__ import annotations

import torch
from torch import nn

from torchslim.measure.size import size_bytes


def test_sparse_model_serializes_much_smaller() -> None:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128))
    dense_bytes = size_bytes(dense)
    assert dense_bytes > 4 * (256 * 256 + 256 * 128)  # fp32 weights are all there
    with torch.no_grad():
        for p in dense.parameters():
            p[torch.rand_like(p) < 0.9] = 0  # about 90% zeros
    assert size_bytes(dense) < 0.25 * dense_bytes


def test_tied_weights_are_stored_once() -> None:
    embed = nn.Embedding(512, 64)
    head = nn.Linear(64, 512, bias=False)
    separate = size_bytes(nn.ModuleDict({"embed": embed, "head": head}))
    head.weight = embed.weight
    tied = size_bytes(nn.ModuleDict({"embed": embed, "head": head}))
    assert tied < 0.6 * separate
