"""Vectorise a class raster: one polygon per region, made block by block, merged across block borders.

A *region* is a 4-connected set of pixels of one class; nodata pixels (the raster's nodata value, and
255, the class raster's "no class") belong to none. :func:`vectorize` reads the class raster one
block at a time (a GeoTIFF/COG, or the Zarr store of the predict stage), labels the block's regions
and traces their outlines in numpy (the polygons GDAL's 4-connected polygonizer gives, holes
included), and writes the polygons that touch no internal block border at once. Pieces of regions
that do touch one are joined across borders with a union-find, spilled to a temporary file and
merged as soon as their region is complete. Memory follows the block size, the raster width and the
regions still open, not the raster size; the one exception is a single region spanning many blocks,
whose polygon is assembled whole (about 32 bytes per vertex while it is merged and written). Without ``min_area``
and ``simplify`` the result is exact and does not depend on ``block_size``: the same polygons as
``rasterio.features.shapes(..., connectivity=4)`` on the whole raster. Blocks are polygonised as
tasks on the run's Dask cluster, in a pool of spawned processes, or in this process; merging and
writing happen in the calling process. The parts are listed in :mod:`geoseg.vector`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from geoseg.atomic import PARTIAL
from geoseg.config import ClassSchema
from geoseg.errors import ConfigError
from geoseg.raster import gdal_env
from geoseg.tiling import partition
from geoseg.vector.attributes import FIELDS, attribute_table
from geoseg.vector.blocks import BlockOut, PolygonJob, map_blocks
from geoseg.vector.borders import BorderMerger, PieceStore
from geoseg.vector.inputs import (
    Grid,
    Source,
    embedded_classes,
    open_class_raster,
    open_confidence,
    read_pixels,
    reset_handles,
)
from geoseg.vector.sieve import MAX_SIEVE_ROUNDS, sieve
from geoseg.vector.writer import VectorWriter, infer_driver

if TYPE_CHECKING:
    from distributed import Client

__all__ = [
    "FIELDS",
    "MAX_SIEVE_ROUNDS",
    "Grid",
    "Source",
    "VectorizeSummary",
    "open_class_raster",
    "open_confidence",
    "read_pixels",
    "vectorize",
]

log = logging.getLogger(__name__)

#: Rows, or bytes of rows, gathered before a write (the writer holds a few batches at once).
_BATCH = 20_000
_BATCH_BYTES = 32 * 1024**2


@dataclass(frozen=True)
class VectorizeSummary:
    """What :func:`vectorize` wrote: polygon count, and per class id its pixel count and area (m²)."""

    path: Path
    polygons: int
    pixels: dict[int, int]
    area_m2: dict[int, float]
    sieve_rounds: int = 0


def vectorize(
    class_raster: str | Path,
    out: str | Path,
    *,
    classes: ClassSchema | None = None,
    block_size: int = 2048,
    min_area: float | None = None,
    simplify: float | None = None,
    confidence: str | Path | None = None,
    driver: str | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
    client: Client | None = None,
) -> VectorizeSummary:
    """Turn a class raster into polygons with class, name, area, perimeter and mean confidence.

    Args:
        class_raster: a one-band integer GeoTIFF/COG, or a Zarr store with a ``class_id`` (y, x)
            variable and a rioxarray CRS (as the predict stage writes it).
        out: output file; ``.gpkg`` (GeoPackage, the default), ``.shp`` or ``.parquet`` (GeoParquet).
        classes: class schema giving ``class_name``; by default the one the class map carries (a geoseg
            COG's class tags, a predict store's attributes), else the name is the id as text.
        block_size: pixels per block side; memory grows with its square, the result does not change.
        min_area: minimum mapping unit in m². A region whose area is below it is *small*. In each
            round every small region that touches a region of at least ``min_area`` takes the class
            of the large neighbouring regions it shares the longest border with (border length in
            pixel edges, summed per class; ties go to the lower class id); nodata never counts.
            Rounds repeat on the result until no small region touches a large one (at most
            :data:`MAX_SIEVE_ROUNDS`); regions still small then (e.g. a cluster of small regions
            ringed by nodata) keep their class. Areas are pixel count × pixel area, or for a geographic CRS
            the sum of each pixel row's geodesic pixel area (WGS84), counted in whole dm², so the
            result is the same for every ``block_size``.
        simplify: tolerance in metres for topology-preserving simplification
            (:func:`shapely.coverage_simplify`, Visvalingam-Whyatt: roughly, triangles smaller than
            tolerance² go), done in pixel units (tolerance / pixel size; for a geographic CRS the pixel
            size in metres at the raster's centre latitude). Shared borders stay shared, nodata
            included. Each block is simplified with its sides pinned, so polygons still merge exactly
            across blocks; the vertices where boundaries cross block borders are kept.
        confidence: a float raster on the same grid (GeoTIFF, or a Zarr store's ``confidence``
            variable; pass the class store itself to use its own) for the ``mean_conf`` field.
        driver: ``"GPKG"``, ``"ESRI Shapefile"`` or ``"Parquet"``, overriding the suffix.
        overwrite: replace an existing output.
        progress: called with (blocks done, blocks planned); the sieve adds passes as it goes.
        workers: processes polygonising blocks, spawned for this call (default: CPU count, at most 4;
            1 runs in-process); unused with ``client``.
        client: a Dask client: the blocks are polygonised as tasks on its cluster (the predict
            stage passes the cluster that ran the blocks). Merging and writing stay in this process.

    Returns:
        A :class:`VectorizeSummary`. Fields written: ``class_id``, ``class_name``, ``area_m2`` and
        ``perim_m`` (shell and holes; geodesic on WGS84 for a geographic CRS, else planar in metres),
        ``mean_conf`` (with ``confidence``): the same names in every format (none passes the
        Shapefile's 10 characters).

    Raises:
        SceneNotFoundError: an input does not exist.
        InvalidSceneError: an input is not an integer class raster with a CRS, or the confidence
            raster is on another grid.
        OutputExistsError: ``out`` exists and ``overwrite`` is False.
        VectorExportError: unknown output format, or a Shapefile past 2 GB.
        ConfigError: a bad option value.
    """
    if block_size < 1:
        raise ConfigError(f"block_size must be at least 1 pixel, got {block_size}")
    for name, value in (("min_area", min_area), ("simplify", simplify)):
        if value is not None and not value >= 0:
            raise ConfigError(
                f"{name} must be a non-negative number of {'m²' if name == 'min_area' else 'm'}, got {value}"
            )
    infer_driver(out, driver)
    source, grid = open_class_raster(class_raster, ignore=classes.ignore_index if classes else 255)
    classes = classes or embedded_classes(class_raster)
    conf = open_confidence(confidence, grid) if confidence is not None else None
    names = {c.id: c.name for c in classes.classes} if classes else {}
    fields = {k: v for k, v in FIELDS.items() if k != "mean_conf" or conf is not None}
    blocks = list(partition(grid.height, grid.width, block_size))
    workers = min(4, os.cpu_count() or 1) if workers is None else max(1, workers)
    ticker = _Ticker(progress, len(blocks) * (3 if min_area else 1))
    out = Path(out)
    with (
        VectorWriter(out, crs=grid.crs, fields=fields, driver=driver, overwrite=overwrite) as writer,
        tempfile.TemporaryDirectory(prefix=f".{out.stem}.", suffix=PARTIAL, dir=writer.path.parent) as tmp,
        gdal_env(),
    ):
        try:
            rounds = 0
            if min_area:
                source, rounds = sieve(source, grid, blocks, min_area, Path(tmp), ticker.tick)
            simplify_px = simplify / grid.pixel_size_m() if simplify else None
            job = PolygonJob(source, conf, grid, names, simplify_px)
            summary = _Output(writer, job)
            results = map_blocks(job, blocks, workers=workers, client=client)
            _merge_and_write(results, job, block_size, summary, Path(tmp), ticker)
        finally:
            reset_handles()
    log.debug("vectorised %s: %d polygons in %d blocks", class_raster, summary.polygons, len(blocks))
    return VectorizeSummary(
        writer.path, summary.polygons, dict(sorted(summary.pixels.items())), dict(sorted(summary.area.items())), rounds
    )


class _Ticker:
    def __init__(self, callback: Callable[[int, int], None] | None, total: int) -> None:
        self.callback, self.done, self.total = callback, 0, total

    def tick(self, extra_total: int = 0) -> None:
        self.total += extra_total
        self.done += 1
        if self.callback:
            self.callback(self.done, max(self.total, self.done))


class _Output:
    """Rows on their way to the writer, in batches (:data:`_BATCH`), and the totals of what was written."""

    def __init__(self, writer: VectorWriter, job: PolygonJob) -> None:
        self.writer, self.job = writer, job
        self.batch: list[pa.Table] = []
        self.rows = self.bytes = self.polygons = 0
        self.pixels: dict[int, int] = {}
        self.area: dict[int, float] = {}

    def emit(self, table: pa.Table) -> None:
        """Queue rows; write them when a batch is full."""
        if len(table):
            self.batch.append(table)
            self.rows += len(table)
            self.bytes += table.nbytes
            self.polygons += len(table)
            keys, where = np.unique(np.asarray(table["class_id"]), return_inverse=True)
            sums = np.bincount(where.ravel(), weights=np.asarray(table["area_m2"]), minlength=len(keys))
            for k, a in zip(keys.tolist(), sums.tolist(), strict=True):
                self.area[k] = self.area.get(k, 0.0) + a
        if self.rows >= _BATCH or self.bytes >= _BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the rows queued."""
        if self.batch:
            self.writer.write(pa.concat_tables(self.batch))
            self.batch.clear()
            self.rows = self.bytes = 0


def _merge_and_write(
    results: Iterator[BlockOut], job: PolygonJob, block_size: int, output: _Output, tmp: Path, ticker: _Ticker
) -> None:
    store = PieceStore(tmp)
    grid = job.grid
    merger = BorderMerger(
        store, block_size=block_size, height=grid.height, width=grid.width, exact=job.simplify_px is None
    )
    try:
        for res in results:
            output.emit(res.table)
            for k, n in res.class_pixels.items():
                output.pixels[k] = output.pixels.get(k, 0) + n
            merger.add(res.box, res.cls, res.edges, res.pieces)
            if res.box.x1 == grid.width:
                for groups, merged in merger.finished(last_row=res.box.y1 == grid.height):
                    rows = attribute_table(
                        merged,
                        np.array([g.cls for g in groups]),
                        np.array([g.conf_sum for g in groups]),
                        np.array([g.conf_n for g in groups]),
                        grid=grid,
                        names=job.names,
                        mean_conf=job.confidence is not None,
                    )
                    del merged  # a large region's coordinates go before its rows are written
                    output.emit(rows)
            ticker.tick()
        output.flush()
    finally:
        results.close()  # stops the blocks still running, at once, also on an interrupt
        store.close()
