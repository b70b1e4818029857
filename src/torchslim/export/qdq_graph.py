"""Keep int8 tensors int8 across max-pooling and reshapes in an exported QDQ graph.

A static int8 model written by ``quantization.ptq`` dequantizes a layer's output, and the
next layer quantizes its input again. Between the two there may be ops that only pick or
move values (MaxPool, Reshape, Flatten, Transpose, Squeeze, Unsqueeze): their outputs lie
exactly on the grid of their input. Without a QuantizeLinear after such an op, ONNX Runtime
runs it in float (with layout conversions around it), and an ``Add`` fed by it cannot
become ``QLinearAdd``. ``share_grids`` inserts ``QuantizeLinear -> DequantizeLinear`` with
the input's own scale and zero point after each such op. On values already on that grid the
pair is the identity, so the model computes exactly the same numbers; ONNX Runtime then fuses
the ops into uint8 kernels. A QuantizeLinear that already follows with the same grid is
reused rather than doubled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GRID_PRESERVING", "share_grids"]

GRID_PRESERVING = frozenset({"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"})


def share_grids(path: str | Path) -> int:
    """Rewrite the ONNX file at ``path`` in place; return how many ops now carry a grid."""
    import onnx

    model = onnx.load(str(path))
    changed = _share(model.graph)
    if changed:
        onnx.save(model, str(path))
    return changed


def _share(graph: Any) -> int:
    from onnx import helper

    constants = _scalar_constants(graph)
    outputs = {o.name for o in graph.output}
    on_grid: dict[str, tuple[str, str]] = {}  # float tensor -> (scale, zero point) it lies exactly on
    nodes = list(graph.node)
    ordered: list[Any] = []
    moved: set[int] = set()  # QuantizeLinear nodes placed early, or dropped as duplicates
    quantized_here: set[str] = set()  # activations quantized in the graph (weights are initializers)
    changed = 0
    for node in nodes:
        if id(node) in moved:
            continue
        ordered.append(node)
        if node.op_type == "QuantizeLinear":
            quantized_here.add(node.output[0])
        if (node.op_type == "DequantizeLinear" and node.input[0] in quantized_here
                and _scalar_grid(node, constants)):
            on_grid[node.output[0]] = (node.input[1], node.input[2])
            continue
        if (node.op_type not in GRID_PRESERVING or not node.input or node.input[0] not in on_grid
                or node.output[0] in outputs):
            continue
        scale, zero = on_grid[node.input[0]]
        out = node.output[0]
        consumers = [n for n in nodes if out in n.input and id(n) not in moved]
        same = [n for n in consumers if n.op_type == "QuantizeLinear" and len(n.input) == 3
                and _same_grid(n, scale, zero, constants)]
        others = [n for n in consumers if all(n is not q for q in same)]
        if len(same) == 1 and not others:  # already quantized to its grid and read by nothing else
            continue
        if same:  # reuse a QuantizeLinear that already has this grid, right after the op
            quantized = same[0].output[0]
            ordered.append(same[0])
            quantized_here.add(quantized)
            for dup in same:
                moved.add(id(dup))
                if dup is not same[0]:
                    _rename_input(nodes, dup.output[0], quantized)
        else:
            quantized = f"{out}_grid_q"
            ordered.append(helper.make_node("QuantizeLinear", [out, scale, zero], [quantized],
                                            name=f"{node.name or out}_grid_q"))
        dequantized = f"{out}_grid_dq"
        ordered.append(helper.make_node("DequantizeLinear", [quantized, scale, zero], [dequantized],
                                        name=f"{node.name or out}_grid_dq"))
        for consumer in others:
            consumer.input[:] = [dequantized if name == out else name for name in consumer.input]
        on_grid[dequantized] = (scale, zero)
        changed += 1
    if changed:
        del graph.node[:]
        graph.node.extend(ordered)
    return changed


def _scalar_constants(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    found = {i.name: numpy_helper.to_array(i) for i in graph.initializer if _numel(i.dims) == 1}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            value = numpy_helper.to_array(node.attribute[0].t)
            if value.size == 1:
                found[node.output[0]] = value
    return found


def _numel(dims: Any) -> int:
    return int(np.prod(list(dims))) if len(dims) else 1


def _scalar_grid(node: Any, constants: dict[str, np.ndarray]) -> bool:
    """A DequantizeLinear with one scale and one zero point (an activation grid)."""
    return len(node.input) == 3 and node.input[1] in constants and node.input[2] in constants


def _same_grid(node: Any, scale: str, zero: str, constants: dict[str, np.ndarray]) -> bool:
    s, z = constants.get(node.input[1]), constants.get(node.input[2])
    if s is None or z is None:
        return False
    ref_s, ref_z = constants[scale], constants[zero]
    return bool(s.dtype == ref_s.dtype and z.dtype == ref_z.dtype and s.item() == ref_s.item()
                and z.item() == ref_z.item())


def _rename_input(nodes: list[Any], old: str, new: str) -> None:
    for n in nodes:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new
