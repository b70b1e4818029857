"""One verified export in any format: the library side of ``torchslim export DIR --format ...``.

Every format but ``safetensors`` (the run folder's own weights) is written into the folder,
loaded back, run and compared with the PyTorch model; the reloaded artifact is timed too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.errors import ExportError, OutputError

__all__ = ["ENGINES", "FORMATS", "example_inputs_of", "export_artifact"]

FORMATS = ("onnx", "torchscript", "torch_export", "safetensors")
ENGINES = {"onnx": "onnxruntime", "torchscript": "torchscript", "torch_export": "torch.export"}


def example_inputs_of(environment: dict[str, Any]) -> torch.Tensor | None:
    """Zeros of the recorded example input shape, for float inputs only.

    None when no shape is recorded or the input is integer (token ids): zeros would be padding
    tokens, which many language models map to all-zero outputs, so the caller takes real
    inputs from the data spec instead.
    """
    shape = environment.get("example_input_shape")
    if not shape:
        return None
    dtype = getattr(torch, str(environment.get("example_input_dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise OutputError("record.json: unknown example_input_dtype "
                          f"{environment.get('example_input_dtype')!r}")
    return torch.zeros(*shape, dtype=dtype) if dtype.is_floating_point else None


def _export_file(model: nn.Module, inputs: Any, folder: Path,
                 fmt: str) -> tuple[dict[str, Any], Callable[..., Any]]:
    if fmt == "onnx":
        from torchslim.export.onnx import OnnxModule, export_onnx
        from torchslim.export.program import FirstTensor

        # Hugging Face models return output objects (and a KV cache), which ONNX cannot carry
        info = export_onnx(FirstTensor(model), inputs, folder / "model.onnx", min_cosine=0.99)
        return info, OnnxModule(folder / "model.onnx")
    from torchslim.export.program import FORMATS as FILES
    from torchslim.export.program import export_program, load_program

    info = export_program(model, inputs, folder / FILES[fmt], fmt, min_cosine=0.99)
    return info, load_program(folder / FILES[fmt], fmt)


def export_artifact(model: nn.Module, inputs: Any, folder: Path, fmt: str) -> dict[str, Any]:
    """Export ``model`` as ``fmt`` into ``folder``, reload the file and check it against PyTorch.

    Returns:
        What the exporter returned (``path``, ``bytes``, ``max_abs_diff``, ``cosine``) plus
        ``latency_ms`` of the reloaded artifact; for ``safetensors`` only the path.

    Raises:
        ExportError: unknown format, or the export fails or disagrees with PyTorch.
    """
    from torchslim.measure.latency import model_latency

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "safetensors":
        return {"path": str(folder / "model.safetensors"), "format": fmt}
    info, loaded = _export_file(model, inputs, folder, fmt)
    timed = loaded if isinstance(loaded, nn.Module) and fmt == "onnx" else _Callable(loaded)
    info["latency_ms"] = model_latency(timed, inputs)["latency_ms"]
    info.setdefault("format", fmt)
    return info


class _Callable(nn.Module):
    """A loaded artifact behind ``nn.Module`` for timing; not registered as a submodule, since
    an ExportedProgram's module refuses ``eval()``."""

    fn: Callable[..., Any]

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        object.__setattr__(self, "fn", fn)

    def forward(self, *inputs: Any) -> Any:
        fn = self.__dict__["fn"]
        return fn(*inputs)
