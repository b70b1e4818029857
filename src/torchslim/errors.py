"""The exception hierarchy: every error a user can cause is a TorchslimError.

Messages say what was expected, what was found and where (a YAML path, an fqn or a file).
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "ExportError",
    "ModelError",
    "OutputError",
    "RecipeError",
    "SelectorError",
    "TorchslimError",
    "UnsupportedModuleError",
]


class TorchslimError(Exception):
    """Base class of every error caused by bad input; the CLI exits 2 on it."""


class RecipeError(TorchslimError, ValueError):
    """A recipe is malformed: syntax, unknown method or field, wrong type or value."""


class ConfigError(TorchslimError, ValueError):
    """A method config holds an invalid value."""


class SelectorError(TorchslimError, ValueError):
    """A `targets`/`ignore` selector matches nothing or cannot be parsed."""


class UnsupportedModuleError(TorchslimError, TypeError):
    """A method met a layer or model it cannot handle."""


class ModelError(TorchslimError, ValueError):
    """A model spec cannot be resolved or a model file is missing or invalid."""


class DataError(TorchslimError, ValueError):
    """Data needed by a method is missing or has the wrong shape."""


class OutputError(TorchslimError, ValueError):
    """An output folder cannot be written or a saved folder cannot be read."""


class ExportError(TorchslimError, RuntimeError):
    """An export failed or its verification run disagreed with PyTorch."""
