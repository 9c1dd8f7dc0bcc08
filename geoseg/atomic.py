"""Outputs appear under their final name only when complete: written beside it, then renamed.

Every file geoseg writes as a result (COGs, polygons, summaries, checkpoints, ledgers, training
reports) goes through :func:`atomic_write`: the writer gets a temporary path in the same folder,
``.<stem>.<token>.partial<suffix>`` (the suffix is kept, so GDAL and OGR still pick the format from
it), and only a writer that finished is renamed into place. A killed or failed write leaves at most
a ``.partial`` file, which :func:`remove_partials` clears once the next run owns the folder
(:mod:`geoseg.runlock`). ``OSError`` while writing becomes an :class:`OutputWriteError` naming the
output and the fix (free space, permissions).
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from geoseg.errors import OutputExistsError, OutputWriteError

#: Marks a temporary output name.
PARTIAL = ".partial"
_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def partial_path(path: Path) -> Path:
    """A fresh temporary name for ``path``, in its folder."""
    return path.with_name(f".{path.stem}.{secrets.token_hex(4)}{PARTIAL}{path.suffix}")


def write_error(path: Path, err: BaseException) -> OutputWriteError:
    """An :class:`OutputWriteError` for ``path`` that says what went wrong and what to do."""
    code = getattr(err, "errno", None)
    text = str(err)
    if code in _FULL or "No space left" in text or "File too large" in text:
        fix = "the disk is full: free some space, then rerun the same command to resume"
    elif code in _DENIED or "Permission denied" in text or "Read-only file system" in text:
        fix = "the folder is not writable: fix its permissions or pick another output folder"
    else:
        fix = "check free space and permissions, then rerun the same command to resume"
    reason = getattr(err, "strerror", None) or text
    return OutputWriteError(f"{path}: cannot write ({reason}); {fix}.")


def room_for(folder: Path, nbytes: int) -> OSError | None:
    """Whether ``folder`` can take ``nbytes`` more (at most 64 MiB are tried): None, or the error a write met.

    For writers (GDAL) that report a full disk only as a broken file; the probe file is removed.
    """
    probe = partial_path(folder / "space-probe")
    chunk = bytes(1024**2)
    try:
        with open(probe, "wb") as f:
            for _ in range(max(1, min(nbytes, 64 * 1024**2) // len(chunk))):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        return err
    finally:
        probe.unlink(missing_ok=True)
    return None


def ensure_folder(folder: Path) -> Path:
    """Create ``folder`` (and its parents), or raise an :class:`OutputWriteError` that names it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(folder, err) from None
    return folder


@contextmanager
def atomic_write(
    path: str | Path,
    *,
    overwrite: bool = True,
    sidecars: Callable[[Path], Iterable[Path]] | None = None,
) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` to; rename it into place when the block succeeds.

    Args:
        path: the final output.
        overwrite: replace an existing ``path``; otherwise refuse before anything is written.
        sidecars: the files that travel with a file (e.g. a Shapefile's ``.dbf``), given its path;
            they are renamed first, the main file last, so a reader never finds it without them.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False.
        OutputWriteError: the folder cannot be created or written (full, read-only).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: already exists. Pass --overwrite (overwrite=True) to replace it.")
    ensure_folder(path.parent)
    tmp = partial_path(path)
    parts = (lambda p: list(sidecars(p))) if sidecars else (lambda p: [])
    try:
        yield tmp
        _fsync(tmp)
        for side_tmp, side in zip(parts(tmp), parts(path), strict=True):
            if side_tmp.exists():
                os.replace(side_tmp, side)
            else:
                side.unlink(missing_ok=True)
        os.replace(tmp, path)
    except OutputWriteError:
        raise
    except OSError as err:
        raise write_error(path, err) from err
    finally:
        for leftover in (tmp, *parts(tmp)):
            _remove(leftover)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode())


def remove_partials(folder: Path) -> list[Path]:
    """Delete the temporary outputs a killed run left in ``folder`` (call only while owning it)."""
    gone = [p for p in folder.glob(f".*{PARTIAL}*") if p.name.startswith(".")]
    for p in gone:
        _remove(p)
    return gone


def _fsync(path: Path) -> None:
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
