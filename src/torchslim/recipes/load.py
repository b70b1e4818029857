"""Strict YAML -> Recipe and back. Every error names the YAML path it is about."""

from __future__ import annotations

import importlib.resources
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from torchslim.core.config import closest, coerce_fields
from torchslim.core.registry import config_from_dict, is_trained
from torchslim.errors import ConfigError, RecipeError
from torchslim.recipes.schema import EXPORTS, MEASURES, Recipe, Stage, TrainSpec

__all__ = ["builtin_recipes", "dump_recipe", "load_recipe"]

_TOP = ("version", "model", "data", "stages", "measure", "export")
_STAGE = ("name", "methods", "train")


def builtin_recipes() -> dict[str, str]:
    """Name -> YAML text of the recipes shipped in ``recipes/builtin``."""
    folder = importlib.resources.files("torchslim.recipes") / "builtin"
    return {
        p.name.removesuffix(".yaml"): p.read_text(encoding="utf-8")
        for p in sorted(folder.iterdir(), key=lambda p: p.name)
        if p.name.endswith(".yaml")
    }


def _read(source: str | Path) -> tuple[str, str]:
    """(YAML text, label for messages) from a path, ``builtin:<name>`` or YAML text."""
    if isinstance(source, str) and source.startswith("builtin:"):
        name, shipped = source[len("builtin:"):], builtin_recipes()
        if name not in shipped:
            raise RecipeError(
                f"no built-in recipe {name!r}{closest(name, shipped)}; built-in: {', '.join(shipped)}"
            )
        return shipped[name], source
    looks_like_path = isinstance(source, Path) or (
        "\n" not in source and source.strip().endswith((".yaml", ".yml"))
    )
    if looks_like_path:
        path = Path(source)
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist (expected a YAML file)")
        return path.read_text(encoding="utf-8"), str(path)
    return str(source), "recipe"


def load_recipe(source: str | Path) -> Recipe:
    """Parse a recipe file, ``builtin:<name>`` or YAML text; anything unknown is an error.

    Raises:
        RecipeError: with the YAML path (``stages[1].methods[0].ratio``) or line number.
    """
    text, label = _read(source)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{label}: YAML syntax error{line}: {problem}") from exc
    return recipe_from_dict(raw, label)


def _only_keys(raw: Any, allowed: tuple[str, ...], where: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{where}: expected a mapping with keys {list(allowed)}, found {raw!r}")
    for key in raw:
        if key not in allowed:
            raise RecipeError(
                f"{where}: unknown key {key!r}{closest(str(key), allowed)}; allowed: {', '.join(allowed)}"
            )
    return raw


def _names(raw: Any, allowed: tuple[str, ...], where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise RecipeError(f"{where}: expected a list of names from {list(allowed)}, found {raw!r}")
    for i, name in enumerate(raw):
        if name not in allowed:
            raise RecipeError(
                f"{where}[{i}]: unknown entry {name!r}{closest(name, allowed)}; allowed: {', '.join(allowed)}"
            )
    return tuple(raw)


def recipe_from_dict(raw: Any, label: str = "recipe") -> Recipe:
    """Build a Recipe from parsed YAML."""
    top = _only_keys(raw, _TOP, label)
    version = top.get("version", 1)
    if version != 1:
        raise RecipeError(f"{label}.version: this torchslim reads version 1, found {version!r}")
    for key in ("model", "data"):
        if top.get(key) is not None and not isinstance(top[key], str):
            raise RecipeError(f"{label}.{key}: expected a string spec, found {top[key]!r}")
    stages_raw = top.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise RecipeError(f"{label}.stages: expected a non-empty list of stages, found {stages_raw!r}")
    stages = tuple(_stage(s, f"stages[{i}]") for i, s in enumerate(stages_raw))
    seen: set[str] = set()
    for i, stage in enumerate(stages):
        if stage.name in seen:
            raise RecipeError(f"stages[{i}].name: stage name {stage.name!r} is used twice")
        seen.add(stage.name)
    return Recipe(
        stages=stages, version=1, model=top.get("model"), data=top.get("data"),
        measure=_names(top["measure"], MEASURES, "measure") if "measure" in top else MEASURES,
        export=_names(top["export"], EXPORTS, "export") if "export" in top else ("checkpoint",),
    )


def _stage(raw: Any, where: str) -> Stage:
    body = _only_keys(raw, _STAGE, where)
    name = body.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise RecipeError(f"{where}.name: expected a non-empty name without '/', found {name!r}")
    methods_raw = body.get("methods", [])
    if not isinstance(methods_raw, list) or not (methods_raw or "train" in body):
        raise RecipeError(
            f"{where}.methods: expected a non-empty list (or a 'train' block alone, for plain "
            f"fine-tuning), found {methods_raw!r}"
        )
    methods = tuple(config_from_dict(m, f"{where}.methods[{j}]") for j, m in enumerate(methods_raw))
    train = None
    if "train" in body:
        train_raw = body["train"] if body["train"] is not None else {}
        if not isinstance(train_raw, Mapping):
            raise RecipeError(f"{where}.train: expected a mapping, found {train_raw!r}")
        try:
            train = TrainSpec(**coerce_fields(TrainSpec, train_raw, f"{where}.train"))
        except ConfigError as exc:
            raise RecipeError(f"{where}.train: {exc}") from exc
    trained = [m.name for m in methods if is_trained(m)]
    if trained and train is None:
        raise RecipeError(
            f"{where}: {', '.join(trained)} train(s) the model, so the stage needs a 'train' block "
            "(write 'train: {}' for the defaults)"
        )
    return Stage(name=name, methods=methods, train=train)


def dump_recipe(recipe: Recipe) -> str:
    """YAML text of ``recipe``; loading it gives an equal Recipe."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None, width=100)
