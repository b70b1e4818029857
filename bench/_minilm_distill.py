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

import argparse
import copy
import random
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import torchslim as ts
from torchslim.distillation import FeatureDistillationConfig, LogitDistillationConfig
from torchslim.recipes import Recipe, Stage, TrainSpec
from torchslim.zoo import minilm

LAYERS = r"re:bert\.encoder\.layer\.\d+"


AUGMENTED = ("augmented: each epoch a fresh random crop of half of them and 10% of words replaced by random "
             "vocabulary words, when the training column says so")


def run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--threads`` and ``--augment``, which every MiniLM distillation bench takes."""
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 leaves a core to other work)")
    parser.add_argument("--augment", action="store_true",
                        help="fresh cropped / word-replaced variants of the sentences every epoch")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="train.precision: bf16 = mixed precision (bfloat16 autocast, float32 weights)")
    parser.add_argument("--replace", type=float, default=0.1, help="--augment: share of words replaced")
    parser.add_argument("--splice", type=float, default=0.0,
                        help="--augment: share of sentences joined with a span of another training sentence")


def run_flags(args: argparse.Namespace) -> str:
    """The ``run_arguments`` options of a run as they are typed, for a doc's reproduce line."""
    flags = " --augment" if args.augment else ""
    flags += f" --replace {args.replace:g}" if args.augment and args.replace != 0.1 else ""
    flags += f" --splice {args.splice:g}" if args.augment and args.splice else ""
    flags += " --precision bf16" if args.precision == "bf16" else ""
    return flags + (f" --threads {args.threads}" if args.threads != 2 else "")


def augmentation(args: argparse.Namespace) -> dict[str, float] | None:
    """The ``Augmented`` settings of a run's ``run_arguments`` (None without ``--augment``)."""
    return {"replace": args.replace, "splice": args.splice} if args.augment else None


def distill_arguments(parser: argparse.ArgumentParser, lr: float) -> None:
    """The command-line options of ``distill`` shared by the MiniLM compression benches."""
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--hidden-weight", type=float, default=1.0)
    run_arguments(parser)


def trained(info: dict[str, Any]) -> str:
    """The training column of a row distilled by ``distill``: time, epochs, lr, augmentation."""
    augmented = (", augmented" if info["augment"] else "") + (", bf16" if info.get("precision") == "bf16" else "")
    return f"{info['minutes']:.1f} min, {int(info['epochs'])} epochs, lr {info['lr']:g}{augmented}"


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


def recipe(epochs: int, lr: float, hidden_weight: float, precision: str = "fp32") -> Recipe:
    methods: tuple[Any, ...] = (LogitDistillationConfig(loss="cosine", alpha=1.0, temperature=1.0),)
    if hidden_weight > 0:
        methods += (FeatureDistillationConfig(mapping="uniform", targets=(LAYERS,), loss="cosine",
                                              weight=hidden_weight),)
    spec = TrainSpec(epochs=epochs, lr=lr, batch_size=32, optimizer="adamw", weight_decay=0.01,
                     precision="bf16" if precision == "bf16" else "fp32")
    return Recipe(stages=(Stage(name="distill", methods=methods, train=spec),), measure=())


def _run(student: nn.Module, teacher: nn.Module, data: Any, example: dict[str, torch.Tensor], epochs: int,
         lr: float, hidden_weight: float, precision: str) -> nn.Module:
    ctx = ts.Context(train_data=data, example_inputs=example, teacher=teacher, seed=0, progress=False)
    return ts.compress(student, recipe(epochs, lr, hidden_weight, precision), ctx).model


def distill(student: nn.Module, teacher: nn.Module, tok: Any, minutes: float, lr: float,
            hidden_weight: float = 1.0,
            augment: dict[str, float] | None = None, precision: str = "fp32") -> tuple[nn.Module, dict[str, Any]]:
    """``student`` distilled from ``teacher`` on Lee background sentences within ``minutes``.

    The epochs are the whole ones that fit in what is left of the budget (``epochs_within``).
    ``augment`` (``Augmented`` settings, see ``augmentation``) trains on fresh variants of the
    sentences every epoch instead of the same batches (timed on such variants too: cropped sentences are shorter).
    """
    started = time.perf_counter()
    sentences = list(minilm.lee_background_sentences())
    data = batches(tok, sentences)
    example = data[0][0]
    timed = list(Augmented(tok, sentences, seed=1, **augment)) if augment is not None else data
    epochs = epochs_within(
        lambda part: _run(copy.deepcopy(student), teacher, part, example, 1, lr, hidden_weight, precision),
        timed, lambda: minutes * 60 - (time.perf_counter() - started))
    train = Augmented(tok, sentences, **augment) if augment is not None else data
    model = _run(student, teacher, train, example, epochs, lr, hidden_weight, precision)
    return model.eval(), {"minutes": (time.perf_counter() - started) / 60, "epochs": float(epochs),
                          "lr": lr, "hidden_weight": hidden_weight, "augment": float(augment is not None), "precision": precision}


def epochs_within(train_on: Callable[[list[Any]], object], timed: list[Any], seconds: Callable[[], float]) -> int:
    """Whole epochs over batches like ``timed`` that fit in ``seconds()`` (read after timing; at least 1).

    ``train_on`` (one epoch of a copy of the student) runs on the first 2 and the first 10 of
    ``timed``: their difference times a token, the rest is the fixed cost of a run (hooks,
    probes, the record), which the budget also pays once. An epoch costs its tokens.
    """
    took = []
    for n in (2, 10):
        probe = time.perf_counter()
        train_on(timed[:n])
        took.append(time.perf_counter() - probe)
    per_token = max((took[1] - took[0]) / tokens(timed[2:10]), 1e-9)
    fixed = max(took[0] - per_token * tokens(timed[:2]), 0.0)
    epoch = per_token * tokens(timed)
    epochs = max(int(0.95 * (seconds() - fixed) / epoch), 1)
    print(f"{epoch:.0f} s per epoch ({len(timed)} batches) + {fixed:.1f} s per run -> {epochs} epochs", flush=True)
    return epochs


def tokens(data: list[tuple[dict[str, torch.Tensor], torch.Tensor]]) -> int:
    """Padded tokens in ``data``: what a pass over it costs, near enough."""
    return sum(int(inputs["input_ids"].numel()) for inputs, _ in data)


def score(model: nn.Module, original: nn.Module, tok: Any, reference: torch.Tensor,
          speed: bool = True) -> dict[str, float]:
    """Lee / WS-353 / SimLex, MR cosine to the original and (optionally) the encode speed-up."""
    model.eval()
    out = {**minilm.evaluate_minilm(model, tok), "mr_cosine": minilm.mr_fidelity(model, tok, reference)}
    out["speedup"] = minilm.encode_speedup(original, model, tok) if speed else float("nan")
    return out


class Augmented:
    """Fresh variants of the training sentences on every pass, batched like ``batches``.

    Each sentence becomes, with probability ``crop``, a random contiguous span of at least 30% of
    its words; with probability ``splice`` its first half is joined to a span of another training
    sentence; and then each word is replaced with probability ``replace`` by a random whole word
    of the tokenizer's vocabulary (TinyBERT-style augmentation without a masked-LM). The student
    so meets words in context that the Lee corpus lacks; no evaluation text is read.
    """

    def __init__(self, tok: Any, sentences: list[str], batch_size: int = 32, seed: int = 0,
                 crop: float = 0.5, replace: float = 0.1, splice: float = 0.0) -> None:
        self.tok, self.sentences, self.batch_size, self.seed = tok, sentences, batch_size, seed
        self.crop, self.replace, self.splice, self.passes = crop, replace, splice, 0
        self.words = sorted(w for w in tok.get_vocab() if w.isalpha() and len(w) >= 3)

    def __len__(self) -> int:
        return -(-len(self.sentences) // self.batch_size)

    def variant(self, sentence: str, rng: random.Random) -> str:
        words = sentence.split()
        if rng.random() < self.crop and len(words) > 4:
            words = self._span(words, rng)
        if rng.random() < self.splice:
            words = words[:max(1, len(words) // 2)] + self._span(rng.choice(self.sentences).split(), rng)
        return " ".join(rng.choice(self.words) if rng.random() < self.replace else w for w in words)

    @staticmethod
    def _span(words: list[str], rng: random.Random) -> list[str]:
        """A random contiguous span of at least 30% of ``words`` (all of a short sentence)."""
        if len(words) <= 4:
            return words
        size = rng.randint(max(4, int(0.3 * len(words))), len(words))
        start = rng.randint(0, len(words) - size)
        return words[start:start + size]

    def __iter__(self) -> Any:
        rng = random.Random(self.seed * 7919 + self.passes)
        self.passes += 1
        variants = [self.variant(s, rng) for s in self.sentences]
        return iter(batches(self.tok, variants, self.batch_size, seed=self.seed + self.passes))
