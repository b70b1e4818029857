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
