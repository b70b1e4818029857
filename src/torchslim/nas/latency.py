"""Latency predictor: a per-operator lookup table timed on this machine, plus a linear fit.

A CNN of the space is a chain of operators (stem, downsampling conv, residual block, head),
each fixed by its channels, kernel and input size. Timing each distinct operator once and
summing predicts a network's latency without timing the network; a scale and offset fitted
on a few measured networks absorb the per-call overhead the sum misses. Rank quality is what
a search needs, so ``spearman`` reports it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from torchslim.errors import ConfigError
from torchslim.measure.latency import measure_latency, model_latency
from torchslim.nas.spaces import CNNArch, Head, ResBlock, stage, stem

__all__ = ["LatencyTable", "measured_latency", "one_thread", "operators", "spearman"]

Op = tuple[Any, ...]


def operators(arch: CNNArch, image_size: int) -> list[Op]:
    """The operator keys of ``arch`` in order: ``(kind, channels..., kernel, input side)``."""
    side = image_size
    ops: list[Op] = [("stem", arch.in_channels, arch.widths[0], side)]
    side //= 2  # max pooling
    for i, (width, depth, kernel) in enumerate(zip(arch.widths, arch.depths, arch.kernels)):
        if i > 0:
            ops.append(("down", arch.widths[i - 1], width, kernel, side))
            side = (side - 1) // 2 + 1  # stride 2 with same padding
        ops += [("block", width, kernel, side)] * depth
    ops.append(("head", arch.widths[-1], arch.num_classes, side))
    return ops


def _module(op: Op) -> tuple[nn.Module, int]:
    """The operator as a module, and its input channels."""
    kind = op[0]
    if kind == "stem":
        return stem(op[1], op[2]), op[1]
    if kind == "down":
        return stage(op[1], op[2], 0, op[3], first=False), op[1]
    if kind == "block":
        return ResBlock(op[1], op[2]), op[1]
    return Head(op[1], op[2]), op[1]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run on one intra-op thread, then restore the previous count.

    Small batch-1 CNNs gain nothing from more threads, and re-sizing the pool also stops
    threads left spinning by training: on a busy machine these made calls 100x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _min_ms(fn: Any, repeats: int) -> float:
    with one_thread(), torch.inference_mode():
        return measure_latency(fn, warmup=3, repeats=repeats)["latency_min_ms"]


def measured_latency(model: nn.Module, inputs: torch.Tensor, repeats: int = 20) -> float:
    """Best-of-``repeats`` single-thread wall time of ``model(inputs)`` in ms (see ``one_thread``)."""
    with one_thread():
        return model_latency(model, inputs, warmup=3, repeats=repeats)["latency_min_ms"]


class LatencyTable:
    """Per-operator latency lookup table for one input size and batch size.

    Args:
        image_size: Side of the input images.
        batch_size: Images per call.
        repeats: Timed calls per operator (the minimum is kept).
    """

    def __init__(self, image_size: int, batch_size: int = 1, repeats: int = 20) -> None:
        if image_size < 1 or batch_size < 1 or repeats < 1:
            raise ConfigError(f"LatencyTable: expected image_size, batch_size and repeats >= 1, found "
                              f"{image_size}, {batch_size}, {repeats}")
        self.image_size, self.batch_size, self.repeats = image_size, batch_size, repeats
        self.table: dict[Op, float] = {}
        self.scale, self.offset = 1.0, 0.0

    def op_ms(self, op: Op) -> float:
        """The operator's time in ms, timed on first use."""
        if op not in self.table:
            module, channels = _module(op)
            module.eval()
            side = op[-1]
            x = torch.randn(self.batch_size, channels, side, side)
            self.table[op] = _min_ms(lambda: module(x), self.repeats)
        return self.table[op]

    def raw(self, arch: CNNArch) -> float:
        """Sum of the operator times of ``arch`` (ms), before the fit."""
        return sum(self.op_ms(op) for op in operators(arch, self.image_size))

    def predict(self, arch: CNNArch) -> float:
        """Predicted latency of ``arch`` in ms."""
        return self.scale * self.raw(arch) + self.offset

    def fit(self, archs: Sequence[CNNArch], measured: Sequence[float]) -> None:
        """Least-squares scale and offset mapping the operator sums to ``measured`` (ms)."""
        if len(archs) != len(measured) or len(archs) < 2:
            raise ConfigError(f"LatencyTable.fit: expected >= 2 architectures with one measurement each, "
                              f"found {len(archs)} architectures and {len(measured)} measurements")
        xs = torch.tensor([self.raw(a) for a in archs], dtype=torch.float64)
        ys = torch.tensor(list(measured), dtype=torch.float64)
        design = torch.stack([xs, torch.ones_like(xs)], dim=1)
        solution = torch.linalg.lstsq(design, ys[:, None]).solution[:, 0]
        self.scale, self.offset = float(solution[0]), float(solution[1])


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):  # ties share their average rank
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman rank correlation of two equally long sequences (ties get average ranks)."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ConfigError(f"spearman: expected two sequences of equal length >= 2, found {len(xs)} "
                          f"and {len(ys)}")
    rx, ry = torch.tensor(_ranks(xs)), torch.tensor(_ranks(ys))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float((rx.square().sum() * ry.square().sum()).sqrt())
    return float((rx * ry).sum()) / denominator if denominator else 0.0
