"""Activation range observers: min/max, percentile, MSE and KL-divergence (histogram).

An ``Observer`` sees a tensor's values over calibration batches in two passes: the first
records the extreme values, the second a fixed-range histogram (``bins`` bins), from which
every method but ``minmax`` chooses the clipping range. Pure tensor code, no hooks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["OBSERVERS", "Observer", "choose_range"]

OBSERVERS = ("minmax", "percentile", "mse", "histogram")


class Observer:
    """Extreme values, then a histogram, of one activation tensor over calibration batches."""

    def __init__(self, bins: int = 2048) -> None:
        self.bins = bins
        self.lo, self.hi = math.inf, -math.inf
        self.hist: torch.Tensor | None = None

    def see_range(self, x: torch.Tensor) -> None:
        x = x.detach()
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))

    def see_values(self, x: torch.Tensor) -> None:
        lo, hi = self.edges()
        h = torch.histc(x.detach().float().flatten(), bins=self.bins, min=lo, max=hi).double()
        self.hist = h if self.hist is None else self.hist + h

    def edges(self) -> tuple[float, float]:
        """The histogram's range: the observed extremes, always containing 0."""
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        return (lo, hi) if hi > lo else (lo, lo + 1e-6)


def choose_range(obs: Observer, method: str, bits: int = 8, percentile: float = 99.99) -> tuple[float, float]:
    """The ``[lo, hi]`` clipping range that ``method`` picks for ``obs``'s tensor."""
    lo, hi = obs.edges()
    if method == "minmax" or obs.hist is None or float(obs.hist.sum()) == 0:
        return lo, hi
    hist = obs.hist
    width = (hi - lo) / obs.bins
    centers = lo + width * (torch.arange(obs.bins, dtype=torch.float64) + 0.5)
    if method == "percentile":
        cdf = torch.cumsum(hist, 0) / hist.sum()
        tail = (100.0 - percentile) / 100.0
        first = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=cdf.dtype)))
        last = int(torch.searchsorted(cdf, torch.tensor(1.0 - tail, dtype=cdf.dtype)))
        return min(lo + first * width, 0.0), max(lo + (last + 1) * width, 0.0)
    if method == "mse":
        return _mse_range(hist, centers, lo, hi, bits)
    if method == "histogram":
        return _kl_range(hist, centers, lo, hi, bits)
    raise ValueError(f"unknown observer {method!r}; expected one of {OBSERVERS}")


def _grid_error(hist: torch.Tensor, centers: torch.Tensor, lo: float, hi: float, bits: int) -> float:
    """Expected squared error of rounding the histogram's values to the grid over [lo, hi]."""
    qmax = (1 << bits) - 1
    scale = max((hi - lo) / qmax, 1e-12)
    zp = round(-lo / scale)
    q = torch.clamp(torch.round(centers / scale) + zp, 0, qmax)
    err = ((q - zp) * scale - centers) ** 2
    return float((hist * err).sum())


_SHRINK = torch.logspace(0, -2, 100).tolist()  # share of the observed extreme kept, 100% .. 1%


def _search(lo: float, hi: float, cost: Callable[[float, float], float]) -> tuple[float, float]:
    """The [lo, hi] with the smallest ``cost``, each end shrunk towards 0 in turn (two rounds)."""
    best_lo, best_hi = lo, hi
    for _ in range(2):
        best_hi = min((hi * f for f in _SHRINK), key=lambda h: cost(best_lo, h)) if hi > 0 else hi
        best_lo = min((lo * f for f in _SHRINK), key=lambda v: cost(v, best_hi)) if lo < 0 else lo
    return best_lo, best_hi


def _mse_range(hist: torch.Tensor, centers: torch.Tensor, lo: float, hi: float,
               bits: int) -> tuple[float, float]:
    return _search(lo, hi, lambda a, b: _grid_error(hist, centers, a, b, bits))


def _kl_range(hist: torch.Tensor, centers: torch.Tensor, lo: float, hi: float,
              bits: int) -> tuple[float, float]:
    """TensorRT-style entropy calibration: the clipped range whose quantized distribution has the
    smallest KL divergence from the observed one (clipped mass folded into the edge bins)."""
    levels = 1 << bits
    total = hist.sum()

    def kl(a: float, b: float) -> float:
        inside = ((centers >= a) & (centers <= b)).nonzero()
        if inside.numel() < 2:
            return math.inf
        first, last = int(inside[0]), int(inside[-1])
        p = hist[first:last + 1].clone()
        p[0] += hist[:first].sum()
        p[-1] += hist[last + 1:].sum()
        p = p / total
        q = _quantized_distribution(hist[first:last + 1], levels)
        mask = p > 0
        return float((p[mask] * torch.log(p[mask] / q[mask].clamp_min(1e-12))).sum())

    return _search(lo, hi, kl)


def _quantized_distribution(p: torch.Tensor, levels: int) -> torch.Tensor:
    """``p`` merged into ``levels`` equal groups of bins, each group's mass spread evenly over
    its non-empty bins, normalised to sum 1."""
    n = p.numel()
    group = torch.div(torch.arange(n) * levels, n, rounding_mode="floor")
    mass = torch.zeros(levels, dtype=p.dtype).index_add_(0, group, p)
    nonzero = torch.zeros(levels, dtype=p.dtype).index_add_(0, group, (p > 0).to(p.dtype))
    q = torch.where(p > 0, mass[group] / nonzero[group].clamp_min(1), torch.zeros_like(p))
    return q / q.sum().clamp_min(1e-12)
