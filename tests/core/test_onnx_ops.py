"""core/onnx_ops.py: the registry of ONNX translations for custom ops."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from torchslim.core import onnx_ops


@pytest.fixture
def empty_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_ops, "_TRANSLATIONS", {})


def _translate(x: Any) -> Any:
    return x


@pytest.mark.usefixtures("empty_registry")
def test_registered_translation_is_in_the_table() -> None:
    assert onnx_ops.translation_table() == {}
    onnx_ops.register_translation(torch.ops.aten.relu.default, _translate)
    assert onnx_ops.translation_table() == {torch.ops.aten.relu.default: _translate}


@pytest.mark.usefixtures("empty_registry")
def test_table_is_a_copy() -> None:
    onnx_ops.register_translation(torch.ops.aten.relu.default, _translate)
    table = onnx_ops.translation_table()
    table.clear()
    assert torch.ops.aten.relu.default in onnx_ops.translation_table()


@pytest.mark.usefixtures("empty_registry")
def test_registering_again_replaces_the_translation() -> None:
    def other(x: Any) -> Any:
        return x

    onnx_ops.register_translation(torch.ops.aten.relu.default, _translate)
    onnx_ops.register_translation(torch.ops.aten.relu.default, other)
    assert onnx_ops.translation_table()[torch.ops.aten.relu.default] is other
