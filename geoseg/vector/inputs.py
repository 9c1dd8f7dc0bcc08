"""Inputs of vectorising: class and confidence rasters (GeoTIFF/COG or a Zarr store), read block by block.

A :class:`Source` says where a raster's pixels come from and is picklable, so block workers reopen
it themselves; :func:`read_pixels` reads one block and its validity. :class:`Grid` is the pixel grid
with its CRS and the sizes derived from it.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import rasterio
from affine import Affine
from pyproj import Geod
from rasterio.crs import CRS
from rasterio.windows import Window

from geoseg.atomic import write_bytes
from geoseg.config import ClassSchema
from geoseg.errors import InvalidSceneError, SceneNotFoundError
from geoseg.export.legend import classes_from_cog, classes_from_store
from geoseg.raster import open_scene
from geoseg.tiling import Box

if TYPE_CHECKING:
    import xarray as xr

log = logging.getLogger(__name__)

#: The WGS84 ellipsoid, for geodesic areas and lengths.
GEOD = Geod(ellps="WGS84")


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
        width = GEOD.inv(lon, lat, lon + t.a, lat)[2]
        height = GEOD.inv(lon, lat, lon, lat + t.e)[2]
        return math.sqrt(width * height)

    def row_areas_dm2(self, y0: int, y1: int) -> np.ndarray:
        """Geodesic (WGS84) area of one pixel in each row ``y0..y1-1``, in whole dm² (geographic CRS)."""
        t = self.transform
        out = np.empty(y1 - y0)
        for i, row in enumerate(range(y0, y1)):
            top, bottom = t.f + row * t.e, t.f + (row + 1) * t.e
            lons = [t.c, t.c + t.a, t.c + t.a, t.c]
            out[i] = abs(GEOD.polygon_area_perimeter(lons, [top, top, bottom, bottom])[0])
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


def read_pixels(src: Source, box: Box) -> tuple[np.ndarray, np.ndarray]:
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


def write_pixels(src: Source, box: Box, values: np.ndarray) -> None:
    """Store the pixels of ``box`` in a ``"blocks"`` source (written whole, then renamed)."""
    write_bytes(Path(src.path) / f"{box.y0}_{box.x0}.z", zlib.compress(np.ascontiguousarray(values).tobytes(), 1))


def embedded_classes(path: str | Path) -> ClassSchema | None:
    """The class schema a class map carries, or None.

    A geoseg COG carries class tags and a colour table, a predict store its attributes.  Call it on
    a raster :func:`open_class_raster` has accepted.
    """
    path = Path(path)
    return classes_from_store(path) if _is_zarr(path) else classes_from_cog(path)


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
            raise InvalidSceneError(f"{path}: {variable!r} has no CRS. Write one with `ds.rio.write_crs(...)`.")
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
    nodata = [v for v in (*src.nodata, ignore) if v is not None and not math.isnan(v) and info.min <= v <= info.max]
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
