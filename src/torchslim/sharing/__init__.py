"""Weight sharing: clustered weights (codebooks), shared layers, factorised embeddings."""

from torchslim.sharing.cross_layer import CrossLayerSharingConfig
from torchslim.sharing.embedding import EmbeddingFactorizationConfig
from torchslim.sharing.huffman import HuffmanConfig
from torchslim.sharing.kmeans import KMeansSharingConfig
from torchslim.sharing.modules import (
    ClusteredConv2d,
    ClusteredLinear,
    FactorizedEmbedding,
    FactorizedTiedHead,
)

__all__ = ["ClusteredConv2d", "ClusteredLinear", "CrossLayerSharingConfig", "EmbeddingFactorizationConfig",
           "FactorizedEmbedding", "FactorizedTiedHead", "HuffmanConfig", "KMeansSharingConfig"]
