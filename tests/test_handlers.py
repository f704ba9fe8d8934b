"""Engine handlers: Noam schedule values, atomic checkpoints, best/last checkpoints and exact resume state,
the NaN guard and the worst-tiles image grid. Small ignite engines with a toy network keep this fast."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn

import saltkit.handlers.save_resume as ckpt_mod
from saltkit.handlers import (
    BestCheckpoint,
    DivergenceError,
    EpochTimeBudget,
    FailOnNanLoss,
    LastCheckpoint,
    NoamHandler,
    NoamLambda,
    ResumeError,
    ResumeFromCheckpoint,
    ScheduledValidation,
    WorstTilesImages,
    cooldown_steps,
    noam_scheduler,
    save_checkpoint,
    schedule_steps,
    warmup_steps,
)
from saltkit.handlers.image_grids import worst_tile_order
from saltkit.handlers.save_resume import load_schedule_keeping_settings
from saltkit.pictures import BOTH_RGB, TRUTH_RGB


class ToyNet(nn.Linear):
    """A network with the `arch` property checkpoints need."""

    def __init__(self, width: int = 3):
        super().__init__(width, 1)
        self.arch = {"backbone": "toy", "num_filters": width, "attention": "sdpa"}


# ---------------------------------------------------------------- Noam schedule


def test_noam_factor_values():
    f = NoamLambda(4)
    expected = [0.25, 0.5, 0.75, 1.0, math.sqrt(4 / 5), math.sqrt(4 / 6), math.sqrt(4 / 7), math.sqrt(4 / 8)]
    assert [f(step) for step in range(8)] == pytest.approx(expected, rel=1e-12)
    # peak at the end of warm-up, inverse square root decay afterwards: factor(4W - 1) = 1/2
    assert f(15) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="warm-up"):
        NoamLambda(0)


def test_warmup_steps_units():
    assert warmup_steps(2, 10, "epoch") == 20
    assert warmup_steps(0.5, 10, "epoch") == 5
    assert warmup_steps(7, 10, "iteration") == 7
    with pytest.raises(ValueError, match="warmup_unit"):
        warmup_steps(1, 10, "batch")


def test_noam_cooldown_ramps_to_zero_over_the_last_steps():
    plain, cooled = NoamLambda(4), NoamLambda(4, total_steps=20, cooldown_steps=5)
    # unchanged up to the cool-down, then Noam x (T - step) / C: 1, 4/5, ..., 1/5 over steps 15..19, then 0
    assert [cooled(k) for k in range(16)] == pytest.approx([plain(k) for k in range(16)], rel=1e-12)
    assert [cooled(k) / plain(k) for k in range(15, 20)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2], rel=1e-12)
    assert cooled(20) == 0.0 and cooled(25) == 0.0
    assert schedule_steps(0, 10) == 0 and schedule_steps(1.5, 10, "epoch") == 15
    assert schedule_steps(7, 10, "iteration") == 7
    for bad in ({"cooldown_steps": -1, "total_steps": 10}, {"cooldown_steps": 5}, {"cooldown_steps": 11, "total_steps": 10}):
        with pytest.raises(ValueError, match="cool-down"):
            NoamLambda(4, **bad)


def test_cooldown_longer_than_the_run_covers_the_run(caplog):
    """configs/cpu.json's 3-epoch cool-down under --max_epochs 2: the ramp spans the run instead of failing."""
    assert cooldown_steps(3, 10, total_steps=80) == 30  # fits: unchanged
    with caplog.at_level("INFO", logger="saltkit.handlers.noam"):
        assert cooldown_steps(3, 10, total_steps=20) == 20
    assert "'cooldown_epochs' (3 epochs) is longer than the run (2 epochs of 10 iterations)" in caplog.text
    assert cooldown_steps(50, 10, total_steps=20, unit="iteration") == 20
    whole = NoamLambda(4, total_steps=20, cooldown_steps=cooldown_steps(3, 10, total_steps=20))
    assert [whole(k) / NoamLambda(4)(k) for k in (0, 10, 19)] == pytest.approx([1.0, 0.5, 0.05], rel=1e-12)
    assert whole(20) == 0.0


def test_resume_keeps_the_configured_schedule_length():
    """Extending a finished run (--max_epochs) moves the cool-down to the new end; the position is restored."""
    opt = torch.optim.SGD(ToyNet().parameters(), lr=1.0)
    short = noam_scheduler(opt, 4, total_steps=20, cooldown_steps=5)
    for _ in range(20):
        opt.step()
        short.step()
    assert short.get_last_lr()[0] == 0.0
    longer = noam_scheduler(torch.optim.SGD(ToyNet().parameters(), lr=1.0), 4, total_steps=40, cooldown_steps=5)
    load_schedule_keeping_settings(longer, short.state_dict())
    assert longer.last_epoch == 20 and longer.lr_lambdas[0].total_steps == 40
    longer.optimizer.step()
    longer.step()
    assert longer.get_last_lr()[0] == pytest.approx(NoamLambda(4)(21))


def test_noam_handler_steps_per_iteration_and_records_lr():
    net = ToyNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = noam_scheduler(opt, warmup_steps=4)
    engine = Engine(lambda e, b: opt.step())
    seen = []
    NoamHandler(sched).attach(engine)
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.lr))
    engine.run([0] * 3, max_epochs=2)
    # after iteration k the scheduler has stepped k times: lr = 0.1 * factor(k)
    assert seen == pytest.approx([0.1 * NoamLambda(4)(k) for k in range(1, 7)], rel=1e-9)
    assert opt.param_groups[0]["lr"] == pytest.approx(seen[-1])
    # the lambda is an object, so its warm-up travels in the scheduler state
    assert sched.state_dict()["lr_lambdas"][0] == {"warmup_steps": 4.0, "total_steps": None, "cooldown_steps": 0.0,
                                                   "configured_total_steps": None}


# ---------------------------------------------------------------- atomic writes


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "best_metric.pt"
    save_checkpoint({"network": {"w": torch.ones(2)}, "arch": {"backbone": "toy"}}, path)

    def killed_mid_write(obj, f, *args, **kwargs):
        f.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt  # the process is stopped in the middle of writing

    monkeypatch.setattr(ckpt_mod.torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"network": {"w": torch.zeros(2)}, "arch": {}}, path)
    monkeypatch.undo()
    ckpt = torch.load(path, weights_only=True)  # the previous file, intact
    assert torch.equal(ckpt["network"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["best_metric.pt"]  # no temporary file left behind


# ---------------------------------------------------------------- best / last / resume


def evaluator_with(values: list[dict]) -> Engine:
    """An engine whose epoch i reports metrics values[i - 1]."""
    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def _metrics(e):
        e.state.metrics = dict(values[e.state.epoch - 1])

    return engine


def test_best_checkpoint_keeps_the_best_epoch(tmp_path):
    net = ToyNet()
    best_loss = BestCheckpoint(tmp_path, net, "val_loss", mode="min", filename="best_loss.pt")
    best_metric = BestCheckpoint(tmp_path, net, "val_metric", mode="max", filename="best_metric.pt",
                                 extra={"variant": "pad"})
    engine = evaluator_with([{"val_loss": 3.0, "val_metric": 0.4}, {"val_loss": 2.0, "val_metric": 0.3},
                             {"val_loss": 2.5, "val_metric": 0.6}])
    # handlers run in registration order: the metrics are set before the checkpoints read them
    best_loss.attach(engine)
    best_metric.attach(engine)
    engine.run([0], max_epochs=3)
    assert (best_loss.score, best_loss.epoch) == (2.0, 2)
    assert (best_metric.score, best_metric.epoch) == (0.6, 3)
    saved = torch.load(tmp_path / "best_metric.pt", weights_only=True)
    assert saved["epoch"] == 3 and saved["score"] == 0.6 and saved["variant"] == "pad"
    assert saved["arch"] == net.arch and set(saved["network"]) == {"weight", "bias"}
    assert torch.load(tmp_path / "best_loss.pt", weights_only=True)["epoch"] == 2


def toy_training(net, opt, sched, handlers, data_len=4):
    engine = Engine(lambda e, b: (opt.zero_grad(), net(torch.ones(2, 3)).sum().backward(), opt.step()))
    for h in handlers:
        h.attach(engine)
    return engine, [0] * data_len


def test_last_checkpoint_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    net = ToyNet()
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    sched = noam_scheduler(opt, 3)
    best = BestCheckpoint(tmp_path, net, "val_metric", filename="best_metric.pt")
    best.score, best.epoch = 0.7, 1
    engine, data = toy_training(net, opt, sched, [NoamHandler(sched), LastCheckpoint(tmp_path, net, opt, sched, [best])])
    engine.run(data, max_epochs=2)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["trainer"] == {"epoch": 2, "iteration": 8, "epoch_length": 4, "max_epochs": 2}
    assert saved["best"]["best_metric.pt"]["score"] == 0.7

    # a fresh process: new objects, resumed from last.pt, continues with epoch 3
    net2 = ToyNet()
    opt2 = torch.optim.AdamW(net2.parameters(), lr=0.01)
    sched2 = noam_scheduler(opt2, 3)
    best2 = BestCheckpoint(tmp_path, net2, "val_metric", filename="best_metric.pt")
    epochs = []
    engine2, data2 = toy_training(net2, opt2, sched2, [ResumeFromCheckpoint(tmp_path / "last.pt", net2, opt2, sched2,
                                                                           [best2]), NoamHandler(sched2)])
    engine2.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    restored = {}
    engine2.add_event_handler(Events.STARTED, lambda e: restored.update(
        weight=net2.weight.detach().clone(), step=opt2.state_dict()["state"][0]["step"].item(),
        last_epoch=sched2.last_epoch, lr=opt2.param_groups[0]["lr"]))
    engine2.run(data2, max_epochs=3)
    assert torch.equal(restored["weight"], saved["network"]["weight"])
    assert restored["step"] == 8 and restored["last_epoch"] == 8
    assert restored["lr"] == pytest.approx(0.01 * NoamLambda(3)(8))
    assert epochs == [3] and engine2.state.iteration == 12
    assert (best2.score, best2.epoch) == (0.7, 1)


def test_resume_refuses_another_architecture(tmp_path):
    net = ToyNet(3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    engine, data = toy_training(net, opt, None, [LastCheckpoint(tmp_path, net, opt)])
    engine.run(data, max_epochs=1)
    other = ToyNet(3)
    other.arch = {**other.arch, "backbone": "resnet34", "attention": "plain"}  # attention alone would be fine
    resume = ResumeFromCheckpoint(tmp_path / "last.pt", other, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(ResumeError, match=r"another architecture \(backbone: checkpoint 'toy' vs config 'resnet34'\)"):
        resume.read()
    with pytest.raises(ResumeError, match="not found"):
        ResumeFromCheckpoint(tmp_path / "missing.pt", net, opt).read()


# ---------------------------------------------------------------- NaN guard, images


def test_terminate_on_nan_raises_a_clear_error(tmp_path):
    last = tmp_path / "last.pt"
    last.write_bytes(b"")  # a previous epoch's checkpoint
    engine = Engine(lambda e, b: {"loss": torch.tensor(float("nan") if e.state.iteration == 3 else 1.0)})
    FailOnNanLoss(last_checkpoint=str(last)).attach(engine)
    with pytest.raises(DivergenceError, match=rf"loss is nan at epoch 1, iteration 3; {last} holds"):
        engine.run([0] * 5, max_epochs=1)


class FakeWriter:
    def __init__(self):
        self.images, self.texts, self.flushed = [], [], 0

    def add_image(self, tag, img, global_step, dataformats="CHW"):
        self.images.append((tag, img, global_step, dataformats))

    def add_text(self, tag, text, step):
        self.texts.append((tag, text, step))

    def flush(self):
        self.flushed += 1


def test_worst_tile_order_breaks_ties_by_accuracy():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.5], dtype=torch.float64)
    accuracy = torch.tensor([1.0, 0.9, 0.2, 0.8], dtype=torch.float64)
    assert worst_tile_order(scores, accuracy).tolist() == [2, 1, 3, 0]


def test_worst_tiles_grid_keeps_the_lowest_scores():
    truth = torch.zeros(4, 1, 128, 128)
    truth[:, :, 40:90, 40:90] = 1
    batches = []
    for k in range(2):
        logits = torch.where(truth > 0, 5.0, -5.0).clone()
        logits[0] = -5.0  # tile 0 of each batch: salt missed entirely (score 0)
        batches.append({"image": torch.rand(4, 3, 128, 128), "tile_pred": logits[..., 13:114, 13:114],
                        "tile_label": truth[..., 13:114, 13:114], "id": [f"b{k}t{i}" for i in range(4)]})
    engine = Engine(lambda e, b: b)

    @engine.on(Events.ITERATION_COMPLETED)
    def _batch(e):
        e.state.batch = e.state.output

    writer = FakeWriter()
    WorstTilesImages(writer, "pad", num_tiles=3).attach(engine)
    engine.run(batches, max_epochs=1)
    (tag, grid, step, dataformats), = writer.images
    assert tag == "val/worst_tiles" and step == 1 and dataformats == "HWC"
    # saltkit.pictures.tile_grid of the three worst: one row of three outlined tiles at twice the size
    assert grid.dtype == np.uint8 and grid.shape[2] == 3 and 3 * 202 < grid.shape[1] < 3 * 202 + 40
    # a 50 x 50 square's inner outline is 196 tile pixels, 4 grid pixels each: the two missed squares in the truth
    # colour, the third (predicted exactly) where truth and prediction coincide
    assert (grid == TRUTH_RGB).all(-1).sum() == 2 * 196 * 4 and (grid == BOTH_RGB).all(-1).sum() == 196 * 4
    text = writer.texts[0][1]
    assert text.index("b0t0 (0.00)") < text.index("b1t0 (0.00)")  # both misses first, in order seen


def test_time_limit_stops_before_the_budget_runs_out(monkeypatch):
    import saltkit.handlers.time_limit as tl

    clock = iter(range(0, 10_000, 100))  # every call: 100 s later; one call per epoch start and end
    monkeypatch.setattr(tl.time, "perf_counter", lambda: next(clock))
    engine = Engine(lambda e, b: None)
    EpochTimeBudget(minutes=10).attach(engine)  # 600 s
    engine.run([0], max_epochs=20)
    # epoch 1 started at 0, epoch k ends at 100 k (epoch starts after the first do not read the clock):
    # after epoch 5, 500 s + 100 s/epoch = 600 s is not past the budget; after epoch 6 it would be
    assert engine.state.epoch == 6
    EpochTimeBudget(None).attach(Engine(lambda e, b: None))  # no limit: nothing attached


def test_time_limit_ends_the_cooldown_at_the_last_epoch_that_fits(monkeypatch):
    import saltkit.handlers.time_limit as tl

    clock = iter(range(0, 10_000, 100))
    monkeypatch.setattr(tl.time, "perf_counter", lambda: next(clock))
    opt = torch.optim.SGD(ToyNet().parameters(), lr=1.0)
    sched = noam_scheduler(opt, 2, total_steps=40, cooldown_steps=6)  # 20 epochs of 2 iterations configured
    engine = Engine(lambda e, b: opt.step())
    NoamHandler(sched).attach(engine)
    lrs = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: lrs.append(e.state.lr))
    EpochTimeBudget(minutes=10, lr_scheduler=sched).attach(engine)
    engine.run([0, 0], max_epochs=20)
    # 6 epochs fit (as above): the schedule now ends at iteration 12, so the run stops with the rate at 0 after a
    # full 6-iteration ramp instead of being cut before its cool-down started
    assert engine.state.epoch == 6 and sched.lr_lambdas[0].total_steps == 12
    ramp = [NoamLambda(2)(k) * (12 - k) / 6 for k in range(7, 13)]
    assert lrs[-6:] == pytest.approx(ramp, abs=1e-12) and lrs[-1] == 0.0
    assert lrs[:6] == pytest.approx([NoamLambda(2)(k) for k in range(1, 7)])


class _RecordingValidator:
    def __init__(self):
        self.epochs = []

    def run(self, epoch):
        self.epochs.append(epoch)


def _validated_epochs(interval, max_epochs, budget_minutes=None, cooldown_steps=0, monkeypatch=None):
    """Epochs (2 iterations each, 100 s each on a fake clock) after which ScheduledValidation ran the validator."""
    import saltkit.handlers.time_limit as tl

    clock = iter(range(0, 10_000, 100))
    monkeypatch.setattr(tl.time, "perf_counter", lambda: next(clock))
    opt = torch.optim.SGD(ToyNet().parameters(), lr=1.0)
    sched = noam_scheduler(opt, 2, total_steps=2 * max_epochs, cooldown_steps=cooldown_steps)
    engine = Engine(lambda e, b: opt.step())
    NoamHandler(sched).attach(engine)
    EpochTimeBudget(budget_minutes, lr_scheduler=sched).attach(engine)  # before the validation, as in train.json
    handler = ScheduledValidation(None, interval=interval, lr_scheduler=sched)
    handler.validator = validator = _RecordingValidator()
    handler.attach(engine)
    engine.run([0, 0], max_epochs=max_epochs)
    return validator.epochs


def test_scheduled_validation_skips_only_epochs_that_decide_nothing(monkeypatch):
    assert _validated_epochs(1, 5, monkeypatch=monkeypatch) == [1, 2, 3, 4, 5]  # interval 1: ValidationHandler's
    assert _validated_epochs(3, 7, monkeypatch=monkeypatch) == [3, 6, 7]  # every 3rd and the last
    # a 10-minute budget stops the run after epoch 6 (see above): the epoch it stops after is validated
    assert _validated_epochs(4, 20, budget_minutes=10, monkeypatch=monkeypatch) == [4, 6]
    # with a 6-iteration cool-down the schedule ends at iteration 12: epochs 4-6 ramp the rate down, all validated
    assert _validated_epochs(5, 20, budget_minutes=10, cooldown_steps=6, monkeypatch=monkeypatch) == [4, 5, 6]
    assert _validated_epochs(2, 20, budget_minutes=10, cooldown_steps=6, monkeypatch=monkeypatch) == [2, 4, 5, 6]


def test_time_limit_never_raises_a_rate_that_is_cooling_down(monkeypatch):
    """A slow epoch (epoch 5: 500 s instead of 100 s) shortens the schedule; the faster epochs after it would let
    the end move later again, but a cool-down that has begun only gets shorter, and the run stops at rate 0."""
    import saltkit.handlers.time_limit as tl

    clock = iter([0, 100, 200, 300, 400, 900, *range(1000, 10_000, 100)])  # epoch starts and ends, as above
    monkeypatch.setattr(tl.time, "perf_counter", lambda: next(clock))
    opt = torch.optim.SGD(ToyNet().parameters(), lr=1.0)
    sched = noam_scheduler(opt, 2, total_steps=40, cooldown_steps=6)
    engine = Engine(lambda e, b: opt.step())
    NoamHandler(sched).attach(engine)
    lrs = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: lrs.append(e.state.lr))
    EpochTimeBudget(minutes=25, lr_scheduler=sched).attach(engine)  # 1500 s
    engine.run([0, 0], max_epochs=20)
    # after epoch 5 (900 s, 180 s per epoch) 3 more fit: the end moves to iteration 16 and the ramp starts at 10;
    # after epochs 6 and 7 the mean epoch is shorter and one more epoch would fit, but the end stays at 16
    assert sched.lr_lambdas[0].total_steps == 16 and engine.state.epoch == 8
    assert lrs[-1] == 0.0 and all(b <= a for a, b in zip(lrs[9:-1], lrs[10:], strict=True))
