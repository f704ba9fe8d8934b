"""Noam learning-rate schedule: linear warm-up, then decay with the inverse square root of the step.

    factor(step) = min(s / W, sqrt(W / s)),  s = step + 1,  W = warm-up steps
so the rate climbs linearly to the base rate at step W - 1 and falls as 1 / sqrt(step) afterwards
(the schedule of "Attention is all you need", normalised so that its peak is the optimizer's lr).
"""

from __future__ import annotations

import math

import torch
from ignite.engine import Engine, Events
from monai.handlers import LrScheduleHandler
from torch.optim.lr_scheduler import LambdaLR


class NoamLambda:
    """Multiplicative factor of the Noam schedule for `LambdaLR`; a class (not a closure) so it pickles and its
    warm-up is saved in the scheduler's state_dict."""

    def __init__(self, warmup_steps: int | float):
        if not warmup_steps > 0:
            raise ValueError(f"warm-up must be > 0 steps, got {warmup_steps}")
        self.warmup_steps = float(warmup_steps)

    def __call__(self, step: int) -> float:
        s = step + 1
        return min(s / self.warmup_steps, math.sqrt(self.warmup_steps / s))


def warmup_steps(warmup: float, steps_per_epoch: int, unit: str = "epoch") -> float:
    """Warm-up length in optimizer steps from a value counted in epochs (x steps_per_epoch) or iterations."""
    if unit == "epoch":
        return max(warmup * steps_per_epoch, 1.0)
    if unit == "iteration":
        return max(float(warmup), 1.0)
    raise ValueError(f"config key 'warmup_unit' must be 'epoch' or 'iteration', got {unit!r}")


def noam_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: float) -> LambdaLR:
    """LambdaLR with the Noam factor; step it once per iteration."""
    return LambdaLR(optimizer, NoamLambda(warmup_steps))


class NoamHandler(LrScheduleHandler):
    """LrScheduleHandler stepping a (Noam) LambdaLR every iteration that also records the current rate as
    `engine.state.lr`, so StatsHandler / TensorBoardStatsHandler(state_attributes=["lr"]) report it per epoch.
    """

    def __init__(self, lr_scheduler: LambdaLR, name: str | None = None):
        super().__init__(lr_scheduler, print_lr=False, name=name, epoch_level=False)

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        engine.add_event_handler(Events.STARTED, self.record)

    def record(self, engine: Engine) -> None:
        engine.state.lr = self.lr_scheduler.get_last_lr()[0]

    def __call__(self, engine: Engine) -> None:
        super().__call__(engine)
        self.record(engine)
