"""Entry point: ``torchslim <command>``; exit 0 on success, 2 on bad input, 1 on a bug."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from torchslim.cli import commands
from torchslim.errors import TorchslimError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="torchslim", description="Make PyTorch models smaller and faster.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    parser.add_argument("--json", action="store_true", help="print the run record as JSON")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the main job on the bundled model and data")
    demo.add_argument("--quick", action="store_true", help="a one-minute version")
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--overwrite", action="store_true", help="replace a non-torchslim folder")
    comp = sub.add_parser("compress", help="run a recipe (a YAML file or builtin:<name>)")
    comp.add_argument("recipe")
    comp.add_argument("--model", help="model spec, overrides the recipe's (zoo:, torchvision:, hf:, py:)")
    comp.add_argument("--out", default="runs/compress", help="output folder")
    comp.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    comp.add_argument("--overwrite", action="store_true", help="replace a non-torchslim folder")
    comp.add_argument("--quick", action="store_true", help="small data slices (smoke test)")
    comp.add_argument("--nproc", type=int, default=1,
                      help="data-parallel processes on this machine (launches torchrun; default 1)")
    srch = sub.add_parser("search", help="run a recipe with nas.search; N workers share one study")
    srch.add_argument("recipe")
    srch.add_argument("--workers", type=int, default=1, help="search processes on this machine (default 1)")
    srch.add_argument("--storage", help="Optuna storage URL (default: SQLite <out>.nas.db)")
    srch.add_argument("--worker", type=int, help="only search, as worker number N (joins --storage)")
    srch.add_argument("--model", help="model spec, overrides the recipe's")
    srch.add_argument("--out", default="runs/search", help="output folder")
    srch.add_argument("--overwrite", action="store_true", help="replace a non-torchslim folder")
    srch.add_argument("--quick", action="store_true", help="small data slices (smoke test)")
    methods = sub.add_parser("methods", help="list every method with a one-line summary")
    methods.add_argument("--technique", help="only this family, e.g. pruning")
    explain = sub.add_parser("explain", help="document one method: paper, fields, recipe example")
    explain.add_argument("key")
    report = sub.add_parser("report", help="re-render the report of a finished run")
    report.add_argument("dir")
    export = sub.add_parser("export", help="export a finished run's model")
    export.add_argument("dir")
    export.add_argument("--format", choices=("onnx", "torchscript", "torch_export", "safetensors"),
                        default="onnx", help="every format but safetensors is reloaded and checked")
    export.add_argument("--model", help="model spec to rebuild the base (default: the recipe's)")
    bench = sub.add_parser("bench", help="run a benchmark from bench/ (writes docs/benchmarks/)")
    bench.add_argument("name", nargs="?", help="benchmark name; omit to list them")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    worker = os.environ.get("RANK", "0") != "0"  # under torchrun only rank 0 talks
    level = logging.WARNING if args.quiet or worker else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return commands.dispatch(args)
    except TorchslimError as exc:
        print(f"torchslim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("torchslim: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
