"""Latency predictor: a per-operator lookup table timed on this machine, plus a linear fit.

Both spaces have one: ``LatencyTable`` (CNN) and ``TransformerLatencyTable``.

A CNN of the space is a chain of operators (stem, downsampling conv, residual block, head),
each fixed by its channels, kernel and input size. Timing each distinct operator once and
summing predicts a network's latency without timing the network; a scale and offset fitted
on a few measured networks absorb the per-call overhead the sum misses. Rank quality is what
a search needs, so ``spearman`` reports it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from torchslim.errors import ConfigError
from torchslim.measure.latency import measure_latency, model_latency
from torchslim.nas.spaces import CNNArch, Head, ResBlock, stage, stem
from torchslim.nas.transformer import ModelDims, TransformerArch

__all__ = ["LatencyTable", "TransformerLatencyTable", "assess", "measured_latency", "one_thread", "operators",
           "spearman"]

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


class _OpTable:
    """Per-operator times summed over an architecture, then a fitted scale and offset."""

    def __init__(self, repeats: int) -> None:
        self.repeats = repeats
        self.table: dict[Op, float] = {}
        self.scale, self.offset = 1.0, 0.0

    def operators(self, arch: Any) -> list[Op]:
        """The operator keys of ``arch``."""
        raise NotImplementedError

    def _operator(self, op: Op) -> tuple[nn.Module, torch.Tensor]:
        """The operator as a module and an input of its shape."""
        raise NotImplementedError

    def op_ms(self, op: Op) -> float:
        """The operator's time in ms, timed on first use."""
        if op not in self.table:
            module, x = self._operator(op)
            module.eval()
            self.table[op] = _min_ms(lambda: module(x), self.repeats)
        return self.table[op]

    def raw(self, arch: Any) -> float:
        """Sum of the operator times of ``arch`` (ms), before the fit."""
        return sum(self.op_ms(op) for op in self.operators(arch))

    def predict(self, arch: Any) -> float:
        """Predicted latency of ``arch`` in ms."""
        return self.scale * self.raw(arch) + self.offset

    def fit(self, archs: Sequence[Any], measured: Sequence[float]) -> None:
        """Least-squares scale and offset mapping the operator sums to ``measured`` (ms)."""
        if len(archs) != len(measured) or len(archs) < 2:
            raise ConfigError(f"{type(self).__name__}.fit: expected >= 2 architectures with one measurement "
                              f"each, found {len(archs)} architectures and {len(measured)} measurements")
        xs = torch.tensor([self.raw(a) for a in archs], dtype=torch.float64)
        ys = torch.tensor(list(measured), dtype=torch.float64)
        design = torch.stack([xs, torch.ones_like(xs)], dim=1)
        solution = torch.linalg.lstsq(design, ys[:, None]).solution[:, 0]
        self.scale, self.offset = float(solution[0]), float(solution[1])


class LatencyTable(_OpTable):
    """Per-operator latency lookup table of the CNN space for one input size and batch size.

    Args:
        image_size: Side of the input images.
        batch_size: Images per call.
        repeats: Timed calls per operator (the minimum is kept).
    """

    def __init__(self, image_size: int, batch_size: int = 1, repeats: int = 20) -> None:
        if image_size < 1 or batch_size < 1 or repeats < 1:
            raise ConfigError(f"LatencyTable: expected image_size, batch_size and repeats >= 1, found "
                              f"{image_size}, {batch_size}, {repeats}")
        super().__init__(repeats)
        self.image_size, self.batch_size = image_size, batch_size

    def operators(self, arch: CNNArch) -> list[Op]:
        """The operator keys of ``arch`` (see ``operators``)."""
        return operators(arch, self.image_size)

    def _operator(self, op: Op) -> tuple[nn.Module, torch.Tensor]:
        module, channels = _module(op)
        side = op[-1]
        return module, torch.randn(self.batch_size, channels, side, side)


class _Attention(nn.Module):
    """The cost shape of one self-attention sublayer: fused QKV, attention, output, residual norm."""

    def __init__(self, hidden: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(hidden, 3 * heads * head_dim)
        self.out = nn.Linear(heads * head_dim, hidden)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, -1)
        out: torch.Tensor = self.norm(x + self.out(y))
        return out


def _ffn(hidden: int, width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, hidden), nn.LayerNorm(hidden))


class TransformerLatencyTable(_OpTable):
    """Per-operator latency lookup table of the Transformer space (students of one model).

    Each layer of a student is an attention sublayer with its heads (of the model's head
    size) and an FFN of its width; both are timed once per distinct shape at the student's
    hidden size, on ``batch_size`` sequences of ``seq_len`` tokens. Embeddings and pooling
    go into the fitted offset.

    Args:
        dims: The model's sizes (``torchslim.nas.transformer.model_dims``).
        batch_size: Sequences per call.
        seq_len: Tokens per sequence.
        repeats: Timed calls per operator (the minimum is kept).
    """

    def __init__(self, dims: ModelDims, batch_size: int = 8, seq_len: int = 128, repeats: int = 10) -> None:
        if batch_size < 1 or seq_len < 1 or repeats < 1:
            raise ConfigError(f"TransformerLatencyTable: expected batch_size, seq_len and repeats >= 1, "
                              f"found {batch_size}, {seq_len}, {repeats}")
        super().__init__(repeats)
        self.dims, self.batch_size, self.seq_len = dims, batch_size, seq_len

    def operators(self, arch: TransformerArch) -> list[Op]:
        """``("attention", heads, hidden)`` and ``("ffn", width, hidden)`` once per layer of ``arch``."""
        hidden = self.dims.hidden if arch.hidden is None else arch.hidden
        return [("attention", arch.heads, hidden), ("ffn", arch.ffn, hidden)] * arch.layers

    def _operator(self, op: Op) -> tuple[nn.Module, torch.Tensor]:
        hidden = int(op[2])
        attention = op[0] == "attention"
        module = _Attention(hidden, op[1], self.dims.head_dim) if attention else _ffn(hidden, op[1])
        return module, torch.randn(self.batch_size, self.seq_len, hidden)


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


def assess(table: _OpTable, archs: Sequence[Any], measured: Sequence[float],
           fit_on: int = 10) -> dict[str, float]:
    """How well ``table`` predicts ``measured`` latencies (ms) of ``archs``.

    Returns ``spearman`` (operator sums vs measurement: the ranking a search relies on),
    ``mape`` (mean relative error on the rest after fitting scale and offset on the first
    ``fit_on``), ``ops`` (operators timed) and ``lut_s`` (seconds spent timing them).
    """
    if len(archs) != len(measured) or len(archs) <= fit_on or fit_on < 2:
        raise ConfigError(f"assess: expected one measurement per architecture and more than fit_on={fit_on} "
                          f">= 2 of them, found {len(archs)} architectures and {len(measured)} measurements")
    started = time.perf_counter()
    predicted = [table.raw(a) for a in archs]
    lut_s = time.perf_counter() - started
    table.fit(archs[:fit_on], measured[:fit_on])
    errors = [abs(table.predict(a) - m) / m for a, m in zip(archs[fit_on:], measured[fit_on:])]
    return {"spearman": spearman(predicted, measured), "mape": sum(errors) / len(errors),
            "ops": float(len(table.table)), "lut_s": lut_s}
