"""Export to ONNX, check the file in ONNX Runtime, and run or time it like a torch module.

onnx and onnxruntime are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchslim.core.storage import temp_path
from torchslim.errors import DataError, ExportError, OutputError
from torchslim.export.qdq_graph import share_grids

__all__ = ["OnnxModule", "export_onnx", "onnx_latency"]

logger = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the exporters colour their messages
_NUMPY_OF_ORT = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
                 "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
                 "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    verify: bool = True,
    opset: int | None = None,
    min_cosine: float = 0.999,
) -> dict[str, Any]:
    """Export ``model`` to ``path`` with a dynamic batch dimension, then check it in ONNX Runtime.

    The dynamo exporter (``torch.onnx.export(dynamo=True)``) is tried first, with the
    translations of torchslim's custom ops (``core.onnx_ops``); the TorchScript exporter is
    the fallback. In a quantized (QDQ) graph, max-pooling and reshapes of int8 tensors get the
    grid of their input (``export.qdq_graph``), so ONNX Runtime runs them in uint8. The graph
    is always the inference graph: the model is exported in eval
    mode, and every module's train/eval mode and every parameter's ``requires_grad`` are
    restored afterwards. The file is written under a temporary name and renamed only after
    it passed verification. Weights are stored inside the file, so models over 2 GB (which
    need ONNX external data) are not supported.

    Args:
        model: The model to export; it is not changed.
        example_inputs: A tensor or a tuple of tensors; dimension 0 is the batch.
        path: Where to write the ``.onnx`` file.
        verify: Run the file in ONNX Runtime on ``example_inputs`` and compare with PyTorch.
        opset: ONNX opset version; the exporter's default when None.
        min_cosine: Smallest accepted cosine similarity between PyTorch and ONNX Runtime
            outputs; pass a looser value for quantized models.

    Returns:
        ``path``, ``bytes``, ``opset``, ``exporter`` (which one succeeded),
        ``dynamic_batch`` and, with ``verify``, ``max_abs_diff``, ``cosine`` and
        ``top1_agreement`` (share of equal argmax for 2-D outputs, else None).

    Raises:
        ExportError: No exporter could export the model, or its outputs disagree with PyTorch.
    """
    path = Path(path)
    inputs = _as_tuple(example_inputs)
    saved = _save_modes(model)
    try:
        model.eval()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        try:
            facts, traced = _export_file(model, inputs, tmp, opset)
            share_grids(tmp)  # exact: keeps int8 tensors int8 across max-pooling and reshapes
            info: dict[str, Any] = {"path": str(path), "bytes": tmp.stat().st_size, **facts}
            if verify:
                info.update(_verify(model, tmp, inputs, traced, min_cosine))
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        _restore_modes(saved)
    logger.info("exported %s (%d bytes)", path, info["bytes"])
    return info


class OnnxModule(nn.Module):
    """An ONNX file run by ONNX Runtime behind the ``nn.Module`` call interface.

    Lets the same ``eval_fn(model)`` score an exported model: ``forward(*tensors)`` feeds the
    inputs in order and returns torch tensors (a single output is returned as a tensor), on
    the device of the first input.

    Args:
        path: The ONNX file.
        providers: ONNX Runtime execution providers, in order of preference.
        optimize: ``False`` runs the graph as written (no ONNX Runtime graph optimization: a
            QDQ model then computes its float ops between QuantizeLinear / DequantizeLinear
            nodes instead of fused int8 kernels), to compare the two.

    Attributes:
        path: The ONNX file.
        session: The ``onnxruntime.InferenceSession``.
        providers: The execution providers the session uses.
    """

    def __init__(self, path: str | Path, *, providers: Sequence[str] = ("CPUExecutionProvider",),
                 optimize: bool = True) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = _session(self.path, providers, optimize)
        self.providers: list[str] = list(self.session.get_providers())

    def forward(self, *inputs: torch.Tensor) -> Any:
        """Run the session on ``inputs``."""
        device = inputs[0].device if inputs and isinstance(inputs[0], torch.Tensor) else torch.device("cpu")
        outputs = [o.to(device) for o in _run(self.session, inputs, DataError)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, providers={self.providers}"


def onnx_latency(path: str | Path, example_inputs: Any, **kw: Any) -> dict[str, float]:
    """Time ``session.run`` on ``example_inputs`` in ONNX Runtime (CPU, torch's thread count).

    Args:
        path: The ONNX file.
        example_inputs: A tensor or a tuple of tensors.
        **kw: Passed to ``torchslim.measure.latency.measure_latency`` (``warmup``, ``repeats``,
            ``min_seconds``).

    Returns:
        What ``measure_latency`` returns, including ``latency_ms``.
    """
    from torchslim.measure.latency import measure_latency

    session = _session(Path(path))
    feed = _feed(session, _as_tuple(example_inputs))
    return dict(measure_latency(lambda: session.run(None, feed), **kw))


def _as_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        found = [type(t).__name__ for t in inputs]
        raise DataError(f"ONNX export needs example inputs as a tensor or a tuple of tensors, found {found}")
    return inputs


def _save_modes(model: nn.Module) -> list[tuple[Any, str, bool]]:
    modes: list[tuple[Any, str, bool]] = [(m, "training", m.training) for m in model.modules()]
    return modes + [(p, "requires_grad", p.requires_grad) for p in model.parameters()]


def _restore_modes(saved: list[tuple[Any, str, bool]]) -> None:
    for obj, attr, value in saved:
        setattr(obj, attr, value)


def _batched(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Inputs with a batch of at least 2, so tracing cannot specialize the batch size to 1."""
    if all(t.dim() > 0 and t.shape[0] == 1 for t in inputs):
        return tuple(torch.cat([t, t]) for t in inputs)
    return inputs


def _export_file(model: nn.Module, inputs: tuple[torch.Tensor, ...], tmp: Path,
                 opset: int | None) -> tuple[dict[str, Any], tuple[torch.Tensor, ...] | None]:
    """Write the ONNX file; return (facts about it, inputs of another batch size to check)."""
    batched = _batched(inputs)
    attempts: list[tuple[str, Callable[[], None], tuple[torch.Tensor, ...] | None]] = [
        ("dynamo exporter, dynamic batch",
         lambda: _dynamo(model, batched, tmp, opset, dynamic=True), batched),
        ("dynamo exporter, fixed shapes",
         lambda: _dynamo(model, inputs, tmp, opset, dynamic=False), None),
        ("TorchScript exporter, dynamic batch",
         lambda: _torchscript(model, inputs, tmp, opset), batched),
    ]
    errors = []
    for label, run, traced in attempts:
        try:
            run()
        except Exception as exc:  # exporters raise many unrelated types; every one means "try the next"
            first_line = _ANSI.sub("", (str(exc).strip().splitlines() or [type(exc).__name__])[0])
            logger.warning("ONNX export with the %s failed: %s", label, first_line)
            errors.append(f"{label}: {type(exc).__name__}: {first_line}")
            continue
        used_opset, dynamic = _graph_facts(tmp)
        if not dynamic:
            logger.warning("the ONNX graph has a fixed batch size; it runs only at the example's batch")
        facts = {"opset": used_opset, "exporter": label.split(",")[0], "dynamic_batch": dynamic}
        return facts, traced if dynamic else None
    raise ExportError(f"cannot export {type(model).__name__} to ONNX; " + "; ".join(errors))


def _dynamo(model: nn.Module, inputs: tuple[torch.Tensor, ...], tmp: Path, opset: int | None,
            *, dynamic: bool) -> None:
    from torchslim.core.onnx_ops import translation_table

    shapes = tuple({0: torch.export.Dim("batch")} if t.dim() else None for t in inputs) if dynamic else None
    program = torch.onnx.export(model, inputs, dynamo=True, dynamic_shapes=shapes, opset_version=opset,
                                custom_translation_table=translation_table() or None, verbose=False)
    if program is None:
        raise ExportError("the dynamo exporter returned no program")
    program.save(str(tmp), external_data=False)


def _torchscript(model: nn.Module, inputs: tuple[torch.Tensor, ...], tmp: Path, opset: int | None) -> None:
    names = [f"input_{i}" for i in range(len(inputs))]
    axes = {n: {0: "batch"} for n, t in zip(names, inputs) if t.dim()}
    torch.onnx.export(model, inputs, str(tmp), dynamo=False, input_names=names, dynamic_axes=axes,
                      opset_version=opset or 17, do_constant_folding=True)


def _graph_facts(path: Path) -> tuple[int, bool]:
    """(default-domain opset, whether every input has a symbolic first dimension)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    opset = next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)
    dims = [i.type.tensor_type.shape.dim for i in proto.graph.input]
    return opset, all(d and d[0].HasField("dim_param") for d in dims)


def _session(path: Path, providers: Sequence[str] = ("CPUExecutionProvider",), optimize: bool = True) -> Any:
    import onnxruntime as ort

    if not path.is_file():
        raise OutputError(f"ONNX file {str(path)!r} does not exist")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as exc:  # onnxruntime's errors share no base class
        raise OutputError(f"{path}: ONNX Runtime cannot load it: {exc}") from exc


def _feed(session: Any, inputs: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    specs = session.get_inputs()
    if len(specs) != len(inputs):
        raise DataError(f"the ONNX model takes {len(specs)} input(s) {[s.name for s in specs]}, "
                        f"found {len(inputs)}")
    feed = {}
    for spec, tensor in zip(specs, inputs):
        array = tensor.detach().cpu().numpy()
        wanted = _NUMPY_OF_ORT.get(spec.type)
        feed[spec.name] = array.astype(wanted, copy=False) if wanted is not None else array
    return feed


def _run(session: Any, inputs: Sequence[torch.Tensor], error: type[Exception]) -> list[torch.Tensor]:
    """Outputs of ``session`` on ``inputs``; a failure raises ``error`` naming the input shapes."""
    feed = _feed(session, inputs)
    try:
        return [torch.from_numpy(np.asarray(o)) for o in session.run(None, feed)]
    except Exception as exc:  # onnxruntime's errors share no base class
        shapes = [list(t.shape) for t in inputs]
        raise error(f"ONNX Runtime failed on inputs of shape {shapes}: {exc}") from exc


def _flat_outputs(outputs: Any) -> list[torch.Tensor]:
    """Tensors of a (nested) output in the exporter's order: sequences in order, dicts by value."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, (list, tuple)):
        return [t for item in outputs for t in _flat_outputs(item)]
    return []


def _verify(model: nn.Module, path: Path, inputs: tuple[torch.Tensor, ...],
            traced: tuple[torch.Tensor, ...] | None, min_cosine: float) -> dict[str, Any]:
    """Compare PyTorch and ONNX Runtime on ``inputs`` (and on the traced batch, if dynamic)."""
    session = _session(path)
    result = _compare(model, session, inputs, path)
    if traced is not None and traced is not inputs:
        other = _compare(model, session, traced, path)
        result["max_abs_diff"] = max(result["max_abs_diff"], other["max_abs_diff"])
        result["cosine"] = min(result["cosine"], other["cosine"])
    if not result["cosine"] >= min_cosine:  # written so that NaN fails too
        raise ExportError(
            f"{path.name}: ONNX Runtime disagrees with PyTorch: cosine {result['cosine']:.6f} < "
            f"{min_cosine} (max |diff| {result['max_abs_diff']:.3g}); pass a looser min_cosine "
            "for quantized models"
        )
    return result


def _compare(model: nn.Module, session: Any, inputs: tuple[torch.Tensor, ...], path: Path) -> dict[str, Any]:
    with torch.no_grad():
        expected = _flat_outputs(model(*inputs))
    if not expected:
        raise ExportError(f"{path.name}: the model returned no tensors to compare")
    found = _run(session, inputs, ExportError)
    shapes_expected = [tuple(t.shape) for t in expected]
    shapes_found = [tuple(t.shape) for t in found]
    if shapes_expected != shapes_found:
        raise ExportError(
            f"{path.name}: ONNX outputs have shapes {shapes_found}, PyTorch gives {shapes_expected}"
        )
    a = torch.cat([t.detach().cpu().double().flatten() for t in expected])
    b = torch.cat([t.double().flatten() for t in found])
    norms = float(a.norm() * b.norm())
    cosine = float(a @ b) / norms if norms > 0 else float(torch.equal(a, b))
    top1 = None
    if expected[0].dim() == 2 and expected[0].is_floating_point():
        top1 = float((expected[0].argmax(1).cpu() == found[0].argmax(1)).float().mean())
    return {"max_abs_diff": float((a - b).abs().max()) if a.numel() else 0.0, "cosine": cosine,
            "top1_agreement": top1}
