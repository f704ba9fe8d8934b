"""Validation every N epochs, and every epoch that decides the run's checkpoints."""

from __future__ import annotations

from ignite.engine import Engine, Events
from monai.handlers import ValidationHandler

from saltkit.handlers.noam import cooldown_lambdas


class ScheduledValidation(ValidationHandler):
    """MONAI's epoch-level ValidationHandler that runs the validator every `interval` epochs and also after every
    epoch of the learning-rate cool-down and after the run's last epoch (`max_epochs`, or the epoch the trainer was
    told to stop after, e.g. by EpochTimeBudget), so a short run spends no time validating epochs whose weights
    the best checkpoints would not keep, and its final weights are always validated.

    Attach after EpochTimeBudget (which moves the cool-down's end and stops the trainer) and before the
    checkpoint handlers.

    Args:
        validator: the evaluator to run.
        interval: validate every `interval` epochs (1: every epoch, as ValidationHandler does).
        lr_scheduler: the (Noam) LambdaLR whose cool-down epochs are all validated; None (or a schedule
            without a cool-down): only the interval and the last epoch count.
    """

    def __init__(self, validator, interval: int = 1, lr_scheduler=None):
        super().__init__(interval=interval, validator=validator, epoch_level=True)
        self.lr_scheduler = lr_scheduler

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def in_cooldown(self, iteration: int) -> bool:
        """Whether some of the iterations up to `iteration` ran in a cool-down (the rate ramping down to 0)."""
        return any(fn.ramped(iteration) for fn in cooldown_lambdas(self.lr_scheduler))

    def due(self, engine: Engine) -> bool:
        state = engine.state
        return (state.epoch % self.interval == 0 or state.epoch >= state.max_epochs or bool(engine.should_terminate)
                or self.in_cooldown(state.iteration))

    def __call__(self, engine: Engine) -> None:
        if self.due(engine):
            super().__call__(engine)
