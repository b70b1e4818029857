"""nas.search over a Transformer space: students sliced by registry key, distilled, saved, reloaded."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError, RecipeError, UnsupportedModuleError
from torchslim.export import load, save
from torchslim.nas import (
    NASSearchConfig,
    TransformerArch,
    TransformerLatencyTable,
    TransformerSpace,
    model_dims,
    search,
    slice_student,
)
from torchslim.nas.latency import assess

transformers = pytest.importorskip("transformers")
pytest.importorskip("optuna")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPACE = TransformerSpace(layers=(1, 2, 4), heads=(2, 4), ffn=(32, 64))


def tiny_encoder(seed: int = 0) -> nn.Module:
    """A random BERT sentence encoder (mean pooling, L2 norm): hidden 32, 4 layers of 4 heads, FFN 64.

    No dropout and a wide initialization: the default's embeddings nearly all point one way.
    """
    from torchslim.zoo.minilm import MiniLMEncoder

    config = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2)
    torch.manual_seed(seed)
    return MiniLMEncoder(transformers.BertModel(config)).eval()


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 60, (8, 12), generator=g), "attention_mask": torch.ones(8, 12).long()}


def _ctx(teacher: nn.Module, tmp_path: Path | None, held_seed: int = 100) -> ts.Context:
    """Six training batches; eval_fn: cosine to the teacher's embeddings on batch ``held_seed``."""
    train = [(_batch(i), torch.zeros(8, dtype=torch.long)) for i in range(6)]
    held = _batch(held_seed)
    with torch.no_grad():
        reference = teacher(**held)

    def fidelity(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return {"fidelity": float(nn.functional.cosine_similarity(model(**held), reference).mean())}

    return ts.Context(train_data=train, calib_data=[b for b, _ in train[:2]], example_inputs=held,
                      eval_fn=fidelity, workdir=tmp_path, seed=0)


def _cfg(**fields: object) -> NASSearchConfig:
    raw = {"method": "nas.search", "space": {"kind": "transformer", "layers": [1, 2], "heads": [2, 4],
                                              "ffn": [32, 64]},
           "strategy": "random", "trials": 3, "metric": "fidelity", "lr": 1e-3,
           "distill": [{"method": "distillation.logits", "loss": "cosine", "temperature": 1.0, "alpha": 1.0}],
           **fields}
    cfg = NASSearchConfig.from_dict(raw)
    assert isinstance(cfg, NASSearchConfig)
    return cfg


def test_model_dims_read_the_config_of_a_wrapped_model() -> None:
    dims = model_dims(tiny_encoder())
    assert (dims.layers, dims.heads, dims.ffn, dims.hidden, dims.head_dim) == (4, 4, 64, 32, 8)


def test_a_sliced_student_has_the_picked_sizes_and_the_full_pick_is_the_model() -> None:
    model = tiny_encoder()
    ctx = _ctx(model, None)
    student, structure = slice_student(model, TransformerArch(layers=2, heads=2, ffn=32), SPACE, ctx)
    layers = student.bert.encoder.layer
    assert len(layers) == 2 and student.bert.config.num_hidden_layers == 2
    for layer in layers:
        assert layer.attention.self.query.out_features == 2 * 8  # 2 heads of the model's head size
        assert layer.attention.output.dense.in_features == 16
        assert layer.intermediate.dense.out_features == 32 and layer.output.dense.in_features == 32
    assert "bert.encoder.layer" in structure
    assert len(model.bert.encoder.layer) == 4, "the model itself is left whole"
    whole, nothing = slice_student(model, TransformerArch(layers=4, heads=4, ffn=64), SPACE, ctx)
    batch = _batch(5)
    assert nothing == {}
    torch.testing.assert_close(whole(**batch), model(**batch), rtol=0, atol=0)


def test_a_narrower_hidden_size_slices_the_residual_stream() -> None:
    model = tiny_encoder()
    ctx = _ctx(model, None)
    space = TransformerSpace(layers=(2,), heads=(4,), ffn=(64,), hidden=(24, 32))
    arch = space.arch({"layers": 2, "heads": 4, "ffn": 64, "hidden": 24})
    student, structure = slice_student(model, arch, space, ctx)
    emb = student.bert.embeddings
    assert emb.word_embeddings.embedding_dim == 24 and emb.LayerNorm.normalized_shape == (24,)
    for layer in student.bert.encoder.layer:
        assert layer.attention.self.query.in_features == 24 and layer.intermediate.dense.in_features == 24
        assert layer.attention.self.query.out_features == 32  # heads keep the model's head size
        assert layer.attention.output.dense.out_features == 24 and layer.output.dense.out_features == 24
        assert layer.output.LayerNorm.normalized_shape == (24,)
    batch = _batch(3)
    assert student(**batch).shape == (8, 24) and model_dims(student).hidden == 24
    kept = [i for i in range(32) if any(torch.equal(emb.word_embeddings.weight[:, j],
                                                    model.bert.embeddings.word_embeddings.weight[:, i])
                                        for j in range(24))]
    assert len(kept) == 24  # a subset of the model's channels, not new ones
    assert space.genes()["hidden"] == (24, 32) and "hidden" not in SPACE.genes()
    table = TransformerLatencyTable(model_dims(model), batch_size=2, seq_len=8, repeats=1)
    assert table.operators(arch) == [("attention", 4, 24), ("ffn", 64, 24)] * 2


def test_a_search_over_hidden_sizes_distills_through_projections_and_reloads_bit_exact(tmp_path: Path) -> None:
    model = tiny_encoder()
    held = _batch(100)

    def agreement(m: nn.Module) -> dict[str, float]:  # pairwise similarities: any width compares
        with torch.no_grad():
            a, b = m(**held), model(**held)
        return {"fidelity": float(torch.corrcoef(torch.stack([(a @ a.T).flatten(), (b @ b.T).flatten()]))[0, 1])}

    ctx = dataclasses.replace(_ctx(model, tmp_path / "work"), eval_fn=agreement)
    features = {"method": "distillation.features", "mapping": "uniform", "loss": "mse",
                "targets": [r"re:bert\.encoder\.layer\.\d+"]}
    cfg = _cfg(space={"kind": "transformer", "layers": [2], "heads": [4], "ffn": [64], "hidden": [24]},
               trials=1, distill=[features])
    result = ts.apply(model, cfg, ctx)
    stats = result.record.outcomes[0].stats
    assert stats["trials_complete"] == 1 and stats["trials_failed"] == 0
    assert result.model.bert.embeddings.word_embeddings.embedding_dim == 24
    save(result, tmp_path / "out")
    reloaded = load(tmp_path / "out", build=tiny_encoder)
    batch = _batch(7)
    torch.testing.assert_close(reloaded(**batch), result.model(**batch), rtol=0, atol=0)


def test_search_distills_students_and_the_chosen_one_reloads_bit_exact(tmp_path: Path) -> None:
    model = tiny_encoder()
    ctx = _ctx(model, tmp_path / "work")
    result = ts.apply(model, _cfg(), ctx)
    student = result.model
    stats = result.record.outcomes[0].stats
    assert stats["trials_complete"] == 3 and stats["trials_failed"] == 0
    assert -1.0 <= stats["best_accuracy"] <= 1.0
    assert len(student.bert.encoder.layer) in (1, 2)
    assert (tmp_path / "work" / "nas_trials.md").is_file()
    save(result, tmp_path / "out")
    reloaded = load(tmp_path / "out", build=tiny_encoder)
    batch = _batch(7)
    torch.testing.assert_close(reloaded(**batch), student(**batch), rtol=0, atol=0)


def test_distillation_moves_a_student_towards_its_teacher() -> None:
    model = tiny_encoder()
    ctx = _ctx(model, None, held_seed=0)  # scored on a training batch: random tokens do not generalize
    arch = TransformerArch(layers=1, heads=2, ffn=32)
    student, _ = slice_student(model, arch, SPACE, ctx)
    before = ctx.eval_fn(student.eval())["fidelity"]  # type: ignore[misc]
    result = search(_cfg(space={"kind": "transformer", "layers": [1], "heads": [2], "ffn": [32]}, trials=1,
                         epochs_per_trial=5), ctx, base=model)
    assert result.best["arch"] == arch.to_dict()
    assert result.best["accuracy"] > before + 0.2


def test_transformer_latency_table_sums_per_layer_operators() -> None:
    table = TransformerLatencyTable(model_dims(tiny_encoder()), batch_size=2, seq_len=8, repeats=2)
    small, large = TransformerArch(layers=1, heads=2, ffn=32), TransformerArch(layers=3, heads=2, ffn=32)
    assert table.operators(large) == [("attention", 2, 32), ("ffn", 32, 32)] * 3  # at the model's hidden size
    assert table.raw(large) == pytest.approx(3 * table.raw(small))  # each operator is timed once
    assert len(table.table) == 2
    table.fit([small, large], [2 * table.raw(small) + 1, 2 * table.raw(large) + 1])
    assert (table.scale, table.offset) == (pytest.approx(2.0), pytest.approx(1.0))


def test_bad_transformer_spaces_are_refused_with_where_and_what(tmp_path: Path) -> None:
    model = tiny_encoder()
    with pytest.raises(ConfigError, match=r"space\.heads: \[8\] exceed the model's 4 heads"):
        search(_cfg(space={"kind": "transformer", "layers": [1], "heads": [2, 8], "ffn": [32]}), _ctx(model, None),
               base=model)
    with pytest.raises(ConfigError, match=r"space\.hidden: \[48\] exceed the model's 32 hidden"):
        search(_cfg(space={"kind": "transformer", "layers": [1], "heads": [2], "ffn": [32], "hidden": [16, 48]}),
               _ctx(model, None), base=model)
    with pytest.raises(ConfigError, match=r"space\.hidden: expected distinct choices"):
        _cfg(space={"kind": "transformer", "layers": [1], "heads": [2], "ffn": [32], "hidden": [16, 16]})
    with pytest.raises(ConfigError, match="space.layers: expected at least one choice"):
        _cfg(space={"kind": "transformer", "layers": [], "heads": [2], "ffn": [32]})
    with pytest.raises(ConfigError, match="space.kind: expected 'cnn' or 'transformer', found 'rnn'"):
        _cfg(space={"kind": "rnn"})
    with pytest.raises(ConfigError, match="is a one-shot method; expected a trained method"):
        _cfg(distill=[{"method": "pruning.magnitude", "sparsity": 0.5}])
    with pytest.raises(RecipeError, match=r"nas\.search\.distill\[0\]: pruning\.magnitude has no field 'ratio'"):
        _cfg(distill=[{"method": "pruning.magnitude", "ratio": 0.5}])
    with pytest.raises(ConfigError, match="slices its candidates from the model"):
        search(_cfg(), _ctx(model, None))
    with pytest.raises(UnsupportedModuleError, match="Hugging Face-style config"):
        ts.apply(nn.Sequential(nn.Linear(4, 4)), _cfg(), _ctx(model, None))


def test_a_re_proposed_student_is_not_trained_again() -> None:
    model = tiny_encoder()
    ctx = _ctx(model, None)
    calls = []
    scored = ctx.eval_fn
    assert scored is not None

    def counting(m: nn.Module) -> dict[str, float]:
        calls.append(1)
        return scored(m)

    only = {"kind": "transformer", "layers": [1], "heads": [2], "ffn": [32]}  # one student in the space
    result = search(_cfg(space=only, trials=3), dataclasses.replace(ctx, eval_fn=counting), base=model)
    assert len(calls) == 1 and len(result.rows) == 1 and not result.failed


def test_assess_reports_rank_agreement_and_the_error_after_the_fit() -> None:
    table = TransformerLatencyTable(model_dims(tiny_encoder()), batch_size=2, seq_len=8, repeats=1)
    table.table = {("attention", 2, 32): 1.0, ("attention", 4, 32): 1.5, ("ffn", 32, 32): 0.5,
                   ("ffn", 64, 32): 0.8}  # as timed
    archs = [TransformerArch(layers=n, heads=h, ffn=f) for n in (1, 2, 3) for h in (2, 4) for f in (32, 64)]
    measured = [3 * table.raw(a) + 2 for a in archs]  # a machine 3x slower plus a fixed cost
    scores = assess(table, archs, measured, fit_on=4)
    assert scores["spearman"] == pytest.approx(1.0) and scores["mape"] == pytest.approx(0.0, abs=1e-9)
    assert scores["ops"] == 4 and (table.scale, table.offset) == (pytest.approx(3.0), pytest.approx(2.0))
    with pytest.raises(ConfigError, match="more than fit_on=10"):
        assess(table, archs[:5], measured[:5])
