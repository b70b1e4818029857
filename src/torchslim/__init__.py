"""torchslim: make trained PyTorch models smaller and faster, and prove it with measurements."""

from torchslim import distillation, lowrank, nas, pruning, quantization, sharing
from torchslim.core import Context, MethodConfig, Outcome, get_config_class, list_methods
from torchslim.errors import RecipeError, TorchslimError
from torchslim.export import load, save
from torchslim.recipes import Recipe, Stage, TrainSpec, dump_recipe, load_recipe
from torchslim.runner import Result, apply, compress

__version__ = "0.1.0"

__all__ = [
    "Context",
    "MethodConfig",
    "Outcome",
    "Recipe",
    "RecipeError",
    "Result",
    "Stage",
    "TorchslimError",
    "TrainSpec",
    "__version__",
    "apply",
    "compress",
    "distillation",
    "dump_recipe",
    "get_config_class",
    "list_methods",
    "load",
    "load_recipe",
    "lowrank",
    "nas",
    "pruning",
    "quantization",
    "save",
    "sharing",
]
