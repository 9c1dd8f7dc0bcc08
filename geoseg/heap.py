"""Hand the memory a finished block freed back to the OS, so a worker's footprint does not drift up.

glibc keeps freed blocks below its *dynamic* mmap threshold (which grows up to 32 MiB) in per-thread
arenas; with a block's reader, compute and writer threads each holding tens of MiB of freed buffers,
a run's resident memory drifts upwards block after block. ``malloc_trim(0)`` after each block
returns those pages. Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_`` for its workers instead, but any
such setting also pins the mmap threshold at 128 KiB, and then every activation the model allocates
is a fresh ``mmap`` whose pages are faulted in again: measured here, DeepLabV3 forwards ran 1.4x
slower. One trim per block costs milliseconds.
"""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


#: ``M_ARENA_MAX`` in glibc's ``malloc.h``.
_M_ARENA_MAX = -8


@functools.cache
def one_arena() -> bool:
    """Let threads started from now on share the main malloc arena (glibc); False where there is none.

    Each thread arena keeps its own freed blocks, so a block's reader and writer threads would hold
    their own share and the peak would grow with the number of blocks; with one arena it does not
    (``bench/pipeline.py`` prints the blocks stage's peak by thirds of its time).
    """
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_ARENA_MAX, 1))


def release_freed_memory() -> bool:
    """Return free heap pages to the OS (glibc ``malloc_trim``); False where there is no glibc."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
