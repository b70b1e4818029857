"""Maps recipe keys to (config class, implementation). Filled by explicit imports only."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torchslim.core.config import MethodConfig, closest
from torchslim.errors import ConfigError, RecipeError

__all__ = [
    "config_from_dict",
    "get_config_class",
    "is_trained",
    "list_methods",
    "register",
    "resolve",
]

Impl = TypeVar("Impl")
_METHODS: dict[str, tuple[type[MethodConfig], Any]] = {}


def register(config_cls: type[MethodConfig]) -> Callable[[Impl], Impl]:
    """Bind an ``apply`` function or a ``TrainedMethod`` class to its config type."""

    def bind(impl: Impl) -> Impl:
        if config_cls.name in _METHODS:
            raise RuntimeError(f"method {config_cls.name!r} is registered twice")
        _METHODS[config_cls.name] = (config_cls, impl)
        return impl

    return bind


def _load_builtins() -> None:
    from torchslim import _builtin  # noqa: F401  (explicit import list, no package walking)


def list_methods() -> list[str]:
    """Every registered method key, sorted."""
    _load_builtins()
    return sorted(_METHODS)


def _entry(key: object, where: str) -> tuple[type[MethodConfig], Any]:
    _load_builtins()
    if not isinstance(key, str) or key not in _METHODS:
        hint = closest(key, _METHODS) if isinstance(key, str) else ""
        raise RecipeError(
            f"{where}: unknown method {key!r}{hint}; known methods: {', '.join(sorted(_METHODS))}"
        )
    return _METHODS[key]


def get_config_class(key: str) -> type[MethodConfig]:
    """The config class registered under ``key``."""
    return _entry(key, "method")[0]


def resolve(cfg: MethodConfig) -> Any:
    """The implementation (``apply`` function or ``TrainedMethod`` class) for ``cfg``."""
    return _entry(cfg.name, "method")[1]


def is_trained(cfg: MethodConfig) -> bool:
    """Whether ``cfg``'s method runs inside a training loop."""
    from torchslim.core.lifecycle import TrainedMethod

    impl = resolve(cfg)
    return isinstance(impl, type) and issubclass(impl, TrainedMethod)


def config_from_dict(raw: Mapping[str, Any], where: str = "method") -> MethodConfig:
    """Build a config from recipe data, rejecting unknown methods, fields and bad values."""
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{where}: expected a mapping with a 'method' key, found {raw!r}")
    config_cls, _ = _entry(raw.get("method"), where)
    try:
        return config_cls.from_dict(raw, where)
    except ConfigError as exc:
        raise RecipeError(f"{where}: {exc}") from exc
