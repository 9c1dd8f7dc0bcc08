"""Polygonise blocks, in a pool of worker processes.

A block gives finished output rows for the regions inside it, and spill records of the pieces of
the regions that touch an internal block border (see :mod:`geoseg.vector.borders`).
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import shapely

from geoseg.raster import gdal_env
from geoseg.tiling import Box
from geoseg.vector.attributes import attribute_table
from geoseg.vector.borders import Pieces, encode_pieces
from geoseg.vector.inputs import Grid, Source, read_block, reset_handles
from geoseg.vector.polygons import Polygons
from geoseg.vector.regions import Edges, label_regions
from geoseg.vector.trace import trace_regions


@dataclass(frozen=True)
class BlockJob:
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


def polygonise_block(job: BlockJob, box: Box) -> BlockOut:
    """Polygonise one block; finish the regions inside it, return the pieces touching its sides."""
    classes, valid = read_block(job.source, box)
    regions = label_regions(classes, valid)
    n = regions.n
    polys, touching = trace_regions(regions, x0=box.x0, y0=box.y0)
    if job.simplify_px is not None and n:
        polys = _simplify(polys, classes, valid, box, job.simplify_px)
    cls = regions.cls[1:]
    pixels = regions.pixels[1:]
    conf_sum, conf_n = np.zeros(n), np.zeros(n, np.int64)
    if job.confidence is not None:
        conf, ok = read_block(job.confidence, box)
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


_WORKER_JOB: BlockJob | None = None


def _init_worker(job: BlockJob) -> None:
    global _WORKER_JOB
    _WORKER_JOB = job
    reset_handles(close=False)
    gdal_env().__enter__()  # for the worker's lifetime: bounded GDAL block cache, etc.


def _worker_block(box: Box) -> BlockOut:
    assert _WORKER_JOB is not None
    return polygonise_block(_WORKER_JOB, box)


def map_blocks(job: BlockJob, blocks: list[Box], workers: int) -> Iterator[BlockOut]:
    """Polygonise blocks, in order; with several workers a few blocks run ahead in other processes."""
    if workers == 1 or len(blocks) < 2:
        for box in blocks:
            yield polygonise_block(job, box)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(job,)) as pool:
        pending: deque[Future] = deque()
        todo = iter(blocks)
        try:
            for box in todo:
                pending.append(pool.submit(_worker_block, box))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                res = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(_worker_block, nxt))
                yield res
        finally:
            for f in pending:
                f.cancel()
