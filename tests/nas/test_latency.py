"""The per-operator latency table: operator lists, Spearman, and agreement with measured latency."""

from __future__ import annotations

import random

import pytest
import torch

from torchslim.errors import ConfigError
from torchslim.nas import CNNSpace, LatencyTable, build_cnn, spearman
from torchslim.nas.latency import measured_latency, operators


def test_spearman_known_values() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)  # scipy's value, ties
    with pytest.raises(ConfigError):
        spearman([1.0], [2.0])


def test_operators_cover_every_layer_of_the_network() -> None:
    space = CNNSpace()
    arch = space.arch(space.sample(random.Random(3)))
    ops = operators(arch, space.image_size)
    assert len(ops) == 1 + sum(arch.depths) + len(arch.widths) - 1 + 1  # stem, blocks, downsampling, head
    assert [op[-1] for op in ops if op[0] in ('stem', 'head')] == [28, 4]  # pool 14, stride 2: 7, 4


def test_lut_prediction_ranks_candidates_like_measurement() -> None:
    space = CNNSpace(base_widths=(8, 16, 32), width_mults=(0.5, 1.0), depths=(0, 1, 2), kernels=(3, 5))
    rng = random.Random(0)
    archs = [space.arch(space.sample(rng)) for _ in range(8)]
    x = torch.randn(1, 1, 28, 28)
    torch.manual_seed(0)
    models = [build_cnn(a).eval() for a in archs]
    rounds = [[measured_latency(m, x) for m in models] for _ in range(3)]  # interleaved: a load spike hits one
    measured = [min(times) for times in zip(*rounds)]
    table = LatencyTable(28)
    predicted = [table.predict(a) for a in archs]
    assert len(table.table) < sum(len(operators(a, 28)) for a in archs)  # shared operators are timed once
    rho = spearman(predicted, measured)
    assert rho > 0.7, (rho, predicted, measured)
    raw_error = sum((p - m) ** 2 for p, m in zip(predicted, measured))
    table.fit(archs, measured)
    fitted_error = sum((table.predict(a) - m) ** 2 for a, m in zip(archs, measured))
    assert fitted_error <= raw_error + 1e-12  # least squares over (scale, offset) includes (1, 0)
