"""The worker side of a predict run: what one Dask worker (or the client, without a cluster) does with blocks.

A worker loads the checkpoint once (:func:`worker_predictor`) and keeps it. A run has two passes:

1. :func:`process_blocks` runs each block's own tiles: it reads each read box ahead in a thread,
   predicts and blends on the predictor's device, and in another thread writes the core's local
   cells and the partial sums over shared cells (its own and its neighbours') into the Zarr store;
2. :func:`finish_blocks` finishes each block's shared cells from the partial sums of every block
   whose tiles cover them (no model, a few strips per block).

Torch runs with a fixed thread count (:func:`torch_threads`), so any number of workers gives the
same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import rasterio
import torch

from geoseg.checkpoint import load_checkpoint
from geoseg.heap import one_arena, release_freed_memory
from geoseg.predict import Predictor
from geoseg.raster import gdal_env, read_window
from geoseg.stitch import BlockResult, Sums, accumulate, core_result, finish_cell
from geoseg.store import read_block, read_partial, write_block, write_partial
from geoseg.tiling import Block, Box, bounding_box


@dataclass(frozen=True)
class BlockJob:
    """What a worker needs to process blocks: small, picklable, identical for every block of a run."""

    scene: str  # a path, a URL or a STAC Item's VRT (XML): what GDAL opens
    bands: tuple[int, ...]
    checkpoint: str  # a path or a URL (fetched once per machine)
    checkpoint_sha256: str
    scales: tuple[float, ...]
    flip: bool
    device: str
    batch_size: int
    margin: int
    probabilities: bool
    store: str  # a folder or a URL: workers write there directly
    torch_threads: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch CPU ops with exactly ``n`` threads (results depend on it), then restore the old count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@lru_cache(maxsize=2)
def worker_predictor(job: BlockJob) -> Predictor:
    """Load the checkpoint once per worker process and keep it (keyed by path, hash and settings).

    The contract normalises with the job's ``mean``/``std`` (the scene's own, for a ``scene`` contract).
    """
    model, contract = load_checkpoint(job.checkpoint, device=job.device)
    contract = replace(contract, mean=job.mean, std=job.std)
    return Predictor(model, contract, scales=job.scales, flip=job.flip, device=job.device, batch_size=job.batch_size)


def read_box(job: BlockJob, box: Box | None) -> tuple[torch.Tensor, np.ndarray] | None:
    """A box of the scene in its data type: (C, h, w) bands and the (h, w) validity mask (None for no box).

    For a CUDA job the bands are copied into pinned host memory here, in the reader thread, so the
    model's thread hands them to the GPU in one asynchronous copy.
    """
    if box is None:
        return None
    with gdal_env(), rasterio.open(job.scene) as src:
        data, valid = read_window(src, box, bands=job.bands, dtype=None)
    bands = torch.from_numpy(data)
    return (bands.pin_memory() if job.device == "cuda" else bands), valid


def process_blocks(job: BlockJob, blocks: Sequence[Block], *, on_block: Callable[[], None] | None = None) -> int:
    """Run blocks' tiles (on a worker): local cells written, partial sums of shared cells stored.

    A block whose shared cells' other owners ran earlier in ``blocks`` (in row-major order the
    blocks above and to the left come first) is finished on the spot, its core written once, from
    sums kept in memory; the others wait for :func:`finish_blocks`, and the sums they need go to the
    store.

    The model never waits for I/O: while block ``i`` is normalised, predicted and blended on this
    thread (on the predictor's device, its bands copied there in the scene's data type), a reader
    thread reads block ``i + 1`` and a writer thread writes block ``i - 1`` into the store. At most
    one block is read ahead (native dtype) and one write is pending. ``on_block`` is called as each
    block's write completes.

    Returns:
        the tiles it ran.
    """
    one_arena()
    predictor = worker_predictor(job)
    ids = predictor.contract.classes.ids
    writing: Future | None = None
    here = finished_here(blocks)
    kept: dict[tuple[tuple[int, int], Box], Sums] = {}  # sums over the cells of blocks finished here

    def finish_write() -> None:
        if writing is not None:
            writing.result()
            release_freed_memory()
            if on_block:
                on_block()

    def write(block: Block, sums: Sums | None, valid: np.ndarray | None) -> None:
        for cell in block.sends:
            if cell.target in here:
                kept[block.key, cell.box] = sums.crop(cell.box).clone()
            else:
                write_partial(job.store, block.key, sums.crop(cell.box))
        result = core_result(block, sums, valid, ids, keep_probabilities=job.probabilities)
        now = block.key in here
        if now:
            finish_shared(job, block, result, ids, kept=kept)
        write_block(job.store, block, result, done=now)

    with ThreadPoolExecutor(1, thread_name_prefix="geoseg-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="geoseg-write") as writer:
        ahead = reader.submit(read_box, job, blocks[0].read) if blocks else None
        for i, block in enumerate(blocks):
            read = ahead.result()
            ahead = reader.submit(read_box, job, blocks[i + 1].read) if i + 1 < len(blocks) else None
            sums = valid = None
            if read is not None:
                data, valid = read
                sums = tile_sums(job, predictor, block.tiles, block.read, data, valid)
                del data
            finish_write()
            writing = writer.submit(write, block, sums, valid)
        finish_write()
    return sum(len(b.tiles) for b in blocks)


def tile_sums(job: BlockJob, predictor: Predictor, tiles: Sequence[Box], read: Box, data: torch.Tensor,
              valid: np.ndarray) -> Sums:
    """Normalise ``data`` (the scene over ``read``, native dtype) on the device, run ``tiles``, sum them."""
    with torch_threads(job.torch_threads):
        bands = data.to(predictor.device, non_blocking=True)
        image = predictor.contract.normalise(bands, torch.from_numpy(valid), inplace=True)
        del bands
        return accumulate(tiles, image, read, predictor.proba, margin=job.margin, batch_size=job.batch_size,
                          device=predictor.device)


def resend_partials(job: BlockJob, requests: Sequence[tuple[Block, tuple[Box, ...]]]) -> int:
    """Recompute blocks' partial sums over some shared cells, running only their tiles that reach them.

    For a resumed store whose partial sums were already removed: the blocks' cores stay as they
    are. The sums equal the first ones (fixed point: no order, no grouping matters).

    Returns:
        the tiles it ran.
    """
    predictor = worker_predictor(job)
    ran = 0
    for block, boxes in requests:
        tiles = tuple(t for t in block.tiles if any(t.intersection(b) for b in boxes))
        read = bounding_box(tiles)
        data, valid = read_box(job, read)
        sums = tile_sums(job, predictor, tiles, read, data, valid)
        for box in boxes:
            write_partial(job.store, block.key, sums.crop(box))
        ran += len(tiles)
    return ran


def finished_here(blocks: Sequence[Block]) -> set[tuple[int, int]]:
    """The blocks of ``blocks`` that can be finished as they come: the other owners of their shared cells come first."""
    seen: set[tuple[int, int]] = set()
    here = set()
    for block in blocks:
        seen.add(block.key)
        if all(owner in seen for cell in block.shared for owner in cell.owners):
            here.add(block.key)
    return here


def finish_shared(job: BlockJob, block: Block, result: BlockResult, class_ids: Sequence[int], *,
                  kept: dict[tuple[tuple[int, int], Box], Sums] | None = None) -> None:
    """Put the block's finished shared cells into ``result``: every owner's sums added.

    Sums come from ``kept`` (and are taken out of it) or else from the store.
    """
    kept = {} if kept is None else kept
    with gdal_env(), rasterio.open(job.scene) as src:
        for cell in block.shared:
            parts = [kept.pop((owner, cell.box), None) or read_partial(job.store, owner, cell.box)
                     for owner in cell.owners]
            _, valid = read_window(src, cell.box, bands=job.bands, dtype=None)
            finish_cell(result, block.core, parts, valid, class_ids, keep_probabilities=job.probabilities)


def finish_blocks(job: BlockJob, blocks: Sequence[Block], class_ids: Sequence[int]) -> int:
    """Finish blocks' shared cells from every owner's stored partial sums (runs on a worker, no model).

    Returns:
        the blocks it finished.
    """
    for block in blocks:
        result = read_block(job.store, block)
        finish_shared(job, block, result, class_ids)
        write_block(job.store, block, result, done=True)
    return len(blocks)
