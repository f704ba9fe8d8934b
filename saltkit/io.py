"""Atomic file writes: a reader never sees a half-written CSV, checkpoint or npz, and a failed write leaves none."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", newline: str | None = "", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success it is renamed onto `path` (os.replace).

    On an exception inside the block the temporary file is removed and `path` is left untouched.
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
    # Same folder as the target so os.replace is a rename within one file system.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, newline=newline, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; keep the target's mode when replacing it, else use the usual 0644.
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable(folder: str | os.PathLike, key: str = "output_dir") -> Path:
    """Fail now, naming `folder` and its config `key`, when files cannot be created there (checked before a long
    computation). The folder itself is not created: the nearest existing parent must be writable instead."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot write to {folder} (config key '{key}'): {existing} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"cannot write to {folder} (config key '{key}'): {e.strerror or e}") from e
    return folder
