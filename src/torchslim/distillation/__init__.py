"""Knowledge distillation: a student learns from a teacher's outputs and features."""

from torchslim.distillation.adversarial import AdversarialDistillationConfig
from torchslim.distillation.attention import AttentionDistillationConfig
from torchslim.distillation.datafree import DataFreeConfig
from torchslim.distillation.features import FeatureDistillationConfig
from torchslim.distillation.logits import LogitDistillationConfig
from torchslim.distillation.relational import RelationalDistillationConfig

__all__ = [
    "AdversarialDistillationConfig",
    "AttentionDistillationConfig",
    "DataFreeConfig",
    "FeatureDistillationConfig",
    "LogitDistillationConfig",
    "RelationalDistillationConfig",
]
