"""Packed low-bit embeddings: exact lookups, a tied head sharing the codes, a smaller file, exact reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim as ts
from tiny_llama import tiny_llama, token_batches
from torchslim.errors import ConfigError
from torchslim.export import load, save
from torchslim.quantization import GPTQConfig, WeightOnlyConfig, WeightOnlyEmbedding, WeightOnlyLinear
from torchslim.recipes import Recipe


@pytest.mark.parametrize("bits", [4, 8])
def test_lookup_equals_the_dequantised_table_and_stays_within_half_a_step(bits: int) -> None:
    torch.manual_seed(0)
    table = nn.Embedding(50, 64)
    packed = WeightOnlyEmbedding.from_embedding(table, bits, 32, symmetric=False)
    ids = torch.randint(0, 50, (3, 7))
    out = packed(ids)
    torch.testing.assert_close(out, F.embedding(ids, packed.weight()), rtol=0, atol=0)
    step = packed.scale.repeat_interleave(32, dim=1)[ids]
    assert bool(((out - table(ids)).abs() <= 0.5 * step + 1e-6).all())
    assert packed.packed.shape == (50, 32 if bits == 4 else 64)


def _tied_llama() -> nn.Module:
    return tiny_llama(vocab=512, tied=True)


def test_tied_embedding_and_head_share_one_set_of_codes_and_the_file_shrinks(tmp_path: Path) -> None:
    model = _tied_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    x = token_batches(vocab=512)[0]
    with torch.no_grad():
        dense = model(x).logits
    ctx = ts.Context()
    linears_only = ts.compress(_tied_llama(), Recipe.single(WeightOnlyConfig(bits=4)), ctx)
    result = ts.compress(model, Recipe.single(WeightOnlyConfig(bits=4, embedding_bits=8)), ctx)
    embed, head = result.model.model.embed_tokens, result.model.lm_head
    assert isinstance(embed, WeightOnlyEmbedding) and isinstance(head, WeightOnlyLinear)
    assert head.packed is embed.packed and head.scale is embed.scale and head.zero is embed.zero
    torch.testing.assert_close(head.weight(), embed.weight(), rtol=0, atol=0)
    assert result.record.outcomes[0].layers["lm_head"]["tied_to"] == "model.embed_tokens"
    with torch.no_grad():
        out = result.model(x).logits
        float_table = linears_only.model(x).logits
    # int8 table: the logits move far less than int4 Linears already moved them
    assert float((out - float_table).pow(2).mean()) < 0.1 * float((float_table - dense).pow(2).mean())
    save(result, tmp_path / "run")
    save(linears_only, tmp_path / "float-table")
    size = (tmp_path / "run" / "model.safetensors").stat().st_size
    table_bytes = 512 * 64 * 4
    assert size < (tmp_path / "float-table" / "model.safetensors").stat().st_size - 0.6 * table_bytes  # stored once
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "run", _tied_llama)(x).logits, out, rtol=0, atol=0)


def test_gptq_quantizes_the_tied_embedding_too() -> None:
    model = _tied_llama()
    batches = token_batches(vocab=512)
    result = ts.apply(model, GPTQConfig(bits=4, group_size=32, embedding_bits=8), ts.Context(calib_data=batches))
    assert isinstance(result.model.model.embed_tokens, WeightOnlyEmbedding)
    assert result.record.outcomes[0].stats["embeddings"] == 1
    assert sum(isinstance(m, WeightOnlyLinear) for m in result.model.modules()) == 15  # 14 + the tied head


def test_bad_embedding_settings_fail_before_anything_changes() -> None:
    with pytest.raises(ConfigError, match="embedding_bits must be 0 .* found 1"):
        WeightOnlyConfig(embedding_bits=1)
    model = nn.Sequential(nn.Embedding(10, 48), nn.Linear(64, 8))  # the Linear alone could be quantized
    with pytest.raises(ConfigError, match="group_size 32 does not divide the width 48 of embedding '0'"):
        ts.apply(model, WeightOnlyConfig(bits=4, group_size=32, embedding_bits=8), ts.Context())
    assert type(model[0]) is nn.Embedding and type(model[1]) is nn.Linear


class _TinyLM(nn.Module):
    """Embedding, one mixing layer and a head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(300, 64)
        self.mix = nn.Linear(64, 64)
        self.head = nn.Linear(64, 300, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids))))


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_embedding_and_tied_head_export_to_onnx_runtime(tmp_path: Path, bits: int) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from torchslim.export.onnx import OnnxModule, export_onnx

    model = ts.apply(_TinyLM().eval(), WeightOnlyConfig(bits=4, embedding_bits=bits, targets=("mix",)),
                     ts.Context()).model
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    info = export_onnx(model, ids, tmp_path / "m.onnx")
    assert info["max_abs_diff"] < 1e-4
    tables = [t for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer if 300 in t.dims and len(t.dims) > 1
              and t.dims[1] > 1]
    assert [(t.data_type, list(t.dims)) for t in tables] == [(onnx.TensorProto.UINT8, [300, 64 * bits // 8])]  # once
    other = torch.randint(0, 300, (5, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(OnnxModule(tmp_path / "m.onnx")(other), model(other), rtol=0, atol=1e-4)


def test_a_corrupt_layout_in_structure_json_is_refused() -> None:
    from torchslim.core.structure import replay
    from torchslim.errors import OutputError

    model = nn.Sequential(nn.Embedding(10, 64))
    for bad in ({"group_size": 0}, {"group_size": 48}, {"bits": 9}):
        kwargs = {"num_embeddings": 10, "embedding_dim": 64, "bits": 8, "group_size": 32, **bad}
        with pytest.raises(OutputError, match="cannot build torchslim:WeightOnlyEmbedding"):
            replay(model, [{"fqn": "0", "module": {"cls": "torchslim:WeightOnlyEmbedding", "kwargs": kwargs}}])
        linear = {"in_features": 64, "out_features": 4, "bits": kwargs["bits"], "group_size": kwargs["group_size"]}
        with pytest.raises(OutputError, match="cannot build torchslim:WeightOnlyLinear"):
            replay(model, [{"fqn": "0", "module": {"cls": "torchslim:WeightOnlyLinear", "kwargs": linear}}])
