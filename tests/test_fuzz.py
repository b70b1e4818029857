"""Fuzzing the loaders: random and mutated recipes, structure.json files and compressed weights.

Every input must either load or raise a ``TorchslimError``: never another exception, a hang or
code execution. Each loader gets ``FUZZ_EXAMPLES`` generated inputs (10,000 by default; set
``TORCHSLIM_FUZZ_EXAMPLES`` to change it; ``make test`` uses 2,000 to stay fast, ``make fuzz`` the full
10,000); the counts are printed to the test log.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from torchslim.core import storage, structure
from torchslim.errors import TorchslimError
from torchslim.export.checkpoint import read_structure
from torchslim.recipes import load_recipe

FUZZ_EXAMPLES = int(os.environ.get("TORCHSLIM_FUZZ_EXAMPLES", "10000"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
COUNTS: dict[str, int] = {}

VALID_RECIPE = """version: 1
model: zoo:fashion_cnn
data: zoo:fashion_mnist
stages:
  - name: prune
    methods:
      - {method: pruning.magnitude, sparsity: 0.5, scope: global}
      - {method: distillation.logits, temperature: 4.0, alpha: 0.9}
    train: {epochs: 2, lr: 5.0e-4}
  - name: quantize
    methods: [{method: quantization.dynamic}]
measure: [accuracy, params, size]
export: [checkpoint, onnx]
"""

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                    st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=20)


@st.composite
def mutated(draw: Any, text: str) -> str:
    """``text`` with a few random deletions, insertions and replacements."""
    chars = list(text)
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(chars)))
        action = draw(st.sampled_from(("delete", "insert", "replace")))
        new = draw(st.characters(codec="utf-8"))
        if action == "insert" or not chars or pos == len(chars):
            chars.insert(pos, new)
        elif action == "delete":
            del chars[pos]
        else:
            chars[pos] = new
    return "".join(chars)


@st.composite
def recipe_dicts(draw: Any) -> str:
    """Recipes with valid keys and random values, or random keys and values, as YAML."""
    base: dict[str, Any] = yaml.safe_load(VALID_RECIPE)
    containers = [base, *base["stages"], *(m for s in base["stages"] for m in s["methods"]),
                  base["stages"][0]["train"]]
    for _ in range(draw(st.integers(1, 4))):
        target = draw(st.sampled_from(containers))
        key = draw(st.one_of(st.sampled_from(sorted(target)), st.text(max_size=8)))
        target[key] = draw(json_values)
    return yaml.safe_dump(base)


def _count(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


@FUZZ
@given(st.one_of(st.text(max_size=300), mutated(VALID_RECIPE), recipe_dicts()))
def test_recipe_loader_never_crashes(text: str) -> None:
    _count("recipe")
    with contextlib.suppress(TorchslimError):
        load_recipe(text + "\n")  # a newline keeps short texts from being taken for a file path


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


shapes = st.dictionaries(st.sampled_from(("weight", "bias", "running_mean", "x", "__class__")),
                         st.one_of(st.lists(st.integers(-3, 2**40), max_size=4), json_values), max_size=3)
module_specs = st.fixed_dictionaries({"cls": st.sampled_from(("Linear", "Conv2d", "BatchNorm2d", "Nope", "LayerNorm")),
                                      "kwargs": st.one_of(st.dictionaries(
                                          st.sampled_from(("in_features", "out_features", "in_channels",
                                                           "out_channels", "kernel_size", "num_features",
                                                           "normalized_shape", "bias", "zzz")),
                                          st.one_of(st.integers(-2, 2**40), st.lists(st.integers(-2, 2**20), max_size=3),
                                                    st.booleans(), st.text(max_size=3)), max_size=4), json_values)})
ops = st.lists(st.one_of(json_values, st.fixed_dictionaries(
    {"fqn": st.sampled_from(("", "0", "1", "3", "2", "9", "0.weight", "a.b"))},
    optional={"module": st.one_of(module_specs, json_values), "shapes": shapes,
              "keep": st.one_of(st.lists(st.integers(-2, 5), max_size=4), json_values),
              "tie": st.one_of(st.lists(st.sampled_from(("", "0", "1", "3", "2", "9", "0.weight", "a.b")),
                                        max_size=3), json_values),
              "attrs": st.dictionaries(st.sampled_from(("in_features", "eps", "__dict__", "training", "k")),
                                       json_values, max_size=2)})), max_size=4)


@FUZZ
@given(ops)
def test_structure_replay_never_crashes(operations: list[Any]) -> None:
    _count("structure")
    with contextlib.suppress(TorchslimError):
        structure.replay(_tiny(), operations)


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.builds(lambda o, f: json.dumps({"format": f, "version": 1, "ops": o}),
                                                     ops, st.sampled_from(("torchslim-structure", "x")))
                 .map(str.encode)))
def test_structure_json_reader_never_crashes(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    _count("structure.json")
    path = tmp_path_factory.getbasetemp() / "structure.json"
    path.write_bytes(data)
    with contextlib.suppress(TorchslimError):
        structure.replay(_tiny(), read_structure(path))


@functools.cache
def _encoded_once() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    weight = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    weight[weight.abs() < 1.0] = 0.0
    indices = (weight.abs() * 4).clamp(max=31).to(torch.uint8)  # Huffman-coded (sharing.huffman)
    pruned = torch.zeros(40, 40, dtype=torch.uint8)  # mostly the pinned zero: sparse Huffman format
    pruned[::3, ::5] = torch.arange(1, 15, dtype=torch.uint8).repeat(8)[:112].view(14, 8)
    tensors, meta = storage.encode({"w": weight, "b": torch.zeros(16), "tied": weight, "idx": indices,
                                    "sparse_idx": pruned}, {"idx", "sparse_idx"})
    assert json.loads(meta["torchslim.encoding"])["sparse_idx"]["format"] == "sparse_huffman"
    return tensors, meta


def _encoded() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, meta = _encoded_once()
    return dict(tensors), dict(meta)


@st.composite
def weight_files(draw: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, meta = _encoded()
    info = json.loads(next(iter(meta.values())))
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(info)))
        field = draw(st.sampled_from(("shape", "format", "of", "negative_zeros", "junk", "dtype", "fill", "cap",
                                      "entries", "gap_table", "value_table", "gap_bytes")))
        info[name][field] = draw(st.one_of(json_values, st.lists(st.integers(-5, 2**45), max_size=3)))
    if draw(st.booleans()):  # a truncated tensor
        key = draw(st.sampled_from(sorted(tensors)))
        tensors[key] = tensors[key].flatten()[: draw(st.integers(0, 8))]
    if tensors["sparse_idx::sparse"].numel() and draw(st.booleans()):  # flipped bytes in the sparse blob
        blob = tensors["sparse_idx::sparse"].clone()
        for _ in range(draw(st.integers(1, 4))):
            blob[draw(st.integers(0, blob.numel() - 1))] = draw(st.integers(0, 255))
        tensors["sparse_idx::sparse"] = blob
    return tensors, {next(iter(meta)): draw(st.one_of(st.just(json.dumps(info)), st.text(max_size=20)))}


@FUZZ
@given(weight_files())
def test_compressed_weight_decoder_never_crashes(case: tuple[dict[str, torch.Tensor], dict[str, str]]) -> None:
    _count("weights")
    with contextlib.suppress(TorchslimError):
        storage.decode(*case)


@FUZZ
@given(st.binary(max_size=300))
def test_weights_file_reader_never_crashes(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    _count("weights file")
    path: Path = tmp_path_factory.getbasetemp() / "model.safetensors"
    path.write_bytes(data)
    with contextlib.suppress(TorchslimError):
        storage.read_state_dict(path)


def test_fuzz_counts_reach_the_target() -> None:
    """Runs last in this file: every loader saw FUZZ_EXAMPLES inputs (printed with -s / in the log)."""
    print(f"fuzz inputs per loader: {COUNTS}")
    assert COUNTS and all(n >= FUZZ_EXAMPLES for n in COUNTS.values()), COUNTS
