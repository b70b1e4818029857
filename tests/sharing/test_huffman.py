"""sharing.huffman on real weights: a trained, pruned, clustered MLP is stored sparse, smaller, and exact."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import torchslim as ts
from torchslim.core import huffman
from torchslim.core.storage import entropy_coded_bytes, serialized_size
from torchslim.export import load, save
from torchslim.pruning import MagnitudePruningConfig
from torchslim.recipes import Recipe, Stage
from torchslim.sharing import HuffmanConfig, KMeansSharingConfig
from torchslim.zoo import accuracy, digits


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))


def _trained() -> nn.Module:
    """An MLP trained for a few seconds on sklearn's digits: real weights."""
    model, data = _mlp(), digits("train")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.tensors[0]), data.tensors[1]).backward()
        opt.step()
    return model.eval()


def test_pruned_clustered_real_weights_code_sparse_below_one_bit_and_reload_exactly(tmp_path: Path) -> None:
    model = _trained()
    test = digits("test")
    assert accuracy(model, test) > 0.9
    stages = (Stage(name="prune", methods=(MagnitudePruningConfig(sparsity=0.9),)),
              Stage(name="share", methods=(KMeansSharingConfig(bits=5), HuffmanConfig())))
    result = ts.compress(model, Recipe(stages=stages, measure=()), ts.Context())
    layer = result.model[1]
    indices = layer.indices.flatten().numpy()
    assert (indices == 0).mean() > 0.89 and layer.entropy_coded  # int(0.9 * n) zeros
    dense_code = huffman.encode(indices)
    assert dense_code is not None
    sparse_bytes = entropy_coded_bytes(layer.indices)
    assert sparse_bytes < 0.8 * dense_code[0].size  # a dense code pays >= 1 bit per (mostly zero) weight
    row = result.record.outcomes[-1].layers["1"]
    assert row["bits_per_weight"] == round(8 * sparse_bytes / indices.size, 3) and row["bits_per_weight"] < 1.0
    save(result, tmp_path / "run")
    assert (tmp_path / "run" / "model.safetensors").stat().st_size == serialized_size(result.model)
    reloaded = load(tmp_path / "run", _mlp)
    assert torch.equal(reloaded[1].indices, layer.indices) and torch.equal(reloaded[3].indices, result.model[3].indices)
    x = test.tensors[0]
    torch.testing.assert_close(reloaded(x), result.model(x), rtol=0, atol=0)
    assert serialized_size(result.model) < serialized_size(_mlp()) / 15  # 18x: biases and headers weigh here
