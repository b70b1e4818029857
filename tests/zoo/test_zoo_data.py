"""Bundled data sets, the name registry, and the accuracy / eval_fn helpers."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from torchslim.errors import DataError
from torchslim.zoo import data
from torchslim.zoo.data import accuracy, digits, head, load_data, loader, make_eval_fn


def _fashion_installed() -> bool:
    try:
        data.locate_fashion_mnist()
    except DataError:
        return False
    return True


needs_fashion = pytest.mark.skipif(
    not _fashion_installed(),
    reason="Fashion-MNIST is not installed: apt-get update && apt-get install -y dataset-fashion-mnist",
)


def test_digits_shapes_dtypes_and_normalisation() -> None:
    train, test = digits("train"), digits("test")
    x, y = train.tensors
    assert x.shape == (1438, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1438,) and y.dtype == torch.int64
    assert len(test) == 359 and len(train) + len(test) == 1797
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1.0) < 0.05
    assert set(y.tolist()) == set(range(10)) == set(test.tensors[1].tolist())


def test_digits_split_is_seeded_and_disjoint() -> None:
    a, b = digits("test", seed=0), digits("test", seed=0)
    assert torch.equal(a.tensors[0], b.tensors[0])
    assert not torch.equal(a.tensors[0], digits("test", seed=1).tensors[0])
    # train and test together are the 1,797 digits, each exactly once (an 80/20 partition)
    from sklearn.datasets import load_digits

    def rows(x: torch.Tensor) -> list[tuple[float, ...]]:
        return sorted(tuple(r) for r in x.flatten(1).tolist())

    split = torch.cat([digits("train").tensors[0], a.tensors[0]]) * data.DIGITS_STD + data.DIGITS_MEAN
    full = torch.from_numpy(load_digits().images).float() / 16
    assert torch.allclose(torch.tensor(rows(split)), torch.tensor(rows(full)), atol=1e-5)


def test_registry_finds_names_and_suggests_close_ones() -> None:
    assert torch.equal(load_data("digits", "test").tensors[1], digits("test").tensors[1])
    with pytest.raises(DataError, match=r"unknown data set 'digit' \(did you mean 'digits'\?\)"):
        load_data("digit", "train")
    with pytest.raises(DataError, match=r"digits: unknown split 'val'; expected one of train, test"):
        load_data("digits", "val")


def test_missing_debian_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHSLIM_FASHION_MNIST_DIR", raising=False)
    with pytest.raises(DataError, match="apt-get update && apt-get install -y dataset-no-such-package-zz"):
        data.locate_fashion_mnist("dataset-no-such-package-zz")


def test_folder_override_lists_the_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b""))
    monkeypatch.setenv("TORCHSLIM_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DataError, match="lacks train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz"):
        data.locate_fashion_mnist()


@needs_fashion
def test_folder_override_finds_a_copy_of_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, path in data.locate_fashion_mnist().items():
        shutil.copy(path, tmp_path / name)
    monkeypatch.setenv("TORCHSLIM_FASHION_MNIST_DIR", str(tmp_path))
    found = data.locate_fashion_mnist()
    assert sorted(found) == sorted(p.name for p in tmp_path.iterdir())
    assert all(p.parent == tmp_path for p in found.values())


@needs_fashion
def test_fashion_mnist_full_splits() -> None:
    train, test = load_data("fashion_mnist", "train"), load_data("fashion_mnist", "test")
    assert train.tensors[0].shape == (60_000, 1, 28, 28) and test.tensors[0].shape == (10_000, 1, 28, 28)
    assert train.tensors[0].dtype == torch.float32 and test.tensors[1].dtype == torch.int64
    # normalised with the data set's own mean/std, so the train split is ~N(0, 1)
    assert abs(float(train.tensors[0].mean())) < 0.01 and abs(float(train.tensors[0].std()) - 1) < 0.01
    assert torch.bincount(train.tensors[1]).tolist() == [6000] * 10
    assert torch.bincount(test.tensors[1]).tolist() == [1000] * 10


def _nearest_class_mean(train: torch.utils.data.TensorDataset) -> nn.Module:
    """A linear classifier in closed form: logits_c = x . mu_c - |mu_c|^2 / 2."""
    x, y = train.tensors
    means = torch.stack([x[y == c].flatten(1).mean(0) for c in range(10)])  # (10, 64)
    linear = nn.Linear(64, 10)
    with torch.no_grad():
        linear.weight.copy_(means)
        linear.bias.copy_(-0.5 * (means**2).sum(1))
    return nn.Sequential(nn.Flatten(), linear)


def test_accuracy_matches_a_direct_count_and_restores_mode() -> None:
    model = _nearest_class_mean(digits("train"))
    test = digits("test")
    x, y = test.tensors
    expected = int((model(x).argmax(1) == y).sum()) / len(y)
    model.train()
    got = accuracy(model, test, batch_size=100)
    assert got == pytest.approx(expected, abs=1e-9)
    assert got > 0.85  # nearest class mean separates digits well
    assert model.training, "accuracy() must give the model its train mode back"
    first = int((model(x[:50]).argmax(1) == y[:50]).sum()) / 50
    assert accuracy(model.eval(), loader(test, 32), limit=50) == pytest.approx(first, abs=1e-9)
    assert not model.training
    assert make_eval_fn(test)(model) == {"accuracy": pytest.approx(expected, abs=1e-9)}


def test_accuracy_turns_dropout_off() -> None:
    test = digits("test")
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.9), nn.Linear(64, 10)).train()
    assert accuracy(model, test) == accuracy(model, test)  # eval mode: deterministic


def test_accuracy_of_empty_data_is_an_error() -> None:
    with pytest.raises(DataError, match="empty"):
        accuracy(nn.Flatten(), head(digits("test"), 0))


def test_loader_shuffle_is_seeded() -> None:
    test = digits("test")
    order = [torch.cat([y for _, y in loader(test, 64, shuffle=True, seed=s)]) for s in (3, 3, 4)]
    assert torch.equal(order[0], order[1]) and not torch.equal(order[0], order[2])
    assert torch.equal(torch.cat([y for _, y in loader(test, 64)]), test.tensors[1])


def test_head_shares_memory_and_keeps_short_sets() -> None:
    test = digits("test")
    assert len(head(test, 10)) == 10
    assert head(test, 10).tensors[0].data_ptr() == test.tensors[0].data_ptr()
    assert head(test, None) is test and head(test, 10_000) is test
