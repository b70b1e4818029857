"""Layer-by-layer calibration: run a model's blocks one at a time on captured inputs.

One-shot LLM methods (SparseGPT, Wanda, GPTQ, AWQ) need statistics of each layer's inputs
*as the already-compressed earlier layers produce them*, without holding every layer's
activations at once. ``layerwise`` captures the inputs (positional and keyword arguments) of
the first block of a decoder stack, then for each block in turn: runs it on those inputs
while hooks feed each observed layer's input to a statistic, hands the block to a callback
that may change it, and runs it again to produce the next block's inputs. Peak memory is the
model plus one block's inputs and outputs over the calibration set.

Blocks are found by one rule: the ``nn.ModuleList`` holding the most parameters whose
children all share one class, accepted only if the model really runs them as a chain (on the
first batch each block is called once and its output is the next block's first input). A model
without such a list is treated as a single block. KV caches are kept out: the model is called
with ``use_cache=False`` when its ``forward`` takes that argument, and ``past_key_values`` is
dropped from the captured arguments (a shared cache would make every calibration batch attend
to the earlier ones).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from torchslim.core.hooks import HookSet

__all__ = [
    "BlockStep",
    "Call",
    "InputGram",
    "InputNorms",
    "Stat",
    "find_blocks",
    "layerwise",
    "model_call",
]

logger = logging.getLogger(__name__)

Call = tuple[tuple[Any, ...], dict[str, Any]]
"""The positional and keyword arguments of one call of a block."""

_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


class Stat(Protocol):
    """A running statistic of a layer's input; ``update`` sees each call's first input."""

    def update(self, x: torch.Tensor) -> None: ...


class InputNorms:
    """Running sum of squares of each input feature (last dimension): ``||X_j||^2``."""

    def __init__(self, features: int, device: torch.device | str = "cpu") -> None:
        self.squares = torch.zeros(features, dtype=torch.float64, device=device)
        self.rows = 0

    def update(self, x: torch.Tensor) -> None:
        """Add one batch of inputs ``(..., features)``."""
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (..., F) -> (rows, F)
        self.squares += x.pow(2).sum(dim=0).to(self.squares)
        self.rows += x.shape[0]


class InputGram:
    """Running ``X^T X`` of the inputs (rows = tokens); ``2 X^T X / rows`` is the OBS Hessian."""

    def __init__(self, features: int, device: torch.device | str = "cpu") -> None:
        self.xtx = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.rows = 0

    def update(self, x: torch.Tensor) -> None:
        """Add one batch of inputs ``(..., features)``."""
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (..., F) -> (rows, F)
        self.xtx += (x.T @ x).to(self.xtx)  # (F, F), summed in float64
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """``2 X^T X / rows`` in float32: the Hessian of the layer's squared output error."""
        return (2.0 * self.xtx / max(self.rows, 1)).float()

    @property
    def squares(self) -> torch.Tensor:
        """Sum of squares of each input feature (the Gram diagonal)."""
        return self.xtx.diagonal().clone()


@dataclasses.dataclass
class BlockStep:
    """One block's turn, handed to the ``on_block`` callback.

    Attributes:
        index: Position of the block in the stack (0-based).
        count: Number of blocks.
        fqn: The block's name in the model; ``""`` when the whole model is the block.
        module: The block itself; the callback may change its layers in place.
        layers: Observed layers inside the block, model fqn -> module.
        stats: Model fqn -> statistic, for every observed layer that received input.
        calls: The block's captured inputs over the calibration set.
        groups: Observed layers that read the same input tensor (``q/k/v``, ``gate/up``), in
            the order the block runs them.
    """

    index: int
    count: int
    fqn: str
    module: nn.Module
    layers: dict[str, nn.Module]
    stats: dict[str, Any]
    calls: list[Call]
    groups: list[list[str]] = dataclasses.field(default_factory=list)

    def forward(self) -> list[Any]:
        """Run the block on every captured input; return its hidden-state outputs."""
        return _run(self.module, self.calls)

    def observe(self, fqns: Sequence[str], new_stat: Callable[[str, nn.Module], Stat]) -> dict[str, Any]:
        """Fresh statistics of ``fqns``' inputs as the block now computes them.

        Each call stops as soon as all of ``fqns`` have run, so observing a block's early
        layers again after changing them (sequential calibration) costs a partial pass.
        """
        stats, _, _ = _observe(self.module, {f: self.layers[f] for f in fqns}, self.calls, new_stat,
                               keep=False, stop_early=True)
        return stats


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The candidate block stack: the ModuleList of same-class children holding most parameters."""
    best: tuple[str, nn.ModuleList] | None = None
    best_size = 0
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = (fqn, module), size
    return best


def model_call(model: nn.Module, batch: Any) -> Call:
    """The call ``model(*args, **kwargs)`` for one batch, with the KV cache turned off.

    A mapping is passed as keyword arguments, a tuple or list as positional arguments,
    anything else (a tensor of token ids) as the only positional argument.
    """
    if isinstance(batch, Mapping):
        args: tuple[Any, ...] = ()
        kwargs = dict(batch)
    elif isinstance(batch, (tuple, list)):
        args, kwargs = tuple(batch), {}
    else:
        args, kwargs = (batch,), {}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    return args, kwargs


def run_batches(model: nn.Module, batches: Iterable[Any]) -> None:
    """Call ``model`` on every batch (see ``model_call``) in eval mode, then restore its mode.

    The way calibration passes drive a model whose layers carry observing hooks.
    """
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            args, kwargs = model_call(model, batch)
            model(*args, **kwargs)
    finally:
        model.train(was_training)


def layerwise(
    model: nn.Module,
    batches: Sequence[Any],
    *,
    layers: Mapping[str, nn.Module],
    new_stat: Callable[[str, nn.Module], Stat],
    on_block: Callable[[BlockStep], None],
    modifies: bool = True,
) -> list[str]:
    """Run ``model`` block by block on ``batches``, observing ``layers`` and calling ``on_block``.

    Args:
        model: The model; its train/eval mode is restored afterwards.
        batches: Model inputs (see ``model_call``), already on the model's device.
        layers: Layers to observe, model fqn -> module. Each gets ``new_stat(fqn, module)``
            on its block's turn, fed the first positional input of every call.
        new_stat: Builds the statistic of one layer.
        on_block: Called once per block after its statistics are complete.
        modifies: False when ``on_block`` never changes the block: the outputs of the
            observing pass are then reused instead of running the block again.

    Returns:
        The fqns of observed layers that lie outside every block (never observed).
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            blocks, calls = _plan(model, list(batches))
            outside = [f for f in layers if not any(_inside(f, b) for b, _ in blocks)]
            for i, (fqn, block) in enumerate(blocks):
                inside = {f: m for f, m in layers.items() if _inside(f, fqn)}
                last = i + 1 == len(blocks)
                reuse = not last and not modifies
                stats, outputs, groups = _observe(block, inside, calls, new_stat, keep=reuse)
                on_block(BlockStep(i, len(blocks), fqn, block, inside, stats, calls, groups))
                if not last:
                    outputs = outputs if reuse else _run(block, calls)
                    calls = [_with_hidden(call, h) for call, h in zip(calls, outputs)]
                logger.debug("layerwise: block %d/%d (%s) done", i + 1, len(blocks), fqn or "<model>")
    finally:
        model.train(was_training)
    return outside


def _run(block: nn.Module, calls: list[Call]) -> list[Any]:
    with torch.no_grad():
        return [_hidden_out(block(*args, **kwargs)) for args, kwargs in calls]


def _inside(layer_fqn: str, block_fqn: str) -> bool:
    return block_fqn == "" or layer_fqn.startswith(block_fqn + ".")


def _observe(block: nn.Module, layers: Mapping[str, nn.Module], calls: list[Call],
             new_stat: Callable[[str, nn.Module], Stat], keep: bool,
             stop_early: bool = False) -> tuple[dict[str, Any], list[Any], list[list[str]]]:
    """Run ``block`` on ``calls`` with hooks feeding ``layers``' inputs to their statistics.

    Returns the statistics, the block outputs (when ``keep``) and the layers grouped by shared
    input tensor on the first call, in running order.
    """
    stats: dict[str, Any] = {}
    inputs: dict[str, Any] = {}  # fqn -> input tensor of the current call, in running order

    def hook_for(fqn: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if args and isinstance(args[0], torch.Tensor):
                if fqn not in stats:
                    stats[fqn] = new_stat(fqn, module)
                stats[fqn].update(args[0])
                inputs.setdefault(fqn, args[0])
            if stop_early and len(inputs) == len(layers):
                raise _Captured
        return hook

    outputs: list[Any] = []
    groups: list[list[str]] = []
    with HookSet() as hooks:
        for fqn, module in layers.items():
            hooks.forward(module, hook_for(fqn))
        for args, kwargs in calls:
            inputs.clear()
            with contextlib.suppress(_Captured):
                out = block(*args, **kwargs)
                if keep:
                    outputs.append(_hidden_out(out))
            groups = groups or _group_by_input(inputs)
    return stats, outputs, groups


def _group_by_input(inputs: Mapping[str, Any]) -> list[list[str]]:
    groups: list[list[str]] = []
    last: Any = None
    for fqn, x in inputs.items():
        if groups and x is last:
            groups[-1].append(fqn)
        else:
            groups.append([fqn])
        last = x
    return groups


class _Captured(Exception):
    """Raised by a hook to stop a forward pass once it has seen what it needs."""


def _plan(model: nn.Module, batches: list[Any]) -> tuple[list[tuple[str, nn.Module]], list[Call]]:
    """The blocks to run in order and the first block's inputs for every batch."""
    found = find_blocks(model)
    if found is not None and batches:
        prefix, stack = found
        calls = _capture(model, stack, batches)
        if calls is not None:
            return [(f"{prefix}.{i}" if prefix else str(i), b) for i, b in enumerate(stack)], calls
        logger.info("layerwise: %s is not run as a chain of blocks; using the whole model", prefix)
    return [("", model)], [model_call(model, b) for b in batches]


def _capture(model: nn.Module, stack: nn.ModuleList, batches: list[Any]) -> list[Call] | None:
    """Inputs of ``stack[0]`` for every batch, or None if the stack is not run as a chain."""
    if not _is_chain(model, stack, batches[0]):
        return None
    calls: list[Call] = []

    def grab(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append(_clean(args, kwargs))
        raise _Captured

    with HookSet() as hooks:
        hooks.forward_pre(stack[0], grab, with_kwargs=True)
        for batch in batches:
            args, kwargs = model_call(model, batch)
            with contextlib.suppress(_Captured):
                model(*args, **kwargs)
    return calls if len(calls) == len(batches) else None


def _is_chain(model: nn.Module, stack: nn.ModuleList, batch: Any) -> bool:
    """Whether, on ``batch``, each block runs once and feeds its output to the next block."""
    seen_in: dict[int, list[Any]] = {i: [] for i in range(len(stack))}
    seen_out: dict[int, list[Any]] = {i: [] for i in range(len(stack))}
    with HookSet() as hooks:
        for i, block in enumerate(stack):
            hooks.forward_pre(block, lambda m, a, k, i=i: seen_in[i].append(_hidden_in(a, k)),
                              with_kwargs=True)
            hooks.forward(block, lambda m, a, o, i=i: seen_out[i].append(_hidden_out(o)))
        args, kwargs = model_call(model, batch)
        model(*args, **kwargs)
    if any(len(seen_in[i]) != 1 or len(seen_out[i]) != 1 for i in seen_in):
        return False
    for i in range(len(stack) - 1):
        x, y = seen_out[i][0], seen_in[i + 1][0]
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            return False
        if x is not y and (x.shape != y.shape or not torch.equal(x, y)):
            return False
    return isinstance(seen_in[0][0], torch.Tensor)


def _clean(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
    """Drop cached keys/values and turn caching off, so calibration batches stay independent."""
    kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return tuple(args), kwargs


def _hidden_in(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    if args:
        return args[0]
    return kwargs.get("hidden_states")


def _hidden_out(output: Any) -> Any:
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def _with_hidden(call: Call, hidden: Any) -> Call:
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}
