"""Engine handlers that write a run's checkpoints (best_loss.pt, best_accuracy.pt, best_metric.pt, last.pt) and
resume from last.pt; what the files hold and how they are written is `saltkit.checkpoints`.

Fixed file names (not Ignite's Checkpoint, whose names carry the score, nor MONAI's CheckpointSaver, which writes
non-atomically and has no resume-identity checks).
At the end of an epoch last.pt is written first and the improved best files after it: a kill in between loses
nothing, since the resume rewrites a best file that last.pt records as this epoch's but that was not written.
Only the process of rank 0 writes; every rank resumes.
"""

from __future__ import annotations

import logging
import pickle
import random
from collections.abc import Sequence
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn

from saltkit.checkpoints import (
    ResumeError,
    arch_of,
    check_same_arch,
    check_same_run,
    read_checkpoint,
    read_resume_checkpoint,
    save_checkpoint,
    unwrap,
)
from saltkit.config import none_if_null

logger = logging.getLogger(__name__)


def is_writer() -> bool:
    """Only the process of rank 0 writes files (single-process runs have rank 0)."""
    return idist.get_rank() == 0


class BestCheckpoint:
    """Keep `<run_dir>/<filename>` = the network at the best value of the evaluator metric `metric` so far.

    Attach to the evaluator: runs on its EPOCH_COMPLETED, reads `engine.state.metrics[metric]` and, when it
    improves on the best (mode "max" or "min"; ties keep the earlier epoch), writes
    {"network", "arch", "epoch", "metric", "score", **extra}. `state_dict()` / `load_state_dict()` carry the best
    score through last.pt so a resumed run keeps comparing against it. When a `LastCheckpoint` owns it
    (`deferred`), the file is written by that handler right after last.pt instead (`write_pending`).

    Args:
        run_dir: the run folder the checkpoint is written into.
        network: the network whose weights are saved (a DistributedDataParallel's inner module is saved).
        metric: the name of the evaluator metric to follow (e.g. "metric", "pixel_accuracy").
        mode: "max" (higher is better) or "min".
        filename: the checkpoint's file name; None: best_<metric>.pt.
        epoch_source: the engine whose epoch is recorded (the trainer); None: the evaluator's own.
        extra: more entries stored in the checkpoint (variant, fold, ...).
    """

    def __init__(self, run_dir: str | Path, network: nn.Module, metric: str, mode: str = "max",
                 filename: str | None = None, epoch_source: Engine | None = None, extra: dict | None = None):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.run_dir = Path(run_dir)
        self.network = network
        self.metric = metric
        self.mode = mode
        self.filename = filename or f"best_{metric}.pt"
        self.epoch_source = epoch_source  # the trainer, whose epoch counts; default: the evaluator's epoch
        self.extra = dict(extra or {})
        self.score: float | None = None
        self.epoch: int | None = None
        self.deferred = False  # set by LastCheckpoint.attach: write after last.pt, not at validation
        self.pending = False

    @property
    def path(self) -> Path:
        return self.run_dir / self.filename

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def improves(self, value: float) -> bool:
        if self.score is None:
            return True
        return value > self.score if self.mode == "max" else value < self.score

    def __call__(self, engine: Engine) -> None:
        if self.metric not in engine.state.metrics:
            raise KeyError(f"BestCheckpoint({self.filename}): metric {self.metric!r} not computed by the evaluator; "
                           f"it has {sorted(engine.state.metrics)}")
        value = float(engine.state.metrics[self.metric])
        if not np.isfinite(value) or not self.improves(value):
            return
        self.score = value
        self.epoch = int((self.epoch_source or engine).state.epoch)
        if self.deferred:
            self.pending = True
        else:
            self.write()

    def write(self) -> None:
        """Save the network now as this best checkpoint (its score and epoch as recorded); rank 0 only."""
        self.pending = False
        if is_writer():
            save_checkpoint({"network": unwrap(self.network).state_dict(), "arch": arch_of(self.network),
                             "epoch": self.epoch, "metric": self.metric, "score": self.score, **self.extra},
                            self.path)
            logger.info(f"epoch {self.epoch}: best {self.metric} {self.score:.4f} -> {self.path}")

    def write_pending(self) -> None:
        """Write the file when the last validation improved on the best (deferred mode)."""
        if self.pending:
            self.write()

    def saved_epoch(self) -> int | None:
        """The epoch recorded in the file on disk (None when missing or unreadable)."""
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True, mmap=True).get("epoch")
        except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError, AttributeError):
            return None

    def state_dict(self) -> dict:
        return {"metric": self.metric, "mode": self.mode, "score": self.score, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.score, self.epoch = state.get("score"), state.get("epoch")


def rng_state() -> dict:
    """Global torch / numpy / python RNG states as tensors and plain types (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64)),
            "numpy_pos": int(pos), "numpy_gauss": (int(has_gauss), float(cached)), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], has_gauss, cached))
    random.setstate(state["python"])


class LastCheckpoint:
    """Write `<run_dir>/last.pt` at the end of every training epoch (after validation: attach it after the
    validation handler) with everything `ResumeFromCheckpoint` needs to continue exactly there, then the `best`
    checkpoints that this epoch's validation improved (they wait for last.pt, see the module docstring).

    Args:
        run_dir: the run folder last.pt is written into.
        network: the network whose weights are saved.
        optimizer: the optimizer whose state is saved.
        lr_scheduler: the learning-rate scheduler whose state is saved, or None.
        best: the `BestCheckpoint` handlers whose scores last.pt carries and whose files it writes after it.
        filename: the checkpoint's file name.
        extra: more entries stored in the checkpoint (what identifies the run: variant, fold, split, ...).
    """

    def __init__(self, run_dir: str | Path, network: nn.Module, optimizer: torch.optim.Optimizer,
                 lr_scheduler=None, best: Sequence[BestCheckpoint] = (), filename: str = "last.pt",
                 extra: dict | None = None):
        self.run_dir = Path(run_dir)
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.best = list(best)
        self.filename = filename
        self.extra = dict(extra or {})

    @property
    def path(self) -> Path:
        return self.run_dir / self.filename

    def attach(self, engine: Engine) -> None:
        for b in self.best:
            b.deferred = True
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def checkpoint(self, engine: Engine) -> dict:
        state = engine.state
        ckpt = {
            "network": unwrap(self.network).state_dict(), "arch": arch_of(self.network),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "trainer": {"epoch": int(state.epoch), "iteration": int(state.iteration),
                        "epoch_length": int(state.epoch_length), "max_epochs": int(state.max_epochs)},
            "best": {b.filename: b.state_dict() for b in self.best},
            "rng": rng_state(),
            **self.extra,
        }
        scaler = getattr(engine, "scaler", None)
        if scaler is not None:
            ckpt["scaler"] = scaler.state_dict()
        return ckpt

    def __call__(self, engine: Engine) -> None:
        if is_writer():
            save_checkpoint(self.checkpoint(engine), self.path)
        for b in self.best:
            b.write_pending()


def load_schedule_keeping_settings(scheduler, state: dict) -> None:
    """`scheduler.load_state_dict(state)`, then put back the configured settings of its lambda objects
    (LambdaLR restores their attributes too): the checkpoint supplies the position, the config the shape."""
    lambdas = [fn for fn in getattr(scheduler, "lr_lambdas", []) if hasattr(fn, "__dict__")]
    configured = [dict(vars(fn)) for fn in lambdas]
    scheduler.load_state_dict(state)
    for fn, settings in zip(lambdas, configured, strict=True):
        vars(fn).clear()
        vars(fn).update(settings)


class ResumeFromCheckpoint:
    """On the trainer's STARTED event, restore network, optimizer, scheduler, epoch/iteration, best scores and
    RNG from a last.pt written by `LastCheckpoint`; training then continues with the next epoch.

    The configured max_epochs is kept (so a finished run can be extended with `--max_epochs`), and so are the
    configured schedule settings (a cool-down follows the new length); the step count comes from the checkpoint.
    The checkpoint's arch must match the network's, its run what `expected` describes (`check_same_run`), and the
    epoch length this config's (ResumeError otherwise). A best checkpoint that last.pt records as its own epoch's
    but that is missing or older on disk (a kill between the two writes) is rewritten from last.pt's network.

    Args:
        path: the last.pt to resume; None: a fresh run, nothing is attached.
        network: the run's network, whose weights are restored.
        optimizer: the run's optimizer, whose state is restored.
        lr_scheduler: the run's learning-rate scheduler, whose state is restored, or None.
        best: the `BestCheckpoint` handlers, whose best scores are restored.
        expected: what identifies the run (`saltkit.training.run_identity`), checked against the checkpoint's.
    """

    def __init__(self, path: str | Path | None, network: nn.Module, optimizer: torch.optim.Optimizer,
                 lr_scheduler=None, best: Sequence[BestCheckpoint] = (), expected: dict | None = None):
        self.path = None if path is None else Path(path)
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.best = list(best)
        self.expected = dict(expected or {})

    def attach(self, engine: Engine) -> None:
        if self.path is not None:
            engine.add_event_handler(Events.STARTED, self)

    def read(self) -> dict:
        ckpt = read_resume_checkpoint(self.path)
        check_same_arch(ckpt["arch"], arch_of(self.network), self.path)
        check_same_run(ckpt, self.expected, self.path)
        return ckpt

    def restore_best_files(self, epoch: int) -> None:
        """Rewrite the best files that last.pt (epoch `epoch`, its network now loaded) has but the disk lacks."""
        for b in self.best:
            if b.epoch == epoch and b.saved_epoch() != epoch:
                b.write()

    def __call__(self, engine: Engine) -> None:
        ckpt = self.read()
        trainer = ckpt["trainer"]
        if trainer["epoch_length"] != engine.state.epoch_length:
            raise ResumeError(f"resume: {self.path} was written with {trainer['epoch_length']} iterations per epoch, "
                              f"this config has {engine.state.epoch_length} (batch_size, dataset or fold differ)")
        unwrap(self.network).load_state_dict(ckpt["network"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.lr_scheduler is not None and ckpt.get("scheduler") is not None:
            load_schedule_keeping_settings(self.lr_scheduler, ckpt["scheduler"])
        for b in self.best:
            if b.filename in ckpt["best"]:
                b.load_state_dict(ckpt["best"][b.filename])
        self.restore_best_files(trainer["epoch"])
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])
        engine.state.iteration = trainer["iteration"]
        engine.state.epoch = trainer["epoch"]
        if hasattr(engine.state, "lr") and self.lr_scheduler is not None:
            engine.state.lr = self.lr_scheduler.get_last_lr()[0]
        logger.info(f"resumed from {self.path} at epoch {trainer['epoch']} (iteration {trainer['iteration']}); "
                    f"training to epoch {engine.state.max_epochs}")


class InitFromCheckpoint:
    """On the trainer's STARTED event, load the network weights of a trained checkpoint (config key 'init_ckpt'):
    fine-tuning starts from them with the config's fresh optimizer and schedule. The architecture was checked
    before the run (`saltkit.finetune.check_init_ckpt`); a resumed run takes its weights from last.pt instead.

    Args:
        path: the checkpoint (config key `init_ckpt`); null: nothing to load, nothing is attached.
        network: the run's network.
        resume_path: the last.pt a resumed run continues from (then nothing is attached), or None.
    """

    def __init__(self, path: str | Path | None, network: nn.Module, resume_path: str | Path | None = None):
        path = none_if_null(path)
        self.path = None if path is None or resume_path is not None else Path(path)
        self.network = network

    def attach(self, engine: Engine) -> None:
        if self.path is not None:
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        unwrap(self.network).load_state_dict(read_checkpoint(self.path, "init_ckpt")["network"])
        logger.info(f"fine-tuning from {self.path} (its network weights; fresh optimizer and schedule)")
