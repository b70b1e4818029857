"""pruning/structured/graph.py + group.py: which channels the trace couples, on hand-written models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tiny_models import ResConcatCNN, TinyLM
from torchslim.errors import UnsupportedModuleError
from torchslim.pruning.structured.graph import ChannelGraph, trace
from torchslim.pruning.structured.group import Group, build_groups


def _roots(graph: ChannelGraph, fqn: str, name: str, dim: int) -> np.ndarray:
    for slot in graph.slots:
        if (fqn, name) in slot.owners and slot.dim == dim:
            return graph.elements.roots(slot.elements)
    raise KeyError((fqn, name, dim))


def _groups(model: nn.Module, x: torch.Tensor) -> tuple[ChannelGraph, list[Group]]:
    graph = trace(model, x)
    fqns = {f for f, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))}
    return graph, build_groups(graph, model, fqns)


def _group_of(groups: list[Group], producer: str) -> Group:
    return next(g for g in groups if producer in g.producers)


def test_residual_add_and_concat_are_coupled_with_offsets() -> None:
    graph, groups = _groups(ResConcatCNN().eval(), torch.randn(2, 3, 12, 12))
    stem = _roots(graph, "stem.0", "weight", 0)
    assert (stem == _roots(graph, "res.0", "weight", 0)).all()  # the residual add joins them
    assert (stem == _roots(graph, "res.1", "bias", 0)).all()
    head_in = _roots(graph, "head", "weight", 1)
    assert (head_in[:8] == stem).all() and (head_in[8:] == _roots(graph, "side", "weight", 0)).all()
    res = _group_of(groups, "stem.0")
    assert set(res.producers) == {"stem.0", "res.0"} and res.size == 8 and res.prunable
    head = next(s for s in res.slices if s.fqn == "head" and s.name == "weight")
    assert head.channels[8:] == (-1,) * 4  # concat: the side branch's channels are another group
    assert _group_of(groups, "side").size == 4


def test_inputs_and_outputs_keep_their_size() -> None:
    graph, _ = _groups(ResConcatCNN().eval(), torch.randn(2, 3, 12, 12))
    assert (_roots(graph, "stem.0", "weight", 1) == 0).all()
    assert (_roots(graph, "head", "weight", 0) == 0).all()


class DepthwiseFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(3, 6, 1)
        self.dw = nn.Conv2d(6, 12, 3, padding=1, groups=6)  # channel multiplier 2
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=6)
        self.fc = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.grouped(F.relu(self.dw(F.relu(self.pw(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 4), 1))


def test_depthwise_grouped_and_flatten_couplings() -> None:
    graph, groups = _groups(DepthwiseFlatten().eval(), torch.randn(1, 3, 8, 8))
    pw, dw = _roots(graph, "pw", "weight", 0), _roots(graph, "dw", "weight", 0)
    assert (dw == np.repeat(pw, 2)).all()  # out channels 2i, 2i+1 read input channel i
    grouped_out = _roots(graph, "grouped", "weight", 0)
    assert (grouped_out == dw).all()  # a conv group's inputs and outputs are one unit
    fc_in = _roots(graph, "fc", "weight", 1)
    assert (fc_in == np.repeat(grouped_out, 16)).all()  # flatten of C x 4 x 4
    assert _group_of(groups, "pw").size == 6


def test_tied_embedding_is_one_tensor_and_attention_is_kept() -> None:
    graph, groups = _groups(TinyLM().eval(), torch.randint(0, 50, (2, 5)))
    tied = [s for s in graph.slots if ("embed", "weight") in s.owners]
    assert tied and all(("lm_head", "weight") in s.owners for s in tied)
    assert (_roots(graph, "embed", "weight", 1) == 0).all()  # feeds the attention block
    assert (_roots(graph, "attn", "in_proj_weight", 0) == 0).all()
    ffn = _group_of(groups, "ffn.0")
    assert ffn.prunable and ffn.size == 64


class Shapes(nn.Module):
    """Channel shuffle, a hard-coded reshape, chunk and an unknown op."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(3, 8, 1)
        self.d = nn.Conv2d(3, 8, 1)
        self.out = nn.Conv2d(8 + 8 + 4 + 8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        a = self.a(x).view(n, 2, 4, h, w).transpose(1, 2).reshape(n, 8, h, w)  # channel shuffle
        b = self.b(x).reshape(n, 8, -1).reshape(n, 8, h, w)  # 8 is written in the code
        c1, c2 = self.c(x).chunk(2, dim=1)
        d = torch.special.erfcx(self.d(x))  # no rule for this op
        return self.out(torch.cat([a, b, c1 * c2, d], dim=1))


def test_shape_ops_keep_what_they_cannot_follow() -> None:
    graph, groups = _groups(Shapes().eval(), torch.randn(1, 3, 4, 4))
    assert (_roots(graph, "a", "weight", 0) == 0).all()
    assert (_roots(graph, "b", "weight", 0) == 0).all()
    c = _roots(graph, "c", "weight", 0)
    assert (c[:4] == c[4:]).all() and (c != 0).all()  # chunks lose the same local channels
    assert (_roots(graph, "d", "weight", 0) == 0).all()
    assert any("erfcx" in k for k in graph.blocked)
    assert _group_of(groups, "c").size == 4


def test_permute_and_channels_last_linear_are_followed() -> None:
    class ChannelsLast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 1)
            self.norm = nn.LayerNorm(6)
            self.fc = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.norm(self.conv(x).permute(0, 2, 3, 1))).mean((1, 2))

    graph, _ = _groups(ChannelsLast().eval(), torch.randn(1, 3, 4, 4))
    conv = _roots(graph, "conv", "weight", 0)
    assert (conv != 0).all() and (_roots(graph, "fc", "weight", 1) == conv).all()
    assert (_roots(graph, "norm", "weight", 0) == conv).all()


class WithAux(nn.Module):
    """An auxiliary head that only runs in training mode, like GoogLeNet's."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(8, 2)
        self.aux = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.body(x)).mean((2, 3))
        return (self.head(h), self.aux(h)) if self.training else self.head(h)


def test_layers_used_only_in_training_are_traced_and_modes_restored() -> None:
    model = WithAux().eval()
    before = [b.clone() for b in model.buffers()]
    graph = trace(model, torch.randn(2, 3, 6, 6))
    assert (_roots(graph, "aux", "weight", 1) == _roots(graph, "body", "weight", 0)).all()
    assert not model.training
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_submodule_is_an_error_naming_it_unless_ignored() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), torch.jit.script(nn.Conv2d(4, 4, 1)), nn.Conv2d(4, 2, 1)).eval()
    with pytest.raises(UnsupportedModuleError, match=r"cannot follow 1.*TorchScript.*ignore"):
        trace(model, torch.randn(1, 3, 4, 4))
    graph = trace(model, torch.randn(1, 3, 4, 4), ignore={"1"})
    assert (_roots(graph, "0", "weight", 0) == 0).all()  # feeds the opaque module
    assert type(model[1]).__name__ == "RecursiveScriptModule"  # the temporary wrapper is gone
