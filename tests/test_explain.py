from pathlib import Path

import pytest
import yaml

from torchslim.core import config_from_dict, list_methods
from torchslim.explain import explain, recipe_example, summary


@pytest.mark.parametrize("key", list_methods())
def test_every_method_documents_a_loadable_recipe_example(key: str) -> None:
    example = recipe_example(key)
    assert f"method: {key}" in example, f"{key}: docstring lacks a Recipe: example"
    entries = yaml.safe_load(example)
    assert isinstance(entries, list) and entries
    for entry in entries:
        assert config_from_dict(entry).name == key


@pytest.mark.parametrize("key", list_methods())
def test_explain_lists_every_field_and_a_summary(key: str) -> None:
    import dataclasses

    from torchslim.core import get_config_class

    text = explain(key)
    assert summary(key) and summary(key) in text
    for field in dataclasses.fields(get_config_class(key)):
        assert f"  {field.name} " in text


DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("key", list_methods())
def test_docs_have_an_up_to_date_page_and_a_line_per_method(key: str) -> None:
    from torchslim.explain import method_page

    page = DOCS / "methods" / f"{key}.md"
    assert page.is_file(), f"run `python -m torchslim.explain docs/methods` to write {page.name}"
    assert page.read_text() == method_page(key), f"{page.name} is stale: rerun python -m torchslim.explain"
    assert f"`{key}`" in (DOCS / "index.md").read_text(), f"docs/index.md has no line for {key}"
