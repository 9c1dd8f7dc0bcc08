"""Run a command in a child process and measure its whole process tree: peak memory and CPU time.

Both bench scripts run every measured job in a fresh child so one job's memory cannot leak into the
next. Memory is polled over the child and every process it starts (Dask workers included):

* ``peak_pss_mb``: proportional set size, pages shared between forked workers counted once, the
  figure the targets are judged on;
* ``peak_rss_mb``: resident set size summed over the tree (double counts shared pages: an upper bound);
* ``trace``: every sample as (Unix time, PSS MB), so a caller that knows when its stages ran can
  tell which stage held the peak (:func:`peak_between`).
"""

from __future__ import annotations

import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class Measured:
    """A finished child: its standard output and what the tree used."""

    stdout: str
    seconds: float
    cpu_s: float
    peak_pss_mb: float
    peak_rss_mb: float
    trace: list[tuple[float, float]]


def run_measured(cmd: list[str], *, cwd: Path | None = None, interval: float = 0.1) -> Measured:
    """Run ``cmd``, polling its process tree's memory every ``interval`` s.

    Raises:
        SystemExit: the child failed (its exit code is in the message).
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.PIPE, cwd=cwd, text=True)
    peak_pss = peak_rss = 0
    trace: list[tuple[float, float]] = []
    while proc.poll() is None:
        pss = rss = 0
        for p in [proc, *_children(proc)]:
            try:
                info = p.memory_full_info()
            except psutil.Error:
                continue
            pss, rss = pss + info.pss, rss + info.rss
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        trace.append((time.time(), pss / 2**20))
        time.sleep(interval)
    seconds = time.perf_counter() - t0
    stdout = proc.stdout.read() if proc.stdout else ""
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed with exit code {proc.returncode}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # includes the workers the child waited for
    return Measured(
        stdout=stdout,
        seconds=seconds,
        cpu_s=after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
        peak_pss_mb=peak_pss / 2**20,
        peak_rss_mb=peak_rss / 2**20,
        trace=trace,
    )


def peak_between(trace: list[tuple[float, float]], start: float, end: float) -> float:
    """The highest PSS (MB) sampled between two Unix times; 0 when no sample fell in between."""
    return max((mb for t, mb in trace if start <= t <= end), default=0.0)


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []
