"""saltkit's own errors on one line: `saltkit WORKFLOW: error: MESSAGE` and exit code 2, without a traceback.

MONAI's bundle runner wraps an error raised in a config expression (`RuntimeError: Failed to evaluate
ConfigExpression`, `RuntimeError: applying transform`), so a user reading the last line of a 60-line traceback
never sees saltkit's message. `import saltkit` installs `excepthook` (bundle configs `$import saltkit`): for an
uncaught error that is saltkit's own (see `user_error`) it prints that message and exits with 2; everything else
keeps Python's traceback. `SALTKIT_DEBUG=1` shows the full traceback of saltkit's errors too.
"""

from __future__ import annotations

import dis
import os
import sys
from pathlib import Path
from types import TracebackType

PACKAGE_DIR = Path(__file__).resolve().parent
DEBUG_ENV = "SALTKIT_DEBUG"
EXIT_CODE = 2


def debug_enabled() -> bool:
    """True when the environment asks for full tracebacks and detailed logs (`SALTKIT_DEBUG=1`)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _innermost(tb: TracebackType | None) -> TracebackType | None:
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb


def raised_by_saltkit(exc: BaseException) -> bool:
    """True when `exc` left a `raise` statement in saltkit's own code (not a library call inside saltkit)."""
    tb = _innermost(exc.__traceback__)
    if tb is None or not Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR):
        return False
    ops = {ins.offset: ins.opname for ins in dis.get_instructions(tb.tb_frame.f_code)}
    return ops.get(tb.tb_lasti) == "RAISE_VARARGS"


def is_user_error(exc: BaseException) -> bool:
    """saltkit's own error about the user's input: an exception class defined in saltkit (ConfigError,
    DatasetError, ...), or a ValueError / OSError that saltkit raised itself with its message (a missing checkpoint)."""
    if type(exc).__module__.split(".")[0] == "saltkit":
        return True
    return isinstance(exc, (ValueError, OSError)) and raised_by_saltkit(exc)


def user_error(exc: BaseException) -> BaseException | None:
    """The outermost of saltkit's own errors in `exc`'s chain of explicit causes (`raise ... from e`, as MONAI
    wraps config and transform errors), or None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if is_user_error(exc):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__
    return None


def one_line(exc: BaseException) -> str:
    """The error's message on one line (whitespace runs collapsed); for an error re-raised from a DataLoader
    worker, the original error's own message (the last line of the worker's traceback)."""
    text = str(exc)
    if "\nOriginal Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split()) or type(exc).__name__


def program_name(argv: list[str] | None = None) -> str:
    """'saltkit training' for `python -m monai.bundle run training ...`, 'saltkit' otherwise."""
    argv = sys.argv if argv is None else argv
    if len(argv) >= 2 and Path(argv[0]).parent.name == "bundle" and argv[1] == "run":
        run_id = argv[2] if len(argv) > 2 and not argv[2].startswith("-") else "run"
        return f"saltkit {run_id}"
    return "saltkit"


def report(exc: BaseException, prog: str | None = None) -> None:
    """Print `PROG: error: MESSAGE` as the last line of the output (stdout flushed first, so it stays last)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    print(f"{prog or program_name()}: error: {one_line(exc)}", file=sys.stderr, flush=True)


def excepthook(exc_type, exc: BaseException, tb, fallback=None) -> None:
    """sys.excepthook: saltkit's own errors on one line and exit code 2, everything else to `fallback`."""
    fallback = fallback or sys.__excepthook__
    ours = None if debug_enabled() else user_error(exc)
    if ours is None:
        fallback(exc_type, exc, tb)
        return
    report(ours)
    raise SystemExit(EXIT_CODE)  # raised inside the hook, it becomes the process's exit status


def install_excepthook() -> None:
    """Install `excepthook` once, in front of whatever hook is installed (it falls back to that one)."""
    current = sys.excepthook
    if getattr(current, "saltkit", False):
        return

    def hook(exc_type, exc, tb):
        excepthook(exc_type, exc, tb, fallback=current)

    hook.saltkit = True
    sys.excepthook = hook
