"""Conv/Linear + BatchNorm folding and ReLU fusion, found in the traced graph or in Sequentials.

Static int8 quantizes a layer's output after its BatchNorm and activation, so those are folded
into the layer first: ``Conv2d -> BatchNorm2d -> ReLU`` becomes one layer whose weights carry
the BN affine map and whose output grid starts at 0 (ONNX Runtime then drops the ReLU into its
int8 kernel). The chains come from a ``torch.fx`` trace of the model; a model that cannot be
traced falls back to consecutive children of an ``nn.Sequential`` (a module's ``forward`` can
call its children in any order, a Sequential cannot).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

__all__ = ["Fusion", "find_fusions", "fold_batchnorm"]

_ACTS: dict[type[nn.Module], str] = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
_NORMS = {nn.Conv2d: nn.BatchNorm2d, nn.Linear: nn.BatchNorm1d}


@dataclasses.dataclass
class Fusion:
    """A layer and what follows it: the BatchNorm to fold and the activation to fuse."""

    layer: str
    norm: str | None = None
    activation: str = "none"
    act_module: str | None = None

    def absorbed(self) -> list[str]:
        """The fqns that become ``nn.Identity`` after fusion."""
        return [f for f in (self.norm, self.act_module) if f is not None]


def find_fusions(model: nn.Module, layers: list[str]) -> dict[str, Fusion]:
    """For each fqn in ``layers``, the BatchNorm / ReLU that directly consume its output.

    The model's ``forward`` is traced with ``torch.fx`` when it can be (so a ResNet block's
    ``self.bn1(self.conv1(x))`` fuses too); otherwise only consecutive children of an
    ``nn.Sequential`` are fused.
    """
    fusions = {fqn: Fusion(fqn) for fqn in layers}
    if _fuse_traced(model, fusions):
        return fusions
    for parent_fqn, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for i, (name, child) in enumerate(children):
            fqn = f"{parent_fqn}.{name}" if parent_fqn else name
            if fqn not in fusions:
                continue
            j = i + 1
            norm_type = _NORMS.get(type(child))
            if j < len(children) and norm_type is not None and type(children[j][1]) is norm_type:
                bn = children[j][1]
                if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats:
                    fusions[fqn].norm = _join(parent_fqn, children[j][0])
                    j += 1
            if j < len(children) and type(children[j][1]) in _ACTS:
                fusions[fqn].activation = _ACTS[type(children[j][1])]
                fusions[fqn].act_module = _join(parent_fqn, children[j][0])
    return fusions


def _fuse_traced(model: nn.Module, fusions: dict[str, Fusion]) -> bool:
    """Fill ``fusions`` from the fx graph; False if the model cannot be traced."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 -- any tracing failure means "use the Sequential rule"
        return False
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1

    def single_module_user(node: torch.fx.Node, types: tuple[type[nn.Module], ...]) -> torch.fx.Node | None:
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or calls.get(str(users[0].target)) != 1:
            return None
        return users[0] if type(modules.get(str(users[0].target))) in types else None

    for node in graph.nodes:
        if node.op != "call_module" or node.target not in fusions or calls[node.target] != 1:
            continue
        fusion, tail = fusions[node.target], node
        norm_type = _NORMS.get(type(modules[node.target]))
        bn = single_module_user(node, (norm_type,)) if norm_type is not None else None
        if bn is not None and getattr(modules[bn.target], "track_running_stats", False):
            fusion.norm, tail = str(bn.target), bn
        act = single_module_user(tail, tuple(_ACTS))
        if act is not None:
            fusion.activation, fusion.act_module = _ACTS[type(modules[act.target])], str(act.target)
    return True


def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None,
                   bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, bias)`` of the layer that computes ``bn(layer(x))`` in eval mode."""
    assert bn.running_mean is not None and bn.running_var is not None
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_mean)
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(bn.running_mean)
    factor = gamma / torch.sqrt(bn.running_var + bn.eps)
    b = bias.detach() if bias is not None else torch.zeros_like(bn.running_mean)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return weight.detach() * factor.reshape(shape), (b - bn.running_mean) * factor + beta


def _join(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name
