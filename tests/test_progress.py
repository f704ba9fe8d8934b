"""Console output of a training run: one line per epoch, progress lines off a terminal, detail at DEBUG, log lines
written through the progress bars."""

from __future__ import annotations

import io
import logging
import sys
from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Engine, Events

from saltkit.handlers.progress import EpochSummary, TrainingProgress, marks, metric_text
from saltkit.logs import DetailsAtDebug, details_at_debug, logging_around_bars


def toy_engines(validate_every: int = 1):
    """A trainer of 8 iterations per epoch with train_* metrics and lr, and an evaluator run every
    `validate_every` epochs with val_* metrics."""
    validator = Engine(lambda e, b: None)

    @validator.on(Events.EPOCH_COMPLETED)
    def _val_metrics(e):
        e.state.metrics = {"val_loss": 0.41499999999, "val_metric": 0.4, "val_accuracy": 0.78888}

    trainer = Engine(lambda e, b: {"loss": torch.tensor(2.0 - e.state.iteration / 10)})

    @trainer.on(Events.EPOCH_COMPLETED)
    def _train_metrics(e):
        e.state.metrics = {"train_metric": 0.09375, "train_loss": 3.24661, "train_accuracy": 0.66699}
        e.state.lr = 0.0019069251784911848
        if e.state.epoch % validate_every == 0:
            validator.state.epoch = e.state.epoch - 1  # as ValidationHandler does: the trainer's epoch
            validator.run(range(4), max_epochs=e.state.epoch)

    return trainer, validator


def test_progress_marks():
    assert marks(5, 25) == {2, 3, 4}  # 40%, 60%, 80% of 5 iterations; the last one has the epoch's own line
    assert marks(180, 25) == {45, 90, 135}
    assert marks(1, 25) == set() and marks(10, 0) == set()


def test_lines_instead_of_a_bar_off_the_terminal(caplog):
    trainer, validator = toy_engines()
    TrainingProgress(validator=validator, terminal=False).attach(trainer)
    with caplog.at_level(logging.INFO, logger="saltkit.handlers.progress"):
        trainer.run(range(8), max_epochs=2)
    lines = [r.getMessage() for r in caplog.records]
    epoch_lines = [m for m in lines if m.startswith("epoch ")]
    assert [m.split("  ")[:2] for m in epoch_lines] == [
        ["epoch 1/2", "25% (2/8)"], ["epoch 1/2", "50% (4/8)"], ["epoch 1/2", "75% (6/8)"],
        ["epoch 2/2", "25% (2/8)"], ["epoch 2/2", "50% (4/8)"], ["epoch 2/2", "75% (6/8)"]]
    assert epoch_lines[1].endswith("loss 1.750")  # the mean of this epoch's batch losses 1.9, 1.8, 1.7, 1.6
    assert epoch_lines[4].endswith("loss 0.950")  # epoch 2: 1.1 ... 0.8, none of epoch 1's
    assert lines.count("validation  50% (2/4)") == 2 and lines.count("validation  25% (1/4)") == 2
    assert all("\r" not in m for m in lines)


def test_one_compact_line_per_epoch(caplog):
    trainer, validator = toy_engines(validate_every=2)
    best = [SimpleNamespace(metric="val_loss", epoch=None), SimpleNamespace(metric="val_metric", epoch=None)]

    @validator.on(Events.EPOCH_COMPLETED)
    def _improved(e):
        best[1].epoch = e.state.epoch

    EpochSummary(validator=validator, best=best).attach(trainer)
    with caplog.at_level(logging.DEBUG, logger="saltkit.handlers.progress"):
        trainer.run(range(8), max_epochs=2)
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert info[0] == "training: 2 epochs of 8 iterations"
    one, two = info[1].rsplit("  ", 1)[0], info[2].rsplit("  ", 1)[0]  # without the time taken
    assert one == "epoch 1/2  lr 0.00191  train loss 3.247 metric 0.094 accuracy 0.667"  # not validated
    assert two == ("epoch 2/2  lr 0.00191  train loss 3.247 metric 0.094 accuracy 0.667  "
                   "val loss 0.415 metric 0.400 accuracy 0.789  new best: metric")
    assert info[2].rsplit("  ", 1)[1].endswith("s") and len(info) == 3
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("0.41499999999" in m for m in debug)  # the full values are still there, at DEBUG
    assert metric_text({"val_x": 1e-4, "val_loss": 2.0, "train_loss": 1.0}, "val_") == "loss 2.000 x 0.0001"


def console(stream) -> logging.Logger:
    log = logging.getLogger("saltkit.test.console")
    log.propagate, log.handlers = False, [logging.StreamHandler(stream)]
    log.setLevel(logging.DEBUG)
    return log


def test_engine_detail_at_debug():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(DetailsAtDebug(show=False))
    detail, ours = logging.getLogger("ignite.engine.engine.SupervisedTrainer"), logging.getLogger("saltkit.x")
    for show in (False, True):
        handler.filters[0].show = show
        for log in (detail, ours):
            log.addHandler(handler)
            log.propagate = False
            log.setLevel(logging.DEBUG)
        try:
            detail.info("Epoch[1] Complete. Time taken: 00:00:09.349")
            detail.warning("a warning of the engine")
            ours.info("epoch 1/12  lr 0.0012")
        finally:
            for log in (detail, ours):
                log.removeHandler(handler)
                log.propagate = True
                log.setLevel(logging.NOTSET)
    assert out.getvalue().splitlines() == [
        "a warning of the engine", "epoch 1/12  lr 0.0012",  # hidden detail
        "Epoch[1] Complete. Time taken: 00:00:09.349", "a warning of the engine", "epoch 1/12  lr 0.0012"]


def test_details_at_debug_reaches_every_console_handler(monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    log = console(sys.stdout)
    details_at_debug(show=False)
    details_at_debug(show=False)  # idempotent
    assert [type(f) for f in log.handlers[0].filters] == [DetailsAtDebug]


def test_log_lines_go_through_the_bars(monkeypatch):
    from tqdm import tqdm

    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    log = console(sys.stdout)
    bar = tqdm(total=10, file=out, ncols=60, mininterval=0)
    bar.update(3)
    with logging_around_bars():
        log.info("a line in the middle")
    assert log.handlers[0].stream is out  # restored
    bar.close()
    text = out.getvalue()
    before = text[: text.index("a line in the middle")]
    assert before.endswith("\r") and "30%" in before  # the bar was cleared back to the line's start first
    assert "30%" in text[text.index("a line in the middle"):]  # and drawn again below it


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    logging.getLogger("saltkit.test.console").handlers = []


def test_the_bar_ends_an_epoch_on_the_summary_values():
    """The running values end each epoch equal to the summary's train loss and metric (ignite's Average of batch
    losses, CompetitionMetric over the epoch's tiles), also with batches of unequal size and from epoch 2 on."""
    from ignite.metrics import Average

    from saltkit.metrics import CompetitionMetric

    generator = torch.Generator().manual_seed(0)
    sizes = [4, 4, 3, 4, 2]  # tiles per batch

    def step(engine, batch):
        label = (torch.rand(batch, 1, 8, 8, generator=generator) > 0.6).float()
        pred = torch.where(torch.rand(batch, 1, 8, 8, generator=generator) > 0.3, label * 2 - 1, 1 - label * 2)
        return {"loss": torch.rand((), generator=generator) * 3, "tile_pred": pred, "tile_label": label}

    trainer = Engine(step)
    CompetitionMetric(output_transform=lambda o: (o["tile_pred"], o["tile_label"])).attach(trainer, "train_metric")
    Average(output_transform=lambda o: o["loss"]).attach(trainer, "train_loss")
    progress = TrainingProgress(terminal=False)
    progress.attach(trainer)
    shown = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: shown.append((progress.shown(), dict(e.state.metrics))))
    trainer.run(sizes, max_epochs=3)
    for bar, summary in shown:
        assert bar["loss"] == pytest.approx(summary["train_loss"], abs=1e-6)
        assert bar["metric"] == pytest.approx(summary["train_metric"], abs=1e-9)
    assert len({round(bar["metric"], 9) for bar, _ in shown}) == 3  # three epochs, three different values


def test_progress_bars_need_a_terminal_and_the_key():
    from saltkit.config import ConfigError
    from saltkit.logs import progress_bars

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert progress_bars(True, Terminal()) and progress_bars("true", Terminal())
    assert not progress_bars(False, Terminal()) and not progress_bars("false", Terminal())
    assert not progress_bars(True, io.StringIO())  # redirected to a file
    closed = io.StringIO()
    closed.close()  # its isatty() raises ValueError
    assert not progress_bars(True, closed) and not progress_bars(True, object())
    with pytest.raises(ConfigError, match="'progress' must be true or false"):
        progress_bars("maybe", Terminal())
