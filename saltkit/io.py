"""Atomic file writes: a reader never sees a half-written CSV, checkpoint or npz, and a failed write leaves none.

A write goes to a hidden temporary `.NAME.<pid>@<host>.<random>.tmp` beside its target, renamed onto it when
complete. A killed process cannot remove its temporary, so the next write into that folder removes the
temporaries whose writer is gone (same host, process no longer alive); `check_writable` does the same for a whole
output folder before a command starts.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

# `.NAME.<pid>@<host>.<random>.tmp`: the writer's pid and host tell whether a leftover temporary is stale
TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.[^.]+\.tmp$")


class Terminated(SystemExit):
    """SIGTERM or SIGHUP, raised in the main thread so that every `with` block and `except BaseException` cleans up
    (temporaries removed, outputs left as they were), as on Ctrl-C; the exit code is 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def _terminate(signum, _frame):
    print(f"saltkit: stopped by {signal.Signals(signum).name}; removing temporary files", file=sys.stderr, flush=True)
    raise Terminated(signum)


def clean_up_on_termination() -> None:
    """Make SIGTERM (kill, a scheduler's time limit) and SIGHUP (a closed terminal) end the command as Ctrl-C does,
    through its cleanup, instead of killing it with its temporaries left. Only where those signals still have
    their default action, from the main thread; kill -9 cannot be caught (the next run removes what it left)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _terminate)


class FolderNotWritableError(OSError):
    """An output folder that cannot be created or written; the message names the folder and the config key."""


class OutputClashError(ValueError):
    """An output that would replace one of the command's inputs, another of its outputs, or a file it did not
    write; raised before any work starts, the message names both and what to pass instead."""


def host_name() -> str:
    """This machine's name, reduced to the characters a temporary's name may hold."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def process_alive(pid: int) -> bool:
    """True when a process with this pid exists on this machine (signal 0 tests for it without disturbing it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def stale_temporary(filename: str, name: str | None = None) -> bool:
    """Whether `filename` is a temporary of `atomic_write` (for target `name` when given) whose writing process, on
    this host, is gone."""
    m = TEMPORARY.match(filename)
    if m is None or (name is not None and m["name"] != name) or m["host"] != host_name():
        return False
    pid = int(m["pid"])
    return pid != os.getpid() and not process_alive(pid)


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporaries of `atomic_write` in `folder` (only those for target `name` when given) whose writing
    process is no longer alive on this host; returns the removed paths. Other files are never touched."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        candidates = [folder / n for n in os.listdir(folder) if n.startswith(".") and n.endswith(".tmp")]
    except OSError:
        return removed
    for path in candidates:
        if not stale_temporary(path.name, name):
            continue
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:  # removed meanwhile by another process cleaning the same folder
            pass
    return removed


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", newline: str | None = "", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success it is renamed onto `path` (os.replace).

    On an exception inside the block the temporary file is removed and `path` is left untouched; temporaries of
    `path` left by killed processes are removed first.
    `mode` is "w" (text, utf-8 by default) or "wb" (binary: torch.save, np.savez). The parent folder must exist.
    Usage: `with atomic_write("folds.csv") as f: df.to_csv(f, index=False)`.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")
    if "b" in mode:
        open_kwargs.pop("encoding", None)
        newline = None
    else:
        open_kwargs.setdefault("encoding", "utf-8")
    remove_stale_temporaries(path.parent, path.name)
    # Same folder as the target so os.replace is a rename within one file system.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}@{host_name()}.",
                                    suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, newline=newline, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; keep the target's mode when replacing it, else use the usual 0644.
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):  # the OS's message names no file
            raise OSError(e.errno, f"cannot write {path}: {e.strerror}; nothing was written there: free space "
                                   "(or raise the file-size limit) or choose another folder") from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """A new folder written whole or not at all: yields an empty folder `.NAME.partial-<pid>` beside `out`, renamed
    onto `out` (which must be missing or empty) when the block ends, removed when it raises."""
    out = Path(out)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        yield partial
        if out.is_dir():
            out.rmdir()  # empty (checked before the work)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def check_writable(folder: str | os.PathLike, key: str, probe_bytes: int = 1 << 16) -> Path:
    """Make sure output can be written to `folder` before any compute starts; returns it as a Path.

    Creates the folder (and parents) when missing, then writes, syncs and removes a probe file of `probe_bytes`
    (so a read-only folder and a full disk both fail here), and removes stale `atomic_write` temporaries left in
    it by killed processes. Raises FolderNotWritableError naming the folder and the config `key`.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".write-check.{os.getpid()}@{host_name()}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"\0" * probe_bytes)
                f.flush()
                os.fsync(f.fileno())
        finally:
            Path(probe).unlink(missing_ok=True)
    except OSError as e:
        reason = e.strerror or str(e)
        raise FolderNotWritableError(f"config key '{key}': cannot write to {folder} ({reason}); "
                                     "choose a writable folder with free space") from None
    remove_stale_temporaries(folder)
    return folder


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when `a` and `b` name one file: the same path once links are resolved, or hard links of one inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def check_outputs(outputs: dict[str, str | os.PathLike | None], inputs: dict[str, object]) -> None:
    """Refuse, before any work, an output that names one of the inputs or the same file as another output.

    outputs: {option: path} (None: not written); inputs: {option: path or list of paths}. Paths are compared
    after resolving symbolic links (and as inodes, for hard links), so `--out ./a.npz` for input `a.npz` is refused.
    """
    named = {k: v for k, v in outputs.items() if v not in (None, "")}
    keys = list(named)
    for i, key in enumerate(keys):
        for other in keys[i + 1:]:
            if same_file(named[key], named[other]):
                raise OutputClashError(f"{key} {named[key]} and {other} {named[other]} name the same file; one "
                                       "would replace the other: give them different names")
        for in_key, value in inputs.items():
            paths = value if isinstance(value, (list, tuple)) else [value]
            for path in paths:
                if path not in (None, "") and same_file(named[key], path):
                    raise OutputClashError(f"{key} {named[key]} is the input {in_key} {path}: writing it would "
                                           f"destroy the input; give {key} another file name")
