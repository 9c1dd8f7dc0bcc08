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


@dataclass
class Finished:
    """A finished command: exit status, output, every process it started, seconds it took."""

    returncode: int
    stdout: str
    stderr: str
    descendants: set[int] = field(default_factory=set)
    seconds: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)

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
) -> Finished:
    """Run ``cmd`` in its own session, recording its descendants; ``on_line`` sees each stderr line.

    The command is killed (and the test fails on its result) when it runs past ``timeout``.
    """
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, **(env or {})}, preexec_fn=preexec_fn,
    )
    seen: set[int] = set()
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
                seen.update(c.pid for c in parent.children(recursive=True))
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
