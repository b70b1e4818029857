"""Low-rank factorisation: layers replaced by products of thinner ones."""

from torchslim.lowrank.drone import DroneConfig
from torchslim.lowrank.modules import LowRankLinear
from torchslim.lowrank.svd import SVDConfig

__all__ = ["DroneConfig", "LowRankLinear", "SVDConfig"]
