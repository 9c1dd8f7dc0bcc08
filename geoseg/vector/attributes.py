"""The output rows of finished polygons: class, name, area, perimeter, mean confidence and WKB geometry."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from geoseg.vector.inputs import GEOD, Grid
from geoseg.vector.polygons import Polygons, apply_affine, offsets

#: Attribute fields of the output, in order (``mean_conf`` only with a confidence raster).
FIELDS = {
    "class_id": "int32",
    "class_name": "string",
    "area_m2": "float64",
    "perim_m": "float64",
    "mean_conf": "float64",
}


def attribute_table(
    polys: Polygons,
    cls: np.ndarray,
    conf_sum: np.ndarray,
    conf_n: np.ndarray,
    *,
    grid: Grid,
    names: dict[int, str],
    mean_conf: bool,
) -> pa.Table:
    """The output rows for ``polys`` (pixel coordinates; written in the scene CRS).

    Areas and perimeters are planar in metres for a projected CRS (exact for pixel polygons: from
    the pixel coordinates and the pixel size), geodesic on WGS84 for a geographic one.
    """
    t = grid.transform
    if grid.geographic:
        area, perimeter = _geodesic(polys, grid)
    else:
        area = polys.areas() * abs(t.a * t.e) * grid.unit**2
        perimeter = polys.perimeters(abs(t.a), abs(t.e)) * grid.unit
    cols = {
        "class_id": _numbers(cls, np.int32),
        "class_name": class_names(names, cls),
        "area_m2": _numbers(area, np.float64),
        "perim_m": _numbers(perimeter, np.float64),
    }
    if mean_conf:
        with np.errstate(invalid="ignore", divide="ignore"):
            cols["mean_conf"] = _numbers(np.where(conf_n > 0, conf_sum / np.maximum(conf_n, 1), np.nan), np.float64)
    cols["geometry"] = polys.to_wkb(t)
    return pa.table(cols)


def class_names(names: dict[int, str], cls: np.ndarray) -> pa.Array:
    """The name of each class id (the id as text where ``names`` has none)."""
    keys, where = np.unique(np.asarray(cls, np.int64), return_inverse=True)
    data = [names.get(k, str(k)).encode() for k in keys.tolist()]
    ends = offsets([len(d) for d in data]).astype(np.int32)
    text = pa.Array.from_buffers(pa.string(), len(data), [None, pa.py_buffer(ends), pa.py_buffer(b"".join(data))])
    return pc.take(text, _numbers(where.ravel(), np.int32))


def _numbers(values: np.ndarray, dtype: type) -> pa.Array:
    """A numeric Arrow array of ``values`` (``pa.array`` on numpy data would import pandas)."""
    values = np.ascontiguousarray(values, dtype)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def _geodesic(polys: Polygons, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Geodesic area (shell less holes) and perimeter (shell and holes) of each polygon, on WGS84.

    The perimeter counts every ring, as the planar one does (``shapely.length``); pyproj's
    :meth:`~pyproj.Geod.geometry_area_perimeter` would give the shell's only.
    """
    lonlat = apply_affine(polys.xy, grid.transform)
    ring = np.array(
        [
            GEOD.polygon_area_perimeter(lonlat[a:b, 0], lonlat[a:b, 1])
            for a, b in zip(polys.ring_offsets[:-1].tolist(), polys.ring_offsets[1:].tolist(), strict=True)
        ]
    ).reshape(-1, 2)
    shell = np.zeros(len(ring), bool)
    shell[polys.poly_offsets[:-1]] = True
    area = np.where(shell, 1.0, -1.0) * np.abs(ring[:, 0])
    starts = polys.poly_offsets[:-1]
    if not len(starts):
        return np.zeros(0), np.zeros(0)
    return np.add.reduceat(area, starts), np.add.reduceat(ring[:, 1], starts)
