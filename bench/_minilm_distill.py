"""Shared by the MiniLM compression benches: distil a compressed encoder back towards the original.

Training text is the Lee background corpus only (``minilm.lee_background_sentences``); the Lee 50
documents, MR sentences, WordSim-353 and SimLex are evaluation only. The student keeps the
teacher's 6 layers, so hidden states are matched layer for layer (``distillation.features``,
cosine, ``uniform`` mapping = identity here) together with the pooled, normalised sentence
embedding (``distillation.logits`` with ``loss: cosine``). The number of epochs is set from a
timed pass of a few batches so the whole distillation (timing pass included) stays inside a
wall-clock budget.
"""

from __future__ import annotations

import copy
import random
import time
from typing import Any

import torch
from torch import nn

import torchslim as ts
from torchslim.distillation import FeatureDistillationConfig, LogitDistillationConfig
from torchslim.recipes import Recipe, Stage, TrainSpec
from torchslim.zoo import minilm

LAYERS = r"re:bert\.encoder\.layer\.\d+"


def batches(tok: Any, sentences: list[str], batch_size: int = 32,
            seed: int = 0) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Length-bucketed, dynamically padded batches in a seeded order (targets unused: no labels)."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(chunks)
    out = []
    for chunk in chunks:
        ids, mask = minilm.tokenize(tok, [sentences[i] for i in chunk])
        out.append(({"input_ids": ids, "attention_mask": mask}, torch.zeros(len(chunk), dtype=torch.long)))
    return out


def recipe(epochs: int, lr: float, hidden_weight: float) -> Recipe:
    methods: tuple[Any, ...] = (LogitDistillationConfig(loss="cosine", alpha=1.0, temperature=1.0),)
    if hidden_weight > 0:
        methods += (FeatureDistillationConfig(mapping="uniform", targets=(LAYERS,), loss="cosine",
                                              weight=hidden_weight),)
    spec = TrainSpec(epochs=epochs, lr=lr, batch_size=32, optimizer="adamw", weight_decay=0.01)
    return Recipe(stages=(Stage(name="distill", methods=methods, train=spec),), measure=())


def _run(student: nn.Module, teacher: nn.Module, data: list[Any], epochs: int, lr: float,
         hidden_weight: float) -> nn.Module:
    ctx = ts.Context(train_data=data, example_inputs=data[0][0], teacher=teacher, seed=0, progress=False)
    return ts.compress(student, recipe(epochs, lr, hidden_weight), ctx).model


def distill(student: nn.Module, teacher: nn.Module, tok: Any, minutes: float, lr: float,
            hidden_weight: float = 1.0) -> tuple[nn.Module, dict[str, float]]:
    """``student`` distilled from ``teacher`` on Lee background sentences within ``minutes``.

    Copies of the student first train on 2 and on 10 batches: their difference times a batch,
    the rest is the fixed cost of a run (hooks, probes, the record). The epochs are then the whole
    ones that fit in what is left of the budget (at least one).
    """
    started = time.perf_counter()
    data = batches(tok, list(minilm.lee_background_sentences()))
    took = []
    for n in (2, 10):
        probe = time.perf_counter()
        _run(copy.deepcopy(student), teacher, data[:n], 1, lr, hidden_weight)
        took.append(time.perf_counter() - probe)
    per_batch = max((took[1] - took[0]) / 8, 1e-3)
    fixed = max(took[0] - 2 * per_batch, 0.0)
    left = minutes * 60 - (time.perf_counter() - started) - fixed
    epochs = max(int(0.95 * left / (per_batch * len(data))), 1)
    print(f"{per_batch:.3f} s per batch + {fixed:.1f} s per run, {len(data)} batches -> {epochs} epochs "
          f"in {minutes} minutes", flush=True)
    model = _run(student, teacher, data, epochs, lr, hidden_weight)
    return model.eval(), {"minutes": (time.perf_counter() - started) / 60, "epochs": float(epochs),
                          "lr": lr, "hidden_weight": hidden_weight}


def score(model: nn.Module, original: nn.Module, tok: Any, reference: torch.Tensor,
          speed: bool = True) -> dict[str, float]:
    """Lee / WS-353 / SimLex, MR cosine to the original and (optionally) the encode speed-up."""
    model.eval()
    out = {**minilm.evaluate_minilm(model, tok), "mr_cosine": minilm.mr_fidelity(model, tok, reference)}
    out["speedup"] = minilm.encode_speedup(original, model, tok) if speed else float("nan")
    return out
