"""Strict reader of IDX files (the MNIST / Fashion-MNIST container format), gzip or raw."""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from torchslim.errors import DataError

__all__ = ["read_idx"]

_UBYTE = 0x08  # the only element type the (Fashion-)MNIST files use


def read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """Decode an unsigned-byte IDX file into a read-only ``uint8`` array.

    The header is checked: two zero bytes, type code 0x08, ``ndim`` dimensions, and a
    payload of exactly the size the dimensions announce.

    Args:
        path: An IDX file, gzip-compressed when its name ends in ``.gz``.
        ndim: Expected number of dimensions (3 for images, 1 for labels).

    Raises:
        DataError: the file is unreadable, truncated, or its header is not what was expected.
    """
    raw = _read_bytes(path)
    header_len = 4 + 4 * ndim
    magic, expected = bytes(raw[:4]), bytes((0, 0, _UBYTE, ndim))
    if len(raw) >= 4 and magic != expected:
        raise DataError(f"{path}: corrupt IDX file: header magic {magic.hex()} (expected {expected.hex()}, "
                        f"unsigned bytes in {ndim} dimension(s))")
    if len(raw) < header_len:
        raise DataError(f"{path}: corrupt IDX file: {len(raw)} bytes, shorter than its "
                        f"{header_len}-byte header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    payload = len(raw) - header_len
    if payload != math.prod(dims):
        raise DataError(f"{path}: corrupt IDX file: header announces shape {dims} = {math.prod(dims)} "
                        f"values, found {payload} bytes of data")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: IDX file not found") from exc
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError(f"{path}: corrupt IDX file: cannot decompress ({exc})") from exc
