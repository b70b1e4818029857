"""STYLE.md §4.2: technique packages never import each other; report imports no torch code."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "torchslim"
TECHNIQUES = ("pruning", "quantization", "distillation", "sharing", "lowrank", "nas")
ALLOWED = {
    **{t: {"core", "errors", t} for t in TECHNIQUES},
    # nas trains and times every candidate: the training driver (and its TrainSpec) and the
    # measure functions are layers below the techniques, not techniques, so no cycle arises
    "nas": {"core", "errors", "nas", "measure", "train", "recipes"},
    # quantization.mixed under a latency budget times layers and models with measure's timer
    "quantization": {"core", "errors", "quantization", "measure"},
    "core": {"core", "errors", "_builtin"},
    "measure": {"core", "errors", "measure"},
    "report": {"report", "errors"},
    "export": {"core", "errors", "export", "measure"},
    "recipes": {"core", "errors", "recipes"},
}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torchslim"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("torchslim"))
    return {name.split(".")[1] if "." in name else "" for name in found}


def test_packages_import_only_what_the_layering_allows() -> None:
    problems = []
    for package, allowed in ALLOWED.items():
        for path in sorted((SRC / package).rglob("*.py")):
            bad = _imports(path) - allowed - {""}
            if bad:
                problems.append(f"{path.relative_to(SRC)} imports torchslim.{sorted(bad)}")
    assert not problems, "\n".join(problems)


def test_rule_checker_sees_imports(tmp_path: Path) -> None:
    sample = tmp_path / "x.py"
    sample.write_text("from torchslim.quantization import dynamic\nimport torchslim.core.config\n")
    assert _imports(sample) == {"quantization", "core"}
