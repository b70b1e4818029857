"""Canonical Huffman coding: decode(encode(x)) == x on random and skewed data; near-entropy size."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torchslim.core import huffman


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=1, max_size=400))
def test_decode_inverts_encode(values: list[int]) -> None:
    data = np.array(values)
    coded = huffman.encode(data)
    assert coded is not None
    assert np.array_equal(huffman.decode(*coded, len(data)), data)


def test_size_is_within_one_bit_of_the_entropy() -> None:
    rng = np.random.default_rng(0)
    data = np.clip(rng.normal(16, 4, 200_000).round(), 0, 31).astype(np.int64)
    stream, _, _ = huffman.encode(data)
    p = np.bincount(data) / len(data)
    entropy = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    bits = stream.size * 8 / len(data)
    assert entropy <= bits <= entropy + 1


def test_truncated_stream_is_an_error() -> None:
    stream, symbols, lengths = huffman.encode(np.arange(64).repeat(3))
    with pytest.raises(ValueError, match="ends after"):
        huffman.decode(stream[:4], symbols, lengths, 192)


@st.composite
def mostly_one_value(draw: st.DrawFn) -> np.ndarray:
    """Index-like tensors: one common value, the rest spread over a small alphabet."""
    n = draw(st.integers(1, 3000))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    fill, density = draw(st.integers(0, 31)), draw(st.sampled_from((0.0, 0.001, 0.05, 0.1, 0.5, 1.0)))
    return np.where(rng.random(n) < density, rng.integers(0, draw(st.integers(1, 300)), n), fill)


@settings(max_examples=150, deadline=None)
@given(mostly_one_value())
def test_sparse_decode_inverts_sparse_encode(values: np.ndarray) -> None:
    coded = huffman.encode_sparse(values)
    assert coded is not None
    blob, header = coded
    assert header["fill"] == int(np.bincount(values).argmax())
    assert np.array_equal(huffman.decode_sparse(blob, header, len(values)), values)


def test_sparse_code_beats_the_one_bit_per_value_floor_of_a_dense_code() -> None:
    rng = np.random.default_rng(0)
    n = 100_000
    values = np.where(rng.random(n) < 0.1, rng.integers(1, 32, n), 0)  # 90% pinned zero, 5-bit indices
    blob, header = huffman.encode_sparse(values)
    stream, symbols, _ = huffman.encode(values)
    assert stream.size >= n / 8  # a dense code spends at least one bit on every value
    assert blob.size < 0.75 * (stream.size + 5 * symbols.size)
    # close to the information content: positions (binary entropy) plus ~5 bits per nonzero
    p = 0.1
    ideal_bits = n * -(p * np.log2(p) + (1 - p) * np.log2(1 - p)) + 0.1 * n * 5
    assert 8 * blob.size < 1.1 * ideal_bits
    assert np.array_equal(huffman.decode_sparse(blob, header, n), values)


def test_long_runs_are_split_by_fillers_and_trailing_runs_are_bounded() -> None:
    values = np.zeros(10_000, dtype=np.int64)
    values[[0, 5000, 5001]] = [3, 7, 1]  # gaps of 4998 and a trailing run of 4998
    blob, header = huffman.encode_sparse(values)
    assert header["entries"] >= 3 + 2 * (4998 // (header["cap"] + 1))
    assert np.array_equal(huffman.decode_sparse(blob, header, len(values)), values)
    with pytest.raises(ValueError, match="end at position"):  # a longer tensor than the entries reach
        huffman.decode_sparse(blob, header, len(values) + header["cap"] + 1)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("entries", 10**9, "cannot hold|cannot fill"), ("cap", 0, "out of range"), ("cap", 10**6, "out of range"),
    ("gap_bytes", 10**6, "cannot hold"), ("gap_table", -1, "out of range"), ("entries", 1, "cannot fill")])
def test_corrupt_sparse_headers_raise_value_error(field: str, value: int, message: str) -> None:
    values = np.where(np.arange(4000) % 9 == 0, np.arange(4000) % 13, 0)
    blob, header = huffman.encode_sparse(values)
    with pytest.raises(ValueError, match=message):
        huffman.decode_sparse(blob, {**header, field: value}, len(values))


def test_truncated_or_garbled_sparse_blob_raises_value_error() -> None:
    values = np.where(np.arange(4000) % 9 == 0, np.arange(4000) % 13, 0)
    blob, header = huffman.encode_sparse(values)
    with pytest.raises(ValueError):
        huffman.decode_sparse(blob[: len(blob) // 2], header, len(values))
    garbled = blob.copy()
    garbled[: header["gap_table"]] = 200  # code lengths over MAX_LENGTH
    with pytest.raises(ValueError, match="code lengths"):
        huffman.decode_sparse(garbled, header, len(values))
