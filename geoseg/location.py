"""Where a file lives: a local path, or a URL on object storage (``s3://``, ``gs://``, ``az://``) or HTTP.

geoseg reads scenes by URL through GDAL's virtual file systems (rasterio maps ``s3://`` to
``/vsis3/``, ``https://`` to ``/vsicurl/``, ...: windows are fetched with range requests, the file is
never downloaded whole) and reads object metadata, checkpoints and outputs through obstore.  Both
take credentials the usual way, from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``,
``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_*``); ``AWS_ENDPOINT_URL`` points both at an
S3-compatible store (:func:`configure_gdal` hands it to GDAL in GDAL's own terms).  Credentials never
appear in messages: :func:`redact` drops user info and query strings (signed URLs) from a URL.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import urlsplit, urlunsplit

import obstore
from obstore.exceptions import BaseError, PermissionDeniedError, UnauthenticatedError
from obstore.store import ObjectStore, from_url

from geoseg.errors import SceneNotFoundError, StorageError

#: URL schemes geoseg reads and writes.
URL_SCHEMES = ("s3", "gs", "az", "http", "https")
#: What a failed object-storage call raises (obstore maps "not found" to FileNotFoundError).
STORAGE_ERRORS = (OSError, BaseError)
#: Fail fast on an unreachable endpoint instead of retrying for minutes.
_CLIENT = {"connect_timeout": "5s", "timeout": "120s"}
_RETRY = {"max_retries": 3, "retry_timeout": timedelta(seconds=20)}


def is_url(location: str | Path) -> bool:
    """Whether ``location`` is a URL geoseg handles (not a local path)."""
    return isinstance(location, str) and urlsplit(location).scheme in URL_SCHEMES


def location_str(location: str | Path) -> str:
    """A URL as it is, a local path made absolute (what travels to workers and into summaries)."""
    return location if is_url(location) else str(Path(location).resolve())


def basename(location: str | Path) -> str:
    """The file name: the last part of the path or URL path."""
    return PurePosixPath(urlsplit(location).path).name if is_url(location) else Path(location).name


def stem(location: str | Path) -> str:
    """The file name without its last suffix (names the outputs of a scene)."""
    return PurePosixPath(basename(location)).stem


#: URL scheme → GDAL virtual file system.
_VSI = {"s3": "/vsis3/", "gs": "/vsigs/", "az": "/vsiaz/"}


def gdal_path(location: str | Path) -> str:
    """What GDAL itself opens (e.g. inside a VRT): ``/vsis3/bucket/key``, ``/vsicurl/https://...``, a path."""
    if not is_url(location):
        return str(Path(location).resolve())
    parts = urlsplit(location)
    if parts.scheme in _VSI:
        return f"{_VSI[parts.scheme]}{parts.netloc}{parts.path}"
    return f"/vsicurl/{location}"


def redact(url: str) -> str:
    """``url`` without user info and query string, which may hold credentials (signed URLs)."""
    parts = urlsplit(url)
    if not parts.scheme:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _allow_http(url: str) -> bool:
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "") if url.startswith("s3://") else url
    return endpoint.startswith("http://")


def store_for(url: str) -> ObjectStore:
    """An obstore store rooted at ``url`` (a bucket, prefix or HTTP folder), configured from the environment."""
    client = {**_CLIENT, "allow_http": _allow_http(url)}
    return from_url(url, client_options=client, retry_config=_RETRY)


def split(url: str) -> tuple[ObjectStore, str]:
    """(store of the folder holding ``url``, the object's name in it)."""
    head, _, name = url.rstrip("/").rpartition("/")
    return store_for(head), name


def http_status(err: Exception) -> int | None:
    """The HTTP status a failed call got, when the server answered (obstore only says it in words)."""
    if isinstance(err, urllib.error.HTTPError):
        return err.code
    found = re.search(r"status code: (\d{3})", str(err))
    return int(found.group(1)) if found else None


def storage_error(url: str, err: Exception) -> Exception:
    """A one-line geoseg error for a failed object-storage call (missing, denied, unreachable)."""
    where = redact(url)
    status = http_status(err)
    if isinstance(err, FileNotFoundError) or status == 404:
        return SceneNotFoundError(f"{where}: no such object (or no such bucket). Check the URL.")
    if isinstance(err, PermissionDeniedError | UnauthenticatedError | PermissionError) or status in (401, 403):
        return StorageError(f"{where}: access denied. Check the credentials in the environment "
                            "(AWS_ACCESS_KEY_ID / AWS_PROFILE, ...) and the bucket's policy.")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return StorageError(f"{where}: the store cannot be reached or refused the request ({first[:200]}). "
                        "Check the URL and AWS_ENDPOINT_URL.")


def head(url: str) -> dict:
    """The object's metadata (``size``, ``e_tag``, ``last_modified``), checking it can be read.

    HTTP(S) URLs are asked with a plain HEAD request, query string included (signed URLs).

    Raises:
        SceneNotFoundError: no such object or bucket.
        StorageError: access denied, or the store cannot be reached.
    """
    try:
        if urlsplit(url).scheme in ("http", "https"):
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=30) as r:
                return {"size": int(r.headers.get("Content-Length", -1)), "e_tag": r.headers.get("ETag"),
                        "last_modified": r.headers.get("Last-Modified")}
        store, name = split(url)
        return obstore.head(store, name)
    except STORAGE_ERRORS as err:
        raise storage_error(url, err) from None


def _download(url: str, out: BinaryIO) -> None:
    """Stream the object at ``url`` into ``out``."""
    if urlsplit(url).scheme in ("http", "https"):
        with urllib.request.urlopen(url, timeout=120) as r:
            shutil.copyfileobj(r, out, 1 << 20)
        return
    store, name = split(url)
    for chunk in obstore.get(store, name).stream():
        out.write(chunk)


def list_prefix(url: str, suffixes: tuple[str, ...]) -> list[str]:
    """The URLs of the objects under the prefix ``url`` whose names end with one of ``suffixes``, sorted.

    Hidden names (a part starting with ``.``) are left out.

    Raises:
        StorageError: no such bucket, access denied, or the store cannot be reached.
    """
    base = url.rstrip("/")
    try:
        paths = [m["path"] for batch in obstore.list(store_for(base)) for m in batch]
    except STORAGE_ERRORS as err:
        raise storage_error(url, err) from None
    keep = (p for p in paths if p.lower().endswith(suffixes) and not any(part.startswith(".") for part in p.split("/")))
    return [f"{base}/{p}" for p in sorted(keep)]


def read_bytes(url: str) -> bytes:
    """The whole object at ``url`` (for small ones: STAC Items).

    Raises:
        SceneNotFoundError, StorageError: as :func:`head`.
    """
    out = io.BytesIO()
    try:
        _download(url, out)
    except STORAGE_ERRORS as err:
        raise storage_error(url, err) from None
    return out.getvalue()


def version(location: str | Path) -> tuple:
    """What changes when the file changes: (size, mtime) of a local file, (size, ETag or date) of an object."""
    if is_url(location):
        meta = head(location)
        return meta["size"], meta.get("e_tag") or str(meta.get("last_modified"))
    stat = Path(location).stat()
    return stat.st_size, stat.st_mtime_ns


def fetch(url: str, cache: Path | None = None) -> Path:
    """A local copy of the object at ``url``, downloaded once per version into ``cache``.

    The copy is named after the URL and its ETag, and written under a temporary name then renamed,
    so concurrent workers on one machine never see half a file and a changed object is fetched again.
    ``cache`` defaults to ``$GEOSEG_CACHE`` or ``<temp>/geoseg-cache``.
    """
    meta = head(url)
    cache = cache or Path(os.environ.get("GEOSEG_CACHE") or Path(tempfile.gettempdir()) / "geoseg-cache")
    key = hashlib.sha256(f"{redact(url)}|{meta.get('e_tag')}|{meta['size']}".encode()).hexdigest()[:24]
    target = cache / f"{key}-{basename(url)}"
    if target.exists() and target.stat().st_size == meta["size"]:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".fetch-")
    try:
        with os.fdopen(fd, "wb") as out:
            _download(url, out)
        os.replace(tmp, target)
    except STORAGE_ERRORS as err:
        Path(tmp).unlink(missing_ok=True)
        raise storage_error(url, err) from None
    return target


def configure_gdal() -> None:
    """Point GDAL's ``/vsis3/`` at ``AWS_ENDPOINT_URL`` (GDAL names it ``AWS_S3_ENDPOINT``), once per process.

    Settings the user made for GDAL themselves are kept.  rasterio refuses AWS options in
    ``rasterio.Env``, so they go where GDAL also looks: the environment.
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint or "AWS_S3_ENDPOINT" in os.environ:
        return
    parts = urlsplit(endpoint)
    os.environ["AWS_S3_ENDPOINT"] = parts.netloc or parts.path
    os.environ.setdefault("AWS_HTTPS", "NO" if parts.scheme == "http" else "YES")
    os.environ.setdefault("AWS_VIRTUAL_HOSTING", "FALSE")
