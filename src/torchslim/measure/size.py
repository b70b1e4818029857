"""Serialized model size: the bytes of the weights file torchslim writes.

Sparse tensors are stored as a bitmask plus nonzero values and tied tensors once
(``torchslim.core.storage``), so unstructured sparsity and packed weights shrink the number for
real, as they shrink the file.
"""

from __future__ import annotations

import logging

from torch import nn

from torchslim.core.storage import serialized_size

__all__ = ["size_bytes"]

logger = logging.getLogger(__name__)


def size_bytes(model: nn.Module) -> int:
    """Bytes of ``model.state_dict()`` as written to ``model.safetensors``."""
    return serialized_size(model)
