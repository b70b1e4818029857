"""Model and data specs used by recipes and the CLI: ``zoo:``, ``torchvision:``, ``hf:`` and ``py:``.

``resolve_model(spec)`` returns the model plus a zero-argument ``build`` that rebuilds the same
architecture (``ts.load`` uses it before loading compressed weights). ``resolve_data(spec)``
returns the train/test splits, example inputs, calibration batches and an ``eval_fn``.
Optional libraries (torchvision, scikit-learn, transformers) are imported only when a spec
needs them. Text data (``zoo:lee_windows``, ``zoo:lee_similarity``) is tokenized with the
tokenizer of the ``hf:`` model it is used with, so ``resolve_data`` takes the model spec too.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from torchslim.core.config import closest
from torchslim.core.context import Context
from torchslim.errors import DataError, ModelError

__all__ = ["MODEL_SCHEMES", "DataBundle", "resolve_data", "resolve_model"]

logger = logging.getLogger(__name__)

MODEL_SCHEMES = {
    "zoo": "zoo:<name> (a bundled model, e.g. zoo:fashion_cnn)",
    "torchvision": "torchvision:<name>[?weights=<file>&num_classes=<n>]",
    "hf": "hf:<folder> (a Hugging Face model folder: config.json, or a single .gguf file)",
    "py": "py:<package.module>:<function> (called with no arguments)",
}
QUICK_TRAIN, QUICK_TEST = 5_000, 2_000  # sample counts of the --quick data slices
CALIB_SAMPLES, CALIB_BATCH = 512, 64

Build = Callable[[], nn.Module]


@dataclasses.dataclass(frozen=True)
class _Options:
    pretrained: bool
    quick: bool
    progress: bool
    seed: int


def resolve_model(spec: str, *, pretrained: bool = True, quick: bool = False, progress: bool = False,
                  seed: int = 0) -> tuple[nn.Module, Build]:
    """The model named by ``spec`` and a factory rebuilding its architecture.

    Args:
        spec: ``zoo:<name>``, ``torchvision:<name>[?weights=<file>&num_classes=<n>]``,
            ``hf:<folder>`` (see ``torchslim.hf``) or ``py:<package.module>:<function>``.
        pretrained: Load or train the weights; False returns freshly initialised weights
            (enough when only the architecture is needed).
        quick: For ``zoo:fashion_cnn`` without a cached fully trained model, train a quick
            one (one epoch on 12,000 images) instead.
        progress: Show a progress bar while training a zoo model.
        seed: Seed of the initialisation (and of training a zoo model).

    Raises:
        ModelError: unknown scheme or name, missing module, attribute or weights file.
    """
    scheme, sep, rest = spec.partition(":")
    if not sep or scheme not in _RESOLVERS:
        raise ModelError(f"model spec {spec!r}: unknown scheme {scheme if sep else spec!r}; "
                         f"expected one of: {'; '.join(MODEL_SCHEMES.values())}")
    return _RESOLVERS[scheme](spec, rest, _Options(pretrained, quick, progress, seed))


def _seeded(build: Build, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # reproducible init, caller's RNG untouched
        torch.manual_seed(seed)
        return build()


def _zoo(spec: str, name: str, opts: _Options) -> tuple[nn.Module, Build]:
    from torchslim.zoo import models, pretrained

    if name not in models.MODELS:
        raise ModelError(f"model spec {spec!r}: unknown zoo model {name!r}{closest(name, models.MODELS)}; "
                         f"known: {', '.join(sorted(models.MODELS))}")
    build: Build = functools.partial(models.build_model, name)
    if name == "fashion_cnn" and opts.pretrained:
        full = pretrained.pretrained_path(opts.seed).is_file()
        settings = pretrained.QUICK_SETTINGS if opts.quick and not full else pretrained.DEFAULT_SETTINGS
        model = pretrained.pretrained_fashion_cnn(opts.seed, progress=opts.progress, settings=settings)
        return model, build
    if opts.pretrained:
        logger.warning("%s has no pretrained weights; it starts from random weights", spec)
    return _seeded(build, opts.seed), build


def _query(spec: str, query: str, allowed: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        key, sep, value = item.partition("=")
        if key not in allowed or not sep or not value:
            raise ModelError(f"model spec {spec!r}: bad option {item!r}; expected "
                             f"{' or '.join(k + '=<value>' for k in allowed)}")
        out[key] = value
    return out


def _torchvision(spec: str, rest: str, opts: _Options) -> tuple[nn.Module, Build]:
    name, _, query = rest.partition("?")
    options = _query(spec, query, ("weights", "num_classes"))
    try:
        import torchvision.models as tvm
    except ImportError as exc:
        raise ModelError(f"model spec {spec!r}: torchvision is not installed or does not import ({exc}); "
                         "install it with: pip install 'torchslim[vision]'") from exc
    known = tvm.list_models()
    if name not in known:
        raise ModelError(f"model spec {spec!r}: torchvision has no model {name!r}{closest(name, known)}; "
                         "see torchvision.models.list_models()")
    kwargs: dict[str, Any] = {"weights": None}
    if "num_classes" in options:
        if not options["num_classes"].isdigit():
            raise ModelError(f"model spec {spec!r}: num_classes must be a positive integer, "
                             f"found {options['num_classes']!r}")
        kwargs["num_classes"] = int(options["num_classes"])
    build: Build = functools.partial(tvm.get_model, name, **kwargs)
    model = _seeded(build, opts.seed)
    if "weights" in options and opts.pretrained:
        load_weights(model, Path(options["weights"]).expanduser(), spec)
    elif opts.pretrained:
        logger.warning("%s: no ?weights=<file> given; the model has random weights", spec)
    return model, build


def load_weights(model: nn.Module, path: Path, spec: str = "") -> None:
    """Load a state dict (``.safetensors``, or a ``torch.save`` file read with ``weights_only``).

    A checkpoint dict holding the weights under ``state_dict`` or ``model`` is accepted too.

    Raises:
        ModelError: missing or unreadable file, or weights that do not fit the model.
    """
    where = f"model spec {spec!r}: " if spec else ""
    if not path.is_file():
        raise ModelError(f"{where}weights file {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refusals and corrupt files come in many types
        raise ModelError(f"{where}cannot read weights file {path} ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict):
        state = state.get("state_dict", state.get("model", state))
    if not isinstance(state, dict):
        raise ModelError(f"{where}{path} holds a {type(state).__name__}, expected a state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{where}weights in {path} do not fit {type(model).__name__}: "
                         f"{str(exc)[:800]}") from exc


def _py(spec: str, rest: str, opts: _Options) -> tuple[nn.Module, Build]:
    module_name, sep, attr = rest.rpartition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"model spec {spec!r}: expected py:<package.module>:<function>")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ModelError(f"model spec {spec!r}: module {module_name!r} not found "
                             "(is it installed or on PYTHONPATH?)") from exc
        raise ModelError(f"model spec {spec!r}: importing {module_name!r} failed: {exc}") from exc
    except ImportError as exc:
        raise ModelError(f"model spec {spec!r}: importing {module_name!r} failed: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            public = [n for n in dir(target) if not n.startswith("_")]
            raise ModelError(f"model spec {spec!r}: {module_name} has no attribute {attr!r}"
                             f"{closest(part, public)}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelError(f"model spec {spec!r}: {module_name}:{attr} is a {type(target).__name__}, "
                         "expected a function returning an nn.Module")
    build: Build = functools.partial(_call_factory, spec, target)
    return _seeded(build, opts.seed), build


def _call_factory(spec: str, factory: Callable[[], Any]) -> nn.Module:
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelError(f"model spec {spec!r}: the function returned a {type(model).__name__}, "
                         "expected a torch.nn.Module")
    return model


def _hf(spec: str, rest: str, opts: _Options) -> tuple[nn.Module, Build]:
    from torchslim.hf import resolve_hf

    return resolve_hf(spec, rest, pretrained=opts.pretrained, seed=opts.seed)


_RESOLVERS: dict[str, Callable[[str, str, _Options], tuple[nn.Module, Build]]] = {
    "zoo": _zoo,
    "torchvision": _torchvision,
    "hf": _hf,
    "py": _py,
}


@dataclasses.dataclass(frozen=True)
class DataBundle:
    """What a run needs from a data set.

    Attributes:
        name: The data spec.
        train: Training split, ``(input, label)`` samples.
        test: Test split.
        example_inputs: One test input as a batch of 1 (latency is measured at batch 1); a
            tensor or a tuple of tensors.
        calib: Calibration batches: the first 512 training samples in batches of 64 (images),
            or the text set's calibration batches.
        eval_fn: ``model -> {"accuracy": ...}`` on the whole test split (``perplexity`` or
            ``lee_pearson``, ... for text).
        samples_fn: ``model -> {prompt: generated text}`` for causal LMs, else None.
    """

    name: str
    train: TensorDataset
    test: TensorDataset
    example_inputs: Any
    calib: Iterable[Any]
    eval_fn: Callable[[nn.Module], dict[str, float]]
    samples_fn: Callable[[nn.Module], dict[str, str]] | None = None

    def context(self, **overrides: Any) -> Context:
        """A ``Context`` filled from this data; keyword arguments set other fields."""
        return Context(example_inputs=self.example_inputs, calib_data=self.calib,
                       train_data=self.train, eval_fn=self.eval_fn, **overrides)


def resolve_data(spec: str, *, quick: bool = False, model: str | None = None) -> DataBundle:
    """The data named by ``spec``: ``zoo:fashion_mnist``, ``zoo:digits``, or text for ``hf:`` models.

    ``zoo:lee_windows`` (causal LMs: perplexity and a sample generation) and
    ``zoo:lee_similarity`` (sentence encoders: Lee Pearson, WordSim-353, SimLex-999) are
    tokenized with the tokenizer of the ``model`` folder (see ``torchslim.zoo.text``).

    Args:
        spec: The data spec.
        quick: Keep only the first 5,000 training and 2,000 test samples (smoke runs), or a
            few text windows / sentences.
        model: The model spec the data is used with; required (``hf:<folder>``) for text.

    Raises:
        DataError: unknown scheme or name, the data set is not installed, or text data
            without an ``hf:`` model.
    """
    from torchslim.zoo.data import DATASETS, head, load_data, loader, make_eval_fn
    from torchslim.zoo.text import TEXT_DATASETS

    known = [*DATASETS, *TEXT_DATASETS]
    scheme, sep, name = spec.partition(":")
    if scheme != "zoo" or not sep:
        raise DataError(f"data spec {spec!r}: expected zoo:<name> with name one of {', '.join(known)}")
    if name in TEXT_DATASETS:
        return _text_data(spec, name, quick, model)
    if name not in DATASETS:
        raise DataError(f"data spec {spec!r}: unknown data set {name!r}{closest(name, known)}; "
                        f"known: {', '.join(sorted(known))}")
    train = head(load_data(name, "train"), QUICK_TRAIN if quick else None)
    test = head(load_data(name, "test"), QUICK_TEST if quick else None)
    calib = loader(head(train, CALIB_SAMPLES), CALIB_BATCH)
    return DataBundle(name=spec, train=train, test=test, example_inputs=test.tensors[0][:1].clone(),
                      calib=calib, eval_fn=make_eval_fn(test))


def _text_data(spec: str, name: str, quick: bool, model: str | None) -> DataBundle:
    from torchslim.hf import inspect_folder, load_tokenizer
    from torchslim.zoo.text import TEXT_DATASETS

    if not model or not model.startswith("hf:"):
        raise DataError(f"data spec {spec!r} is tokenized with the model's own tokenizer: expected an "
                        f"hf:<folder> model, found {model!r}")
    tokenizer = load_tokenizer(inspect_folder(model, model[len("hf:"):]))
    return DataBundle(name=spec, **TEXT_DATASETS[name](tokenizer, quick))
