import pytest

from torchslim.core.config import coerce_fields
from torchslim.core.registry import config_from_dict
from torchslim.errors import RecipeError
from torchslim.pruning.magnitude import MagnitudePruningConfig


def test_to_dict_round_trips_through_from_dict() -> None:
    cfg = MagnitudePruningConfig(sparsity=0.7, scope="global", ignore=("fc2",))
    raw = cfg.to_dict()
    assert raw["method"] == "pruning.magnitude" and raw["ignore"] == ["fc2"]
    assert config_from_dict(raw) == cfg


def test_misspelled_field_suggests_the_closest_name() -> None:
    with pytest.raises(RecipeError, match=r"stages\[0\]\.methods\[1\].*'sparsty'.*did you mean 'sparsity'"):
        config_from_dict({"method": "pruning.magnitude", "sparsty": 0.5}, "stages[0].methods[1]")


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [("sparsity", "half", "expected float"), ("scope", "row", "expected one of 'layer', 'global'"),
     ("targets", [1, 2], "expected a list of str"), ("sparsity", True, "expected float")],
)
def test_wrong_types_name_the_path_and_the_expected_type(field: str, value: object, expected: str) -> None:
    with pytest.raises(RecipeError, match=rf"m\.{field}: {expected}"):
        coerce_fields(MagnitudePruningConfig, {field: value}, "m")


def test_value_out_of_range_is_a_recipe_error_with_path() -> None:
    with pytest.raises(RecipeError, match=r"here: sparsity must be in \[0, 1\), got 1.5"):
        config_from_dict({"method": "pruning.magnitude", "sparsity": 1.5}, "here")


def test_integers_are_accepted_for_floats() -> None:
    assert config_from_dict({"method": "pruning.magnitude", "sparsity": 0}).sparsity == 0.0  # type: ignore[attr-defined]
