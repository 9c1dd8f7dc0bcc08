"""Vectorise a class raster: one polygon per region, made block by block, merged across block borders.

A *region* is a 4-connected set of pixels of one class; nodata pixels (the raster's nodata value, and
255, the class raster's "no class") belong to none. :func:`vectorize` reads the class raster one
block at a time (a GeoTIFF/COG, or the Zarr store of the predict stage), polygonises the block's
regions with GDAL (4-connectivity: valid polygons, holes included) in pixel coordinates, and writes
the polygons that touch no internal block border at once. Pieces of regions that do touch
one are joined across borders with a union-find (see :mod:`geoseg.polygon_merge`), spilled to a
temporary file and merged as soon as their region is complete. Memory follows the block size, the
raster width and the regions still open, not the raster size; the one exception is a single region
spanning many blocks, whose polygon is assembled whole (about 70 bytes per vertex while merging).
Without ``min_area`` and ``simplify`` the result is exact and does not depend on ``block_size``: the
same polygons as ``rasterio.features.shapes(..., connectivity=4)`` on the whole raster. Blocks are
polygonised in ``workers`` processes; merging and writing happen in the calling process.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import tempfile
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import rasterio
import shapely
from affine import Affine
from pyproj import Geod
from rasterio.crs import CRS
from rasterio.windows import Window

from geoseg.config import ClassSchema
from geoseg.errors import ConfigError, InvalidSceneError, SceneNotFoundError
from geoseg.export.vector import VectorWriter, infer_driver
from geoseg.polygon_merge import (
    BorderMerger,
    Edges,
    Pieces,
    PieceStore,
    SieveRound,
    apply_affine,
    label_regions,
    polygonize,
)
from geoseg.raster import gdal_env, open_scene
from geoseg.tiling import Box

if TYPE_CHECKING:
    import xarray as xr

log = logging.getLogger(__name__)

#: Attribute fields of the output, in order (``mean_conf`` only with a confidence raster).
FIELDS = {
    "class_id": "int32",
    "class_name": "string",
    "area_m2": "float64",
    "perimeter_m": "float64",
    "mean_conf": "float64",
}
#: Rounds of the sieve before giving up on regions that are still small (see :func:`vectorize`).
MAX_SIEVE_ROUNDS = 16
_BATCH = 20_000
#: Pixel types GDAL polygonises directly; others are labelled first.
_SHAPES_DTYPES = ("uint8", "uint16", "int16", "int32")
_GEOD = Geod(ellps="WGS84")


@dataclass(frozen=True)
class VectorizeSummary:
    """What :func:`vectorize` wrote: polygon count, and per class id its pixel count and area (m²)."""

    path: Path
    polygons: int
    pixels: dict[int, int]
    area_m2: dict[int, float]
    sieve_rounds: int = 0


@dataclass(frozen=True)
class _Job:
    """Everything a block worker needs; picklable."""

    source: Source
    confidence: Source | None
    grid: Grid
    names: dict[int, str]
    simplify_px: float | None


@dataclass
class _BlockOut:
    box: Box
    cls: np.ndarray
    edges: Edges
    pieces: Pieces
    table: pa.Table
    class_pixels: dict[int, int] = field(default_factory=dict)


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
) -> VectorizeSummary:
    """Turn a class raster into polygons with class, name, area, perimeter and mean confidence.

    Args:
        class_raster: a one-band integer GeoTIFF/COG, or a Zarr store with a ``class_id`` (y, x)
            variable and a rioxarray CRS (as the predict stage writes it).
        out: output file; ``.gpkg`` (GeoPackage, the default), ``.shp`` or ``.parquet`` (GeoParquet).
        classes: class schema giving ``class_name``; without it the name is the id as text.
        block_size: pixels per block side; memory grows with its square, the result does not change.
        min_area: minimum mapping unit in m². A region whose area is below it is *small*. In each
            round every small region that touches a region of at least ``min_area`` takes the class
            of the large neighbouring regions it shares the longest border with (border length in
            pixel edges, summed per class; ties go to the lower class id); nodata never counts.
            Rounds repeat on the result until no small region touches a large one (at most
            :data:`MAX_SIEVE_ROUNDS`); regions still small then (e.g. a cluster of small regions ringed
            by nodata) keep their class. Areas are pixel count × pixel area, or for a geographic CRS
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
        workers: processes polygonising blocks (default: CPU count, at most 4; 1 runs in-process).

    Returns:
        A :class:`VectorizeSummary`. Fields written: ``class_id``, ``class_name``, ``area_m2`` and
        ``perimeter_m`` (geodesic on WGS84 for a geographic CRS, else planar in metres),
        ``mean_conf`` (with ``confidence``). Shapefile field names: ``perim_m``.

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
    conf = open_confidence(confidence, grid) if confidence is not None else None
    names = {c.id: c.name for c in classes.classes} if classes else {}
    fields = {k: v for k, v in FIELDS.items() if k != "mean_conf" or conf is not None}
    blocks = [
        Box(y, x, min(y + block_size, grid.height), min(x + block_size, grid.width))
        for y in range(0, grid.height, block_size)
        for x in range(0, grid.width, block_size)
    ]
    workers = min(4, os.cpu_count() or 1) if workers is None else max(1, workers)
    ticker = _Ticker(progress, len(blocks) * (3 if min_area else 1))
    out = Path(out)
    with (
        VectorWriter(out, crs=grid.crs, fields=fields, driver=driver, overwrite=overwrite) as writer,
        tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=writer.path.parent) as tmp,
        gdal_env(),
    ):
        try:
            rounds = 0
            if min_area:
                source, rounds = _sieve(source, grid, blocks, min_area, Path(tmp), ticker)
            simplify_px = simplify / grid.pixel_size_m() if simplify else None
            job = _Job(source, conf, grid, names, simplify_px)
            summary = _polygonize(job, blocks, block_size, writer, Path(tmp), ticker, workers)
        finally:
            reset_handles()
    log.info("vectorised %s: %d polygons in %d blocks", class_raster, summary["polygons"], len(blocks))
    return VectorizeSummary(writer.path, summary["polygons"], summary["pixels"], summary["area"], rounds)


class _Ticker:
    def __init__(self, callback: Callable[[int, int], None] | None, total: int) -> None:
        self.callback, self.done, self.total = callback, 0, total

    def tick(self, extra_total: int = 0) -> None:
        self.total += extra_total
        self.done += 1
        if self.callback:
            self.callback(self.done, max(self.total, self.done))


# -- polygonising -----------------------------------------------------------------------------


def _polygonize(
    job: _Job,
    blocks: list[Box],
    block_size: int,
    writer: VectorWriter,
    tmp: Path,
    ticker: _Ticker,
    workers: int,
) -> dict:
    store = PieceStore(tmp)
    merger = BorderMerger(
        store,
        block_size=block_size,
        height=job.grid.height,
        width=job.grid.width,
        exact=job.simplify_px is None,
    )
    pixels: dict[int, int] = {}
    area: dict[int, float] = {}
    polygons = 0
    batch: list[pa.Table] = []
    rows = 0

    def emit(table: pa.Table) -> None:
        nonlocal rows, polygons
        if len(table):
            batch.append(table)
            rows += len(table)
            polygons += len(table)
            keys, where = np.unique(np.asarray(table["class_id"]), return_inverse=True)
            sums = np.bincount(where.ravel(), weights=np.asarray(table["area_m2"]), minlength=len(keys))
            for k, a in zip(keys.tolist(), sums.tolist(), strict=True):
                area[k] = area.get(k, 0.0) + a
        if rows >= _BATCH:
            writer.write(pa.concat_tables(batch))
            batch.clear()
            rows = 0

    try:
        for res in _map_blocks(job, blocks, workers):
            emit(res.table)
            for k, n in res.class_pixels.items():
                pixels[k] = pixels.get(k, 0) + n
            merger.add(res.box, res.cls, res.edges, res.pieces)
            if res.box.x1 == job.grid.width:
                for groups, merged in merger.finished(last_row=res.box.y1 == job.grid.height):
                    world = _to_world(np.array(merged, dtype=object), job.grid.transform)
                    emit(
                        _attributes(
                            job,
                            world,
                            np.array([g.cls for g in groups]),
                            np.array([g.conf_sum for g in groups]),
                            np.array([g.conf_n for g in groups]),
                        )
                    )
            ticker.tick()
        if batch:
            writer.write(pa.concat_tables(batch))
    finally:
        store.close()
    return {"polygons": polygons, "pixels": dict(sorted(pixels.items())), "area": dict(sorted(area.items()))}


_WORKER_JOB: _Job | None = None


def _init_worker(job: _Job) -> None:
    global _WORKER_JOB
    _WORKER_JOB = job
    reset_handles(close=False)
    gdal_env().__enter__()  # for the worker's lifetime: bounded GDAL block cache, etc.


def _worker_block(box: Box) -> _BlockOut:
    assert _WORKER_JOB is not None
    return _block(_WORKER_JOB, box)


def _map_blocks(job: _Job, blocks: list[Box], workers: int) -> Iterator[_BlockOut]:
    """Polygonise blocks, in order; with several workers a few blocks run ahead in other processes."""
    if workers == 1 or len(blocks) < 2:
        for box in blocks:
            yield _block(job, box)
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


def _block(job: _Job, box: Box) -> _BlockOut:
    """Polygonise one block; finish the regions inside it, return the pieces touching its sides."""
    classes, valid = read_block(job.source, box)
    simplify = job.simplify_px is not None
    labels = None
    if job.confidence is not None or classes.dtype.name not in _SHAPES_DTYPES:
        regions = label_regions(classes, valid)  # pixel labels, for confidence sums (or odd dtypes)
        labels = regions.labels
        polys = polygonize(labels, x0=box.x0, y0=box.y0, mask=None if simplify else labels > 0)
        nodata = polys.values == 0
        cls = regions.cls[polys.values]
    else:
        polys = polygonize(classes, x0=box.x0, y0=box.y0, mask=None if simplify else valid)
        nodata = np.isin(polys.values, job.source.nodata)
        cls = polys.values
    pixel_geoms = polys.geometries()
    if simplify and len(polys):
        pixel_geoms = _simplify_block(pixel_geoms, job.simplify_px)
    if nodata.any():
        polys, pixel_geoms, cls = polys.subset(~nodata), pixel_geoms[~nodata], cls[~nodata]
    pixels = (
        np.rint(shapely.area(polys.geometries())).astype(np.int64)
        if simplify
        else np.rint(shapely.area(pixel_geoms)).astype(np.int64)
    )
    conf_sum = np.zeros(len(polys))
    conf_n = np.zeros(len(polys), np.int64)
    if job.confidence is not None:
        conf, ok = read_block(job.confidence, box)
        ok = (ok & valid).ravel()
        lab = labels.ravel()[ok]
        n = int(labels.max()) + 1
        sums = np.bincount(lab, weights=conf.ravel()[ok].astype(np.float64), minlength=n)
        counts = np.bincount(lab, minlength=n)
        conf_sum, conf_n = sums[polys.values], counts[polys.values]
    edges = polys.side_owners(box)
    sides = [
        edges.top if box.y0 > 0 else None,
        edges.bottom if box.y1 < job.grid.height else None,
        edges.left if box.x0 > 0 else None,
        edges.right if box.x1 < job.grid.width else None,
    ]
    at_border = np.zeros(len(polys) + 1, bool)
    for side in sides:
        if side is not None:
            at_border[side] = True
    at_border = at_border[1:]
    ids = np.flatnonzero(at_border)
    pieces = Pieces(ids + 1, list(shapely.to_wkb(pixel_geoms[ids])), pixels[ids], conf_sum[ids], conf_n[ids])
    inner = ~at_border
    if simplify:
        world = _to_world(pixel_geoms[inner], job.grid.transform)
    else:
        world = polys.subset(inner).geometries(job.grid.transform)
    table = _attributes(job, world, cls[inner], conf_sum[inner], conf_n[inner])
    keys, where = np.unique(cls, return_inverse=True)
    per_class = np.bincount(where.ravel(), weights=pixels, minlength=len(keys))
    class_pixels = {int(k): int(c) for k, c in zip(keys, per_class, strict=True)}
    return _BlockOut(box, np.r_[-1, cls], edges, pieces, table, class_pixels)


def _simplify_block(polys: np.ndarray, tolerance: float) -> np.ndarray:
    """Coverage-simplify a block's polygons (nodata areas included) with the block's sides pinned.

    Polygons first get a vertex at every pixel corner along their edges, so that the coverage is
    edge-matched (GDAL writes corners only), rounded back to exact integers.
    """
    dense = shapely.transform(shapely.segmentize(polys, 1.0), np.round)
    return shapely.simplify(shapely.coverage_simplify(dense, tolerance, simplify_boundary=False), 0.0)


def _to_world(geoms: np.ndarray, t: Affine) -> np.ndarray:
    return shapely.transform(geoms, lambda xy: apply_affine(xy, t))


def _attributes(
    job: _Job, geoms: np.ndarray, cls: np.ndarray, conf_sum: np.ndarray, conf_n: np.ndarray
) -> pa.Table:
    """The output rows for finished polygons (scene CRS coordinates)."""
    if job.grid.geographic:
        geoms = shapely.orient_polygons(geoms)  # pyproj wants counter-clockwise shells
        ap = np.array([_GEOD.geometry_area_perimeter(g) for g in geoms]).reshape(-1, 2)
        area, perimeter = np.abs(ap[:, 0]), ap[:, 1]
    else:
        unit = job.grid.unit
        area, perimeter = shapely.area(geoms) * unit * unit, shapely.length(geoms) * unit
    cols = {
        "class_id": pa.array(cls, pa.int32()),
        "class_name": _class_names(job.names, cls),
        "area_m2": pa.array(area, pa.float64()),
        "perimeter_m": pa.array(perimeter, pa.float64()),
    }
    if job.confidence is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            cols["mean_conf"] = pa.array(np.where(conf_n > 0, conf_sum / np.maximum(conf_n, 1), np.nan))
    cols["geometry"] = pa.array(shapely.to_wkb(geoms), pa.binary())
    return pa.table(cols)


def _class_names(names: dict[int, str], cls: np.ndarray) -> pa.Array:
    keys, where = np.unique(np.asarray(cls, np.int64), return_inverse=True)
    text = np.array([names.get(k, str(k)) for k in keys.tolist()] or [""], dtype=object)
    return pa.array(text[where.ravel()] if len(cls) else [], pa.string())


# -- sieve ------------------------------------------------------------------------------------


def _sieve(
    source: Source, grid: Grid, blocks: list[Box], min_area: float, tmp: Path, ticker: _Ticker
) -> tuple[Source, int]:
    """Apply the minimum-mapping-unit sieve; returns the source of the sieved blocks and the rounds run."""
    if grid.geographic:
        threshold = min_area * 100.0  # sizes in whole dm²

        def weights(box: Box) -> np.ndarray:
            return grid.row_areas_dm2(box.y0, box.y1)
    else:
        threshold = min_area / grid.pixel_area_m2()

        def weights(box: Box) -> np.ndarray | None:
            return None

    def analyse(src: Source, box: Box):
        classes, valid = read_block(src, box)
        regions = label_regions(classes, valid)
        return (
            classes,
            valid,
            regions,
            regions.sizes(weights(box)),
            regions.border_labels(box, grid.height, grid.width),
        )

    current = SieveRound(grid.width, threshold)
    for box in blocks:
        _, _, regions, size, border = analyse(source, box)
        current.collect(box, regions, size, border)
        ticker.tick()
    current.resolve()
    sieved = Source("blocks", str(tmp / "sieved"), nodata=source.nodata, dtype=source.dtype)
    Path(sieved.path).mkdir(exist_ok=True)
    src, rounds = source, 0
    while rounds < MAX_SIEVE_ROUNDS:
        following = SieveRound(grid.width, threshold)
        changed = 0
        for i, box in enumerate(blocks):
            classes, valid, regions, size, border = analyse(src, box)
            new = current.new_classes(i, regions, size, border)
            moved = new != regions.cls
            if moved.any():
                changed += int(moved.sum())
                classes = np.where(valid, new[regions.labels], classes).astype(classes.dtype)
                regions = label_regions(classes, valid)
                size, border = (
                    regions.sizes(weights(box)),
                    regions.border_labels(box, grid.height, grid.width),
                )
            _write_sieved(sieved, box, classes)
            following.collect(box, regions, size, border)
            ticker.tick(extra_total=len(blocks) if i == 0 and rounds > 0 else 0)
        log.debug("sieve round %d: %d regions changed class", rounds + 1, changed)
        if not changed:
            break
        rounds += 1
        src = sieved
        following.resolve()
        current = following
    return src, rounds


def _write_sieved(src: Source, box: Box, classes: np.ndarray) -> None:
    path = Path(src.path) / f"{box.y0}_{box.x0}.z"
    tmp = path.with_suffix(".part")
    tmp.write_bytes(zlib.compress(np.ascontiguousarray(classes).tobytes(), 1))
    os.replace(tmp, path)


# -- inputs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """The class raster's pixel grid: size, north-up transform, CRS and its metres per unit."""

    height: int
    width: int
    transform: Affine
    crs: CRS
    geographic: bool
    unit: float

    @classmethod
    def of(cls, height: int, width: int, transform: Affine, crs: CRS) -> Grid:
        """Build a grid, reading the CRS's kind and linear unit once."""
        unit = 1.0
        if not crs.is_geographic:
            try:
                unit = float(crs.linear_units_factor[1])
            except Exception:  # noqa: BLE001  (unknown units: assume metres)
                log.warning("%s: unknown linear unit, assuming metres", crs)
        return cls(height, width, transform, crs, bool(crs.is_geographic), unit)

    def pixel_area_m2(self) -> float:
        """Area of one pixel in m² (projected CRS)."""
        return abs(self.transform.a * self.transform.e) * self.unit**2

    def pixel_size_m(self) -> float:
        """Pixel side in metres: geometric mean of width and height (at the centre latitude if geographic)."""
        t = self.transform
        if not self.geographic:
            return math.sqrt(abs(t.a * t.e)) * self.unit
        lon, lat = t.c + t.a * self.width / 2, t.f + t.e * self.height / 2
        width = _GEOD.inv(lon, lat, lon + t.a, lat)[2]
        height = _GEOD.inv(lon, lat, lon, lat + t.e)[2]
        return math.sqrt(width * height)

    def row_areas_dm2(self, y0: int, y1: int) -> np.ndarray:
        """Geodesic (WGS84) area of one pixel in each row ``y0..y1-1``, in whole dm² (geographic CRS)."""
        t = self.transform
        out = np.empty(y1 - y0)
        for i, row in enumerate(range(y0, y1)):
            top, bottom = t.f + row * t.e, t.f + (row + 1) * t.e
            lons = [t.c, t.c + t.a, t.c + t.a, t.c]
            out[i] = abs(_GEOD.polygon_area_perimeter(lons, [top, top, bottom, bottom])[0])
        return np.round(out * 100.0)


@dataclass(frozen=True)
class Source:
    """Where a (y, x) raster's pixels come from; picklable, so block workers reopen it themselves.

    ``kind`` is ``"gtiff"`` (band 1 of a GDAL raster), ``"zarr"`` (``variable`` of a store) or
    ``"blocks"`` (sieved blocks in a temporary folder). Pixels equal to a ``nodata`` value (or not
    finite) are invalid.
    """

    kind: str
    path: str
    variable: str = ""
    nodata: tuple[float, ...] = ()
    dtype: str = "uint8"


_HANDLES: dict[tuple[str, str, str], object] = {}


def reset_handles(*, close: bool = True) -> None:
    """Forget this process's open inputs (closing them unless ``close`` is False, e.g. after a fork)."""
    for handle in _HANDLES.values():
        if close and isinstance(handle, rasterio.io.DatasetReader):
            handle.close()
    _HANDLES.clear()


def read_block(src: Source, box: Box) -> tuple[np.ndarray, np.ndarray]:
    """The pixels of ``box`` and their validity."""
    key = (src.kind, src.path, src.variable)
    if src.kind == "blocks":
        raw = zlib.decompress((Path(src.path) / f"{box.y0}_{box.x0}.z").read_bytes())
        values = np.frombuffer(raw, src.dtype).reshape(box.shape)
    else:
        if key not in _HANDLES:
            _HANDLES[key] = (
                rasterio.open(src.path) if src.kind == "gtiff" else _zarr_array(Path(src.path), src.variable)
            )
        handle = _HANDLES[key]
        if src.kind == "gtiff":
            values = handle.read(1, window=Window(box.x0, box.y0, box.width, box.height))
        else:
            values = np.asarray(handle[box.y0 : box.y1, box.x0 : box.x1].values)
    valid = np.ones(values.shape, bool)
    for v in src.nodata:
        valid &= values != v
    if values.dtype.kind == "f":
        valid &= np.isfinite(values)
    return values, valid


def _is_zarr(path: Path) -> bool:
    markers = ("zarr.json", ".zgroup", ".zarray", ".zattrs")
    return path.suffix == ".zarr" or (path.is_dir() and any((path / m).exists() for m in markers))


def _zarr_array(path: Path, variable: str) -> xr.DataArray:
    """A store's (y, x) variable, read lazily (only the chunks a block needs), with CRS and transform."""
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr

    try:
        ds = xr.open_zarr(path, consolidated=False, mask_and_scale=False, chunks=None)
    except Exception as err:  # noqa: BLE001  (zarr and xarray raise many kinds)
        raise InvalidSceneError(f"{path}: not a Zarr store xarray can open ({err}).") from None
    if "spatial_ref" in ds.data_vars:
        ds = ds.set_coords("spatial_ref")
    if variable not in ds.data_vars:
        raise InvalidSceneError(
            f"{path}: has no {variable!r} variable (it has {sorted(ds.data_vars)}). "
            "Pass a store written by `geoseg predict`."
        )
    da = ds[variable]
    if da.ndim != 2:
        raise InvalidSceneError(f"{path}: {variable!r} has dimensions {da.dims}; expected (y, x).")
    try:
        return da.transpose(da.rio.y_dim, da.rio.x_dim)
    except Exception as err:  # noqa: BLE001  (rioxarray: missing spatial dimensions)
        raise InvalidSceneError(f"{path}: {variable!r} has no spatial dimensions ({err}).") from None


def _warn_unfinished(path: Path) -> None:
    """Warn when a predict store still has blocks to write (they read as nodata)."""
    import zarr

    try:
        done = zarr.open_group(path, mode="r")["block_done"][:]
    except (KeyError, FileNotFoundError, ValueError, zarr.errors.GroupNotFoundError):
        return
    if not done.all():
        log.warning(
            "%s: %d of %d blocks are not written yet; they give no polygons",
            path,
            int((done == 0).sum()),
            done.size,
        )


def _open_raster(path: str | Path, variable: str) -> tuple[Source, Grid, str]:
    path = Path(path)
    if not path.exists():
        raise SceneNotFoundError(
            f"{path}: no such file or store. Check the path (relative paths start at {Path.cwd()})."
        )
    if _is_zarr(path):
        da = _zarr_array(path, variable)
        crs = da.rio.crs
        if crs is None:
            raise InvalidSceneError(
                f"{path}: {variable!r} has no CRS. Write one with `ds.rio.write_crs(...)`."
            )
        t = da.rio.transform()
        nodata = tuple(v for v in (da.attrs.get("nodata"), da.rio.nodata) if v is not None)
        src = Source("zarr", str(path), variable, nodata, str(da.dtype))
        if variable == "class_id":
            _warn_unfinished(path)
        grid = Grid.of(da.shape[0], da.shape[1], Affine(*tuple(t)[:6]), CRS.from_user_input(crs))

    else:
        scene = open_scene(path)
        if scene.count != 1:
            raise InvalidSceneError(
                f"{path}: has {scene.count} bands; expected one band "
                f"({'class ids' if variable == 'class_id' else 'confidence'})."
            )
        src = Source("gtiff", str(path), "", () if scene.nodata is None else (scene.nodata,), scene.dtype)
        grid = Grid.of(scene.height, scene.width, scene.transform, scene.crs)
        t = scene.transform
    if t.b != 0 or t.d != 0:
        raise InvalidSceneError(f"{path}: has a rotated or sheared transform; warp it north-up first.")
    return src, grid, str(src.dtype)


def open_class_raster(path: str | Path, *, ignore: int = 255) -> tuple[Source, Grid]:
    """Open and check a class raster (GeoTIFF/COG, or a Zarr store's ``class_id``).

    ``ignore`` (255 by default, the class raster's "no class") is nodata in addition to the raster's
    own nodata value.

    Raises:
        SceneNotFoundError: ``path`` does not exist.
        InvalidSceneError: not a one-band integer raster with a CRS and a north-up transform.
    """
    src, grid, dtype = _open_raster(path, "class_id")
    if np.dtype(dtype).kind not in "iu":
        raise InvalidSceneError(
            f"{path}: pixel type {dtype} is not a class raster (class ids are integers). Pass the class map "
            "(e.g. the `class_id` output of `geoseg predict`), or convert it, e.g. `gdal_translate -ot Byte`."
        )
    info = np.iinfo(dtype)
    nodata = [
        v for v in (*src.nodata, ignore) if v is not None and not math.isnan(v) and info.min <= v <= info.max
    ]
    return Source(src.kind, src.path, src.variable, tuple(dict.fromkeys(nodata)), dtype), grid


def open_confidence(path: str | Path, grid: Grid) -> Source:
    """Open a confidence raster (GeoTIFF, or a Zarr store's ``confidence``) and check it is on ``grid``.

    Raises:
        SceneNotFoundError: ``path`` does not exist.
        InvalidSceneError: not a one-band raster on the class raster's grid.
    """
    src, other, _ = _open_raster(path, "confidence")
    a, b = tuple(other.transform)[:6], tuple(grid.transform)[:6]
    tol = 1e-6 * max(abs(grid.transform.a), abs(grid.transform.e))
    if (other.height, other.width) != (grid.height, grid.width) or not np.allclose(a, b, rtol=0, atol=tol):
        raise InvalidSceneError(
            f"{path}: the confidence raster ({other.width}x{other.height}, transform {a}) is not on "
            f"the class raster's grid ({grid.width}x{grid.height}, transform {b}). "
            "Pass the confidence made with the class raster."
        )
    return src
