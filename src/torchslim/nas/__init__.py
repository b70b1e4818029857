"""nas methods: architecture search over a CNN space (``nas.search``) and per-layer compression
settings under a budget (``nas.autocompress``)."""

from torchslim.nas.autocompress import AutoCompressConfig
from torchslim.nas.latency import LatencyTable, spearman
from torchslim.nas.search import NASSearchConfig, search
from torchslim.nas.spaces import CNNArch, CNNSpace, SearchableCNN, build_cnn

__all__ = [
    "AutoCompressConfig",
    "CNNArch",
    "CNNSpace",
    "LatencyTable",
    "NASSearchConfig",
    "SearchableCNN",
    "build_cnn",
    "search",
    "spearman",
]
