"""The one training driver used by every trained method."""

from torchslim.train.driver import fit

__all__ = ["fit"]
