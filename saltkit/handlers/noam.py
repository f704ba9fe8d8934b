"""Noam learning-rate schedule: linear warm-up, then decay with the inverse square root of the step.

    factor(step) = min(s / W, sqrt(W / s)),  s = step + 1,  W = warm-up steps
so the rate climbs linearly to the base rate at step W - 1 and falls as 1 / sqrt(step) afterwards
(the schedule of "Attention is all you need", normalised so that its peak is the optimizer's lr).

An optional cool-down (off in the recipe) multiplies the factor by a linear ramp from 1 to 0 over the last C of
T total steps, so a short fixed-length run ends at a small rate instead of mid-decay. A cool-down longer than the
run covers the whole run (`cooldown_steps`), so a recipe shortened with `--max_epochs` still runs.
"""

from __future__ import annotations

import logging
import math

import torch
from ignite.engine import Engine, Events
from monai.handlers import LrScheduleHandler
from torch.optim.lr_scheduler import LambdaLR

logger = logging.getLogger(__name__)


class NoamLambda:
    """Multiplicative factor of the Noam schedule for `LambdaLR`; a class (not a closure) so it pickles and its
    settings are saved in the scheduler's state_dict. `cooldown_steps` > 0 needs `total_steps`."""

    def __init__(self, warmup_steps: int | float, total_steps: int | float | None = None,
                 cooldown_steps: int | float = 0):
        if not warmup_steps > 0:
            raise ValueError(f"warm-up must be > 0 steps, got {warmup_steps}")
        if cooldown_steps < 0:
            raise ValueError(f"cool-down must be >= 0 steps, got {cooldown_steps}")
        if cooldown_steps and (total_steps is None or not 0 < cooldown_steps <= total_steps):
            raise ValueError(f"a cool-down of {cooldown_steps} steps needs total_steps >= it, got {total_steps}")
        self.warmup_steps = float(warmup_steps)
        self.total_steps = None if total_steps is None else float(total_steps)
        self.cooldown_steps = float(cooldown_steps)
        self.configured_total_steps = self.total_steps  # what the config asked for, before any `end_at`

    @property
    def has_cooldown(self) -> bool:
        return self.cooldown_steps > 0

    def ended(self, step: int) -> bool:
        """Whether a cool-down schedule has brought the rate to 0 by iteration `step` (steps done)."""
        return self.has_cooldown and step >= self.total_steps

    def ramped(self, step: int) -> bool:
        """Whether some of the first `step` iterations ran in the cool-down (at a rate ramping down to 0)."""
        return self.has_cooldown and step > self.total_steps - self.cooldown_steps

    def end_at(self, total_steps: float, step: int | None = None) -> bool:
        """Make the cool-down end at `total_steps`, never past the configured end; True when the end moved.

        With the current `step`: once the cool-down has begun it only ever gets shorter (moving its end later would
        raise a rate that is already ramping down, or restart one that has reached 0).
        """
        end = float(min(total_steps, self.configured_total_steps))
        if step is not None and step >= self.total_steps - self.cooldown_steps:
            end = min(end, self.total_steps)
        moved = end != self.total_steps
        self.total_steps = end
        return moved

    def __call__(self, step: int) -> float:
        s = step + 1
        factor = min(s / self.warmup_steps, math.sqrt(self.warmup_steps / s))
        if self.cooldown_steps:
            factor *= min(max((self.total_steps - step) / self.cooldown_steps, 0.0), 1.0)
        return factor


def schedule_steps(length: float, steps_per_epoch: int, unit: str = "epoch") -> float:
    """A schedule length counted in epochs (x steps_per_epoch) or iterations, in optimizer steps."""
    if unit == "epoch":
        return float(length) * steps_per_epoch
    if unit == "iteration":
        return float(length)
    raise ValueError(f"config key 'warmup_unit' must be 'epoch' or 'iteration', got {unit!r}")


def cooldown_steps(cooldown: float, steps_per_epoch: int, total_steps: float, unit: str = "epoch") -> float:
    """Cool-down length in optimizer steps, at most `total_steps` (then the rate ramps down over the whole run)."""
    steps = schedule_steps(cooldown, steps_per_epoch, unit)
    if steps > total_steps:
        logger.info(f"config key 'cooldown_epochs' ({cooldown:g} {unit}s) is longer than the run "
                    f"({total_steps / steps_per_epoch:g} epochs of {steps_per_epoch} iterations): "
                    "the learning-rate cool-down spans the whole run")
        return float(total_steps)
    return steps


def warmup_steps(warmup: float, steps_per_epoch: int, unit: str = "epoch") -> float:
    """Warm-up length in optimizer steps (at least 1) from a value counted in epochs or iterations."""
    return max(schedule_steps(warmup, steps_per_epoch, unit), 1.0)


def noam_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: float, total_steps: float | None = None,
                   cooldown_steps: float = 0) -> LambdaLR:
    """LambdaLR with the Noam factor (and optional final cool-down); step it once per iteration."""
    return LambdaLR(optimizer, NoamLambda(warmup_steps, total_steps, cooldown_steps))


def epoch_noam_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int, max_epochs: int,
                         warmup: float, cooldown: float = 0, unit: str = "epoch") -> LambdaLR:
    """`noam_scheduler` for a run of `max_epochs` epochs of `steps_per_epoch` iterations (train.json's).

    Args:
        optimizer: the optimizer whose rate the schedule sets.
        steps_per_epoch: iterations per epoch (the training DataLoader's length).
        max_epochs: the run's length in epochs (the cool-down ends with it).
        warmup: the warm-up, in `unit`s (config key `warmup_epochs`).
        cooldown: the final linear ramp to 0, in `unit`s (config key `cooldown_epochs`; 0: none).
        unit: "epoch" or "iteration" (config key `warmup_unit`).
    """
    total = max_epochs * steps_per_epoch
    return noam_scheduler(optimizer, warmup_steps(warmup, steps_per_epoch, unit), total,
                          cooldown_steps(cooldown, steps_per_epoch, total, unit))


class NoamHandler(LrScheduleHandler):
    """LrScheduleHandler stepping a (Noam) LambdaLR every iteration that also records the current rate as
    `engine.state.lr`, so StatsHandler / TensorBoardStatsHandler(state_attributes=["lr"]) report it per epoch.

    Args:
        lr_scheduler: the LambdaLR to step once per iteration (`noam_scheduler` / `epoch_noam_scheduler`).
        name: the logger to use; None: the engine's logger.
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


def cooldown_lambdas(lr_scheduler) -> list[NoamLambda]:
    """The NoamLambda objects with a cool-down among `lr_scheduler`'s lr_lambdas (none for None or another schedule)."""
    return [fn for fn in getattr(lr_scheduler, "lr_lambdas", []) if isinstance(fn, NoamLambda) and fn.has_cooldown]
