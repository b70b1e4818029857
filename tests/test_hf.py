"""hf:<folder> models: resolve, compress, save beside config/tokenizer, reload bit-exact, generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import torchslim as ts
from tiny_hf import bert_folder, llama_folder
from torchslim.adapters import resolve_data, resolve_model
from torchslim.errors import DataError, ModelError
from torchslim.hf import generate, inspect_folder, load_tokenizer, save
from torchslim.quantization import WeightOnlyConfig
from torchslim.quantization.packed import WeightOnlyLinear
from torchslim.zoo.minilm import MiniLMEncoder

IDS = torch.tensor([[4, 6, 7, 5, 8, 9, 10]])


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_causal_lm_folder_resolves_with_a_weightless_build(tmp_path: Path) -> None:
    folder = llama_folder(tmp_path / "llama")
    model, build = resolve_model(f"hf:{folder}")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    rebuilt = build()
    assert type(rebuilt) is type(model) and rebuilt.state_dict().keys() == model.state_dict().keys()
    assert not torch.equal(rebuilt.lm_head.weight, model.lm_head.weight)  # from the config alone
    loaded = resolve_model(f"hf:{folder}")[0]
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)  # the saved weights, deterministically


def test_int4_llama_saves_beside_config_and_tokenizer_reloads_bit_exact_and_generates(tmp_path: Path) -> None:
    folder = llama_folder(tmp_path / "llama")
    model, _ = resolve_model(f"hf:{folder}")
    cfg = WeightOnlyConfig(bits=4, group_size=32, targets=(r"re:model\.layers\.\d+\..*_proj",))
    result = ts.apply(model, cfg, ts.Context())
    assert isinstance(result.model.model.layers[0].mlp.up_proj, WeightOnlyLinear)
    out = save(result, tmp_path / "out", folder)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors",
                 "structure.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text()) == json.loads((folder / "config.json").read_text())

    reloaded, build = resolve_model(f"hf:{out}")  # a torchslim folder resolves to the compressed model
    assert isinstance(reloaded.model.layers[1].self_attn.q_proj, WeightOnlyLinear)
    assert _state_equal(reloaded, result.model)
    assert torch.equal(reloaded(IDS).logits, result.model(IDS).logits)
    also = ts.load(out, build=lambda: resolve_model(f"hf:{folder}", pretrained=False)[0])
    assert _state_equal(also, result.model)

    tok = load_tokenizer(inspect_folder("", out))  # the copied tokenizer
    text = generate(reloaded, tok, "the minister said", max_new_tokens=5)
    assert text == generate(result.model, tok, "the minister said", max_new_tokens=5)
    assert len(text.split()) == 5


def test_config_copied_without_a_tokenizer(tmp_path: Path) -> None:
    folder = llama_folder(tmp_path / "llama", tokenizer=False)
    model, _ = resolve_model(f"hf:{folder}")
    out = save(ts.apply(model, WeightOnlyConfig(bits=8, group_size=32), ts.Context()), tmp_path / "o", folder)
    assert (out / "config.json").is_file() and not (out / "tokenizer.json").exists()


def test_sentence_transformers_folder_is_wrapped_with_mean_pooling(tmp_path: Path) -> None:
    folder = bert_folder(tmp_path / "bert")
    model, build = resolve_model(f"hf:{folder}")
    assert isinstance(model, MiniLMEncoder) and isinstance(build(), MiniLMEncoder)
    mask = torch.tensor([[1, 1, 1, 0]])
    emb = model(torch.tensor([[2, 6, 3, 0]]), mask)
    hidden = model.bert(input_ids=torch.tensor([[2, 6, 3]])).last_hidden_state.mean(1)
    assert torch.allclose(emb, torch.nn.functional.normalize(hidden, dim=-1), atol=1e-5)
    result = ts.apply(model, ts.get_config_class("quantization.dynamic")(), ts.Context())
    out = save(result, tmp_path / "out", folder)
    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file()
    assert _state_equal(resolve_model(f"hf:{out}")[0], result.model)
    plain, _ = resolve_model(f"hf:{bert_folder(tmp_path / 'plain', sentence=False)}")
    assert type(plain).__name__ == "BertModel"


def test_other_pooling_is_refused(tmp_path: Path) -> None:
    folder = bert_folder(tmp_path / "bert")
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    with pytest.raises(ModelError, match="only mean pooling"):
        resolve_model(f"hf:{folder}")


def test_bad_folders_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"does not exist"):
        resolve_model(f"hf:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelError, match=r"empty has no config.json.*weights.bin"):
        resolve_model(f"hf:{tmp_path / 'empty'}")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"bad/config.json is not readable JSON"):
        resolve_model(f"hf:{tmp_path / 'bad'}")
    (tmp_path / "bad" / "config.json").write_text('{"hidden_size": 4}')
    with pytest.raises(ModelError, match="no 'model_type'"):
        resolve_model(f"hf:{tmp_path / 'bad'}")


def test_text_data_needs_an_hf_model() -> None:
    with pytest.raises(DataError, match=r"zoo:lee_windows.*expected an hf:<folder> model, found 'zoo:mlp'"):
        resolve_data("zoo:lee_windows", model="zoo:mlp")
    with pytest.raises(DataError, match="did you mean 'lee_windows'"):
        resolve_data("zoo:lee_window", model="zoo:mlp")
