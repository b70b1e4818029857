"""Method documentation from config docstrings: what ``torchslim explain`` and the docs show."""

from __future__ import annotations

import dataclasses
import inspect
import textwrap
import typing

from torchslim.core.config import config_fields
from torchslim.core.registry import get_config_class, list_methods

__all__ = ["explain", "method_page", "recipe_example", "summaries", "summary", "write_method_pages"]

_SECTIONS = ("Paper:", "Args:", "Recipe:", "Lifecycle:", "Notes:", "Returns:", "Raises:")


def _doc(key: str) -> str:
    return inspect.cleandoc(get_config_class(key).__doc__ or "")


def summary(key: str) -> str:
    """The first line of a method's docstring."""
    return _doc(key).splitlines()[0] if _doc(key) else ""


def summaries(technique: str | None = None) -> list[tuple[str, str]]:
    """(key, one-line summary) for every method, optionally of one family."""
    keys = [k for k in list_methods() if technique is None or k.split(".")[0] == technique]
    return [(k, summary(k)) for k in keys]


def _section(doc: str, name: str) -> str:
    lines, out, inside = doc.splitlines(), [], False
    for line in lines:
        if line.strip() in _SECTIONS or (line and not line[0].isspace() and line.rstrip().endswith(":")
                                         and line.strip() in _SECTIONS):
            inside = line.strip() == name
            continue
        if inside:
            if line and not line[0].isspace():
                inside = line.strip() == name
                continue
            out.append(line)
    return textwrap.dedent("\n".join(out)).strip("\n")


def recipe_example(key: str) -> str:
    """The YAML snippet of the docstring's ``Recipe:`` section."""
    return _section(_doc(key), "Recipe:")


def _type_name(hint: object) -> str:
    text = str(hint).replace("typing.", "")
    return getattr(hint, "__name__", text) if typing.get_origin(hint) is None else text


def explain(key: str) -> str:
    """Full documentation of a method: docstring, fields with type and default, example."""
    cls = get_config_class(key)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else "(required)"
        rows.append(f"  {f.name:<16} {_type_name(config_fields(cls)[f.name]):<28} default: {default!r}")
    kind = "trained (needs a 'train' block)" if _trained(key) else "one-shot"
    return "\n".join([
        f"{key}  [{kind}]", "", _doc(key), "", "Fields:", *rows, "",
        "Recipe example:", textwrap.indent(recipe_example(key), "  "),
    ])


def _trained(key: str) -> bool:
    from torchslim.core.registry import is_trained

    return is_trained(get_config_class(key)())


def method_page(key: str) -> str:
    """Markdown page of one method for ``docs/methods/<key>.md`` (same text as ``explain``)."""
    return "\n".join([
        f"# `{key}`", "", summary(key), "", "```text", explain(key), "```", "",
        "Recipe example:", "", "```yaml", recipe_example(key), "```", "",
    ])


def write_method_pages(folder: str) -> list[str]:
    """Write ``method_page`` for every method into ``folder``; return the file names."""
    from pathlib import Path

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for key in list_methods():
        (out / f"{key}.md").write_text(method_page(key), encoding="utf-8")
        names.append(f"{key}.md")
    return names


if __name__ == "__main__":
    import sys

    print("\n".join(write_method_pages(sys.argv[1] if len(sys.argv) > 1 else "docs/methods")))
