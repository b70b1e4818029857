"""Canonical Huffman coding of small-alphabet integer tensors (cluster indices), exact and vectorised.

``encode`` turns integers into a packed bit stream plus the code table (symbols and their code
lengths); ``decode`` reads it back exactly. Codes are canonical, so the table is just the code
length of each symbol. Code lengths are limited to ``MAX_LENGTH`` bits; a distribution skewed
enough to need longer codes is reported as not worth coding (the caller stores it raw).

``encode_sparse`` / ``decode_sparse`` are Deep Compression's storage of a mostly-one-value tensor
(cluster indices after pruning: the pinned zero): only the other entries are kept, each as the
gap since the previous entry and its value, both Huffman-coded. A gap longer than ``cap`` is
split by filler entries that hold the common value, so the gap alphabet stays small.
"""

from __future__ import annotations

import heapq
import itertools

import numpy as np

__all__ = ["MAX_CAP", "MAX_LENGTH", "code_lengths", "decode", "decode_sparse", "encode", "encode_sparse"]

MAX_LENGTH = 20
MAX_CAP = 255  # longest gap one sparse entry spans; longer gaps take filler entries


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


def _table_code(values: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(code length of every symbol 0..max as uint8, packed stream), or None if codes get too long."""
    coded = encode(values)
    if coded is None:
        return None
    stream, symbols, lengths = coded
    table = np.zeros(int(values.max()) + 1, dtype=np.uint8)
    table[symbols] = lengths
    return table, stream


def _entries(flat: np.ndarray, fill: int, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """(gaps, values) of the sparse entries, fillers included, up to the last ``cap`` positions."""
    positions = np.flatnonzero(flat != fill)
    gaps = np.diff(positions, prepend=-1) - 1
    tail = (len(flat) - 1 - (int(positions[-1]) if len(positions) else -1)) // (cap + 1)
    fillers = np.append(gaps // (cap + 1), tail)  # filler entries before each entry, and at the end
    counts = fillers + 1
    counts[-1] -= 1  # the end has fillers only
    out_gaps = np.full(int(counts.sum()), cap, dtype=np.int64)
    out_values = np.full(len(out_gaps), fill, dtype=np.int64)
    last = np.cumsum(counts[:-1]) - 1
    out_gaps[last], out_values[last] = gaps % (cap + 1), flat[positions]
    return out_gaps, out_values


def encode_sparse(values: np.ndarray) -> tuple[np.ndarray, dict[str, int]] | None:
    """``(blob, header)`` of non-negative integers stored as Huffman-coded (gap, value) entries.

    The common value ``fill`` is implied wherever no entry is. The blob is the gap code table
    (a length per symbol), the value code table, the gap stream and the value stream; the header
    holds what is needed to split and check it. The gap width (``cap``) giving the smallest blob
    is chosen. None if some code would exceed ``MAX_LENGTH`` bits.
    """
    flat = np.asarray(values).reshape(-1).astype(np.int64)
    if len(flat) == 0 or int(flat.min()) < 0:
        return None
    fill = int(np.bincount(flat).argmax())
    best: tuple[np.ndarray, dict[str, int]] | None = None
    for cap in (3, 7, 15, 31, 63, 127, MAX_CAP):
        gaps, entries = _entries(flat, fill, cap)
        header = {"fill": fill, "cap": cap, "entries": len(gaps), "gap_table": 0, "value_table": 0,
                  "gap_bytes": 0}
        parts: list[np.ndarray] = []
        if len(gaps):
            gap_code, value_code = _table_code(gaps), _table_code(entries)
            if gap_code is None or value_code is None:
                continue
            parts = [gap_code[0], value_code[0], gap_code[1], value_code[1]]
            header.update(gap_table=len(gap_code[0]), value_table=len(value_code[0]),
                          gap_bytes=len(gap_code[1]))
        blob = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
        if best is None or blob.size < best[0].size:
            best = blob.astype(np.uint8), header
    return best


def decode_sparse(blob: np.ndarray, header: dict[str, int], count: int) -> np.ndarray:
    """The ``count`` integers that ``encode_sparse`` stored; ValueError if blob and header disagree."""
    fill, cap, entries = int(header["fill"]), int(header["cap"]), int(header["entries"])
    gap_table, value_table = int(header["gap_table"]), int(header["value_table"])
    gap_bytes = int(header["gap_bytes"])
    if not (0 <= fill < 2**62 and 1 <= cap <= MAX_CAP and 0 <= gap_table <= cap + 1
            and 0 <= value_table <= 2**16 and gap_bytes >= 0 and entries >= 0):
        raise ValueError(f"sparse header out of range: {header}")
    if count < 0 or count > entries * (cap + 1) + cap:
        raise ValueError(f"{entries} entries with gaps up to {cap} cannot fill {count} values")
    streams = blob.size - gap_table - value_table - gap_bytes
    if streams < 0 or entries > 8 * min(gap_bytes, streams):
        raise ValueError(f"a blob of {blob.size} bytes cannot hold {entries} sparse entries")
    out = np.full(count, fill, dtype=np.int64)
    if entries == 0:
        return out
    tables = blob[:gap_table], blob[gap_table:gap_table + value_table]
    start = gap_table + value_table
    gaps = _decode_table(blob[start:start + gap_bytes], tables[0], entries)
    values = _decode_table(blob[start + gap_bytes:], tables[1], entries)
    positions = np.cumsum(gaps + 1) - 1
    if int(positions[-1]) >= count or count - 1 - int(positions[-1]) > cap:
        raise ValueError(f"sparse entries end at position {int(positions[-1])} of {count}")
    out[positions] = values
    return out


def _decode_table(stream: np.ndarray, table: np.ndarray, count: int) -> np.ndarray:
    symbols = np.flatnonzero(table)
    if len(symbols) == 0:
        raise ValueError("a sparse code table has no symbols")
    return decode(stream, symbols, table[symbols], count)
