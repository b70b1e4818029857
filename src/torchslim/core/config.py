"""Base class for method settings; subclasses are plain, frozen data with validated fields."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

from torchslim.errors import ConfigError, RecipeError

__all__ = ["MethodConfig", "check", "closest", "coerce_fields", "config_fields"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """Settings for one compression method; ``name`` is its recipe key."""

    name: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """Return ``{"method": key, **fields}`` with tuples as lists (YAML/JSON friendly)."""
        out: dict[str, Any] = {"method": self.name}
        for f in dataclasses.fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "method") -> MethodConfig:
        """Build and validate a config from plain data; errors name ``where``."""
        fields = {k: v for k, v in raw.items() if k != "method"}
        return cls(**coerce_fields(cls, fields, where))


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


_FIELDS: dict[type[Any], dict[str, Any]] = {}


def config_fields(cls: type[Any]) -> dict[str, Any]:
    """Field name -> resolved type annotation of a config class."""
    if cls not in _FIELDS:
        hints = typing.get_type_hints(cls)
        _FIELDS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return _FIELDS[cls]


def closest(name: str, options: typing.Iterable[str]) -> str:
    """A ' (did you mean X?)' hint, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def coerce_fields(cls: type[Any], fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check names and types of recipe fields; lists become tuples.

    Raises:
        RecipeError: unknown field (with the closest name) or a value of the wrong type.
    """
    allowed = config_fields(cls)
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key not in allowed:
            raise RecipeError(
                f"{where}: {getattr(cls, 'name', cls.__name__)} has no field {key!r}"
                f"{closest(str(key), allowed)}; "
                f"allowed fields: {', '.join(allowed)}"
            )
        out[key] = _check_type(value, allowed[key], f"{where}.{key}")
    return out


def _check_type(value: Any, hint: Any, where: str) -> Any:
    import pydantic  # strict per-field validation; imported lazily to keep import fast

    if isinstance(value, list):
        value = tuple(value)
    try:
        return pydantic.TypeAdapter(hint).validate_python(value, strict=True)
    except pydantic.ValidationError as exc:
        expected = _describe(hint)
        raise RecipeError(
            f"{where}: expected {expected}, found {type(value).__name__} {value!r}"
        ) from exc


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``condition``; for ``__post_init__`` checks."""
    if not condition:
        raise ConfigError(message)
