"""nas methods: multi-trial architecture search over a CNN space (``nas.search``)."""

from torchslim.nas.latency import LatencyTable, spearman
from torchslim.nas.search import NASSearchConfig, search
from torchslim.nas.spaces import CNNArch, CNNSpace, SearchableCNN, build_cnn

__all__ = [
    "CNNArch",
    "CNNSpace",
    "LatencyTable",
    "NASSearchConfig",
    "SearchableCNN",
    "build_cnn",
    "search",
    "spearman",
]
