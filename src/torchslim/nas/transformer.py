"""The Transformer search space: students sliced from the trained model, then briefly distilled.

A space lists the depths, attention heads per layer and FFN widths a student may have; a
``TransformerArch`` is one pick. A student is the model itself cut down by registered pruning
methods, applied by key (never imported):

- ``pruning.layers`` keeps ``layers`` of the stacked blocks (Block Influence on calibration data
  picks which);
- ``pruning.heads`` keeps ``heads`` heads in every attention layer (``head_importance``);
- ``pruning.channel`` keeps ``ffn`` channels of every FFN (``ffn_targets``: the FFN's first
  projection; the second projection loses the matching inputs);
- ``pruning.channel`` with ``outputs: prune`` keeps ``hidden`` channels of the residual stream
  (``hidden_targets``: every layer writing to it, i.e. the embedding tables and each residual
  branch's output projection; the norms, every reader and the model's output follow).

The model's sizes come from its Hugging Face config (``num_hidden_layers``,
``num_attention_heads``, ``intermediate_size``, ``hidden_size``), found on the model or any
submodule (a sentence encoder wrapping a BERT, a causal LM). This is how the field finds smaller
BERT and LLM students (DynaBERT, AutoTinyBERT, Minitron): slice the teacher, distill, compare.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from torch import nn

from torchslim.core import Context, check
from torchslim.errors import ConfigError, UnsupportedModuleError
from torchslim.nas._registry import apply_by_key, merge_structure
from torchslim.nas.spaces import GeneSpace

__all__ = ["ModelDims", "TransformerArch", "TransformerSpace", "model_dims", "slice_student"]

_WHERE = "space"


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """The sizes of a Transformer: stacked layers, heads per layer, FFN width, hidden size."""

    layers: int
    heads: int
    ffn: int
    hidden: int

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.hidden // self.heads


def model_dims(model: nn.Module) -> ModelDims:
    """The sizes of ``model`` from the first Hugging Face-style ``config`` on it or a submodule.

    Raises:
        UnsupportedModuleError: no module carries a config with the four sizes.
    """
    names = ("num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_size")
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and all(isinstance(getattr(config, n, None), int) for n in names):
            return ModelDims(*(int(getattr(config, n)) for n in names))
    raise UnsupportedModuleError(
        "nas.search: a transformer space needs a model with a Hugging Face-style config "
        f"({', '.join(names)}) on it or a submodule; found none in a {type(model).__name__}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerArch:
    """One student: layers kept, heads per layer, FFN width, hidden size (None: the model's)."""

    layers: int
    heads: int
    ffn: int
    hidden: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data; ``TransformerArch(**arch.to_dict())`` rebuilds it."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerSpace(GeneSpace):
    """Choices for students sliced from a Transformer (``kind: transformer`` in a recipe).

    Args:
        layers: Numbers of stacked layers a student keeps.
        heads: Attention heads per layer a student keeps.
        ffn: FFN widths (channels of the FFN's first projection) a student keeps.
        ffn_targets: Selectors of the FFN's first projections (``pruning.channel`` targets);
            the default matches BERT-style ``intermediate.dense``. Llama-style models:
            ``["re:.*mlp\\.up_proj$"]`` (the gate follows).
        head_importance: How ``pruning.heads`` ranks heads: ``l1``, ``taylor`` or ``output``
            (the last two read calibration data).
        hidden: Hidden sizes (residual stream width) a student may have; empty: the model's.
            A narrower student's sentence embedding or last hidden state is narrower too, so
            distil it with ``distillation.features`` (learned projections), not a loss that
            compares outputs of equal width.
        hidden_targets: Selectors of every layer writing to the residual stream; the
            default fits BERT (embedding tables, ``attention.output.dense``,
            ``output.dense``). Llama-style models: ``["type:Embedding",
            "re:.*(o_proj|down_proj)$", "lm_head"]`` (a head tied to the embedding table
            shares its tensor, so it must be listed too).
    """

    kind: Literal["transformer"] = "transformer"
    layers: tuple[int, ...] = (2, 3, 4, 6)
    heads: tuple[int, ...] = (4, 8, 12)
    ffn: tuple[int, ...] = (384, 768, 1536)
    ffn_targets: tuple[str, ...] = (r"re:.*\.intermediate\.dense$",)
    head_importance: Literal["l1", "taylor", "output"] = "l1"
    hidden: tuple[int, ...] = ()
    hidden_targets: tuple[str, ...] = ("type:Embedding", r"re:.*\.output\.dense$")

    def __post_init__(self) -> None:
        self._check_choices("layers", "heads", "ffn")
        check(len(set(self.hidden)) == len(self.hidden),
              f"{_WHERE}.hidden: expected distinct choices, found {list(self.hidden)}")
        for field in ("layers", "heads", "ffn", "hidden"):
            values = getattr(self, field)
            check(all(v >= 1 for v in values),
                  f"{_WHERE}.{field}: expected choices >= 1, found {list(values)}")
        check(len(self.ffn_targets) > 0, f"{_WHERE}.ffn_targets: expected at least one selector, found none")
        check(not self.hidden or len(self.hidden_targets) > 0,
              f"{_WHERE}.hidden_targets: expected at least one selector with hidden choices, found none")

    def genes(self) -> dict[str, tuple[Any, ...]]:
        """Parameter name -> choices: ``layers``, ``heads``, ``ffn`` and, when listed, ``hidden``."""
        genes: dict[str, tuple[Any, ...]] = {"layers": self.layers, "heads": self.heads, "ffn": self.ffn}
        return {**genes, "hidden": self.hidden} if self.hidden else genes

    def arch(self, params: Mapping[str, Any]) -> TransformerArch:
        """The student of one pick of every gene."""
        hidden = params.get("hidden")
        return TransformerArch(layers=int(params["layers"]), heads=int(params["heads"]),
                               ffn=int(params["ffn"]), hidden=None if hidden is None else int(hidden))

    def check_model(self, dims: ModelDims) -> None:
        """Raise ConfigError when a choice exceeds what the model has (a student is a slice of it)."""
        sizes = (("layers", dims.layers), ("heads", dims.heads), ("ffn", dims.ffn), ("hidden", dims.hidden))
        for field, have in sizes:
            too_large = [v for v in getattr(self, field) if v > have]
            if too_large:
                raise ConfigError(f"{_WHERE}.{field}: {too_large} exceed the model's {have} {field} "
                                  f"(a student is sliced from the model); expected choices <= {have}")


def slice_student(model: nn.Module, arch: TransformerArch, space: TransformerSpace,
                  ctx: Context) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
    """A copy of ``model`` cut down to ``arch`` by the registered pruning methods, and its structure."""
    dims = model_dims(model)
    student = copy.deepcopy(model)
    steps: list[dict[str, Any]] = []
    if arch.layers < dims.layers:
        steps.append({"method": "pruning.layers", "ratio": (dims.layers - arch.layers) / dims.layers})
    if arch.heads < dims.heads:
        steps.append({"method": "pruning.heads", "ratio": (dims.heads - arch.heads) / dims.heads,
                      "importance": space.head_importance})
    if arch.ffn < dims.ffn:
        steps.append({"method": "pruning.channel", "ratio": (dims.ffn - arch.ffn) / dims.ffn,
                      "targets": list(space.ffn_targets), "importance": "l2"})
    if arch.hidden is not None and arch.hidden < dims.hidden:
        steps.append({"method": "pruning.channel", "ratio": (dims.hidden - arch.hidden) / dims.hidden,
                      "targets": list(space.hidden_targets), "importance": "l2", "outputs": "prune"})
    structure: dict[str, dict[str, Any]] = {}
    for raw in steps:
        outcome = apply_by_key(student, raw, ctx, "nas.search")
        student = outcome.model
        merge_structure(structure, outcome.structure)
    return student, structure  # pruning.channel set config.hidden_size (model_dims reads it)
