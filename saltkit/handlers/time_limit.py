"""Stop training at an epoch boundary before a wall-clock budget runs out (a fixed-time recipe)."""

from __future__ import annotations

import logging
import time

from ignite.engine import Engine, Events

from saltkit.config import none_if_null
from saltkit.handlers.noam import cooldown_lambdas

logger = logging.getLogger(__name__)


class EpochTimeBudget:
    """Terminate the trainer after the epoch whose successor would end past `minutes` of training (Ignite's
    TimeLimit stops mid-epoch once the time is up; this stops at an epoch boundary inside the budget).

    The budget counts from the trainer's start (this process; a resumed run gets a fresh budget). The next epoch's
    length is estimated as the mean of the epochs run so far, validation and checkpoints included. Attach it before
    ScheduledValidation and LastCheckpoint: the handlers after it still run at the epoch it stops after, and its
    decisions (the stop, the cool-down's end) tell ScheduledValidation which epochs to validate. `minutes` None: no
    limit.

    With `lr_scheduler` (a Noam LambdaLR) whose schedule has a cool-down, the schedule's end follows the last epoch
    expected to fit the budget (re-estimated after every epoch, never past max_epochs), so a fixed-time run ends
    cooled down on any machine instead of being cut in the middle of its cool-down. Once the cool-down has begun
    its end only moves earlier, and the run stops when the rate has reached 0 (a slow epoch that shortened the
    schedule is not followed by a rate that climbs back up).

    Args:
        minutes: the training time budget in minutes (config key `time_limit_minutes`); None / null: no limit.
        lr_scheduler: the (Noam) LambdaLR whose cool-down is fitted into the budget, or None.
    """

    def __init__(self, minutes: float | None, lr_scheduler=None):
        minutes = none_if_null(minutes)  # `--time_limit_minutes null` arrives as a string
        self.seconds = None if minutes is None else float(minutes) * 60
        self.lr_scheduler = lr_scheduler
        self.start: float | None = None
        self.first_epoch = 0

    def attach(self, engine: Engine) -> None:
        if self.seconds is None:
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def started(self, engine: Engine) -> None:
        if self.start is None:
            self.start, self.first_epoch = time.perf_counter(), engine.state.epoch - 1

    def __call__(self, engine: Engine) -> None:
        elapsed = time.perf_counter() - self.start
        per_epoch = elapsed / (engine.state.epoch - self.first_epoch)
        fit = max(int((self.seconds - elapsed) // per_epoch), 0)  # further epochs that fit the budget
        last_epoch = min(engine.state.max_epochs, engine.state.epoch + fit)
        self.end_schedule_at(last_epoch * engine.state.epoch_length, engine.state.iteration)
        if engine.state.epoch >= engine.state.max_epochs:
            return
        if last_epoch == engine.state.epoch:
            logger.info(f"time limit {self.seconds / 60:.1f} min: stopping after epoch {engine.state.epoch} "
                        f"({elapsed / 60:.1f} min elapsed, {per_epoch / 60:.1f} min per epoch)")
            engine.terminate()
        elif self.cooled_down(engine.state.iteration):
            # an epoch that ran slow shortened the schedule; the rate is 0 now, so further epochs would change nothing
            logger.info(f"time limit {self.seconds / 60:.1f} min: the learning-rate cool-down has ended, stopping "
                        f"after epoch {engine.state.epoch} ({elapsed / 60:.1f} min elapsed, {per_epoch / 60:.1f} "
                        f"min per epoch)")
            engine.terminate()

    def cooled_down(self, iteration: int) -> bool:
        return any(fn.ended(iteration) for fn in cooldown_lambdas(self.lr_scheduler))

    def end_schedule_at(self, total_steps: int, iteration: int | None = None) -> None:
        """End a cool-down schedule at `total_steps`, or at its configured end if that comes first; a cool-down that
        has begun by `iteration` only gets shorter."""
        for fn in cooldown_lambdas(self.lr_scheduler):
            if fn.end_at(total_steps, iteration):
                logger.info(f"time limit: the learning-rate cool-down now ends at iteration {int(fn.total_steps)} "
                            f"(the last epoch expected to fit the budget; configured: "
                            f"{int(fn.configured_total_steps)})")
