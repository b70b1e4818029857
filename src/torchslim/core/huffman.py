"""Canonical Huffman coding of small-alphabet integer tensors (cluster indices), exact and vectorised.

``encode`` turns integers into a packed bit stream plus the code table (symbols and their code
lengths); ``decode`` reads it back exactly. Codes are canonical, so the table is just the code
length of each symbol. Code lengths are limited to ``MAX_LENGTH`` bits; a distribution skewed
enough to need longer codes is reported as not worth coding (the caller stores it raw).
"""

from __future__ import annotations

import heapq
import itertools

import numpy as np

__all__ = ["MAX_LENGTH", "code_lengths", "decode", "encode"]

MAX_LENGTH = 20


def code_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code length of each symbol with a nonzero count (one symbol: length 1)."""
    live = np.flatnonzero(counts)
    lengths = np.zeros(len(counts), dtype=np.int64)
    if len(live) == 1:
        lengths[live] = 1
        return lengths
    tie = itertools.count()
    heap = [(int(counts[s]), next(tie), [int(s)]) for s in live]
    heapq.heapify(heap)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        lengths[s1 + s2] += 1
        heapq.heappush(heap, (c1 + c2, next(tie), s1 + s2))
    return lengths


def _canonical(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(symbols in canonical order, their codes) for the symbols with a nonzero length."""
    symbols = np.array(sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)), dtype=np.int64)
    codes = np.zeros(len(symbols), dtype=np.int64)
    code, previous = 0, int(lengths[symbols[0]])
    for i, s in enumerate(symbols):
        code <<= int(lengths[s]) - previous
        previous = int(lengths[s])
        codes[i] = code
        code += 1
    return symbols, codes


def encode(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(packed bits, symbols, lengths)`` of non-negative integers, or None if codes get too long."""
    flat = np.asarray(values).reshape(-1).astype(np.int64)
    counts = np.bincount(flat)
    lengths = code_lengths(counts)
    if int(lengths.max()) > MAX_LENGTH:
        return None
    symbols, codes = _canonical(lengths)
    table_code = np.zeros(len(counts), dtype=np.int64)
    table_code[symbols] = codes
    code, length = table_code[flat], lengths[flat]
    width = int(length.max())
    shifts = np.arange(width - 1, -1, -1)  # the bits of each code, most significant first
    bits = (code[:, None] >> (shifts[None, :] - (width - length)[:, None]).clip(min=0)) & 1
    valid = shifts[None, :] < length[:, None]
    stream = np.packbits(bits[valid[:, ::-1]].astype(np.uint8))
    return stream, symbols.astype(np.int32), lengths[symbols].astype(np.uint8)


def decode(stream: np.ndarray, symbols: np.ndarray, lengths: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` integers that ``encode`` packed into ``stream``."""
    lengths = lengths.astype(np.int64)
    width = int(lengths.max()) if len(lengths) else 0
    if count == 0 or width == 0:
        return np.zeros(count, dtype=np.int64)
    if width > MAX_LENGTH or int(lengths.min()) < 1:
        raise ValueError(f"code lengths must be in 1..{MAX_LENGTH}; found {lengths.min()}..{width}")
    full = np.zeros(len(symbols), dtype=np.int64)
    _, codes = _canonical(np.bincount(np.arange(len(symbols)), weights=lengths).astype(np.int64))
    order = sorted(range(len(symbols)), key=lambda i: (lengths[i], i))
    full[order] = codes
    # lookup table over every `width`-bit window: the symbol whose code prefixes it, and its length
    table_symbol = np.zeros(1 << width, dtype=np.int64)
    table_length = np.zeros(1 << width, dtype=np.int64)
    for i in range(len(symbols)):
        start = int(full[i]) << (width - int(lengths[i]))
        stop = start + (1 << (width - int(lengths[i])))
        table_symbol[start:stop], table_length[start:stop] = symbols[i], lengths[i]
    bits = np.unpackbits(stream.astype(np.uint8))
    padded = np.concatenate([bits, np.zeros(width, dtype=np.uint8)]).astype(np.int64)
    weights = 1 << np.arange(width - 1, -1, -1)
    windows = np.lib.stride_tricks.sliding_window_view(padded, width)[: len(bits)] @ weights
    sym_at, len_at = table_symbol[windows].tolist(), table_length[windows].tolist()
    out, pos = [0] * count, 0
    for i in range(count):
        out[i] = sym_at[pos]
        pos += len_at[pos]
        if pos > len(bits):
            raise ValueError(f"the bit stream ends after {i + 1} of {count} symbols")
    return np.asarray(out, dtype=np.int64)
