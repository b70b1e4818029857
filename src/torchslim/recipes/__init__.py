"""Recipes: the YAML format that lists compression stages, and its strict loader."""

from torchslim.recipes.load import builtin_recipes, dump_recipe, load_recipe, recipe_from_dict
from torchslim.recipes.schema import MEASURES, Recipe, Stage, TrainSpec

__all__ = [
    "MEASURES",
    "Recipe",
    "Stage",
    "TrainSpec",
    "builtin_recipes",
    "dump_recipe",
    "load_recipe",
    "recipe_from_dict",
]
