"""Compact, exact weight files: safetensors with bitmask-encoded sparse tensors.

A tensor whose zeros make it cheaper stored as (packed bitmask, nonzero values) is stored
that way; tied tensors are stored once; integer tensors of modules that ask for entropy coding
(``entropy_coded = True``, e.g. cluster indices after ``sharing.huffman``) are Huffman-coded
when that is smaller: densely (one code per value), or sparsely (format ``sparse_huffman``: the
entries that differ from the most common value, each as a Huffman-coded gap and value, as in Deep
Compression) when most values are one value, such as the pinned zero of pruned clustered layers.
Decoding gives back every tensor bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchslim.core import huffman
from torchslim.errors import OutputError

__all__ = ["decode", "encode", "entropy_coded", "entropy_coded_bytes", "load_state_dict_into",
           "read_state_dict", "save_state_dict", "serialized_size", "temp_path"]

_META_KEY = "torchslim.encoding"
_TENSOR_COST = 64  # about what one more tensor adds to a safetensors header, in bytes
_INDEX_DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
                 "int64": torch.int64}


def _bitmask_pays(t: torch.Tensor) -> bool:
    if t.numel() < 64 or t.dtype == torch.bool or t.dtype.is_complex:
        return False
    nnz = int(torch.count_nonzero(t))
    return math.ceil(t.numel() / 8) + nnz * t.element_size() < t.numel() * t.element_size()


def entropy_coded(model: nn.Module) -> set[str]:
    """State-dict names of the ``indices`` of modules flagged ``entropy_coded``."""
    return {f"{fqn}.indices" if fqn else "indices" for fqn, m in model.named_modules()
            if getattr(m, "entropy_coded", False) and isinstance(getattr(m, "indices", None), torch.Tensor)}


def encode(state: Mapping[str, torch.Tensor], entropy: set[str] | frozenset[str] = frozenset(),
           ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to write, safetensors metadata) for a state dict; ``entropy``: names to Huffman-code."""
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, dict[str, object]] = {}
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    for name, tensor in state.items():
        t = tensor.detach().cpu()
        # Same storage, offset, shape, strides and dtype: the very same tensor (tied weights).
        ident = (t.untyped_storage().data_ptr(), int(t.storage_offset()), tuple(t.shape), t.stride(), t.dtype)
        if ident in seen and t.numel():
            info[name] = {"format": "alias", "of": seen[ident]}
            continue
        seen[ident] = name
        if name in entropy and not t.dtype.is_floating_point and (spec := _encode_huffman(name, t, tensors)):
            info[name] = spec
        elif _bitmask_pays(t):
            info[name] = _encode_bitmask(name, t, tensors)
        else:
            tensors[name] = t.contiguous().clone()
    return tensors, {_META_KEY: json.dumps(info)}


def _encode_bitmask(name: str, t: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, object]:
    """Store ``t`` as a bitmask of nonzeros plus their values; return its metadata entry.

    Masked weights hold -0.0 wherever a negative weight was multiplied by 0; a second bitmask
    over the zeros keeps those signs, so decoding is bit-exact.
    """
    flat = t.contiguous().flatten()
    keep = flat != 0  # NaN counts as nonzero and is stored with its payload
    tensors[f"{name}::bitmask"] = torch.from_numpy(np.packbits(keep.numpy()))
    tensors[f"{name}::values"] = flat[keep].clone()
    spec: dict[str, object] = {"format": "bitmask", "shape": list(t.shape)}
    if flat.dtype.is_floating_point:
        negative = torch.signbit(flat[~keep])
        if bool(negative.any()):
            tensors[f"{name}::negative_zeros"] = torch.from_numpy(np.packbits(negative.numpy()))
            spec["negative_zeros"] = True
    return spec


def _encode_huffman(name: str, t: torch.Tensor,
                    tensors: dict[str, torch.Tensor]) -> dict[str, object] | None:
    """Huffman-code an integer tensor, dense or sparse, if that is smaller than storing it as is."""
    if t.numel() == 0 or int(t.min()) < 0:
        return None
    flat = t.flatten().numpy()
    coded, sparse = huffman.encode(flat), huffman.encode_sparse(flat)
    dense_size = coded[0].size + 5 * coded[1].size if coded is not None else t.numel() * t.element_size()
    # each stored tensor costs about _TENSOR_COST header bytes: sparse keeps one, dense three
    sparse_size = sparse[0].size - 2 * _TENSOR_COST if sparse is not None else dense_size
    raw = t.numel() * t.element_size()
    dtype = str(t.dtype).removeprefix("torch.")
    if sparse is not None and sparse_size < dense_size and sparse[0].size < raw:
        tensors[f"{name}::sparse"] = torch.from_numpy(sparse[0])
        return {"format": "sparse_huffman", "shape": list(t.shape), "dtype": dtype, **sparse[1]}
    if coded is None or dense_size >= raw:
        return None
    tensors[f"{name}::huffman"] = torch.from_numpy(coded[0])
    tensors[f"{name}::symbols"] = torch.from_numpy(coded[1])
    tensors[f"{name}::lengths"] = torch.from_numpy(coded[2])
    return {"format": "huffman", "shape": list(t.shape), "dtype": dtype}


def entropy_coded_bytes(t: torch.Tensor) -> int:
    """Bytes of the data ``save_state_dict`` writes for an entropy-coded integer tensor."""
    tensors: dict[str, torch.Tensor] = {}
    t = t.detach().cpu()
    if t.dtype.is_floating_point or _encode_huffman("t", t, tensors) is None:
        return t.numel() * t.element_size()
    return sum(v.numel() * v.element_size() for v in tensors.values())


def _index_dtype(spec: Mapping[str, Any]) -> torch.dtype:
    if spec["dtype"] not in _INDEX_DTYPES:
        raise ValueError(f"entropy-coded dtype must be one of {sorted(_INDEX_DTYPES)}; "
                         f"found {spec['dtype']!r}")
    return _INDEX_DTYPES[spec["dtype"]]


def _decode_sparse(name: str, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    shape = [int(s) for s in spec["shape"]]
    if min(shape, default=1) < 0:
        raise ValueError(f"{name}: negative shape {shape}")
    dtype = _index_dtype(spec)
    header = {k: int(spec[k]) for k in ("fill", "cap", "entries", "gap_table", "value_table", "gap_bytes")}
    values = huffman.decode_sparse(tensors[f"{name}::sparse"].numpy(), header, math.prod(shape))
    if len(values) and int(values.max()) > torch.iinfo(dtype).max:
        raise ValueError(f"{name}: decoded value {int(values.max())} does not fit {dtype}")
    return torch.from_numpy(values).to(dtype).view(shape)


def _decode_huffman(name: str, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    shape = [int(s) for s in spec["shape"]]
    numel = math.prod(shape)
    stream = tensors[f"{name}::huffman"].numpy()
    if min(shape, default=1) < 0 or numel > 8 * stream.size:
        raise ValueError(f"{name}: shape {shape} does not fit a stream of {stream.size} bytes")
    dtype = _index_dtype(spec)
    symbols, lengths = tensors[f"{name}::symbols"].numpy(), tensors[f"{name}::lengths"].numpy()
    values = huffman.decode(stream, symbols, lengths, numel)
    return torch.from_numpy(values).to(dtype).view(shape)


def _decode_bitmask(name: str, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    shape = [int(s) for s in spec["shape"]]
    numel = math.prod(shape)
    values = tensors[f"{name}::values"]
    if min(shape, default=1) < 0 or numel > 8 * tensors[f"{name}::bitmask"].numel():
        raise ValueError(f"{name}: shape {shape} does not fit a bitmask of "
                         f"{tensors[f'{name}::bitmask'].numel()} bytes")
    bits = np.unpackbits(tensors[f"{name}::bitmask"].numpy(), count=numel).astype(bool)
    if int(bits.sum()) != values.numel():
        raise ValueError(f"{name}: bitmask has {int(bits.sum())} ones for {values.numel()} values")
    flat = torch.zeros(numel, dtype=values.dtype)
    flat[torch.from_numpy(bits)] = values
    if spec.get("negative_zeros"):
        zeros = np.flatnonzero(~bits)
        negative = np.unpackbits(tensors[f"{name}::negative_zeros"].numpy(), count=zeros.size).astype(bool)
        flat[torch.from_numpy(zeros[negative])] = -0.0
    return flat.view(shape)


def decode(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> dict[str, torch.Tensor]:
    """Invert ``encode``: the original state dict, bit for bit."""
    try:
        info = json.loads((metadata or {}).get(_META_KEY, "{}"))
        out = {k: v for k, v in tensors.items() if "::" not in k}
        for name, spec in info.items():
            if spec["format"] == "bitmask":
                out[name] = _decode_bitmask(name, spec, tensors)
            elif spec["format"] == "huffman":
                out[name] = _decode_huffman(name, spec, tensors)
            elif spec["format"] == "sparse_huffman":
                out[name] = _decode_sparse(name, spec, tensors)
        for name, spec in info.items():
            if spec["format"] == "alias":
                out[name] = out[spec["of"]]
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError, OverflowError) as exc:
        raise OutputError(f"weights file is corrupt: cannot decode ({exc})") from exc
    return out


def save_state_dict(model: nn.Module, path: Path, metadata: Mapping[str, str] | None = None) -> int:
    """Write ``model.state_dict()`` to ``path`` atomically; return the file size in bytes."""
    from safetensors.torch import save_file

    tensors, meta = encode(model.state_dict(), entropy_coded(model))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        save_file(tensors, str(tmp), metadata={**meta, **(metadata or {})})
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


def temp_path(path: Path) -> Path:
    """A fresh hidden name beside ``path`` to write to before renaming onto ``path``.

    Unlike ``tempfile.mkstemp`` it creates nothing, so the final file gets the usual
    permissions (mkstemp's are owner-only).
    """
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) from a file written by ``save_state_dict``."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise OutputError(f"weights file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    except (SafetensorError, OSError, ValueError) as exc:
        raise OutputError(f"{path}: not a readable safetensors file ({exc})") from exc
    return decode(tensors, metadata), dict(metadata)


def load_state_dict_into(model: nn.Module, path: Path) -> dict[str, str]:
    """Load weights from ``path`` into ``model`` with ``strict=True``; return the metadata."""
    state, metadata = read_state_dict(path)
    expected = model.state_dict()
    problem = _first_mismatch(expected, state)
    if problem is not None:
        raise OutputError(f"{path}: weights do not fit the model: {problem}")
    # Module versions (``_metadata``) are not stored in safetensors; the freshly built model's
    # own versions are the right ones (torchvision's MNASNet refuses a state dict without them).
    loadable: Any = dict(state)
    loadable = type(expected)(loadable)
    loadable._metadata = getattr(expected, "_metadata", None)
    try:
        model.load_state_dict(loadable, strict=True)
    except RuntimeError as exc:
        raise OutputError(f"{path}: weights do not fit the model: {str(exc).splitlines()[0]}") from exc
    return metadata


def _first_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> str | None:
    """Describe the first key that is missing, unexpected or of another shape; None if all fit."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    counts = f"({len(missing)} missing, {len(unexpected)} unexpected key(s) in all)"
    if missing:
        return f"the model expects {missing[0]!r}, which the file does not hold {counts}"
    if unexpected:
        return f"the file holds {unexpected[0]!r}, which the model does not have {counts}"
    for key, tensor in expected.items():
        if tuple(found[key].shape) != tuple(tensor.shape):
            return (f"{key!r} has shape {list(found[key].shape)} in the file but "
                    f"{list(tensor.shape)} in the model")
    return None


def serialized_size(model: nn.Module) -> int:
    """Bytes of the model's weights as ``save_state_dict`` writes them."""
    from safetensors.torch import save

    tensors, meta = encode(model.state_dict(), entropy_coded(model))
    return len(save(tensors, metadata=meta))
