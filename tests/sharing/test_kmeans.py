"""sharing.kmeans: exact with enough centroids, pruned zeros stay zero, centroids train, reload exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.core.storage import serialized_size
from torchslim.errors import ConfigError
from torchslim.export import load, save
from torchslim.recipes import Recipe, Stage, TrainSpec
from torchslim.sharing import ClusteredConv2d, ClusteredLinear, KMeansSharingConfig
from torchslim.sharing.kmeans import kmeans_1d


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


def test_as_many_centroids_as_distinct_values_reproduce_the_model_exactly() -> None:
    model = _cnn()
    with torch.no_grad():  # 16 distinct values per layer
        for m in (model[0], model[3]):
            m.weight.copy_(torch.randint(-8, 8, m.weight.shape) / 10)
    x = torch.randn(4, 1, 8, 8)
    reference = model(x)
    result = ts.apply(model, KMeansSharingConfig(bits=4), ts.Context())
    assert isinstance(result.model[0], ClusteredConv2d) and isinstance(result.model[3], ClusteredLinear)
    torch.testing.assert_close(result.model(x), reference, rtol=0, atol=1e-6)


def test_kmeans_error_falls_with_more_centroids_and_matches_lloyd_fixed_point() -> None:
    w = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    errors = []
    for k in (4, 16, 64):
        centroids, index = kmeans_1d(w, k, iterations=500)
        errors.append(float((centroids[index] - w).pow(2).mean()))
        for j in range(k):  # each centroid is the mean of its members
            members = w[index == j]
            if len(members):
                assert abs(float(members.mean()) - float(centroids[j])) < 1e-4
    assert errors[0] > errors[1] > errors[2]


def test_pruned_zeros_stay_zero_while_centroids_train() -> None:
    model = _cnn()
    with torch.no_grad():
        model[3].weight[model[3].weight.abs() < 0.02] = 0.0
    zeros = model[3].weight == 0
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    recipe = Recipe(stages=(Stage(name="share", methods=(KMeansSharingConfig(bits=3),),
                                  train=TrainSpec(epochs=3, batch_size=16, lr=1e-2)),), measure=())
    layer_before = ts.apply(_cnn(), KMeansSharingConfig(bits=3), ts.Context()).model[3]
    result = ts.compress(model, recipe, ts.Context(train_data=torch.utils.data.TensorDataset(x, y)))
    layer = result.model[3]
    assert isinstance(layer, ClusteredLinear) and layer.fixed_zero
    assert bool((layer.weight()[zeros] == 0).all())
    assert len(torch.unique(layer.weight())) <= 8
    assert not torch.equal(layer.codebook.detach()[1:], layer_before.codebook.detach()[1:])


def test_file_shrinks_and_reloads_exactly(tmp_path: Path) -> None:
    model, x = _cnn(), torch.randn(2, 1, 8, 8)
    dense = serialized_size(model)
    result = ts.compress(model, Recipe.single(KMeansSharingConfig(bits=5)), ts.Context())
    assert serialized_size(result.model) < 0.35 * dense  # uint8 indices; sharing.huffman goes further
    save(result, tmp_path / "run")
    torch.testing.assert_close(load(tmp_path / "run", _cnn)(x), result.model(x), rtol=0, atol=0)


def test_bits_outside_1_to_16_are_refused() -> None:
    with pytest.raises(ConfigError, match="bits must be an integer in 1..16"):
        KMeansSharingConfig(bits=17)


def test_huffman_coded_indices_shrink_the_file_and_reload_bit_exact(tmp_path: Path) -> None:
    from torchslim.sharing import HuffmanConfig

    model, x = _cnn(), torch.randn(2, 1, 8, 8)
    with torch.no_grad():  # 80% pruned: the pinned zero dominates the indices
        for m in (model[0], model[3]):
            m.weight[m.weight.abs() < m.weight.abs().quantile(0.8)] = 0.0
    stage = Stage(name="share", methods=(KMeansSharingConfig(bits=5), HuffmanConfig()))
    plain = ts.compress(_cnn(), Recipe.single(KMeansSharingConfig(bits=5)), ts.Context())
    result = ts.compress(model, Recipe(stages=(stage,), measure=()), ts.Context())
    row = result.record.outcomes[-1]
    assert row.method == "sharing.huffman" and 0 < row.stats["bits_per_weight"] < 2.5
    assert serialized_size(result.model) < 0.5 * serialized_size(plain.model)
    save(result, tmp_path / "run")
    reloaded = load(tmp_path / "run", _cnn)
    assert reloaded[3].entropy_coded
    assert torch.equal(reloaded[3].indices, result.model[3].indices)
    torch.testing.assert_close(reloaded(x), result.model(x), rtol=0, atol=0)


def test_huffman_without_clustered_layers_says_what_to_do() -> None:
    from torchslim.errors import UnsupportedModuleError
    from torchslim.sharing import HuffmanConfig

    with pytest.raises(UnsupportedModuleError, match="run sharing.kmeans first"):
        ts.apply(_cnn(), HuffmanConfig(), ts.Context())
