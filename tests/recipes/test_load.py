import textwrap
from pathlib import Path

import pytest

from torchslim.errors import RecipeError
from torchslim.recipes import Recipe, builtin_recipes, dump_recipe, load_recipe

GOOD = textwrap.dedent("""
    version: 1
    model: zoo:fashion_cnn
    data: zoo:fashion_mnist
    stages:
      - name: prune
        methods:
          - {method: pruning.magnitude, sparsity: 0.5}
          - {method: distillation.logits, temperature: 2.0}
        train: {epochs: 2, lr: 1.0e-3}
      - name: again
        methods:
          - {method: pruning.magnitude, sparsity: 0.6, targets: ["re:fc.*"]}
    measure: [accuracy, size]
    export: [checkpoint]
""")


def test_load_dump_round_trip_is_exact() -> None:
    recipe = load_recipe(GOOD)
    assert isinstance(recipe, Recipe)
    assert recipe.stages[0].train is not None and recipe.stages[0].train.epochs == 2
    assert recipe.stages[1].methods[0].targets == ("re:fc.*",)  # type: ignore[attr-defined]
    again = load_recipe(dump_recipe(recipe))
    assert again == recipe
    assert dump_recipe(again) == dump_recipe(recipe)


def test_builtin_recipes_load_and_round_trip() -> None:
    assert "demo" in builtin_recipes()
    for name in builtin_recipes():
        recipe = load_recipe(f"builtin:{name}")
        assert load_recipe(dump_recipe(recipe)) == recipe


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("sparsity: 0.5}", "sparsity: 0.5, sparsty: 1}"), r"stages\[0\]\.methods\[0\].*'sparsty'.*did you mean 'sparsity'"),
        (("sparsity: 0.6", "sparsity: 2.0"), r"stages\[1\]\.methods\[0\].*sparsity must be in \[0, 1\)"),
        (("lr: 1.0e-3", "lr: fast"), r"stages\[0\]\.train\.lr: expected float or null, found str 'fast'"),
        (("lr: 1.0e-3", "lr: 1.0e-3, precision: fp16"), r"stages\[0\]\.train\.precision: .*'fp16'"),
        (("pruning.magnitude, sparsity: 0.6", "pruning.magnitudes, sparsity: 0.6"), r"stages\[1\]\.methods\[0\]: unknown method 'pruning.magnitudes'"),
        (("export: [checkpoint]", "export: [onx]"), r"export\[0\]: unknown entry 'onx'.*did you mean 'onnx'"),
        (("version: 1", "version: 3"), r"version: this torchslim reads version 1"),
        (("    train: {epochs: 2, lr: 1.0e-3}\n", ""), r"stages\[0\]: distillation.logits train\(s\) the model.*'train' block"),
        (("name: again", "name: prune"), r"stages\[1\]\.name: stage name 'prune' is used twice"),
        (("measure:", "mesure:"), r"unknown key 'mesure'.*did you mean 'measure'"),
    ],
)
def test_bad_recipes_name_the_yaml_path(edit: tuple[str, str], message: str) -> None:
    assert edit[0] in GOOD
    with pytest.raises(RecipeError, match=message):
        load_recipe(GOOD.replace(*edit, 1))


def test_yaml_syntax_error_gives_the_line_number() -> None:
    with pytest.raises(RecipeError, match="YAML syntax error at line 3"):
        load_recipe("version: 1\nstages:\n\tname: x\n")


def test_missing_recipe_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"recipe file '.*nope\.yaml' does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="no built-in recipe 'dem'.*did you mean 'demo'"):
        load_recipe("builtin:dem")


def test_recipe_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    assert load_recipe(path) == load_recipe(str(path)) == load_recipe(GOOD)


def test_empty_train_block_uses_defaults() -> None:
    text = "stages:\n  - name: s\n    methods: [{method: distillation.logits}]\n    train: {}\n"
    stage = load_recipe(text).stages[0]
    assert stage.train is not None and stage.train.epochs == 1 and stage.train.optimizer == "adam"


def test_stage_with_only_a_train_block_fine_tunes() -> None:
    stage = load_recipe("stages:\n  - name: tune\n    train: {epochs: 1}\n").stages[0]
    assert stage.methods == () and stage.train is not None
    with pytest.raises(RecipeError, match=r"stages\[0\]\.methods: expected a non-empty list"):
        load_recipe("stages:\n  - name: nothing\n")
