"""Run geoseg as a user does, in real processes, and watch what they leave behind."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
HOOKED = ROOT / "tests" / "hooked.py"
#: Words in the command lines of Dask worker and pool processes (spawned) and of a Prefect server.
SERVICES = ("spawn_main", "prefect", "uvicorn")


@dataclass
class Finished:
    """A finished command: exit status, output, every process it started (pid: command line), seconds it took."""

    returncode: int
    stdout: str
    stderr: str
    descendants: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)

    def started(self, *words: str) -> list[str]:
        """Command lines of the processes it started that contain any of ``words`` (default :data:`SERVICES`)."""
        return [c for c in self.descendants.values() if any(w in c for w in words or SERVICES)]

    def left_running(self) -> list[psutil.Process]:
        """The processes it started that are still alive (zombies do not count)."""
        out = []
        for pid in self.descendants:
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                continue
        return out


def cli(*args: object) -> list[str]:
    """The ``geoseg`` command line."""
    return [sys.executable, "-m", "geoseg", *map(str, args)]


def flow(*args: object) -> list[str]:
    """The predict flow's command line (``python flows/predict.py ...``)."""
    return [sys.executable, str(ROOT / "flows" / "predict.py"), *map(str, args)]


def hooked(at: str, sig: str, entry: str, *args: object, nth: int = 1, delay: float = 0.0,
           group: bool = False, worker: bool = False) -> list[str]:
    """A command line with a signal sent on the ``nth`` call of ``at`` (see ``tests/hooked.py``)."""
    opts = ["--at", at, "--signal", sig, "--nth", str(nth), "--delay", str(delay),
            *(["--group"] if group else []), *(["--worker"] if worker else [])]
    return [sys.executable, str(HOOKED), *opts, entry, *map(str, args)]


def run(
    cmd: list[str],
    *,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    on_line: Callable[[str, subprocess.Popen], None] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    cwd: Path = ROOT,
) -> Finished:
    """Run ``cmd`` in ``cwd``, in its own session, recording its descendants; ``on_line`` sees each stderr line.

    The command is killed (and the test fails on its result) when it runs past ``timeout``.
    """
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, **(env or {})}, preexec_fn=preexec_fn,
    )
    seen: dict[int, str] = {}
    lines: list[str] = []
    marks: dict[str, float] = {}

    def read_stderr() -> None:
        for line in proc.stderr:
            lines.append(line)
            marks.setdefault(line.strip(), time.monotonic() - started)
            if on_line:
                on_line(line, proc)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    out_chunks: list[str] = []
    out_reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    out_reader.start()
    try:
        parent = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                for child in parent.children(recursive=True):
                    # Read again each time (between fork and exec a child still shows its parent's),
                    # but keep the last one seen: an exiting child's command line reads empty.
                    try:
                        line = " ".join(child.cmdline())
                    except psutil.NoSuchProcess:
                        line = ""
                    if line or child.pid not in seen:
                        seen[child.pid] = line
            except psutil.NoSuchProcess:
                pass
            if time.monotonic() - started > timeout:
                os.killpg(proc.pid, 9)
                proc.wait()
                raise AssertionError(f"{cmd} ran past {timeout} s; stderr:\n{''.join(lines)}")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    reader.join(10)
    out_reader.join(10)
    seconds = time.monotonic() - started
    return Finished(proc.returncode, "".join(out_chunks), "".join(lines), seen, seconds, marks)


def polygons(path: Path) -> list[tuple]:
    """Polygons as a sorted list of (class, name, area, normalised WKB), to compare files exactly."""
    import geopandas as gpd

    df = gpd.read_file(path)
    return sorted((int(r.class_id), r.class_name, round(r.area_m2, 3), r.geometry.normalize().wkb)
                  for r in df.itertuples())


def same_outputs(out: Path, reference: Path, stem: str = "nc_x2") -> None:
    """The class map and confidence COGs have the same bytes, the polygons the same content."""
    for name in (f"{stem}_classes.tif", f"{stem}_confidence.tif"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert polygons(out / f"{stem}_polygons.gpkg") == polygons(reference / f"{stem}_polygons.gpkg")
