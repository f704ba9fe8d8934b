"""Console logging of the bundle runs: the engines' and MONAI's per-epoch detail at DEBUG, log lines that do not
land on a progress bar, and progress bars only on a terminal (`progress_bars`).

The bundle's logging.conf can only name stdlib classes (MONAI refuses anything else), so these are installed from
the bundle (`initialize`) and from the handlers that replace the detail with one line per epoch.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from saltkit.config import as_bool
from saltkit.errors import debug_enabled

# INFO from these loggers is detail (Ignite's "Epoch[3] Complete", MONAI's metric tables and input summary,
# a line per best checkpoint): logged as DEBUG, shown with SALTKIT_DEBUG=1.
DETAIL_LOGGERS = ("ignite.engine", "monai.bundle", "monai.handlers.StatsHandler",
                  "saltkit.handlers.save_resume")


class DetailsAtDebug(logging.Filter):
    """Handler filter: records of DETAIL_LOGGERS at INFO or below become DEBUG records, passed only when `show`."""

    def __init__(self, show: bool = False):
        super().__init__()
        self.show = show

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.INFO and record.name.startswith(DETAIL_LOGGERS):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self.show
        return True


def console_handlers() -> list[logging.StreamHandler]:
    """Stream handlers writing to stdout / stderr, of the root logger and of every logger with its own handlers
    (MONAI's loggers do not propagate)."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger) and lg.handlers]
    found: list[logging.StreamHandler] = []
    for lg in loggers:
        for h in lg.handlers:
            if type(h) is logging.StreamHandler and h not in found and _is_console(h.stream):
                found.append(h)
    return found


def _is_console(stream) -> bool:
    return stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) or isinstance(stream, _TqdmStream)


def details_at_debug(show: bool | None = None, evaluator=None) -> None:
    """Install `DetailsAtDebug` on every console handler that has none (call again after new loggers appear).

    `show` None: as SALTKIT_DEBUG says. `evaluator`: unused; a workflow passes its engine so that the engine, and
    its loggers' handlers, exist before this call.
    """
    show = debug_enabled() if show is None else show
    for h in console_handlers():
        if not any(isinstance(f, DetailsAtDebug) for f in h.filters):
            h.addFilter(DetailsAtDebug(show))


def progress_bars(enabled=True, stream=None) -> bool:
    """Whether to draw progress bars: `enabled` and `stream` is a terminal. Every tqdm bar of saltkit
    (inference, evaluate, predict, a volume's sections, the sliding windows, training) asks here.

    Redirected to a log file, a bar is a stream of carriage-return redraws; the per-epoch log lines
    (training's summary, the workflows' printed results) stay either way.

    Args:
        enabled: config key `progress` (true / false, 1 / 0) or a command's --no-progress negated.
        stream: the stream the bars would be drawn on; None: sys.stderr (tqdm's).
    """
    if not as_bool(enabled, "progress"):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class _TqdmStream:
    """File-like object for a log handler: each line goes through tqdm.write, so open bars are cleared and
    redrawn around it (tqdm.contrib.DummyTqdmFile, which this wraps, buffers to whole lines)."""

    def __init__(self, stream):
        from tqdm.contrib import DummyTqdmFile

        self.stream = stream
        self._file = DummyTqdmFile(stream)

    def write(self, text: str) -> None:
        self._file.write(text)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def logging_around_bars() -> Iterator[None]:
    """While open, console log lines are written through tqdm (they no longer land on the end of a bar)."""
    swapped = [(h, h.stream) for h in console_handlers() if not isinstance(h.stream, _TqdmStream)]
    for h, stream in swapped:
        h.setStream(_TqdmStream(stream))
    try:
        yield
    finally:
        for h, stream in swapped:
            h.setStream(stream)
