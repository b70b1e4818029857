"""The pretrained-model cache: trains once, keys on seed and settings, loads with safetensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from torchslim.zoo import pretrained
from torchslim.zoo.data import accuracy, digits
from torchslim.zoo.models import FashionCNN
from torchslim.zoo.pretrained import TrainSettings, pretrained_fashion_cnn, pretrained_path, read_metadata

TINY = TrainSettings(data="digits", epochs=2, lr=3e-3, batch_size=64)  # 46 steps on 8x8 images


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """A model this small trains fastest on one thread (and does not suffer from busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pretrained.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("TORCHSLIM_CACHE")
    assert pretrained.cache_dir() == tmp_path / "xdg" / "torchslim"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert pretrained.cache_dir() == tmp_path / "home" / ".cache" / "torchslim"


def test_trains_once_then_loads_the_same_weights(cache: Path) -> None:
    rng_before = torch.get_rng_state()
    model = pretrained_fashion_cnn(seed=1, settings=TINY)
    assert torch.equal(torch.get_rng_state(), rng_before), "training must not move the global RNG"
    assert isinstance(model, FashionCNN) and not model.training
    path = pretrained_path(1, TINY)
    assert path.parent == cache and path.is_file()
    assert [p.name for p in cache.iterdir()] == [path.name], "no temporary files left behind"
    stored = float(read_metadata(path)[pretrained.ACCURACY_KEY])
    assert stored == pytest.approx(accuracy(model, digits("test")), abs=1e-6)
    assert stored > 0.9, "two epochs on digits already classify well"

    inode = path.stat().st_ino
    again = pretrained_fashion_cnn(seed=1, settings=TINY)
    assert path.stat().st_ino == inode, "the second call must load, not train and rewrite"
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_seed_and_settings_are_part_of_the_key(cache: Path) -> None:
    paths = {pretrained_path(0, TINY), pretrained_path(1, TINY),
             pretrained_path(0, TrainSettings(data="digits", epochs=3, lr=3e-3, batch_size=64)),
             pretrained_path(0), pretrained_path(0, pretrained.QUICK_SETTINGS)}
    assert len(paths) == 5 and all(p.parent == cache for p in paths)
    assert pretrained_path(0, TINY) == pretrained_path(0, TrainSettings(**vars(TINY)))


def test_corrupt_cache_file_is_replaced(cache: Path) -> None:
    path = pretrained_path(2, TINY)
    cache.mkdir(parents=True)
    path.write_bytes(b"not a safetensors file")
    model = pretrained_fashion_cnn(seed=2, settings=TINY)
    assert float(read_metadata(path)[pretrained.ACCURACY_KEY]) > 0.9
    assert accuracy(model, digits("test")) > 0.9


def test_cache_file_holds_only_tensors(cache: Path) -> None:
    pretrained_fashion_cnn(seed=3, settings=TrainSettings(data="digits", epochs=1, train_limit=256))
    (path,) = cache.iterdir()
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")  # safetensors: u64 length, JSON header, raw bytes
    header = json.loads(raw[8 : 8 + header_len])
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert set(tensors) == set(FashionCNN(image_size=8).state_dict())
    assert all(set(v) == {"dtype", "shape", "data_offsets"} for v in tensors.values())
    assert header["__metadata__"]["torchslim.seed"] == "3"


def test_unknown_training_data_is_rejected() -> None:
    from torchslim.errors import DataError

    with pytest.raises(DataError, match="TrainSettings.data: expected one of"):
        TrainSettings(data="mnist")


@pytest.mark.slow
@pytest.mark.integration
def test_two_processes_filling_one_cache_leave_a_valid_file(cache: Path) -> None:
    code = ("import torch; torch.set_num_threads(1)\n"
            "from torchslim.zoo.pretrained import TrainSettings, pretrained_fashion_cnn\n"
            f"pretrained_fashion_cnn(7, settings=TrainSettings(**{vars(TINY)!r}))\n")
    env = {**os.environ, "TORCHSLIM_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    path = pretrained_path(7, TINY)
    assert [p.name for p in cache.iterdir()] == [path.name]
    inode = path.stat().st_ino
    model = pretrained_fashion_cnn(7, settings=TINY)
    assert path.stat().st_ino == inode, "a complete file is loaded, not retrained"
    assert float(read_metadata(path)[pretrained.ACCURACY_KEY]) == pytest.approx(
        accuracy(model, digits("test")), abs=1e-6)


def test_unwritable_cache_still_returns_the_trained_model(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TORCHSLIM_CACHE", str(blocker / "cache"))  # mkdir under a file fails
    model = pretrained_fashion_cnn(seed=4, settings=TrainSettings(data="digits", epochs=1, train_limit=256))
    assert isinstance(model, FashionCNN) and not model.training
    assert blocker.read_text() == "not a folder"
