"""A training method that kills a run at a given step, for the checkpoint/resume tests."""

from __future__ import annotations

from torchslim.core import Step, TrainedMethod


class Stop(Exception):
    """What ``KillAt`` raises."""


class KillAt(TrainedMethod):
    """Raises ``Stop`` at step ``cfg`` (-1: never), like a process killed mid-epoch."""

    def on_step(self, step: Step) -> None:
        if step.index == self.cfg:
            raise Stop
