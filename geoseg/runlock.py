"""One run per output folder: a lock file naming the run (pid, host, start), held with ``flock``.

The kernel drops an ``flock`` when its process dies, however it dies, so the lock of a killed run is
stale by construction: the next run takes it over (and clears the killed run's ``.partial`` files).
A second run while the first is alive is refused with a message naming the first.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from geoseg.atomic import ensure_folder, remove_partials, write_error
from geoseg.errors import OutputLockedError

log = logging.getLogger(__name__)

#: The lock file inside an output folder.
LOCK_NAME = ".geoseg.lock"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another geoseg run"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"geoseg run pid {info.get('pid')} on {info.get('host')} (started {started})"


def _refusal(folder: Path, path: Path) -> OutputLockedError:
    return OutputLockedError(
        f"{folder}: {_holder(path)} is writing into this output folder. "
        f"Wait for it to finish or pick another output folder (lock file {path})."
    )


def check_unlocked(folder: str | Path) -> None:
    """Raise :class:`OutputLockedError` if a live run holds ``folder`` (nothing is written)."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _refusal(Path(folder), path) from None
    finally:
        os.close(fd)


@contextmanager
def run_lock(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder`` for this run; refuse if another live run holds it, take over a stale lock.

    Raises:
        OutputLockedError: a live run holds the folder.
        OutputWriteError: the folder cannot be created or written.
    """
    folder = ensure_folder(Path(folder))
    path = folder / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise write_error(path, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _refusal(folder, path) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file as we opened it: lock the new one
    try:
        stale = os.read(fd, 4096)
        if stale:
            log.info("taking over the lock of a run that is gone (%s)", stale.decode(errors="replace").strip())
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "argv": sys.argv}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        except OSError as err:
            raise write_error(path, err) from None
        remove_partials(folder)
        yield path
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
