"""Stop training at an epoch boundary before a wall-clock budget runs out (a fixed-time recipe)."""

from __future__ import annotations

import logging
import time

from ignite.engine import Engine, Events

logger = logging.getLogger(__name__)


class TimeLimit:
    """Terminate the trainer after the epoch whose successor would end past `minutes` of training.

    The budget counts from the trainer's start (this process; a resumed run gets a fresh budget). The next epoch's
    length is estimated as the mean of the epochs run so far, validation and checkpoints included. Attach it after
    the ValidationHandler and LastCheckpoint so the last epoch is validated and saved. `minutes` None: no limit.
    """

    def __init__(self, minutes: float | None):
        self.seconds = None if minutes is None else float(minutes) * 60
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
        if engine.state.epoch < engine.state.max_epochs and elapsed + per_epoch > self.seconds:
            logger.info(f"time limit {self.seconds / 60:.1f} min: stopping after epoch {engine.state.epoch} "
                        f"({elapsed / 60:.1f} min elapsed, {per_epoch / 60:.1f} min per epoch)")
            engine.terminate()
