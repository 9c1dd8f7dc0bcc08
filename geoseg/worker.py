"""The worker side of a predict run: what one Dask worker (or the client, without a cluster) does with blocks.

A worker loads the checkpoint once (:func:`worker_predictor`) and keeps it; for its blocks it reads
each read box ahead in a thread, predicts and blends on the predictor's device, and writes the core
into the Zarr store in another thread (:func:`process_blocks`). Torch runs with a fixed thread count
(:func:`torch_threads`), so any number of workers gives the same bytes.
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
from geoseg.stitch import blend_block
from geoseg.store import write_block
from geoseg.tiling import Block


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


def read_block(job: BlockJob, block: Block) -> tuple[np.ndarray, np.ndarray]:
    """A block's read box in the scene's data type: (C, h, w) bands and the (h, w) validity mask."""
    with gdal_env(), rasterio.open(job.scene) as src:
        return read_window(src, block.read, bands=job.bands, dtype=None)


def process_blocks(job: BlockJob, blocks: Sequence[Block], *, on_block: Callable[[], None] | None = None) -> int:
    """Read, predict, blend and write blocks (runs on a worker). Returns the tiles it ran.

    The model never waits for I/O: while block ``i`` is normalised, predicted and blended on this
    thread (on the predictor's device, its bands copied there in the scene's data type), a reader
    thread reads block ``i + 1`` and a writer thread writes block ``i - 1`` into the store. At most
    one block is read ahead (native dtype) and one write is pending (class ids and confidences).
    ``on_block`` is called as each block's write completes.
    """
    one_arena()
    predictor = worker_predictor(job)
    contract = predictor.contract
    writing: Future | None = None

    def finish_write() -> None:
        if writing is not None:
            writing.result()
            release_freed_memory()
            if on_block:
                on_block()

    with ThreadPoolExecutor(1, thread_name_prefix="geoseg-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="geoseg-write") as writer:
        ahead = reader.submit(read_block, job, blocks[0]) if blocks else None
        for i, block in enumerate(blocks):
            data, valid = ahead.result()
            ahead = reader.submit(read_block, job, blocks[i + 1]) if i + 1 < len(blocks) else None
            with torch_threads(job.torch_threads):
                bands = torch.from_numpy(data).to(predictor.device)
                image = contract.normalise(bands, torch.from_numpy(valid), inplace=True)
                del data, bands
                result = blend_block(
                    block, image, valid, predictor.proba, margin=job.margin, class_ids=contract.classes.ids,
                    batch_size=job.batch_size, keep_probabilities=job.probabilities, device=predictor.device,
                )
            del image
            finish_write()
            writing = writer.submit(write_block, job.store, block, result)
        finish_write()
    return sum(len(b.tiles) for b in blocks)
