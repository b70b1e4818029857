import pytest

from tiny_models import ResConcatCNN, TinyLM
from torchslim.core.select import select
from torchslim.errors import SelectorError


def test_type_regex_and_fqn_selectors() -> None:
    model = ResConcatCNN()
    assert [f for f, _ in select(model, ["type:Conv2d"])] == ["stem.0", "res.0", "side"]
    assert [f for f, _ in select(model, ["re:.*\\.0"], ignore=["stem.0"])] == ["res.0"]
    assert [f for f, _ in select(model, ["head"])] == ["head"]


def test_type_selector_matches_subclasses() -> None:
    model = TinyLM()
    # NonDynamicallyQuantizableLinear (inside MultiheadAttention) subclasses Linear.
    assert "attn.out_proj" in [f for f, _ in select(model, ["type:Linear"])]


def test_selector_matching_nothing_lists_close_names() -> None:
    with pytest.raises(SelectorError, match=r"'stem\.1x'.*closest names: stem\.1"):
        select(ResConcatCNN(), ["stem.1x"])


def test_nothing_selected_lists_module_types() -> None:
    with pytest.raises(SelectorError, match="select no module; module types in the model: .*BatchNorm2d"):
        select(ResConcatCNN(), ["type:Embedding"])


def test_bad_regex_is_a_selector_error() -> None:
    with pytest.raises(SelectorError, match="invalid regular expression"):
        select(ResConcatCNN(), ["re:(("])
