"""core/storage.py: bit-exact round trips, compact sparse tensors, tied weights, corrupt files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from torchslim.core import huffman, storage
from torchslim.errors import OutputError

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so NaN payloads and -0.0 compare exactly."""
    flat = t.contiguous().flatten()
    return flat.view(_BITS[flat.element_size()]) if flat.dtype.is_floating_point else flat


def _holder(**tensors: torch.Tensor) -> nn.Module:
    module = nn.Module()
    for name, tensor in tensors.items():
        module.register_buffer(name, tensor)
    return module


def _sparse(shape: tuple[int, ...], sparsity: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if dtype.is_floating_point:
        t = torch.randn(shape).to(dtype)
    else:
        t = torch.randint(-128, 128, shape, dtype=dtype)
    t[torch.rand(shape) < sparsity] = 0
    return t


def _round_trip(module: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    size = storage.save_state_dict(module, path)
    assert size == path.stat().st_size == storage.serialized_size(module)
    state, _ = storage.read_state_dict(path)
    expected = module.state_dict()
    assert sorted(state) == sorted(expected)
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype and state[name].shape == tensor.shape, name
        assert torch.equal(_bits(state[name]), _bits(tensor)), name
    return state


def _size(path: Path) -> int:
    return path.stat().st_size


def _encodings(path: Path) -> dict[str, dict[str, object]]:
    _, metadata = storage.read_state_dict(path)
    return json.loads(metadata["torchslim.encoding"])


def test_random_dense_tensors_round_trip_bit_exact_and_stay_dense(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = _holder(a=torch.randn(64, 33), b=torch.randn(7).double(), c=torch.randn(40, 40).half(),
                     d=torch.randn(12, 12).bfloat16(), e=torch.tensor(3.5), f=torch.rand(9) > 0.5)
    _round_trip(module, tmp_path / "w.safetensors")
    assert _encodings(tmp_path / "w.safetensors") == {}


def test_ninety_percent_sparse_tensor_is_bitmask_encoded_and_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    sparse = _holder(w=_sparse((256, 256), 0.9))
    dense = _holder(w=torch.randn(256, 256))
    _round_trip(sparse, tmp_path / "sparse.safetensors")
    _round_trip(dense, tmp_path / "dense.safetensors")
    assert _encodings(tmp_path / "sparse.safetensors")["w"]["format"] == "bitmask"
    # 1 bit per element plus ~10% of the 32-bit values: about 16% of the dense file.
    assert _size(tmp_path / "sparse.safetensors") < 0.2 * _size(tmp_path / "dense.safetensors")


@pytest.mark.parametrize("sparsity", [0.0, 0.95])
def test_int8_tensors_round_trip(tmp_path: Path, sparsity: float) -> None:
    torch.manual_seed(1)
    module = _holder(q=_sparse((128, 96), sparsity, torch.int8), scale=torch.rand(128))
    _round_trip(module, tmp_path / "q.safetensors")
    encoded = "q" in _encodings(tmp_path / "q.safetensors")
    assert encoded == (sparsity > 0.5)  # 1 bit mask + 1 byte values pays only when mostly zero


def test_negative_zero_and_nan_survive_sparse_encoding(tmp_path: Path) -> None:
    t = torch.zeros(1000)
    t[:10] = -0.0
    t[10] = float("nan")
    t[11] = float("-inf")
    t[500] = 1.5
    state = _round_trip(_holder(t=t), tmp_path / "z.safetensors")
    assert torch.signbit(state["t"][:10]).all() and not torch.signbit(state["t"][12:]).any()
    assert _encodings(tmp_path / "z.safetensors")["t"] == {"format": "bitmask", "shape": [1000],
                                                           "negative_zeros": True}


def test_masked_weights_with_negative_zeros_stay_small(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weight = torch.randn(256, 256)
    masked = weight * (torch.rand(256, 256) > 0.9)  # negative weights times 0 give -0.0
    assert torch.signbit(masked[masked == 0]).float().mean() > 0.4
    _round_trip(_holder(w=masked), tmp_path / "masked.safetensors")
    _round_trip(_holder(w=weight), tmp_path / "dense.safetensors")
    assert _size(tmp_path / "masked.safetensors") < 0.2 * _size(tmp_path / "dense.safetensors")


def test_tied_weights_are_stored_once_and_load_into_a_tied_model(tmp_path: Path) -> None:
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(100, 64)
            self.head = nn.Linear(64, 100, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    state = _round_trip(model, tmp_path / "tied.safetensors")
    alias = {"format": "alias", "of": "embed.weight"}
    assert _encodings(tmp_path / "tied.safetensors")["head.weight"] == alias
    untied = nn.Module()
    untied.register_buffer("a", model.embed.weight.detach().clone())
    untied.register_buffer("b", model.embed.weight.detach().clone())
    storage.save_state_dict(untied, tmp_path / "untied.safetensors")
    assert _size(tmp_path / "tied.safetensors") < 0.6 * _size(tmp_path / "untied.safetensors")
    fresh = Tied()
    storage.load_state_dict_into(fresh, tmp_path / "tied.safetensors")
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.embed.weight, state["embed.weight"])


def test_views_of_one_storage_with_other_strides_are_not_aliased(tmp_path: Path) -> None:
    base = torch.randn(16, 16)
    module = _holder(a=base)
    module.b = base.t()  # same storage, offset, shape and dtype; other strides
    module._buffers["b"] = base.t()
    _round_trip(module, tmp_path / "views.safetensors")


def test_load_state_dict_into_names_the_first_mismatching_key(tmp_path: Path) -> None:
    path = tmp_path / "mlp.safetensors"
    storage.save_state_dict(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), path)
    with pytest.raises(OutputError, match=r"'1.weight' has shape \[2, 8\] in the file but \[2, 6\]"):
        storage.load_state_dict_into(nn.Sequential(nn.Linear(4, 8), nn.Linear(6, 2)), path)
    with pytest.raises(OutputError, match="expects '2.weight'"):
        storage.load_state_dict_into(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(2, 2)), path)
    with pytest.raises(OutputError, match=r"holds '1\.(weight|bias)'.*2 unexpected"):
        storage.load_state_dict_into(nn.Sequential(nn.Linear(4, 8), nn.Identity()), path)


def test_missing_garbage_and_truncated_files_raise_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="does not exist"):
        storage.read_state_dict(tmp_path / "absent.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file" * 10)
    with pytest.raises(OutputError, match="not a readable safetensors file"):
        storage.read_state_dict(garbage)
    good = tmp_path / "good.safetensors"
    storage.save_state_dict(_holder(w=_sparse((64, 64), 0.9)), good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(OutputError):
        storage.read_state_dict(truncated)


def test_inconsistent_encoding_metadata_raises_output_error() -> None:
    tensors, meta = storage.encode({"w": _sparse((64, 64), 0.9)})
    info = json.loads(meta["torchslim.encoding"])
    with pytest.raises(OutputError, match="corrupt"):  # one value missing for the mask
        storage.decode({**tensors, "w::values": tensors["w::values"][1:]}, meta)
    with pytest.raises(OutputError, match="corrupt"):
        storage.decode({"w::values": tensors["w::values"]}, meta)
    with pytest.raises(OutputError, match="corrupt"):
        storage.decode(tensors, {"torchslim.encoding": json.dumps({"w": {**info["w"], "shape": "x"}})})
    with pytest.raises(OutputError, match="corrupt"):
        storage.decode(tensors, {"torchslim.encoding": "{not json"})


def test_save_leaves_no_temporary_file(tmp_path: Path) -> None:
    storage.save_state_dict(_holder(w=torch.randn(8)), tmp_path / "sub" / "w.safetensors")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["w.safetensors"]


def test_mostly_zero_index_tensor_is_stored_sparse_and_smaller_than_dense_huffman(tmp_path: Path) -> None:
    rng = torch.Generator().manual_seed(0)
    indices = torch.randint(1, 32, (300, 784), dtype=torch.uint8, generator=rng)
    indices[torch.rand(indices.shape, generator=rng) < 0.9] = 0  # 90% pruned: the pinned zero
    module = _holder(indices=indices)
    module.entropy_coded = True
    _round_trip(module, tmp_path / "sparse.safetensors")
    assert _encodings(tmp_path / "sparse.safetensors")["indices"]["format"] == "sparse_huffman"
    stream, symbols, _ = huffman.encode(indices.flatten().numpy())
    sparse_bytes = storage.entropy_coded_bytes(indices)
    assert sparse_bytes < 0.75 * (stream.size + 5 * symbols.size)
    assert sparse_bytes < indices.numel() / 8  # under one bit per weight: beyond any dense code


def test_dense_index_tensor_keeps_the_dense_huffman_code(tmp_path: Path) -> None:
    indices = (torch.randn(64, 64, generator=torch.Generator().manual_seed(1)) * 3).round().clamp(-7, 7) + 8
    module = _holder(indices=indices.to(torch.uint8))
    module.entropy_coded = True
    _round_trip(module, tmp_path / "dense.safetensors")
    assert _encodings(tmp_path / "dense.safetensors")["indices"]["format"] == "huffman"


@pytest.mark.parametrize(("field", "value"), [("dtype", "float32"), ("dtype", "nn"), ("fill", 300),
                                              ("shape", [10**12]), ("entries", float("inf")), ("cap", "x")])
def test_corrupt_sparse_entries_raise_output_error(field: str, value: object) -> None:
    indices = torch.zeros(200, 50, dtype=torch.uint8)
    indices[::7, ::3] = 5
    tensors, meta = storage.encode({"idx": indices}, {"idx"})
    info = json.loads(meta["torchslim.encoding"])
    assert info["idx"]["format"] == "sparse_huffman"
    info["idx"][field] = value
    with pytest.raises(OutputError, match="corrupt"):
        storage.decode(tensors, {"torchslim.encoding": json.dumps(info)})
