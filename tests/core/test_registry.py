import pytest

from torchslim.core.registry import config_from_dict, get_config_class, is_trained, list_methods
from torchslim.errors import RecipeError


def test_every_key_maps_to_its_module_path() -> None:
    for key in list_methods():
        package, module = key.split(".")
        cls = get_config_class(key)
        assert cls.name == key
        assert cls.__module__ == f"torchslim.{package}.{module}"


def test_unknown_method_suggests_a_close_key() -> None:
    with pytest.raises(RecipeError, match=r"unknown method 'pruning.magnitud'.*did you mean 'pruning.magnitude'"):
        config_from_dict({"method": "pruning.magnitud"})


def test_method_entry_must_be_a_mapping() -> None:
    with pytest.raises(RecipeError, match="expected a mapping"):
        config_from_dict(["pruning.magnitude"])  # type: ignore[arg-type]


def test_trained_and_one_shot_methods_are_told_apart() -> None:
    assert is_trained(get_config_class("distillation.logits")())
    assert not is_trained(get_config_class("pruning.magnitude")())
