"""Progress of a training run on the console: bars (or, when the output is not a terminal, a line every few
percent) for training and validation, and one compact line per epoch."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence

from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar

from saltkit.config import as_bool
from saltkit.logs import details_at_debug, logging_around_bars, progress_bars
from saltkit.metrics import competition_metric

logger = logging.getLogger(__name__)


class TrainingProgress:
    """Progress of the trainer (and of `validator`, the evaluator run at the end of an epoch).

    In a terminal: Ignite ProgressBars, the trainer's showing `loss` and `metric` averaged over the epoch so far
    (as the epoch's summary line averages them, so the bar's last values are the summary's), with log lines written
    through the bars. Otherwise (output redirected to a file) no `\\r` bars
    but a log line every `every_percent` % of an epoch. The averages are local to this process (no collective
    calls), so attach it on rank 0 only. `metric` is the competition metric of the batch's `tile_pred` > 0 vs
    `tile_label` (engine output after TilePredictiond). `terminal` None: whether stderr (the bars' stream) is one.

    Args:
        persist: keep the finished bars on screen.
        validator: the evaluator run at the end of an epoch, whose progress is shown too.
        every_percent: without a terminal, a log line every this % of an epoch.
        terminal: bars (true) or log lines (false); None: bars when stderr is a terminal.
        enabled: config key `progress` (true / false): false shows nothing (the epoch's summary line stays).
    """

    def __init__(self, persist: bool = False, validator: Engine | None = None, every_percent: float = 25,
                 terminal: bool | None = None, enabled=True):
        self.enabled = as_bool(enabled, "progress")
        self.persist = persist
        self.validator = validator
        self.every_percent = every_percent
        self.terminal = terminal
        self._sums = {"loss": 0.0, "batches": 0, "metric": 0.0, "tiles": 0}
        self._logging = contextlib.ExitStack()

    def reset(self, _engine: Engine | None = None) -> None:
        self._sums = {"loss": 0.0, "batches": 0, "metric": 0.0, "tiles": 0}

    @property
    def loss(self) -> float | None:
        return self._sums["loss"] / self._sums["batches"] if self._sums["batches"] else None

    @property
    def metric(self) -> float | None:
        return self._sums["metric"] / self._sums["tiles"] if self._sums["tiles"] else None

    def update(self, engine: Engine) -> None:
        """Add the batch: its loss to the mean of batch losses (ignite's Average, the summary's `train loss`), its
        tiles' competition metric to the mean over tiles (CompetitionMetric, the summary's `train metric`)."""
        out = engine.state.output
        self._sums["loss"] += float(out["loss"].detach())
        self._sums["batches"] += 1
        if "tile_pred" in out:
            scores = competition_metric(out["tile_pred"] > 0, out["tile_label"] > 0.5)
            self._sums["metric"] += float(scores.sum())
            self._sums["tiles"] += len(scores)

    def shown(self, _output=None) -> dict:
        return {k: v for k, v in (("loss", self.loss), ("metric", self.metric)) if v is not None}

    def is_terminal(self) -> bool:
        return progress_bars() if self.terminal is None else self.terminal

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)  # before the bar reads the values
        if self.is_terminal():
            ProgressBar(persist=self.persist).attach(engine, output_transform=self.shown)
            if self.validator is not None:
                ProgressBar(persist=self.persist, desc="validation").attach(self.validator)
            engine.add_event_handler(Events.STARTED, lambda _: self._logging.enter_context(logging_around_bars()))
            engine.add_event_handler(Events.COMPLETED, lambda _: self._logging.close())
            engine.add_event_handler(Events.TERMINATE, lambda _: self._logging.close())
            return
        ProgressLines(self.every_percent, self.shown).attach(engine)
        if self.validator is not None:
            ProgressLines(self.every_percent, name="validation").attach(self.validator)


def marks(epoch_length: int, every_percent: float) -> set[int]:
    """Iterations (1-based, within an epoch) after which `every_percent`, 2 x, ... % of the epoch is done (not
    the last: the epoch's own line follows it)."""
    steps = int(100 // every_percent) if every_percent > 0 else 0
    return {math.ceil(epoch_length * k * every_percent / 100) for k in range(1, steps + 1)} - {epoch_length, 0}


class ProgressLines:
    """Log `epoch 3/12  50% (90/180)  loss 0.81 metric 0.42` every `every_percent` % of an epoch (for output that
    is not a terminal, where a `\\r` bar would pile up as one long line)."""

    def __init__(self, every_percent: float = 25, values=None, name: str = "epoch"):
        self.every_percent = every_percent
        self.values = values
        self.name = name

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        length = engine.state.epoch_length
        done = (engine.state.iteration - 1) % length + 1
        if done not in marks(length, self.every_percent):
            return
        where = f"epoch {engine.state.epoch}/{engine.state.max_epochs}" if self.name == "epoch" else self.name
        shown = "".join(f"  {k} {v:.3f}" for k, v in (self.values() if self.values else {}).items())
        logger.info(f"{where}  {100 * done // length}% ({done}/{length}){shown}")


def _figure(value) -> str:
    """A figure rounded for people: 3 decimals (0.415, 3.066), small ones in 3 significant digits (0.000123)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{value:.3f}" if value == 0 or abs(value) >= 0.01 else f"{value:.3g}"


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes}m{s:02d}s" if minutes else f"{s}s"


METRIC_ORDER = ("loss", "metric", "accuracy")


def metric_text(metrics: dict, prefix: str) -> str:
    """'loss 3.066 metric 0.233 accuracy 0.666' from {'train_loss': ..., ...} (the `prefix`_ names)."""
    names = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
    order = sorted(names, key=lambda n: (METRIC_ORDER.index(n) if n in METRIC_ORDER else len(METRIC_ORDER), n))
    return " ".join(f"{n} {_figure(names[n])}" for n in order)


class EpochSummary:
    """One INFO line per epoch for the trainer: learning rate, training and validation figures rounded, the best
    checkpoints this epoch improved, the epoch's time (validation included); the full values at DEBUG.

        epoch 3/12  lr 0.00191  train loss 3.066 metric 0.233 accuracy 0.666  val loss 3.052 metric 0.400
        accuracy 0.789  new best: metric  1m36s

    Attach after the validation and checkpoint handlers. Attaching also moves the engines' and MONAI's own
    per-epoch logging to DEBUG (saltkit.logs).

    Args:
        validator: the evaluator, whose figures are shown for the epochs it ran; None: training figures only.
        best: the `BestCheckpoint` handlers (`.metric`, `.epoch`), named when this epoch improved them.
    """

    def __init__(self, validator: Engine | None = None, best: Sequence = ()):
        self.validator = validator
        self.best = list(best)
        self.started: float | None = None

    def attach(self, engine: Engine) -> None:
        details_at_debug()  # the handlers built with the engines log through loggers made since `initialize`
        engine.add_event_handler(Events.STARTED, self.announce)
        engine.add_event_handler(Events.EPOCH_STARTED, self.start_clock)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def announce(self, engine: Engine) -> None:
        loader = engine.state.dataloader
        mixed = getattr(getattr(loader, "sampler", None), "summary", None)  # labelled and pseudo-labelled tiles
        known = [mixed() if callable(mixed) else
                 f"{len(loader.dataset)} training {_unit(loader.dataset)}" if hasattr(loader, "dataset") else "",
                 f"batch {loader.batch_size}" if getattr(loader, "batch_size", None) and not callable(mixed) else ""]
        details = ", ".join(k for k in known if k)
        val = getattr(self.validator, "data_loader", None)  # MONAI engines keep their loader before they run
        first = engine.state.epoch + 1
        epochs = f"epochs {first}-{engine.state.max_epochs}" if first > 1 else f"{engine.state.max_epochs} epochs"
        logger.info(f"training: {epochs} of {engine.state.epoch_length} iterations" + (f" ({details})" if details else "")
                    + (f", validating {len(val.dataset)} {_unit(val.dataset)}" if hasattr(val, "dataset") else ""))

    def start_clock(self, engine: Engine) -> None:
        self.started = time.perf_counter()

    def line(self, engine: Engine) -> str:
        parts = [f"epoch {engine.state.epoch}/{engine.state.max_epochs}"]
        lr = getattr(engine.state, "lr", None)
        if lr is not None:
            parts.append(f"lr {float(lr):.3g}")
        parts.append(f"train {metric_text(engine.state.metrics, 'train_')}")
        validated = self.validator is not None and self.validator.state.epoch == engine.state.epoch
        if validated:
            parts.append(f"val {metric_text(self.validator.state.metrics, 'val_')}")
            improved = [b.metric.removeprefix("val_") for b in self.best if b.epoch == engine.state.epoch]
            if improved:
                parts.append(f"new best: {', '.join(improved)}")
        if self.started is not None:
            parts.append(_duration(time.perf_counter() - self.started))
        return "  ".join(parts)

    def __call__(self, engine: Engine) -> None:
        logger.info(self.line(engine))
        validated = self.validator is not None and self.validator.state.epoch == engine.state.epoch
        logger.debug(f"epoch {engine.state.epoch} metrics: {dict(engine.state.metrics)}"
                     + (f", validation: {dict(self.validator.state.metrics)}" if validated else ""))


def _unit(dataset) -> str:
    """What a dataset's items are, for the log ("tiles" unless the dataset says, as the section datasets do)."""
    return getattr(dataset, "unit", "tiles")
