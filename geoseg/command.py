"""How a geoseg command behaves in a terminal: short output, one-line errors, clean interrupts.

:func:`run_command` runs a command's body (the ``geoseg`` CLI, a flow's ``__main__``): a
:class:`GeosegError` prints one line and exits 2; Ctrl-C or SIGTERM becomes :class:`RunInterrupted` in
the main thread (:func:`interruptible`), which unwinds every stage's ``with`` blocks — pools are
terminated, the Dask cluster and any temporary Prefect server are closed, the output folder's lock
is released, finished blocks stay in the Zarr store — and exits 130 / 143 with one line saying how
to resume. A second signal while that happens acts as usual (Ctrl-C raises ``KeyboardInterrupt``,
SIGTERM ends the process). :func:`setup_logging` shows geoseg's stage lines and hides other
libraries' chatter unless ``verbose``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from geoseg.errors import GeosegError, RunInterrupted

#: The signals that interrupt a run.
SIGNALS = (signal.SIGINT, signal.SIGTERM)

#: What a user is told when a run is interrupted.
RESUME_HINT = "interrupted: finished blocks are kept; run the same command again to resume"


def exit_status(err: RunInterrupted) -> int:
    """The shell's exit status for a run ended by ``err``'s signal (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + err.signum


@contextmanager
def interruptible() -> Iterator[None]:
    """Within this block (main thread only), SIGINT and SIGTERM raise :class:`RunInterrupted`."""
    before = {s: signal.getsignal(s) for s in SIGNALS}

    def stop(signum: int, frame: FrameType | None) -> None:
        for s in SIGNALS:
            signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
        raise RunInterrupted(signum)

    for s in SIGNALS:
        signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def run_command(body: Callable[[], Any]) -> int:
    """Run ``body`` interruptibly; return the exit status (0, 2 for a GeosegError, 130/143 when interrupted)."""
    try:
        with interruptible():
            body()
    except GeosegError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunInterrupted as err:
        print(RESUME_HINT, file=sys.stderr)
        return exit_status(err)
    return 0


def setup_logging(*, verbose: bool = False, quiet: bool = False) -> None:
    """Geoseg's INFO lines (one per stage) as plain text; other libraries' only from warnings on.

    ``verbose`` shows everything (DEBUG, with logger names); ``quiet`` only warnings and errors. Dask
    reads its log levels from the environment when it is imported, here and in worker processes, so
    they are set there.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s") if verbose else _Plain())
    if not verbose:  # other libraries' INFO lines (Prefect's task states, Dask's cluster) only with -v
        handler.addFilter(lambda r: r.levelno >= logging.WARNING or r.name.partition(".")[0] == "geoseg")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("geoseg").setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    if not verbose:  # Dask's INFO lines, and its errors about connections closed at shutdown
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "critical")
        for noisy in ("distributed", "tornado", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)


class _Plain(logging.Formatter):
    """``message`` for INFO, ``WARNING: message`` above it: no logger names, no tracebacks."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno <= logging.INFO else f"{record.levelname}: {text}"
