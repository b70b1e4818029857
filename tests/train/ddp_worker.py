"""One data-parallel training run; `python -m torch.distributed.run ... ddp_worker.py OUT` (used by tests)."""

from __future__ import annotations

import sys

import torch
from torch import nn

from torchslim.core import Context
from torchslim.core.registry import resolve
from torchslim.distillation.features import FeatureDistillationConfig
from torchslim.distillation.logits import LogitDistillationConfig
from torchslim.recipes.schema import TrainSpec
from torchslim.train import distributed, fit
from torchslim.zoo.data import digits

STEPS = 20


def mlp(seed: int, hidden: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def train(batch_size: int = 32) -> tuple[list[float], dict[str, torch.Tensor]]:
    """20 steps of logits + feature distillation (a learned projection) from a wider teacher."""
    student, teacher = mlp(0, 32), mlp(1, 96)
    methods = [resolve(cfg)(cfg) for cfg in (
        LogitDistillationConfig(temperature=2.0, alpha=0.5),
        FeatureDistillationConfig(pairs=("2:2",)))]
    history: list[float] = []
    spec = TrainSpec(steps=STEPS, batch_size=batch_size, lr=1e-2, optimizer="sgd")
    fit(student, spec, methods, Context(train_data=digits("train"), seed=3, progress=False),
        teacher=teacher, history=history)
    return history, {k: v.detach().clone() for k, v in student.state_dict().items()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    losses, state = train()
    rank, size = distributed.world()
    gathered = [None] * size
    torch.distributed.all_gather_object(gathered, state)
    same = all(torch.equal(gathered[0][k], g[k]) for g in gathered for k in state)  # type: ignore[index]
    if rank == 0:
        torch.save({"losses": losses, "state": state, "ranks_agree": same, "world": size}, sys.argv[1])
    distributed.shutdown()
