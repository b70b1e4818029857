"""Pruning: remove weights, channels, heads or layers."""

from torchslim.pruning.magnitude import MagnitudePruningConfig

__all__ = ["MagnitudePruningConfig"]
