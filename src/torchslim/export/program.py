"""Export to TorchScript (``torch.jit.trace``) or a ``torch.export`` program (``.pt2``), verified.

Each export is written under a temporary name, loaded back from the file, run on the example
inputs and compared with the PyTorch model (max abs diff and cosine of the first output
tensor); only a file that passes is renamed into place. Models returning a Hugging Face
output object or a tuple are exported through ``FirstTensor``, which returns the first tensor
(``logits``, ``last_hidden_state``, ...).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.core.storage import temp_path
from torchslim.errors import ExportError

__all__ = ["FORMATS", "FirstTensor", "compare", "export_program", "load_program"]

logger = logging.getLogger(__name__)

FORMATS = {"torchscript": "model.torchscript.pt", "torch_export": "model.pt2"}


def first_tensor(out: Any) -> torch.Tensor:
    """The first tensor of a model output (a tensor, a mapping / HF output, or a sequence)."""
    if isinstance(out, torch.Tensor):
        return out
    values: list[Any] = []
    if isinstance(out, Mapping):
        values = list(out.values())
    elif isinstance(out, (list, tuple)):
        values = list(out)
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise ExportError(f"the model returned a {type(out).__name__} holding no tensor; "
                      "expected a tensor output")


class FirstTensor(nn.Module):
    """Wraps a model so that it returns only the first tensor of its output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return first_tensor(self.model(*inputs))


def compare(reference: torch.Tensor, output: torch.Tensor) -> dict[str, float]:
    """``max_abs_diff`` and ``cosine`` (flattened) of two outputs of the same shape."""
    if reference.shape != output.shape:
        raise ExportError(f"the exported model's output has shape {tuple(output.shape)}, the PyTorch "
                          f"model's {tuple(reference.shape)}")
    a, b = reference.detach().double().flatten(), output.detach().double().flatten()
    if not torch.isfinite(b).all():
        raise ExportError("the exported model's output holds NaN or inf values")
    same = torch.equal(a, b)  # also all-zero outputs, whose cosine is undefined
    cosine = 1.0 if same else float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    return {"max_abs_diff": float((a - b).abs().max()) if a.numel() else 0.0, "cosine": cosine}


def _save_torchscript(model: nn.Module, inputs: tuple[Any, ...], path: Path) -> None:
    traced = torch.jit.trace(model, inputs, check_trace=False)  # type: ignore[no-untyped-call]
    torch.jit.save(traced, str(path))


def _save_torch_export(model: nn.Module, inputs: tuple[Any, ...], path: Path) -> None:
    program = torch.export.export(model, inputs)
    torch.export.save(program, str(path))


_SAVERS: dict[str, Callable[[nn.Module, tuple[Any, ...], Path], None]] = {
    "torchscript": _save_torchscript,
    "torch_export": _save_torch_export,
}


def load_program(path: str | Path, fmt: str) -> Callable[..., Any]:
    """Load an exported file back: a ScriptModule, or the module of an ExportedProgram."""
    if fmt == "torchscript":
        return torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    module: Callable[..., Any] = torch.export.load(str(path)).module()
    return module


def export_program(model: nn.Module, example_inputs: Any, path: str | Path, fmt: str, *,
                   min_cosine: float = 0.999) -> dict[str, Any]:
    """Export ``model`` as ``fmt`` to ``path``, reload the file, and check its outputs.

    Args:
        model: The model; exported in eval mode, and every module's mode is restored.
        example_inputs: A tensor or a tuple of tensors.
        path: Where to write the file.
        fmt: ``torchscript`` or ``torch_export``.
        min_cosine: Smallest accepted cosine similarity between the reloaded file's output
            and PyTorch's.

    Returns:
        ``path``, ``format``, ``bytes``, ``max_abs_diff`` and ``cosine``.

    Raises:
        ExportError: Unknown format, the exporter fails, or the reloaded outputs disagree.
    """
    if fmt not in _SAVERS:
        raise ExportError(f"unknown export format {fmt!r}; expected one of {', '.join(_SAVERS)}")
    path = Path(path)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    modes = {m: m.training for m in model.modules()}
    wrapped = FirstTensor(model).eval()
    tmp = temp_path(path)
    try:
        with torch.no_grad():
            reference = wrapped(*inputs)
            try:
                _SAVERS[fmt](wrapped, inputs, tmp)
                output = first_tensor(load_program(tmp, fmt)(*inputs))
            except ExportError:
                raise
            except Exception as exc:  # tracers and exporters raise many error types
                raise ExportError(f"{fmt} export of {type(model).__name__} failed: "
                                  f"{type(exc).__name__}: {str(exc).strip()[:600]}") from exc
        check = compare(reference, output)
        if not check["cosine"] >= min_cosine:
            raise ExportError(f"{fmt} export of {type(model).__name__} disagrees with PyTorch: cosine "
                              f"{check['cosine']:.6f} < {min_cosine} "
                              f"(max |diff| {check['max_abs_diff']:.3e})")
        info = {"path": str(path), "format": fmt, "bytes": tmp.stat().st_size, **check}
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
        for module, training in modes.items():
            module.train(training)
    logger.info("exported %s: max |diff| %.2e, cosine %.6f", path, info["max_abs_diff"], info["cosine"])
    return info
