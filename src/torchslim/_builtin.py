"""The explicit list of built-in method modules; importing them fills the registry."""

from torchslim.distillation import logits as _logits  # noqa: F401
from torchslim.pruning import magnitude as _magnitude  # noqa: F401
