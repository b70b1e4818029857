"""Model and data specs: every scheme resolves, every failure is a helpful ModelError/DataError."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from torchslim.adapters import resolve_data, resolve_model
from torchslim.errors import DataError, ModelError
from torchslim.zoo.models import MLP, FashionCNN


def _same_architecture(a: nn.Module, b: nn.Module) -> bool:
    shapes = {k: v.shape for k, v in a.state_dict().items()}
    return type(a) is type(b) and shapes == {k: v.shape for k, v in b.state_dict().items()}


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real importable module on sys.path, as a user's project would have."""
    package = tmp_path / "slim_user_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent("""
        from torch import nn

        CALLS = []
        NOT_CALLABLE = 3


        def small_net():
            CALLS.append(1)
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


        def not_a_model():
            return "a string"
    """))
    (package / "broken.py").write_text("import slim_missing_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "slim_user_pkg"


@pytest.mark.parametrize("spec", ["fashion_cnn", "timm:resnet18", "hub:some/dir"])
def test_unknown_scheme_lists_the_schemes(spec: str) -> None:
    with pytest.raises(ModelError, match=r"unknown scheme .*zoo:<name>.*torchvision:<name>.*hf:<folder>.*py:<pack"):
        resolve_model(spec)


def test_hf_scheme_names_the_missing_folder() -> None:
    with pytest.raises(ModelError, match=r"'hf:some/dir'.*folder some/dir does not exist"):
        resolve_model("hf:some/dir")


def test_zoo_names_resolve_and_suggest_close_ones() -> None:
    with pytest.raises(ModelError, match=r"'zoo:fashion_cn'.*did you mean 'fashion_cnn'"):
        resolve_model("zoo:fashion_cn")
    model, build = resolve_model("zoo:fashion_cnn", pretrained=False)
    assert isinstance(model, FashionCNN) and _same_architecture(model, build())
    assert build() is not build()


def test_zoo_model_without_weights_is_seeded(caplog: pytest.LogCaptureFixture) -> None:
    a, build = resolve_model("zoo:mlp", seed=4)
    b, _ = resolve_model("zoo:mlp", seed=4)
    assert isinstance(a, MLP) and _same_architecture(a, build())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert "no pretrained weights" in caplog.text


def test_py_spec_imports_and_calls_the_function(user_module: str) -> None:
    model, build = resolve_model(f"py:{user_module}.nets:small_net")
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    rebuilt = build()
    assert rebuilt is not model and _same_architecture(model, rebuilt)
    import slim_user_pkg.nets as nets  # the same module object the spec imported

    assert len(nets.CALLS) == 2  # once for the model, once for the rebuild


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        ("slim_nowhere_pkg.nets:small_net", r"module 'slim_nowhere_pkg.nets' not found"),
        ("{pkg}.nope:small_net", r"module 'slim_user_pkg.nope' not found"),
        ("{pkg}.broken:anything", r"importing 'slim_user_pkg.broken' failed: .*slim_missing_dependency_xyz"),
        ("{pkg}.nets:smal_net", r"has no attribute 'smal_net' \(did you mean 'small_net'\?\)"),
        ("{pkg}.nets:NOT_CALLABLE", r"is a int, expected a function returning an nn.Module"),
        ("{pkg}.nets:not_a_model", r"the function returned a str, expected a torch.nn.Module"),
        ("{pkg}.nets", r"expected py:<package.module>:<function>"),
    ],
)
def test_py_spec_failures_say_what_went_wrong(user_module: str, tail: str, message: str) -> None:
    spec = "py:" + tail.format(pkg=user_module)
    with pytest.raises(ModelError, match=message) as info:
        resolve_model(spec)
    assert repr(spec) in str(info.value)


@pytest.fixture(scope="module")
def tvm() -> object:
    return pytest.importorskip("torchvision.models", reason="torchvision is optional (torchslim[vision])")


def test_torchvision_unknown_name_and_bad_options(tvm: object) -> None:
    with pytest.raises(ModelError, match=r"no model 'resnet19' \(did you mean 'resnet18'\?\)"):
        resolve_model("torchvision:resnet19")
    with pytest.raises(ModelError, match=r"bad option 'weigths=a.pt'; expected weights=<value> or num_"):
        resolve_model("torchvision:squeezenet1_1?weigths=a.pt")
    with pytest.raises(ModelError, match=r"num_classes must be a positive integer, found 'ten'"):
        resolve_model("torchvision:squeezenet1_1?num_classes=ten")


def test_torchvision_weights_round_trip(tvm: object, tmp_path: Path) -> None:
    source, _ = resolve_model("torchvision:squeezenet1_1?num_classes=10", seed=1)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model, build = resolve_model(f"torchvision:squeezenet1_1?num_classes=10&weights={tmp_path / 'w.pt'}")
    for (k, a), b in zip(source.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    assert _same_architecture(model, build())
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(source.eval()(x), model.eval()(x))


def test_torchvision_weights_errors(tvm: object, tmp_path: Path) -> None:
    missing = tmp_path / "absent.pt"
    with pytest.raises(ModelError, match=r"weights file .*absent.pt not found"):
        resolve_model(f"torchvision:squeezenet1_1?weights={missing}")
    wrong = tmp_path / "wrong.pt"
    torch.save(nn.Linear(3, 2).state_dict(), wrong)
    with pytest.raises(ModelError, match=r"weights in .*wrong.pt do not fit SqueezeNet"):
        resolve_model(f"torchvision:squeezenet1_1?weights={wrong}")
    pickled = tmp_path / "code.pt"
    torch.save({"model": nn.Linear(3, 2)}, pickled)  # a whole module: needs unpickling code
    with pytest.raises(ModelError, match=r"cannot read weights file .*code.pt"):
        resolve_model(f"torchvision:squeezenet1_1?weights={pickled}")


def test_digits_data_bundle() -> None:
    data = resolve_data("zoo:digits")
    assert len(data.train) == 1438 and len(data.test) == 359
    assert data.example_inputs.shape == (1, 1, 8, 8)
    assert torch.equal(data.example_inputs[0], data.test[0][0])
    sizes = [len(y) for _, y in data.calib]
    assert sizes == [64] * 8 and sum(sizes) == 512
    torch.manual_seed(0)
    score = data.eval_fn(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))["accuracy"]
    assert 0.0 <= score <= 0.5  # an untrained classifier is near chance
    ctx = data.context(seed=3)
    assert ctx.train_data is data.train and ctx.calib_data is data.calib and ctx.seed == 3


def _fashion_installed() -> bool:
    from torchslim.zoo.data import locate_fashion_mnist

    try:
        locate_fashion_mnist()
    except DataError:
        return False
    return True


@pytest.mark.skipif(not _fashion_installed(), reason="Fashion-MNIST is not installed: "
                    "apt-get update && apt-get install -y dataset-fashion-mnist")
def test_quick_fashion_data_is_a_slice() -> None:
    full, quick = resolve_data("zoo:fashion_mnist"), resolve_data("zoo:fashion_mnist", quick=True)
    assert (len(full.train), len(full.test)) == (60_000, 10_000)
    assert (len(quick.train), len(quick.test)) == (5_000, 2_000)
    assert torch.equal(quick.train.tensors[0], full.train.tensors[0][:5_000])
    assert quick.example_inputs.shape == (1, 1, 28, 28)
    assert len(resolve_data("zoo:digits", quick=True).train) == 1438  # already below 5,000


@pytest.mark.slow
@pytest.mark.skipif(not _fashion_installed(), reason="Fashion-MNIST is not installed: "
                    "apt-get update && apt-get install -y dataset-fashion-mnist")
def test_pretrained_fashion_cnn_reaches_91_percent() -> None:
    """Uses the user's cache; the first run trains for a few minutes."""
    model, build = resolve_model("zoo:fashion_cnn", progress=False)
    data = resolve_data("zoo:fashion_mnist")
    assert data.eval_fn(model)["accuracy"] >= 0.91
    assert _same_architecture(model, build())


@pytest.mark.parametrize(
    ("spec", "message"),
    [("zoo:digit", r"unknown data set 'digit' \(did you mean 'digits'\?\)"),
     ("digits", r"expected zoo:<name> with name one of fashion_mnist, digits"),
     ("hf:imdb", r"expected zoo:<name>")],
)
def test_bad_data_specs(spec: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        resolve_data(spec)
