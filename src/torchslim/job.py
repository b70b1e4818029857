"""The whole job behind ``torchslim compress`` and ``torchslim demo``.

Resolve the model and data, check the output folder, compress, save, export and measure the
deployed artifacts, then write the report. Every input is checked before anything is written,
so bad input leaves no folder behind.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.core import Context
from torchslim.errors import ModelError, OutputError
from torchslim.recipes import Recipe, load_recipe
from torchslim.report.record import DeploymentRow, RunRecord, SampleRow
from torchslim.runner import Result, compress
from torchslim.train import distributed

__all__ = ["check_out_dir", "deploy_rows", "export_run", "is_run_folder", "launch", "run_job",
           "run_search_job"]

logger = logging.getLogger(__name__)
_OURS = ("record.json", "structure.json", "checkpoints")


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a torchslim run (finished or interrupted)."""
    return any((folder / name).exists() for name in _OURS)


def check_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a folder we must not write into; explain what to do instead."""
    if resume:
        if not (out / "checkpoints" / "stage.json").is_file() and not (out / "checkpoints").is_dir():
            raise OutputError(f"--resume: {out} holds no interrupted run (expected {out}/checkpoints/)")
        return
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} exists and is a file (expected a folder)")
    if out.is_dir() and any(out.iterdir()) and not is_run_folder(out) and not overwrite:
        raise OutputError(
            f"output folder {out} exists, is not empty and is not a torchslim run; "
            "pass --overwrite to replace it or choose another --out"
        )


def run_job(
    recipe_source: str | Path | Recipe,
    out: Path,
    *,
    model_spec: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    quick: bool = False,
) -> RunRecord:
    """Run a recipe from the command line's point of view and write the output folder.

    Under ``torchrun`` every process runs the whole job (training is data-parallel) and only
    rank 0 writes the output folder.
    """
    from torchslim.adapters import resolve_data, resolve_model

    distributed.init_from_env()
    recipe = recipe_source if isinstance(recipe_source, Recipe) else load_recipe(recipe_source)
    spec = model_spec or recipe.model
    if spec is None:
        raise ModelError("no model: the recipe has no 'model:' entry and no --model was given")
    if recipe.data is None:
        raise ModelError("no data: the recipe has no 'data:' entry (e.g. data: zoo:fashion_mnist)")
    check_out_dir(out, resume=resume, overwrite=overwrite)
    data = resolve_data(recipe.data, quick=quick, model=spec)
    model, build = resolve_model(spec, quick=quick, progress=progress)
    recipe = dataclasses.replace(recipe, model=spec)
    distributed.barrier()  # every process has checked its inputs before anything is written
    if distributed.is_main():
        if out.exists() and not resume:
            _clear(out)
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    ctx = Context(example_inputs=data.example_inputs, calib_data=data.calib, train_data=data.train,
                  eval_fn=data.eval_fn, workdir=out / "checkpoints", progress=progress)
    original = copy.deepcopy(model).eval()
    before = data.samples_fn(original) if data.samples_fn and distributed.is_main() else {}
    result = compress(model, recipe, ctx, resume=resume)
    if distributed.is_main():
        if data.samples_fn is not None:
            after = data.samples_fn(result.model)
            result.record.samples.extend(SampleRow(p, before[p], after.get(p, "")) for p in before)
        _finish(result, original, ctx, recipe, out)
    distributed.barrier()
    return result.record


def launch(argv: list[str], nproc: int, *, check: tuple[str, Path, bool, bool] | None = None) -> int:
    """Run ``torchslim <argv>`` in ``nproc`` data-parallel processes through ``torchrun``.

    Args:
        argv: The command line for each process (without ``--nproc``).
        nproc: Number of processes on this machine (gloo on CPU, nccl on GPU).
        check: ``(recipe, out, resume, overwrite)`` to validate here first, so bad input fails
            once, with exit code 2, before any process starts.

    Returns:
        torchrun's exit code.
    """
    import os
    import socket
    import subprocess
    import sys

    if check is not None:
        load_recipe(check[0])
        check_out_dir(check[1], resume=check[2], overwrite=check[3])
    with socket.socket() as sock:  # a free loopback port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    threads = max((os.cpu_count() or 1) // nproc, 1)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "torchslim.cli", *argv]
    logger.info("launching %d processes: %s", nproc, " ".join(cmd))
    return subprocess.run(cmd, env=env, check=False).returncode


def run_search_job(recipe_source: str | Path, out: Path, *, workers: int = 1, storage: str | None = None,
                   model_spec: str | None = None, overwrite: bool = False, quick: bool = False,
                   worker: int | None = None) -> RunRecord | None:
    """``torchslim search``: ``workers - 1`` extra processes search one Optuna study, then the recipe runs.

    Every ``nas.search`` of the recipe gets ``storage`` (default: SQLite ``<out>.nas.db`` next
    to the output folder, which the run rewrites); the recipe's own ``nas.search`` joins the
    study the workers fill. A one-shot search trains its supernet here first and saves it
    beside the study (``<out>.supernet.safetensors``) for the workers to load. With ``worker``
    set, this process only searches (it is worker ``worker``; more can join from other
    machines with the same storage URL) and returns None.
    """
    import os
    import subprocess
    import sys

    from torchslim.adapters import resolve_data, resolve_model
    from torchslim.errors import ConfigError
    from torchslim.nas.search import NASSearchConfig, search, study_result, write_artifacts
    from torchslim.nas.spaces import CNNSpace
    from torchslim.nas.supernet import load_or_train
    from torchslim.nas.transformer import TransformerSpace

    if workers < 1:
        raise ConfigError(f"--workers: expected a number of processes >= 1; found {workers}")
    recipe = load_recipe(recipe_source)
    url = storage or f"sqlite:///{out.resolve().parent / (out.name + '.nas.db')}"
    stages = tuple(dataclasses.replace(stage, methods=tuple(
        _shared(m, url, out) if isinstance(m, NASSearchConfig) else m for m in stage.methods))
        for stage in recipe.stages)
    searches = [m for stage in stages for m in stage.methods if isinstance(m, NASSearchConfig)]
    if not searches:
        raise ConfigError(f"{recipe_source}: torchslim search needs a recipe with a nas.search method")
    recipe = dataclasses.replace(recipe, stages=stages)
    if worker is not None or (workers > 1 and any(cfg.one_shot for cfg in searches)):
        if recipe.data is None:
            raise ModelError("no data: the recipe has no 'data:' entry (e.g. data: zoo:fashion_mnist)")
        spec = model_spec or recipe.model
        ctx = resolve_data(recipe.data, quick=quick, model=spec).context()
    if worker is not None:
        base = None
        if spec and any(isinstance(cfg.space, TransformerSpace) for cfg in searches):
            base, _ = resolve_model(spec, quick=quick, progress=False)  # students are sliced from it
        for cfg in searches:
            search(cfg, ctx, worker=worker, base=base if isinstance(cfg.space, TransformerSpace) else None)
        return None
    check_out_dir(out, resume=False, overwrite=overwrite)
    for cfg in searches:  # one-shot: the supernet trains once, here, before the workers load it
        if cfg.one_shot is not None and workers > 1 and isinstance(cfg.space, CNNSpace):
            load_or_train(cfg.space, cfg.one_shot, ctx, cfg.lr)
    extra = [*(["--model", model_spec] if model_spec else []), *(["--quick"] if quick else [])]
    env = dict(os.environ)  # extra workers take a share of the cores (this process keeps its threads)
    env.setdefault("OMP_NUM_THREADS", str(max((os.cpu_count() or 1) // workers, 1)))
    cmd = [sys.executable, "-m", "torchslim.cli", "--quiet", "search", str(recipe_source), "--storage", url]
    procs = [subprocess.Popen([*cmd, "--worker", str(i), *extra], env=env) for i in range(1, workers)]
    try:
        record = run_job(recipe, out, model_spec=model_spec, overwrite=overwrite, quick=quick, progress=False)
    finally:
        for proc in procs:
            proc.wait()
    for cfg in searches:  # the run's workdir (checkpoints/) is gone; the study still holds every trial
        write_artifacts(study_result(cfg), out, cfg.metric)
    return record


def _shared(cfg: Any, url: str, out: Path) -> Any:
    """A ``nas.search`` config on the shared study ``url``; a one-shot search's supernet is saved
    beside the output folder (``<out>.supernet.safetensors``) unless its recipe names a path."""
    one_shot = cfg.one_shot
    if one_shot is not None and one_shot.path is None:
        path = out.resolve().parent / (out.name + ".supernet.safetensors")
        one_shot = dataclasses.replace(one_shot, path=str(path))
    return dataclasses.replace(cfg, storage=url, one_shot=one_shot)


def _clear(out: Path) -> None:
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _finish(result: Result, original: nn.Module, ctx: Context, recipe: Recipe, out: Path) -> None:
    from torchslim.export import save
    from torchslim.report.jsonio import write_report

    save(result, out, overwrite=True)
    if recipe.model and recipe.model.startswith("hf:"):  # config and tokenizer beside the weights
        from torchslim.hf import copy_assets, inspect_folder

        copied = copy_assets(inspect_folder(recipe.model, recipe.model[3:]), out)
        logger.info("copied %s into %s", ", ".join(copied) or "nothing", out)
    if "onnx" in recipe.export:
        result.record.deployments.extend(deploy_rows(original, result.model, ctx, out))
    _keep_samples(ctx.workdir, out)
    write_report(result.record, out)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


def _keep_samples(workdir: Path | None, out: Path) -> None:
    """Move the synthetic samples and previews of data-free methods out of the checkpoints."""
    if workdir is None or not workdir.is_dir():
        return
    for path in [*workdir.glob("*samples.safetensors"), workdir / "synthetic.safetensors",
                 *workdir.glob("plots/*.png")]:
        if path.is_file():
            target = out / path.relative_to(workdir)
            target.parent.mkdir(parents=True, exist_ok=True)
            path.replace(target)


def deploy_rows(original: nn.Module, compressed: nn.Module, ctx: Context, out: Path) -> list[DeploymentRow]:
    """Latency and quality of the original and compressed models as deployed.

    Rows: the original in PyTorch eager, the original in ONNX Runtime, the compressed model
    exported to ``out/model.onnx`` in ONNX Runtime, and the compressed model in PyTorch.
    """
    from torchslim.export.onnx import OnnxModule, export_onnx, onnx_latency
    from torchslim.measure.latency import model_latency

    x = ctx.require_example_inputs("ONNX export")
    rows = [_row("original fp32", "torch", original, model_latency(original, x), ctx)]
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "original.onnx"
        export_onnx(original, x, fp32_path)
        rows.append(_row("original fp32", "onnxruntime", OnnxModule(fp32_path),
                         onnx_latency(fp32_path, x), ctx))
    info = export_onnx(compressed, x, out / "model.onnx", min_cosine=0.99)
    note = f"max |diff| vs PyTorch {info['max_abs_diff']:.2e}, cosine {info['cosine']:.6f}"
    rows.append(_row("compressed", "onnxruntime", OnnxModule(out / "model.onnx"),
                     onnx_latency(out / "model.onnx", x), ctx, note=note))
    rows.append(_row("compressed", "torch", compressed, model_latency(compressed, x), ctx))
    return rows


def _row(name: str, engine: str, model: nn.Module, timing: dict[str, float], ctx: Context,
         note: str = "") -> DeploymentRow:
    values: dict[str, Any] = {"latency_ms": timing["latency_ms"]}
    if ctx.eval_fn is not None:
        with torch.inference_mode():
            values.update(ctx.eval_fn(model))
    return DeploymentRow(name=name, engine=engine, values=values, note=note)


def export_run(folder: Path, fmt: str, model_spec: str | None = None) -> dict[str, Any]:
    """Rebuild a finished run's model, export it as ``fmt`` into ``folder`` and record the check.

    The check (max abs diff, cosine, latency of the reloaded artifact) becomes a deployment
    row of ``record.json`` (replacing an earlier export in the same format) and the report is
    written again. Example inputs are zeros of the recorded shape and dtype, or, for models
    taking several inputs, the data spec's example inputs.

    Raises:
        ModelError: no model spec in the record and none given.
        ExportError: the export fails or disagrees with PyTorch.
    """
    from torchslim.adapters import resolve_data, resolve_model
    from torchslim.export import load
    from torchslim.export.artifacts import ENGINES, example_inputs_of, export_artifact
    from torchslim.report.jsonio import read_record, write_report

    record = read_record(folder)
    spec = model_spec or record.recipe.get("model")
    if not spec:
        raise ModelError(f"{folder}/record.json names no model; pass --model")
    _, build = resolve_model(spec, pretrained=False)
    model = load(folder, build)
    inputs = example_inputs_of(record.environment)
    if inputs is None and fmt != "safetensors":
        if not record.recipe.get("data"):
            raise OutputError(f"{folder}/record.json has no example input shape or data spec to export with")
        inputs = resolve_data(record.recipe["data"], quick=True, model=spec).example_inputs
    info = export_artifact(model, inputs, folder, fmt)
    if fmt == "safetensors":
        return info
    name = f"exported {fmt}"
    record.deployments = [row for row in record.deployments if row.name != name]
    values = {key: float(info[key]) for key in ("latency_ms", "max_abs_diff", "cosine")}
    note = (f"reloaded {Path(info['path']).name}: max |diff| vs PyTorch {info['max_abs_diff']:.2e}, "
            f"cosine {info['cosine']:.6f}")
    record.deployments.append(DeploymentRow(name=name, engine=ENGINES[fmt], values=values, note=note))
    write_report(record, folder)
    return info
