"""Hand freed memory back to the OS promptly, in-process as Dask's nanny does for worker processes.

glibc keeps freed blocks below its *dynamic* mmap threshold (which grows up to 32 MiB) in per-thread
arenas; with a block's reader, compute and writer threads each holding tens of MiB of freed batches,
a run's resident memory drifts upwards block after block. Dask starts its workers with
``MALLOC_TRIM_THRESHOLD_`` set (``distributed.nanny.pre-spawn-environ``); a run without Dask workers
gets the same setting through ``mallopt``, which also fixes the mmap threshold at its 128 KiB default,
so large arrays are unmapped as soon as they are freed.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import dask.config

#: ``M_TRIM_THRESHOLD`` in glibc's ``malloc.h``.
_M_TRIM_THRESHOLD = -1


@functools.cache
def trim_freed_memory() -> bool:
    """Set this process's glibc trim threshold to Dask's worker setting; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    threshold = int(dask.config.get("distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_", 65536))
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, threshold))
