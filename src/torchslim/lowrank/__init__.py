"""Low-rank factorisation: layers replaced by products of thinner ones."""

from torchslim.lowrank.drone import DroneConfig
from torchslim.lowrank.modules import LowRankConv2d, LowRankLinear, SeparableConv2d, TuckerConv2d
from torchslim.lowrank.separable import SeparableConfig
from torchslim.lowrank.svd import SVDConfig
from torchslim.lowrank.tucker import TuckerConfig

__all__ = ["DroneConfig", "LowRankConv2d", "LowRankLinear", "SVDConfig", "SeparableConfig", "SeparableConv2d",
           "TuckerConfig", "TuckerConv2d"]
