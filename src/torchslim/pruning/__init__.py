"""Pruning: remove weights, channels, heads or layers."""

from torchslim.pruning.channel import ChannelPruningConfig
from torchslim.pruning.gradual import GradualPruningConfig
from torchslim.pruning.heads import HeadPruningConfig
from torchslim.pruning.layers import LayerPruningConfig
from torchslim.pruning.magnitude import MagnitudePruningConfig
from torchslim.pruning.nm import NMPruningConfig
from torchslim.pruning.snip import SnipPruningConfig
from torchslim.pruning.sparsegpt import SparseGPTPruningConfig
from torchslim.pruning.wanda import WandaPruningConfig

__all__ = [
    "ChannelPruningConfig",
    "GradualPruningConfig",
    "HeadPruningConfig",
    "LayerPruningConfig",
    "MagnitudePruningConfig",
    "NMPruningConfig",
    "SnipPruningConfig",
    "SparseGPTPruningConfig",
    "WandaPruningConfig",
]
