"""Knowledge distillation: a student learns from a teacher's outputs and features."""

from torchslim.distillation.logits import LogitDistillationConfig

__all__ = ["LogitDistillationConfig"]
