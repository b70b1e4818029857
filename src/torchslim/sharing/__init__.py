"""Weight sharing: clustered weights (codebooks), shared layers, factorised embeddings."""

from torchslim.sharing.huffman import HuffmanConfig
from torchslim.sharing.kmeans import KMeansSharingConfig
from torchslim.sharing.modules import ClusteredConv2d, ClusteredLinear

__all__ = ["ClusteredConv2d", "ClusteredLinear", "HuffmanConfig", "KMeansSharingConfig"]
