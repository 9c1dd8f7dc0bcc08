"""Polygonise blocks: one block, and the blocks of a raster on a Dask cluster or in a spawned pool.

A block gives finished output rows for the regions inside it, and spill records of the pieces of
the regions that touch an internal block border (see :mod:`geoseg.vector.borders`).
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import shapely

from geoseg.raster import gdal_env
from geoseg.tiling import Box
from geoseg.vector.attributes import attribute_table
from geoseg.vector.borders import Pieces, encode_pieces
from geoseg.vector.inputs import Grid, Source, read_pixels, reset_handles
from geoseg.vector.polygons import Polygons
from geoseg.vector.regions import Edges, label_regions
from geoseg.vector.trace import trace_regions

if TYPE_CHECKING:
    from distributed import Client


@dataclass(frozen=True)
class PolygonJob:
    """Everything a block worker needs; picklable."""

    source: Source
    confidence: Source | None
    grid: Grid
    names: dict[int, str]
    simplify_px: float | None


@dataclass
class BlockOut:
    """One polygonised block: its regions' classes (``cls[label]``) and sides, border pieces, finished rows."""

    box: Box
    cls: np.ndarray
    edges: Edges
    pieces: Pieces
    table: pa.Table
    class_pixels: dict[int, int]


def polygonise_block(job: PolygonJob, box: Box) -> BlockOut:
    """Polygonise one block; finish the regions inside it, return the pieces touching its sides."""
    classes, valid = read_pixels(job.source, box)
    regions = label_regions(classes, valid)
    n = regions.n
    polys, touching = trace_regions(regions, x0=box.x0, y0=box.y0)
    if job.simplify_px is not None and n:
        polys = _simplify(polys, classes, valid, box, job.simplify_px)
    cls = regions.cls[1:]
    pixels = regions.pixels[1:]
    conf_sum, conf_n = np.zeros(n), np.zeros(n, np.int64)
    if job.confidence is not None:
        conf, ok = read_pixels(job.confidence, box)
        ok &= valid
        lab = regions.labels[ok]
        conf_sum = np.bincount(lab, weights=conf[ok].astype(np.float64), minlength=n + 1)[1:]
        conf_n = np.bincount(lab, minlength=n + 1)[1:]
    border = regions.border_labels(box, job.grid.height, job.grid.width) - 1
    inner = np.ones(n, bool)
    inner[border] = False
    # simplified pieces are joined by a polygon union, which needs no cut vertices
    cuts = np.flatnonzero(touching[polys.vertices(border)]) if job.simplify_px is None else np.zeros(0, np.int64)
    data, sizes = encode_pieces(polys.take(border), cuts)
    pieces = Pieces(border + 1, data, sizes, pixels[border], conf_sum[border], conf_n[border])
    table = attribute_table(
        polys.take(inner),
        cls[inner],
        conf_sum[inner],
        conf_n[inner],
        grid=job.grid,
        names=job.names,
        mean_conf=job.confidence is not None,
    )
    keys, where = np.unique(cls, return_inverse=True)
    per_class = np.bincount(where.ravel(), weights=pixels, minlength=len(keys))
    class_pixels = {int(k): int(c) for k, c in zip(keys, per_class, strict=True)}
    return BlockOut(box, regions.cls, regions.edges(), pieces, table, class_pixels)


def _simplify(polys: Polygons, classes: np.ndarray, valid: np.ndarray, box: Box, tolerance: float) -> Polygons:
    """Coverage-simplify a block's polygons, nodata areas included, with the block's sides pinned.

    Polygons first get a vertex at every pixel corner along their edges, so that the coverage is
    edge-matched; Visvalingam-Whyatt only drops vertices, so coordinates stay integers.
    """
    gaps, _ = trace_regions(label_regions(classes, ~valid), x0=box.x0, y0=box.y0)
    cover = Polygons.concat([polys, gaps]).geometries()
    dense = shapely.transform(shapely.segmentize(cover, 1.0), np.round)
    simple = shapely.simplify(shapely.coverage_simplify(dense, tolerance, simplify_boundary=False), 0.0)
    out = Polygons.from_geometries(simple[: len(polys)])
    return Polygons(out.xy.astype(np.int32), out.ring_offsets, out.poly_offsets)


def polygonise_task(job: PolygonJob, box: Box) -> BlockOut:
    """:func:`polygonise_block` as a Dask task: under geoseg's GDAL settings, leaving no file open.

    A long-lived worker may see the same path rewritten by the next run, so it keeps no handle.
    """
    try:
        with gdal_env():
            return polygonise_block(job, box)
    finally:
        reset_handles()


_WORKER_JOB: PolygonJob | None = None


def _init_worker(job: PolygonJob, parent: int) -> None:
    """Set up a pool process: the job, GDAL settings for its lifetime, exit when the parent is gone."""
    global _WORKER_JOB
    _WORKER_JOB = job
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent ends the pool
    gdal_env().__enter__()  # for the worker's lifetime: bounded GDAL block cache, etc.
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)  # the run was killed (e.g. kill -9): no orphaned pool process stays behind


def _worker_block(box: Box) -> BlockOut:
    assert _WORKER_JOB is not None
    return polygonise_block(_WORKER_JOB, box)


def map_blocks(
    job: PolygonJob, blocks: list[Box], *, workers: int = 1, client: Client | None = None
) -> Iterator[BlockOut]:
    """Polygonise blocks and yield them in order, a few running ahead of the one yielded.

    With ``client`` the blocks are tasks on that Dask cluster; otherwise ``workers`` processes of a
    pool *spawned* for this call (never forked: the caller may hold torch, GDAL or Dask threads,
    whose locks a fork would copy held), or this process when ``workers`` is 1.
    """
    if client is not None:
        yield from _on_cluster(job, blocks, client)
    elif workers == 1 or len(blocks) < 2:
        for box in blocks:
            yield polygonise_block(job, box)
    else:
        yield from _in_pool(job, blocks, workers)


def _in_order(
    submit: Callable[[Box], Any], collect: Callable[[Any], BlockOut], blocks: list[Box], ahead: int, pending: deque
) -> Iterator[BlockOut]:
    """Yield ``collect(submit(box))`` block by block, keeping ``ahead`` submitted (in ``pending``)."""
    todo = iter(blocks)
    for box in todo:
        pending.append(submit(box))
        if len(pending) >= ahead:
            break
    while pending:
        res = collect(pending.popleft())
        nxt = next(todo, None)
        if nxt is not None:
            pending.append(submit(nxt))
        yield res


def _on_cluster(job: PolygonJob, blocks: list[Box], client: Client) -> Iterator[BlockOut]:
    token = secrets.token_hex(4)

    def submit(box: Box) -> Any:  # the job is small and travels with each task (no scatter to lost workers)
        return client.submit(polygonise_task, job, box, key=f"geoseg-polygons-{token}-{box.y0}-{box.x0}")

    def collect(future: Any) -> BlockOut:
        res = future.result()
        future.release()
        return res

    pending: deque = deque()
    try:
        yield from _in_order(submit, collect, blocks, 2 * max(1, len(client.scheduler_info()["workers"])), pending)
    finally:
        client.cancel(list(pending))


def _in_pool(job: PolygonJob, blocks: list[Box], workers: int) -> Iterator[BlockOut]:
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(min(workers, len(blocks)), initializer=_init_worker, initargs=(job, os.getpid()))
    try:
        yield from _in_order(
            lambda box: pool.apply_async(_worker_block, (box,)), lambda r: r.get(), blocks, 2 * workers, deque()
        )
        pool.close()
    finally:
        pool.terminate()  # at once, also when the caller stops early or is interrupted
        pool.join()
