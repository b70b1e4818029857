"""Tiny data for nas tests: sklearn digits (8x8), a few hundred samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torchslim as ts
from torchslim.zoo import digits
from torchslim.zoo.data import head, make_eval_fn


@pytest.fixture(scope="session")
def digits_data() -> tuple[torch.utils.data.TensorDataset, torch.utils.data.TensorDataset]:
    return head(digits("train"), 256), head(digits("test"), 200)


@pytest.fixture
def nas_ctx(digits_data, tmp_path: Path) -> ts.Context:
    train, test = digits_data
    return ts.Context(train_data=train, eval_fn=make_eval_fn(test), example_inputs=test.tensors[0][:1],
                      workdir=tmp_path / "work", seed=0)
