"""ALBERT's factorised embedding: a (V, H) table becomes (V, E) codes and an E -> H projection."""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import torch
from torch import nn

from torchslim.core import Context, MethodConfig, Outcome, check, register, select, structure, surgery
from torchslim.errors import ConfigError, UnsupportedModuleError
from torchslim.sharing.modules import FactorizedEmbedding, FactorizedTiedHead

__all__ = ["EmbeddingFactorizationConfig", "apply", "embedding_factors"]

logger = logging.getLogger(__name__)
_NAME = "sharing.embedding"


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmbeddingFactorizationConfig(MethodConfig):
    """Factorise each embedding table into small per-token codes and one shared projection.

    Paper: Lan et al., "ALBERT: A Lite BERT for Self-supervised Learning of Language
    Representations", ICLR 2020, https://arxiv.org/abs/1909.11942

    Args:
        rank: The code width E: a fraction in (0, 1) of the embedding width H, or an integer
            in 1..H.
        targets: Embedding selectors: an fqn, ``re:<regex>`` or ``type:<ClassName>``.
        ignore: Selectors removed from ``targets``.

    Recipe:
        - method: sharing.embedding
          rank: 128

    Notes:
        An ``nn.Embedding`` (V, H) becomes a ``FactorizedEmbedding``: a (V, E) table followed
        by a bias-free E -> H projection, V*H parameters become E*(V + H). The factors are the
        truncated SVD of the table (the best rank-E approximation), so E = H would be exact and
        the error falls as E rises; a table where E*(V + H) >= V*H (E near H, or few rows such as
        BERT's token types) is left as it is with a warning. A padding row of zeros stays exactly
        zero and gets no gradient.
        Tied weights are factorised with the table, consistently: an output head
        ``nn.Linear(H, V)`` whose weight is the table (TinyLM, GPT-2, Hugging Face
        ``tie_word_embeddings``) becomes a ``FactorizedTiedHead``, ``logits = (h @ P) @ A^T``
        with the embedding's own codes A and projection P (the same parameters, also after
        ``torchslim.load``), and other ``nn.Embedding`` tables sharing the weight (encoder and
        decoder embeddings) share the factors. An embedding whose weight is held by any other
        kind of module, or with ``max_norm`` / ``sparse`` set, is left as it is with a warning.
        Below full rank the model changes: recover with a ``train`` block
        (``distillation.logits`` from the original); on all-MiniLM-L6-v2 (H = 384), E = 192 on
        the word table alone takes 22.7M parameters to 16.9M and the Lee Pearson from 0.656 to
        0.632 before any retraining (E = 128: 14.9M, 0.564). A lookup plus a small matmul runs
        about as fast as the lookup; a tied head costs E*(V + H) multiply-adds per token, not V*H.
    """

    name: ClassVar[str] = _NAME
    rank: float = 0.25
    targets: tuple[str, ...] = ("type:Embedding",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check(self.rank > 0 and (self.rank < 1 or float(self.rank).is_integer()),
              f"{_NAME}: rank must be a fraction in (0, 1) of the embedding width or an integer >= 1; "
              f"found {self.rank!r}")


def _width(rank: float, full: int, where: str) -> int:
    width = max(1, round(rank * full)) if rank < 1 else int(rank)
    if width > full:
        raise ConfigError(f"{_NAME}: rank {width} exceeds the width {full} of embedding {where}; "
                          f"expected at most {full}")
    return width


@torch.no_grad()
def embedding_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes (V, rank), proj (H, rank))`` with ``codes @ proj.T`` the truncated SVD of ``weight``."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()  # split the singular values evenly so both factors stay well scaled
    codes = weight.new_zeros(weight.shape[0], rank, dtype=torch.float64)
    proj = weight.new_zeros(weight.shape[1], rank, dtype=torch.float64)
    codes[:, :k] = u[:, :k] * root
    proj[:, :k] = (root[:, None] * vh[:k]).T
    codes[(weight == 0).all(dim=1)] = 0.0  # zero rows (padding) stay exactly zero
    return codes.to(weight.dtype), proj.to(weight.dtype)


def _partners(model: nn.Module, fqn: str, embedding: nn.Embedding) -> tuple[list[str], str | None]:
    """Other modules holding ``embedding.weight``, and why it cannot be factorised (or None)."""
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is embedding.weight]
    partners = []
    for name in names:
        owner, _, leaf = name.rpartition(".")
        if owner == fqn:
            continue
        module = model.get_submodule(owner)
        if leaf != "weight" or type(module) not in (nn.Embedding, nn.Linear) or not _plain(module):
            return [], f"{fqn} (weight tied to {name} of a {type(module).__name__})"
        partners.append(owner)
    return partners, None


def _plain(module: nn.Module) -> bool:
    return getattr(module, "max_norm", None) is None and not getattr(module, "sparse", False)


def _factorised(module: nn.Module, codes: torch.Tensor, proj: torch.Tensor) -> nn.Module:
    rank = codes.shape[1]
    new: FactorizedEmbedding | FactorizedTiedHead
    if isinstance(module, nn.Embedding):
        new = FactorizedEmbedding(module.num_embeddings, module.embedding_dim, rank, module.padding_idx)
    else:
        assert isinstance(module, nn.Linear)
        new = FactorizedTiedHead(module.in_features, module.out_features, rank, module.bias is not None)
        if module.bias is not None and new.bias is not None:
            with torch.no_grad():
                new.bias.copy_(module.bias)
    new.to(device=codes.device, dtype=codes.dtype)
    with torch.no_grad():
        new.weight.copy_(codes)
        new.proj.copy_(proj)
    return new.train(module.training)


def _swap(model: nn.Module, names: list[str], codes: torch.Tensor, proj: torch.Tensor) -> None:
    """Replace the embedding ``names[0]`` and its partners; the partners then share its factors."""
    group = [(f, model.get_submodule(f)) for f in names]
    surgery.replace_modules(model, group, lambda f, m: _factorised(m, codes, proj))
    if len(names) > 1:
        structure.tie_modules(model, names[0], names[1:], _NAME)


@register(EmbeddingFactorizationConfig)
def apply(model: nn.Module, cfg: EmbeddingFactorizationConfig, ctx: Context) -> Outcome:
    """Factorise every selected plain ``nn.Embedding`` and the modules tied to its weight."""
    found = sorted({type(m).__name__ for m in model.modules()})
    if not any(type(m) is nn.Embedding for m in model.modules()):
        raise UnsupportedModuleError(f"{_NAME}: expected a model with an nn.Embedding to factorise; "
                                     f"found only {', '.join(found)}")
    chosen = [(f, m) for f, m in select(model, cfg.targets, cfg.ignore) if type(m) is nn.Embedding]
    plans: dict[str, list[str]] = {}
    skipped, claimed = [], set()
    for fqn, embedding in chosen:
        if fqn in claimed:
            continue
        partners, problem = _partners(model, fqn, embedding)
        if problem is None and not _plain(embedding):
            problem = f"{fqn} (max_norm or sparse set)"
        if problem is not None:
            skipped.append(problem)
            continue
        plans[fqn] = partners
        claimed.update([fqn, *partners])
    if skipped:
        logger.warning("%s: %d embedding(s) left as they are: %s", _NAME, len(skipped), "; ".join(skipped))
    return _factorise(model, plans, cfg.rank)


def _factorise(model: nn.Module, plans: dict[str, list[str]], rank: float) -> Outcome:
    changes: dict[str, dict[str, object]] = {}
    layers: dict[str, dict[str, float]] = {}
    before = after = 0
    for fqn, partners in plans.items():
        embedding = model.get_submodule(fqn)
        assert isinstance(embedding, nn.Embedding)
        n_tokens, width = embedding.weight.shape
        code_width = _width(rank, width, fqn)
        if code_width * (n_tokens + width) >= n_tokens * width:
            logger.warning("%s: %s: rank %d would not reduce the %d x %d table's parameters; left as it is",
                           _NAME, fqn, code_width, n_tokens, width)
            continue
        codes, proj = embedding_factors(embedding.weight, code_width)
        table = embedding.weight.detach().double()
        relative = float((codes.double() @ proj.double().T - table).norm() / table.norm().clamp_min(1e-30))
        _swap(model, [fqn, *partners], codes, proj)
        changes[fqn] = {"tie": partners} if partners else {}
        changes.update({p: {} for p in partners})
        layers[fqn] = {"rank": float(code_width), "relative_error": round(relative, 6)}
        before, after = before + n_tokens * width, after + code_width * (n_tokens + width)
    ratio = round(after / before, 4) if before else 1.0
    return Outcome(model=model, touched=tuple(changes), structure=changes,
                   stats={"embeddings": len(layers), "weight_ratio": ratio}, layers=layers)
