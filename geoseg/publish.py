"""Outputs on object storage: ``--out s3://bucket/prefix/``.

The workers write the Zarr store straight under the prefix (:mod:`geoseg.store`). Everything else (COGs
and their sidecars, quick-look, polygons, ``summary.json``) is made in a local staging folder on the
machine that runs the job and uploaded once complete: one PUT (multipart for large files) per
object, so an object appears under its final key only when whole, and ``summary.json`` goes last, so
its presence means the run finished.  A re-run with the same inputs resumes from the store's
``block_done`` flags.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterable
from pathlib import Path

import obstore

from geoseg.errors import StorageError
from geoseg.location import STORAGE_ERRORS, http_status, redact, storage_error, store_for

#: Written last: its presence under the prefix means the run is complete.
LAST = "summary.json"


def staging_folder(remote: str) -> Path:
    """The local folder where a run for ``remote`` makes its outputs before the upload (one per prefix)."""
    key = hashlib.sha256(redact(remote).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "geoseg-staging" / key


def remote_url(remote: str, local: str | Path) -> str:
    """The URL a staged file is published to."""
    return f"{remote.rstrip('/')}/{Path(local).name}"


def check_prefix(remote: str) -> None:
    """Check before any work that the prefix can be listed (the bucket exists, access is granted).

    Raises:
        StorageError: no such bucket, access denied, or the store cannot be reached.
    """
    try:
        next(iter(obstore.list(store_for(remote), chunk_size=1)), None)
    except STORAGE_ERRORS as err:
        if isinstance(err, FileNotFoundError) or http_status(err) == 404:
            raise StorageError(f"{redact(remote)}: no such bucket. Create it first, or check the URL.") from None
        raise storage_error(remote, err) from None


def existing(remote: str, names: Iterable[str]) -> list[str]:
    """The URLs of those of ``names`` already under the prefix."""
    store = store_for(remote)
    found = []
    for name in names:
        try:
            obstore.head(store, name)
        except FileNotFoundError:
            continue
        except STORAGE_ERRORS as err:
            raise storage_error(remote, err) from None
        found.append(remote_url(remote, name))
    return found


def publish(folder: Path, remote: str) -> list[str]:
    """Upload every file of ``folder`` under ``remote``, :data:`LAST` last (hidden ones, e.g. the lock, stay).

    Returns:
        the URLs written, in upload order.
    """
    files = sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")),
                   key=lambda p: (p.name == LAST, p.name))
    store = store_for(remote)
    urls = []
    for path in files:
        try:
            obstore.put(store, path.name, path)
        except STORAGE_ERRORS as err:
            raise storage_error(remote_url(remote, path), err) from None
        urls.append(remote_url(remote, path))
    return urls
