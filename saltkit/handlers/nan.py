"""Stop a diverging run at the first non-finite loss with an error that says where it happened and what to try."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from ignite.engine import Engine, Events


class DivergenceError(FloatingPointError):
    """The training loss became NaN or infinite."""


def output_loss(output) -> float:
    """The loss of a MONAI trainer's output dict (or a bare loss value) as a float."""
    loss = output["loss"] if isinstance(output, dict) else output
    return float(loss.detach()) if hasattr(loss, "detach") else float(loss)


class FailOnNanLoss:
    """Fail the run on a NaN or infinite loss: raises DivergenceError (last.pt keeps the last good epoch) with the
    epoch, iteration and learning rate, where Ignite's TerminateOnNan logs a warning and ends "successfully".
    The message says whether `last_checkpoint` exists (a run that diverges in its first epoch has none).

    Args:
        output_transform: the trainer's output -> the loss as a float (default: its "loss" entry).
        last_checkpoint: the run's last.pt, named in the message; None: not named.
    """

    def __init__(self, output_transform: Callable = output_loss, last_checkpoint: str | None = None):
        self.output_transform = output_transform
        self.last_checkpoint = last_checkpoint

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        value = self.output_transform(engine.state.output)
        if math.isfinite(value):
            return
        lr = getattr(engine.state, "lr", None)
        where = f"epoch {engine.state.epoch}, iteration {engine.state.iteration}" + (f", lr {lr:.3g}" if lr else "")
        keep = ""
        if self.last_checkpoint and Path(self.last_checkpoint).is_file():
            keep = f"; {self.last_checkpoint} holds the last completed epoch"
        elif self.last_checkpoint:
            keep = f"; no epoch was completed, so there is no {self.last_checkpoint} to resume from"
        raise DivergenceError(f"training diverged: the loss is {value} at {where}{keep}. Try a lower "
                              "learning_rate, a longer warmup_epochs, or amp 'bf16' instead of 'fp16'.")
