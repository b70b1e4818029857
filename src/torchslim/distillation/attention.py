"""Attention distillation: attention maps for CNNs, attention relations for transformers.

CNNs: Zagoruyko & Komodakis 2017, https://arxiv.org/abs/1612.03928.
Transformers: MiniLM (Wang et al. 2020, https://arxiv.org/abs/2002.10957) and its relation
heads (MiniLM-v2, https://arxiv.org/abs/2012.15828).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, Step, TrainedMethod, check, register, select
from torchslim.distillation._outputs import frozen_teacher
from torchslim.distillation._qkv import QKVRecorder, head_count, is_attention
from torchslim.distillation._taps import (
    Recorder,
    Tap,
    find_module,
    map_layers,
    parse_pairs,
    removed_on_error,
)
from torchslim.distillation.losses import attention_transfer_loss, relation_kl, relation_log_probs
from torchslim.errors import ConfigError, DataError, UnsupportedModuleError

__all__ = ["AttentionDistillation", "AttentionDistillationConfig", "RELATIONS"]

logger = logging.getLogger(__name__)

_NAME = "distillation.attention"
RELATIONS = ("qk", "vv", "qq", "kk")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionDistillationConfig(MethodConfig):
    """Match where the student attends to where the teacher attends.

    Paper: Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017,
    https://arxiv.org/abs/1612.03928; Wang et al., "MiniLM", NeurIPS 2020,
    https://arxiv.org/abs/2002.10957 and "MiniLMv2", https://arxiv.org/abs/2012.15828

    Args:
        pairs: ``"student_fqn:teacher_fqn"`` (or one fqn for both): attention modules of
            transformers, or feature-map layers of CNNs. Empty: chosen by ``mapping``.
        mapping: ``auto``: the last attention module of each model (MiniLM) or, for CNNs,
            every top-level child containing a convolution, spread uniformly (AT); with
            ``targets``, ``uniform``. ``uniform`` / ``last``: pair the ``targets`` layers of
            the student with the teacher's evenly spread / last ones.
        targets: Selectors of the layers to pair, applied to both models.
        relations: Transformer relations, summed: ``qk`` (attention distributions), ``vv``
            (value relations), ``qq``, ``kk`` (MiniLM-v2).
        heads: Relation heads: queries, keys and values of both models are split into this
            many heads, so head counts may differ. 0: the student's head count.
        weight: Multiplier on the loss (the mean over pairs), added to the task loss.

    Recipe:
        - method: distillation.attention
          relations: [qk, vv]
          heads: 4
          weight: 1.0

    Lifecycle:
        on_start: hooks record, on the student and the teacher, the queries, keys and values
            of attention modules (``nn.MultiheadAttention`` inputs are projected again with
            its weights; Linear ``query/key/value``-style children are read) or the outputs
            of CNN layers.
        extra_loss: transformers: ``KL(teacher || student)`` of each relation's
            ``softmax(X_r Y_r^T / sqrt(d_r))`` over relation heads, padding left out; CNNs:
            squared distance of the normalised maps ``mean_c F_c^2``. The teacher's side
            comes from its one shared pass per step, without gradients.
        on_end: removes every hook.

    Notes:
        Sequence lengths of teacher and student must agree (same tokenizer), as must the
        spatial sizes of paired CNN maps (channels may differ). Padding comes from
        ``key_padding_mask``/``attn_mask`` of ``nn.MultiheadAttention`` or from an
        ``attention_mask`` entry of dict inputs; causal models are masked when the attention
        module has ``is_causal = True``. Fused qkv projections (GPT-2 ``c_attn``) are not
        supported. No extra parameters are trained.
    """

    name: ClassVar[str] = _NAME
    pairs: tuple[str, ...] = ()
    mapping: Literal["auto", "uniform", "last"] = "auto"
    targets: tuple[str, ...] = ()
    relations: tuple[str, ...] = ("qk", "vv")
    heads: int = 0
    weight: float = 1.0

    def __post_init__(self) -> None:
        check(self.weight >= 0, f"{_NAME}: weight must be >= 0, got {self.weight}")
        check(self.heads >= 0, f"{_NAME}: heads must be >= 0 (0 = the student's), got {self.heads}")
        check(bool(self.relations), f"{_NAME}: relations must name at least one of {list(RELATIONS)}")
        for rel in self.relations:
            check(rel in RELATIONS, f"{_NAME}: unknown relation {rel!r}; expected one of {list(RELATIONS)}")
        check(self.mapping in ("auto", "uniform", "last"),
              f"{_NAME}: mapping must be auto, uniform or last, got {self.mapping!r}")
        parse_pairs(self.pairs, _NAME)


def _conv_stages(model: nn.Module) -> list[str]:
    return [name for name, child in model.named_children()
            if any(isinstance(m, nn.Conv2d) for m in child.modules())]


def _candidates(model: nn.Module, cfg: AttentionDistillationConfig) -> tuple[list[str], bool]:
    """(layer fqns, whether they were found automatically among attention modules)."""
    if cfg.targets:
        return [n for n, _ in select(model, cfg.targets)], False
    found = [n for n, m in model.named_modules() if n and is_attention(m)]
    return (found, True) if found else (_conv_stages(model), False)


def _pairs(model: nn.Module, teacher: nn.Module, cfg: AttentionDistillationConfig) -> list[tuple[str, str]]:
    if cfg.pairs:
        return parse_pairs(cfg.pairs, _NAME)
    (s_names, s_attention), (t_names, _) = _candidates(model, cfg), _candidates(teacher, cfg)
    if not s_names or not t_names:
        raise UnsupportedModuleError(
            f"{_NAME}: expected attention modules (nn.MultiheadAttention or query/key/value "
            f"children) or convolution stages, found {len(s_names)} in the student "
            f"({type(model).__name__}) and {len(t_names)} in the teacher; name layers with 'pairs' "
            "or use distillation.features for models without attention or feature maps")
    if cfg.mapping == "auto" and s_attention:
        return [(s_names[-1], t_names[-1])]  # MiniLM: the last layer only
    rule: Literal["uniform", "last"] = "last" if cfg.mapping == "last" else "uniform"
    index = map_layers(len(s_names), len(t_names), rule)
    return [(s, t_names[j]) for s, j in zip(s_names, index)]


@register(AttentionDistillationConfig)
class AttentionDistillation(TrainedMethod):
    """Adds attention-map (CNN) or attention-relation (transformer) losses."""

    needs_teacher = True
    cfg: AttentionDistillationConfig

    def __init__(self, cfg: AttentionDistillationConfig) -> None:
        super().__init__(cfg)
        self._maps = (Recorder(_NAME), Recorder(_NAME))
        self._qkv = (QKVRecorder(_NAME), QKVRecorder(_NAME))
        self._keys: list[tuple[str, str]] = []  # (key, "relations" | "maps")
        self._heads: dict[str, int] = {}

    def on_start(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Hook the paired layers of student and teacher."""
        teacher = frozen_teacher(ctx, model, _NAME)
        with removed_on_error(*self._maps, *self._qkv):
            for s_fqn, t_fqn in _pairs(model, teacher, self.cfg):
                self._tap(model, teacher, s_fqn, t_fqn)
        logger.info("%s: pairs %s", _NAME, [k for k, _ in self._keys])
        return model

    def _tap(self, model: nn.Module, teacher: nn.Module, s_fqn: str, t_fqn: str) -> None:
        key = f"{s_fqn}:{t_fqn}"
        s_mod = find_module(model, s_fqn, _NAME, "student")
        t_mod = find_module(teacher, t_fqn, _NAME, "teacher")
        if is_attention(s_mod) != is_attention(t_mod):
            raise ConfigError(f"{_NAME} pair {key!r}: one side is an attention module and the other "
                              "is not; pair attention with attention, or feature maps with maps")
        if is_attention(s_mod):
            self._qkv[0].tap(model, s_fqn, key, "student")
            self._qkv[1].tap(teacher, t_fqn, key, "teacher")
            self._heads[key] = self._head_count(s_mod, key)
            self._keys.append((key, "relations"))
        else:
            self._maps[0].tap(model, Tap(s_fqn), key, "student")
            self._maps[1].tap(teacher, Tap(t_fqn), key, "teacher")
            self._keys.append((key, "maps"))

    def _head_count(self, module: nn.Module, key: str) -> int:
        heads = self.cfg.heads or head_count(module)
        if heads is None:
            raise ConfigError(f"{_NAME} pair {key!r}: cannot read the student's head count from "
                              f"{type(module).__name__}; set 'heads'")
        return heads

    def extra_loss(self, step: Step) -> torch.Tensor:
        """``weight * mean over pairs`` of the relation or map losses."""
        with removed_on_error(*self._maps, *self._qkv):
            step.teacher_outputs()  # the shared teacher pass fills the teacher's hooks
            terms = [self._map_loss(key) if kind == "maps" else self._relation_loss(key, step)
                     for key, kind in self._keys]
        return self.cfg.weight * torch.stack(terms).mean()

    def _map_loss(self, key: str) -> torch.Tensor:
        s, t = self._maps[0].get(key, "student"), self._maps[1].get(key, "teacher")
        _check_maps(s, t, key)
        return attention_transfer_loss(s, t)

    def _relation_loss(self, key: str, step: Step) -> torch.Tensor:
        s = self._qkv[0].get(key, "student", step.inputs)
        t = self._qkv[1].get(key, "teacher", step.inputs)
        heads = self._heads[key]
        if s.q.shape[:2] != t.q.shape[:2]:
            raise DataError(f"{_NAME} pair {key!r}: student queries {tuple(s.q.shape)} and teacher "
                            f"queries {tuple(t.q.shape)} differ in batch or sequence length")
        for side, cap in (("student", s), ("teacher", t)):
            if cap.q.shape[-1] % heads or cap.v.shape[-1] % heads:
                raise ConfigError(f"{_NAME} pair {key!r}: {heads} relation heads do not divide the "
                                  f"{side}'s width {cap.q.shape[-1]}; set 'heads' to a common divisor")
        loss = s.q.new_zeros(())
        for rel in self.cfg.relations:
            a, b = _operands(rel)
            ls = relation_log_probs(getattr(s, a), getattr(s, b), heads, allowed=s.allowed)
            lt = relation_log_probs(getattr(t, a), getattr(t, b), heads, allowed=t.allowed)
            loss = loss + relation_kl(ls, lt, query_mask=s.query_mask)
        return loss

    def on_step(self, step: Step) -> None:
        """Drop this step's captures."""
        for rec in (*self._maps, *self._qkv):
            rec.clear()

    def on_end(self, model: nn.Module, ctx: Context) -> Outcome:
        """Remove every hook."""
        for rec in (*self._maps, *self._qkv):
            rec.remove()
        touched = tuple(key.split(":")[0] for key, _ in self._keys)
        return Outcome(model=model, touched=touched, stats={"pairs": float(len(self._keys))})


def _operands(relation: str) -> Sequence[str]:
    return relation[0], relation[1]


def _check_maps(student: torch.Tensor, teacher: torch.Tensor, key: str) -> None:
    if student.dim() != 4 or teacher.dim() != 4:
        raise DataError(f"{_NAME} pair {key!r}: attention maps need (B, C, H, W) activations, found "
                        f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)}; for "
                        "transformers name attention modules")
