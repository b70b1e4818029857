"""Selectors naming submodules: an exact fqn, ``re:<regex>`` or ``type:<ClassName>``."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from torch import nn

from torchslim.errors import SelectorError

__all__ = ["matches", "select"]


def _compile(selector: str) -> tuple[str, str | re.Pattern[str]]:
    if selector.startswith("re:"):
        try:
            return "re", re.compile(selector[3:])
        except re.error as exc:
            raise SelectorError(f"selector {selector!r}: invalid regular expression ({exc})") from exc
    if selector.startswith("type:"):
        return "type", selector[5:]
    return "fqn", selector


def matches(selector: str, fqn: str, module: nn.Module) -> bool:
    """Whether ``selector`` names the submodule ``module`` found at ``fqn``."""
    kind, pattern = _compile(selector)
    if kind == "re":
        assert isinstance(pattern, re.Pattern)
        return pattern.fullmatch(fqn) is not None
    if kind == "type":
        return any(cls.__name__ == pattern for cls in type(module).__mro__)
    return fqn == pattern


def _check_matched(selector: str, hits: int, names: Sequence[str], where: str) -> None:
    if hits or selector.startswith("type:"):
        return
    plain = selector[3:] if selector.startswith("re:") else selector
    close = difflib.get_close_matches(plain, names, n=5, cutoff=0.5)
    hint = f"; closest names: {', '.join(close)}" if close else ""
    raise SelectorError(f"{where} selector {selector!r} matches no module of the model{hint}")


def select(
    model: nn.Module,
    targets: Sequence[str],
    ignore: Sequence[str] = (),
    *,
    include_converted: bool = False,
) -> list[tuple[str, nn.Module]]:
    """Submodules named by any of ``targets`` and none of ``ignore``, in model order.

    Modules already converted by torchslim (``_torchslim_converted = True``) are skipped
    unless ``include_converted``.

    Raises:
        SelectorError: an fqn or regex selector matches nothing, or nothing is selected.
    """
    named = [(fqn, m) for fqn, m in model.named_modules() if fqn]
    names = [fqn for fqn, _ in named]
    for group, label in ((targets, "targets"), (ignore, "ignore")):
        for sel in group:
            hits = sum(matches(sel, fqn, m) for fqn, m in named)
            _check_matched(sel, hits, names, label)
    chosen = [
        (fqn, m)
        for fqn, m in named
        if any(matches(s, fqn, m) for s in targets)
        and not any(matches(s, fqn, m) for s in ignore)
        and (include_converted or not getattr(m, "_torchslim_converted", False))
    ]
    if not chosen and targets:
        kinds = sorted({type(m).__name__ for _, m in named})
        raise SelectorError(
            f"targets {list(targets)} (minus ignore {list(ignore)}) select no module; "
            f"module types in the model: {', '.join(kinds)}"
        )
    return chosen
