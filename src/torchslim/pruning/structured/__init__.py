"""Structured pruning machinery: dependency tracing, channel groups, slicers and importance."""

from torchslim.pruning.structured.graph import ChannelGraph, trace
from torchslim.pruning.structured.group import Group, Slice, build_groups
from torchslim.pruning.structured.importance import importance_names, register_importance
from torchslim.pruning.structured.slicers import Slicer, register_slicer

__all__ = [
    "ChannelGraph",
    "Group",
    "Slice",
    "Slicer",
    "build_groups",
    "importance_names",
    "register_importance",
    "register_slicer",
    "trace",
]
