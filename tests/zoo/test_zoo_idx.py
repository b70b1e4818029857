"""IDX decoding: valid files round-trip, every kind of corruption names the file."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from torchslim.errors import DataError
from torchslim.zoo.idx import read_idx


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write(path: Path, data: bytes) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", ["images-idx3-ubyte.gz", "images-idx3-ubyte"])
def test_valid_file_round_trips(tmp_path: Path, name: str) -> None:
    array = np.random.default_rng(0).integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    out = read_idx(_write(tmp_path / name, _idx_bytes(array)), ndim=3)
    assert out.dtype == np.uint8 and out.shape == (5, 4, 3)
    np.testing.assert_array_equal(out, array)


def test_wrong_magic_is_reported_with_the_file(tmp_path: Path) -> None:
    data = bytearray(_idx_bytes(np.zeros((3, 2, 2), np.uint8)))
    data[2] = 0x0D  # float32 type code instead of unsigned byte
    path = _write(tmp_path / "bad-magic.gz", bytes(data))
    with pytest.raises(DataError, match="bad-magic.gz.*header magic 00000d03"):
        read_idx(path, ndim=3)


def test_wrong_number_of_dimensions_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path / "labels.gz", _idx_bytes(np.zeros(7, np.uint8)))
    with pytest.raises(DataError, match="labels.gz.*expected 00000803"):
        read_idx(path, ndim=3)


def test_truncated_payload_is_rejected(tmp_path: Path) -> None:
    data = _idx_bytes(np.ones((10, 28, 28), np.uint8))[:-100]
    path = _write(tmp_path / "short.gz", data)
    with pytest.raises(DataError, match=r"short.gz.*shape \(10, 28, 28\) = 7840 values, found 7740 bytes"):
        read_idx(path, ndim=3)


def test_header_shorter_than_expected_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path / "tiny", b"\x00\x00\x08")
    with pytest.raises(DataError, match="tiny.*3 bytes, shorter than its 16-byte header"):
        read_idx(path, ndim=3)


def test_broken_gzip_stream_is_rejected(tmp_path: Path) -> None:
    good = tmp_path / "good.gz"
    _write(good, _idx_bytes(np.ones((50, 28, 28), np.uint8)))
    broken = tmp_path / "broken.gz"
    broken.write_bytes(good.read_bytes()[:40])  # cut inside the compressed stream
    with pytest.raises(DataError, match="broken.gz.*cannot decompress"):
        read_idx(broken, ndim=3)


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="absent.gz: IDX file not found"):
        read_idx(tmp_path / "absent.gz", ndim=1)
