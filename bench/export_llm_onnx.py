"""SmolLM2-135M int4 weight-only exported to ONNX: MatMulNBits nodes, size, perplexity and speed in ONNX Runtime.

The decoder Linears are quantized to 4 bits (RTN, asymmetric, group 64; the tied embedding / lm_head
stays fp32, as in bench/quant_llm.py), then ``torchslim.export.artifacts.export_artifact`` writes
``model.onnx`` (the packed linears become ``com.microsoft.MatMulNBits``), reloads it in ONNX Runtime
and checks it against PyTorch. The bench then scores perplexity on the Lee evaluation windows with
the PyTorch int4 model and with the ONNX file, and times one 512-token forward of each in
alternating rounds.

Run: python bench/export_llm_onnx.py [--windows 24] [--rounds 5] [--out build/export-llm]
Writes docs/benchmarks/export-llm-onnx.md.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import torchslim as ts
from torchslim.core.storage import serialized_size
from torchslim.export.artifacts import export_artifact
from torchslim.export.onnx import OnnxModule
from torchslim.export.program import FirstTensor
from torchslim.quantization import WeightOnlyConfig
from torchslim.recipes import Recipe, Stage
from torchslim.zoo import llm

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "export-llm-onnx.md"
DECODER = (r"re:model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj",)


@torch.no_grad()
def _perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    """Mean next-token NLL over (1, L) windows, for any callable returning logits first."""
    nll, count = 0.0, 0
    for ids in windows.split(1):
        logits = FirstTensor(model)(ids)[:, :-1].float()
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                     reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(nll / count)


@torch.no_grad()
def _alternating_ms(models: dict[str, nn.Module], ids: torch.Tensor, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():  # warm up
        FirstTensor(model)(ids)
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            FirstTensor(model)(ids)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=24, help="Lee evaluation windows scored (max 24)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("build/export-llm"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    tokenizer = llm.load_smollm2_tokenizer()
    windows = llm.lee_windows(tokenizer, "eval")[: args.windows]
    model = llm.load_smollm2().eval()
    fp32_bytes = serialized_size(model)
    recipe = Recipe(stages=(Stage(name="int4", methods=(WeightOnlyConfig(targets=DECODER),)),), measure=())
    model = ts.compress(model, recipe, ts.Context(example_inputs=windows[:1])).model.eval()
    started = time.perf_counter()
    info = export_artifact(model, windows[:1], args.out, "onnx")
    export_s = time.perf_counter() - started
    import onnx

    from torchslim.quantization import WeightOnlyLinear

    packed = sum(isinstance(m, WeightOnlyLinear) for m in model.modules())

    ops = Counter(n.op_type for n in onnx.load(str(args.out / "model.onnx"), load_external_data=False).graph.node)
    exported = OnnxModule(args.out / "model.onnx")
    ppl_torch, ppl_onnx = _perplexity(model, windows), _perplexity(exported, windows)
    ms = _alternating_ms({"torch": model, "onnx": exported}, windows[:1], args.rounds)
    lines = [
        "# SmolLM2-135M int4 (weight-only) exported to ONNX Runtime's MatMulNBits", "",
        f"Decoder Linears at 4 bits (RTN, asymmetric, group 64), tied embedding fp32; exported with "
        f"`export_artifact(model, window, folder, \"onnx\")` in {export_s:.0f} s by the "
        f"{info['exporter']} (batch dimension {'dynamic' if info['dynamic_batch'] else 'fixed at 1'}).", "",
        "| measure | PyTorch int4 | ONNX Runtime int4 |", "|---|---|---|",
        f"| MatMulNBits nodes in the graph | {packed} WeightOnlyLinear layers | {ops.get('MatMulNBits', 0)} |",
        f"| file size | {serialized_size(model) / 1e6:.1f} MB (torchslim checkpoint) | "
        f"{info['bytes'] / 1e6:.1f} MB (model.onnx) |",
        f"| fp32 reference size | {fp32_bytes / 1e6:.1f} MB | - |",
        f"| export check on the example window | - | max abs diff {info['max_abs_diff']:.2e}, "
        f"cosine {info['cosine']:.8f} |",
        f"| perplexity, {len(windows)} Lee windows of {windows.shape[1]} | {ppl_torch:.3f} | {ppl_onnx:.3f} |",
        f"| one 512-token forward, median of {args.rounds} alternating rounds | {ms['torch']:.0f} ms | "
        f"{ms['onnx']:.0f} ms |",
        "",
        "Notes: the embedding and lm_head are not MatMulNBits (they stay fp32, a Gather and a MatMul on "
        "the tied weight). The zero-point packing the exporter could not fold is folded by ONNX Runtime "
        "when it loads the file. MatMulNBits runs with accuracy_level 0 (float compute).", "",
        f"Reproduce: `python bench/export_llm_onnx.py --windows {args.windows} --rounds {args.rounds}`. "
        f"Machine: {platform.processor() or platform.machine()}, 2 threads, shared (load average "
        f"{os.getloadavg()[0]:.1f}); torch {torch.__version__}, onnxruntime "
        f"{__import__('onnxruntime').__version__}.", ""]
    DOC.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
