"""The run folder of a training: held by one training at a time, never silently reused.

`claim_run_dir` (called by train.json before anything heavy starts) refuses a folder that holds a previous run's
checkpoints unless the run resumes it (`--resume true`) or replaces it (`--overwrite true`), takes a lock on it
(`<run_dir>/.lock`, holding the pid of the training) so a second training into the same folder fails at once, and
removes the temporaries of writes that a killed process left there. The lock is an advisory `flock`: the system
releases it when its process ends, however it ends, so a killed run never blocks the resume that follows.
`resume_checkpoint` finds the last.pt a run resumes; `prepare_run_dir` writes the run record (`config.json`).
`default_run_dir` names the folder when the config does not: `runs/<dataset name>/<variant>_fold<k>`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import ignite.distributed as idist

from saltkit.config import FALSE_WORDS, TRUE_WORDS, ConfigError, as_bool, none_if_null
from saltkit.data.layout import sample_dir
from saltkit.io import atomic_write, host_name, remove_stale_temporaries

try:
    import fcntl
except ImportError:  # not POSIX: runs go unlocked
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
# files a training writes into its run folder; their presence means the folder holds a run
CHECKPOINT_PATTERNS = ("last.pt", "best_*.pt", "swa.pt")
RESUME_RECORD = "config_resumed.json"
TENSORBOARD_DIR = "tensorboard"

RUNS_ROOT = "runs"
SAMPLE_NAME = "sample"  # the embedded sample's runs (its own folder is named tgs, as the real data's is)
DEFAULT_VARIANT = "pad"


def dataset_name(dataset_dir) -> str:
    """The name a dataset's runs are filed under: `sample` for the embedded sample
    (`saltkit.data.sample_dir()`), the dataset folder's own name otherwise (`../data/tgs` -> `tgs`).

    Args:
        dataset_dir: the dataset folder; None / null: the embedded sample (the workflows' default data).
    """
    dataset_dir = none_if_null(dataset_dir)
    if dataset_dir is None:
        return SAMPLE_NAME
    path = Path(str(dataset_dir)).expanduser().resolve()
    if path == sample_dir().resolve():
        return SAMPLE_NAME
    return path.name or "dataset"


def default_run_dir(dataset_dir, variant, fold, root: str | Path = RUNS_ROOT) -> str:
    """The run folder of a training when config key `run_dir` is not given:
    `runs/<dataset name>/<variant>_fold<k>` (`runs/sample/pad_fold0` for the embedded sample,
    `runs/tgs/pad_fold3` for fold 3 of a folder named tgs), so runs of different data never share a folder.
    The workflows after training (swa, evaluate, inference) default to the same folder.

    Args:
        dataset_dir: the dataset folder (`dataset_name`); None / null: the embedded sample.
        variant: config key `variant` (pad / resize); None / null: pad, the workflows' default.
        fold: config key `fold`, the validation fold; None / null: 0.
        root: the folder holding every run.
    """
    variant = none_if_null(variant)
    fold = none_if_null(fold)
    name = f"{DEFAULT_VARIANT if variant is None else variant}_fold{0 if fold is None else fold}"
    return (Path(root) / dataset_name(dataset_dir) / name).as_posix()


# Locks this process holds, by lock path: a flock belongs to one open file, so a second training in the same
# process (after a first one that failed before releasing it) must reuse that file rather than open another.
_HELD_LOCKS: dict[str, int] = {}


class RunDirLock:
    """The lock on a run folder held by this process (`path` None: nothing to hold, e.g. on ranks > 0)."""

    def __init__(self, path: Path | None = None, fd: int | None = None):
        self.path, self.fd = path, fd

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        """Give the folder back (the lock file stays; deleting it could let two trainings lock different files)."""
        if self.fd is None:
            return
        _HELD_LOCKS.pop(str(self.path), None)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None


def lock_holder(path: Path) -> str:
    """'pid N' ('pid N on HOST' for another machine) as written into the lock file by its holder."""
    try:
        pid, _, host = path.read_text(encoding="utf-8").strip().partition(" ")
    except (OSError, UnicodeDecodeError):
        return "an unknown process"
    if not pid:
        return "an unknown process"
    return f"pid {pid} on {host}" if host and host != host_name() else f"pid {pid}"


def lock_run_dir(run_dir: str | Path) -> RunDirLock:
    """Lock `run_dir` (which must exist) for this process, or raise ConfigError naming the holder's pid."""
    path = (Path(str(run_dir)) / LOCK_FILE).resolve()
    if str(path) in _HELD_LOCKS:  # an earlier training of this process ended without releasing it
        return RunDirLock(path, _HELD_LOCKS[str(path)])
    if fcntl is None:
        logger.warning(f"no file locking on this system: nothing stops a second training into {path.parent}")
        return RunDirLock()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError(f"config key 'run_dir': {path.parent} is in use by another training "
                          f"({lock_holder(path)}, lock file {path}); wait for it to end, or train into another "
                          "--run_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {host_name()}\n".encode())
    _HELD_LOCKS[str(path)] = fd
    return RunDirLock(path, fd)


def previous_run_files(run_dir: Path) -> list[Path]:
    """Checkpoints of an earlier training in `run_dir` (empty when there are none)."""
    if not run_dir.is_dir():
        return []
    return sorted({p for pattern in CHECKPOINT_PATTERNS for p in run_dir.glob(pattern) if p.is_file()})


def clear_previous_run(run_dir: Path) -> list[Path]:
    """Remove what an earlier training wrote into `run_dir` (checkpoints, resume record, TensorBoard events), so the
    folder holds only the new run (config.json is rewritten by it); other files (inference/, evaluate/ outputs) are
    kept. Returns what was removed."""
    removed = previous_run_files(run_dir)
    removed += [p for p in [run_dir / RESUME_RECORD] if p.is_file()]
    for p in removed:
        p.unlink()
    events = run_dir / TENSORBOARD_DIR
    if events.is_dir():
        shutil.rmtree(events)
        removed.append(events)
    return removed


def claim_run_dir(run_dir, resume_path: str | None = None, overwrite=False) -> RunDirLock:
    """Make `run_dir` this training's own: create and lock it, refuse a previous run unless resumed or overwritten.

    A fresh run (`resume_path` None) into a folder holding checkpoints raises ConfigError naming the folder and
    both ways on (`--resume true`, `--overwrite true` or another `--run_dir`); with `overwrite` the earlier run's
    files are removed first. Stale temporaries of killed writes are removed. Only rank 0 creates, locks and
    cleans; every rank checks, so all fail alike. Release the returned lock when the training ends.
    """
    overwrite = as_bool(overwrite, "overwrite")
    run_dir = Path(str(run_dir))
    if resume_path is not None and overwrite:
        raise ConfigError(f"config keys 'resume' and 'overwrite' are both set for {run_dir}: resume continues the "
                          "run in it, overwrite replaces it; choose one")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"config key 'run_dir': {run_dir} is a file, not a folder")
    if idist.get_rank() != 0:
        refuse_previous_run(run_dir, resume_path, overwrite)
        return RunDirLock()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_run_dir(run_dir)
    try:
        refuse_previous_run(run_dir, resume_path, overwrite)
        if overwrite and previous_run_files(run_dir):
            removed = clear_previous_run(run_dir)
            logger.warning(f"overwrite: removed the previous run's {', '.join(p.name for p in removed)} from {run_dir}")
        stale = remove_stale_temporaries(run_dir)
        if stale:
            logger.info(f"removed {len(stale)} temporary file(s) of interrupted writes from {run_dir}")
    except BaseException:
        lock.release()
        raise
    return lock


def refuse_previous_run(run_dir: Path, resume_path: str | None, overwrite: bool) -> None:
    """ConfigError when a run would replace the checkpoints of a previous run: a fresh run without `overwrite`, or
    a resume of a last.pt from another folder."""

    previous = previous_run_files(run_dir)
    if previous and resume_path is None and not overwrite:
        raise ConfigError(f"config key 'run_dir': {run_dir} holds a previous run "
                          f"({', '.join(p.name for p in previous)}); continue it with --resume true, or start "
                          "afresh with --overwrite true (removes its checkpoints) or another --run_dir")
    if previous and resume_path is not None and Path(resume_path).resolve().parent != run_dir.resolve():
        raise ConfigError(f"config key 'run_dir': {run_dir} holds another run ({', '.join(p.name for p in previous)}) "
                          f"than the {resume_path} to resume; resume into the checkpoint's own folder or an empty "
                          "--run_dir")


# ---------------------------------------------------------------- resume and the run record


def resume_checkpoint(resume, run_dir) -> str | None:
    """Checkpoint to resume from: None (`resume` false), `<run_dir>/last.pt` (true), or the path given.

    Args:
        resume: config key `resume`: true, false, or the path of a last.pt.
        run_dir: the run folder whose last.pt `resume` true names.
    """
    if isinstance(resume, (str, Path)) and str(resume).strip().lower() not in TRUE_WORDS + FALSE_WORDS:
        path = Path(str(resume))
        if not path.is_file():
            raise ConfigError(f"config key 'resume' must be true, false or the path of a last.pt; {path} is no file")
    elif as_bool(resume, "resume"):
        path = Path(str(run_dir)) / "last.pt"
    else:
        return None
    if not path.is_file():
        raise ConfigError(f"config key 'resume': {path} not found; nothing to resume (run without --resume first)")
    return str(path)


RECORDED_PATHS = ("dataset_dir", "folds_csv", "run_dir")


def prepare_run_dir(run_dir, record: Mapping, resume_path: str | None = None,
                    argv: Sequence[str] | None = None) -> Path:
    """Create the run directory and write `config.json` (resolved top-level keys + the command line); rank 0 only.

    A previous run in the folder was refused or removed before (`claim_run_dir`).
    """
    run_dir = Path(str(run_dir))
    if idist.get_rank() != 0:
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = list(sys.argv if argv is None else argv)
    # absolute, so SWA and evaluate find the run's data and folds from any working folder
    record = {k: str(Path(str(v)).resolve()) if k in RECORDED_PATHS and v is not None else v for k, v in record.items()}
    content = {"resolved": jsonable(record), "command": argv, "resumed_from": resume_path}
    name = "config.json" if resume_path is None else "config_resumed.json"
    with atomic_write(run_dir / name) as f:
        json.dump(content, f, indent=2)
    return run_dir


def jsonable(value):
    """Config values made JSON-friendly: paths and devices as strings, containers recursively."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
