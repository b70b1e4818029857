"""Hugging Face model folders: the ``hf:<folder>`` model spec, offline.

A folder is read the way ``from_pretrained`` reads it, with the hub switched off:

- ``config.json`` naming a ``*ForCausalLM`` architecture: ``AutoModelForCausalLM``;
- ``config.json`` and ``modules.json`` (a sentence-transformers checkpoint): its transformer
  wrapped with the checkpoint's mean pooling and L2 normalisation (``zoo.minilm.MiniLMEncoder``),
  a plain module taking ``(input_ids, attention_mask)``;
- any other ``config.json``: ``AutoModel``;
- no ``config.json`` but exactly one ``.gguf`` file (e.g. the SmolLM2 package): a causal LM
  dequantised to fp32 by transformers.

``build`` rebuilds the architecture from the config alone (random weights, no weight file read).
A folder written by torchslim from such a model (``structure.json`` beside ``config.json``)
resolves to the compressed model. ``copy_assets`` puts the config and tokenizer files beside
a compressed model's weights so the folder is self-describing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.errors import ModelError

__all__ = ["HFSource", "build_model", "copy_assets", "generate", "inspect_folder", "load_model",
           "load_tokenizer", "resolve_hf", "save"]

CONFIG, MODULES = "config.json", "modules.json"
# Files a folder needs besides the weights: config, generation settings, tokenizer, sentence head.
ASSET_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
               "tokenizer.model", "spiece.model", "chat_template.jinja", "modules.json",
               "sentence_bert_config.json", "config_sentence_transformers.json")
ASSET_DIRS = ("1_Pooling", "2_Normalize")


@dataclasses.dataclass(frozen=True)
class HFSource:
    """What an ``hf:`` folder holds.

    Attributes:
        spec: The model spec, for messages.
        folder: The folder.
        kind: ``causal_lm``, ``sentence`` or ``base``.
        gguf_file: The single ``.gguf`` file when the folder has no ``config.json``.
        compressed: The folder was written by ``torchslim.save`` (holds ``structure.json``).
    """

    spec: str
    folder: Path
    kind: str
    gguf_file: str | None = None
    compressed: bool = False

    def kwargs(self) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments (the GGUF file name)."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def inspect_folder(spec: str, folder: str | Path) -> HFSource:
    """Classify ``folder``; raise ModelError naming it when it is not a model folder."""
    path = Path(folder).expanduser()
    if not str(folder):
        raise ModelError(f"model spec {spec!r}: expected hf:<folder> (a Hugging Face model folder)")
    if not path.is_dir():
        raise ModelError(f"model spec {spec!r}: folder {path} does not exist (expected a Hugging Face "
                         "model folder with config.json)")
    if not (path / CONFIG).is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return HFSource(spec, path, "causal_lm", gguf_file=ggufs[0])
        found = sorted(p.name for p in path.iterdir())[:12]
        raise ModelError(f"model spec {spec!r}: {path} has no {CONFIG} (nor exactly one .gguf file); "
                         f"found {found}")
    try:
        config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model spec {spec!r}: {path / CONFIG} is not readable JSON ({exc})") from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelError(f"model spec {spec!r}: {path / CONFIG} has no 'model_type' entry "
                         "(expected a transformers config)")
    archs = config.get("architectures") or []
    kind = ("sentence" if (path / MODULES).is_file()
            else "causal_lm" if any(str(a).endswith("ForCausalLM") for a in archs) else "base")
    return HFSource(spec, path, kind, compressed=(path / "structure.json").is_file())


def _pooling(src: HFSource) -> None:
    """Sentence-transformers checkpoints: only mean pooling is wrapped (MiniLMEncoder)."""
    for pool in sorted(src.folder.glob("*_Pooling/config.json")):
        modes = json.loads(pool.read_text(encoding="utf-8"))
        active = [k for k, v in modes.items() if k.startswith("pooling_mode_") and v is True]
        if active != ["pooling_mode_mean_tokens"]:
            raise ModelError(f"model spec {src.spec!r}: {pool} asks for {active}; only mean pooling "
                             "(pooling_mode_mean_tokens) is supported")


def _wrap(src: HFSource, model: nn.Module) -> nn.Module:
    if src.kind != "sentence":
        return model
    from torchslim.zoo.minilm import MiniLMEncoder

    _pooling(src)
    return MiniLMEncoder(model)


def _auto(src: HFSource) -> Any:
    _offline()
    import transformers

    return transformers.AutoModelForCausalLM if src.kind == "causal_lm" else transformers.AutoModel


def build_model(src: HFSource) -> nn.Module:
    """The architecture of ``src`` from its config alone, with fresh random fp32 weights."""
    _offline()
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(src.folder), **src.kwargs())
        model = _auto(src).from_config(config, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"model spec {src.spec!r}: cannot build the model from {src.folder} "
                         f"({type(exc).__name__}: {exc})") from exc
    return _wrap(src, model).eval()


def load_model(src: HFSource) -> nn.Module:
    """The pretrained model of ``src`` in eval mode (fp32); a torchslim folder is rebuilt."""
    if src.compressed:
        from torchslim.export.checkpoint import load

        return load(src.folder, functools.partial(build_model, src))
    try:
        model = _auto(src).from_pretrained(str(src.folder), dtype=torch.float32, **src.kwargs())
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"model spec {src.spec!r}: cannot load the weights in {src.folder} "
                         f"({type(exc).__name__}: {exc})") from exc
    return _wrap(src, model).eval()


def resolve_hf(spec: str, folder: str, *, pretrained: bool,
               seed: int) -> tuple[nn.Module, Callable[[], nn.Module]]:
    """``(model, build)`` for ``hf:<folder>``; see the module docstring."""
    src = inspect_folder(spec, folder)
    build: Callable[[], nn.Module] = functools.partial(build_model, src)
    if src.compressed:
        build = functools.partial(load_model, src)  # the compressed architecture
    if pretrained:
        return load_model(src), build
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(), build


def load_tokenizer(src: HFSource) -> Any:
    """The folder's tokenizer (``AutoTokenizer``; read from the GGUF file when there is one)."""
    _offline()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(src.folder), **src.kwargs())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"model spec {src.spec!r}: no usable tokenizer in {src.folder} "
                         f"({type(exc).__name__}: {exc})") from exc


def copy_assets(src: HFSource, out: Path, tokenizer: Any = None) -> list[str]:
    """Put ``src``'s config and tokenizer files into ``out``; return the names written.

    Files are copied as they are. A GGUF source has none: its config is written with
    ``save_pretrained`` and so is ``tokenizer`` when given (else it is loaded from the file).
    """
    written: list[str] = []
    if src.gguf_file:
        _offline()
        from transformers import AutoConfig

        before = set(p.name for p in out.iterdir())
        AutoConfig.from_pretrained(str(src.folder), **src.kwargs()).save_pretrained(str(out))
        (tokenizer if tokenizer is not None else load_tokenizer(src)).save_pretrained(str(out))
        return sorted(set(p.name for p in out.iterdir()) - before)
    for name in ASSET_FILES:
        if (src.folder / name).is_file() and src.folder.resolve() != out.resolve():
            shutil.copyfile(src.folder / name, out / name)
            written.append(name)
    for name in ASSET_DIRS:
        if (src.folder / name).is_dir() and src.folder.resolve() != out.resolve():
            shutil.copytree(src.folder / name, out / name, dirs_exist_ok=True)
            written.append(name + "/")
    return written


def save(result: Any, folder: str | Path, source: str | Path, *, overwrite: bool = False) -> Path:
    """``torchslim.save`` plus the config and tokenizer files of the ``source`` model folder.

    The folder then loads back with ``resolve_model("hf:<folder>")`` (or ``torchslim.load``
    with ``build=functools.partial(build_model, inspect_folder("", folder))``).
    """
    from torchslim.export.checkpoint import save as save_run

    out = save_run(result, folder, overwrite=overwrite)
    copy_assets(inspect_folder(f"hf:{source}", source), out)
    return out


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 24) -> str:
    """A greedy continuation of ``prompt`` (the new text only), with ``model.generate``."""
    if not hasattr(model, "generate"):
        raise ModelError(f"{type(model).__name__} has no generate(); expected a causal LM")
    ids = tokenizer(prompt, return_tensors="pt")
    run: Callable[..., torch.Tensor] = getattr(model, "generate")  # noqa: B009 (nn.Module typing)
    out = run(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    text: str = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    return text
