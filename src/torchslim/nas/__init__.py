"""nas methods: architecture search over a CNN space or students sliced from a Transformer
(``nas.search``) and per-layer compression settings under a budget (``nas.autocompress``)."""

from torchslim.nas.autocompress import AutoCompressConfig
from torchslim.nas.latency import LatencyTable, TransformerLatencyTable, assess, spearman
from torchslim.nas.search import NASSearchConfig, search
from torchslim.nas.spaces import CNNArch, CNNSpace, SearchableCNN, build_cnn
from torchslim.nas.supernet import CNNSupernet, OneShot
from torchslim.nas.transformer import TransformerArch, TransformerSpace, model_dims, slice_student

__all__ = [
    "AutoCompressConfig",
    "CNNArch",
    "CNNSpace",
    "CNNSupernet",
    "LatencyTable",
    "NASSearchConfig",
    "OneShot",
    "SearchableCNN",
    "TransformerArch",
    "TransformerLatencyTable",
    "TransformerSpace",
    "assess",
    "build_cnn",
    "model_dims",
    "search",
    "slice_student",
    "spearman",
]
