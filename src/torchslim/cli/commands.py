"""One small function per subcommand; every piece of logic lives in the library."""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path

from torchslim.errors import ConfigError, OutputError

__all__ = ["dispatch"]


def dispatch(args: argparse.Namespace) -> int:
    """Run the subcommand named in ``args``."""
    handler = {"demo": _demo, "compress": _compress, "search": _search, "methods": _methods,
               "explain": _explain,
               "report": _report, "export": _export, "bench": _bench}[args.command]
    return handler(args)


def _print_result(args: argparse.Namespace, record: object, out: Path) -> int:
    from torchslim.report.markdown import render_markdown
    from torchslim.report.record import RunRecord

    assert isinstance(record, RunRecord)
    if args.json:
        print(record.to_json())
    elif not args.quiet:
        print(render_markdown(record))
        print(f"\nWrote {out}/ (report.html, report.md, model.safetensors, ...)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from torchslim.job import run_job

    out = Path(args.out)
    record = run_job("builtin:demo", out, overwrite=args.overwrite, quick=args.quick,
                     progress=not args.quiet)
    return _print_result(args, record, out)


def _compress(args: argparse.Namespace) -> int:
    from torchslim.job import launch, run_job

    out = Path(args.out)
    if args.nproc < 1:
        raise ConfigError(f"--nproc: expected a number of processes >= 1; found {args.nproc}")
    if args.nproc > 1:
        argv = _without_nproc(args.argv)
        return launch(argv, args.nproc, check=(args.recipe, out, args.resume, args.overwrite))
    record = run_job(args.recipe, out, model_spec=args.model, resume=args.resume,
                     overwrite=args.overwrite, quick=args.quick, progress=not args.quiet)
    return _print_result(args, record, out)


def _search(args: argparse.Namespace) -> int:
    from torchslim.job import run_search_job

    out = Path(args.out)
    record = run_search_job(args.recipe, out, workers=args.workers, storage=args.storage,
                            model_spec=args.model, overwrite=args.overwrite, quick=args.quick,
                            worker=args.worker)
    return 0 if record is None else _print_result(args, record, out)


def _without_nproc(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _methods(args: argparse.Namespace) -> int:
    from torchslim.explain import summaries

    rows = summaries(args.technique)
    if args.json:
        print(json.dumps(dict(rows), indent=2))
    for key, text in [] if args.json else rows:
        print(f"{key:<28} {text}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from torchslim.explain import explain

    print(explain(args.key))
    return 0


def _report(args: argparse.Namespace) -> int:
    from torchslim.report.jsonio import read_record, write_report

    folder = Path(args.dir)
    record = read_record(folder)
    write_report(record, folder)
    return _print_result(args, record, folder)


def _export(args: argparse.Namespace) -> int:
    from torchslim.job import export_run

    info = export_run(Path(args.dir), args.format, args.model)
    if "cosine" in info:
        print(f"verified {info['path']}: reloaded and compared with PyTorch: max |diff| "
              f"{info['max_abs_diff']:.3e}, cosine {info['cosine']:.6f}, latency {info['latency_ms']:.2f} ms")
    print(json.dumps({k: str(v) for k, v in info.items()}, indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    folder = Path("bench")
    available = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    if args.name is None:
        print("\n".join(available) or "no benchmarks in ./bench")
        return 0
    if args.name not in available:
        raise OutputError(f"no benchmark {args.name!r} in ./bench (run from the repo root); "
                          f"available: {', '.join(available) or 'none'}")
    sys.argv = [str(folder / f"{args.name}.py")]
    runpy.run_path(str(folder / f"{args.name}.py"), run_name="__main__")
    return 0

