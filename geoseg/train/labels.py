"""Class labels on a scene's grid, as channel indices: from class ids, vector polygons or a label raster.

Training and scoring hold labels as *channel indices* (one byte per pixel): class
``schema.classes[k].id`` becomes ``k``, and ``schema.ignore_index`` (255) marks pixels that are not
trained on or scored. :func:`encode_labels` does that mapping and names any value that is not a class;
:func:`rasterize_labels` burns polygons onto a scene's grid; :func:`align_label_raster` reads a label
raster onto it (nearest resampling when the grids differ).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning

from geoseg.config import ClassSchema
from geoseg.errors import DatasetError
from geoseg.raster import gdal_env, open_scene

log = logging.getLogger(__name__)

#: Class name that, when present in a schema, labels the pixels outside every polygon (scene_vector).
BACKGROUND = "background"


def encode_labels(
    values: np.ndarray, schema: ClassSchema, *, nodata: float | None = None, source: str = "labels"
) -> np.ndarray:
    """Map class ids to channel indices ``0..K-1`` (uint8); nodata, NaN and the ignore index → ignore.

    Args:
        values: label values (class ids) of any numeric dtype.
        schema: the class schema; ``schema.ids[k]`` becomes ``k``.
        nodata: a value meaning 'no label'.
        source: names the labels in error messages.

    Raises:
        DatasetError: some values are not class ids of the schema (the message lists them).
    """
    values = np.asarray(values)
    ignore = schema.ignore_index
    missing = values == ignore
    if values.dtype.kind == "f":
        missing |= ~np.isfinite(values)
    if nodata is not None and not (isinstance(nodata, float) and np.isnan(nodata)):
        missing |= values == nodata
    present = np.unique(values[~missing])
    unknown = [v for v in present.tolist() if v not in schema.ids]
    if unknown:
        shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in unknown[:20])
        more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
        raise DatasetError(
            f"{source}: label values {shown}{more} are not classes of schema {schema.name!r} "
            f"(ids {list(schema.ids)}). Add them to the class schema, or mark them as nodata."
        )
    lut = np.full(256, ignore, np.uint8)
    for k, cid in enumerate(schema.ids):
        lut[cid] = k
    out = np.full(values.shape, ignore, np.uint8)
    out[~missing] = lut[values[~missing].astype(np.int64)]
    return out


def background_id(schema: ClassSchema) -> int | None:
    """The id of the class named ``background``, if the schema has one (see :data:`BACKGROUND`)."""
    return next((c.id for c in schema.classes if c.name.lower() == BACKGROUND), None)


def rasterize_labels(
    path: str | Path,
    scene_path: str | Path,
    schema: ClassSchema,
    *,
    label_field: str | None = "id",
    label_value: int | None = None,
    background: int | None = None,
) -> np.ndarray:
    """Burn vector labels onto a scene's grid, as channel indices.

    Polygons are reprojected to the scene CRS and rasterised with ``all_touched=False`` (a pixel
    takes a polygon's class when its centre lies inside; where polygons overlap the later one wins).

    Args:
        path: GeoPackage, Shapefile, GeoJSON, ... readable by geopandas.
        scene_path: the scene whose grid (CRS, transform, shape) the labels are burnt onto.
        schema: class schema; the field holds class ids (numbers) or class names (text).
        label_field: attribute holding the class; ignored when ``label_value`` is given.  When the
            file lacks it, the schema has two classes and ``background`` is one of them, every
            polygon takes the other class (footprints: building vs background).
        label_value: burn this class id for every polygon (e.g. building footprints).
        background: class id for pixels outside every polygon; ``None`` leaves them unlabelled.

    Returns:
        ``(H, W)`` uint8 channel indices, ``schema.ignore_index`` where unlabelled.

    Raises:
        DatasetError: unreadable file, no CRS, missing field, or values that are not classes.
    """
    import geopandas as gpd
    from rasterio.features import rasterize

    path = Path(path)
    scene = open_scene(scene_path)
    if not path.exists():
        raise DatasetError(f"{path}: no such vector file. Check the path (relative paths start at {Path.cwd()}).")
    try:
        gdf = gpd.read_file(path)
    except Exception as err:  # noqa: BLE001 - any reader failure means the file is unusable
        raise DatasetError(f"{path}: not a vector file geopandas can read ({err})") from None
    if gdf.crs is None:
        raise DatasetError(f"{path}: has no CRS; set it (e.g. ogr2ogr -a_srs EPSG:XXXX) so it can be "
                           f"reprojected to the scene CRS {scene.crs}.")
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
    if label_value is None and label_field not in gdf.columns and background is not None and len(schema.ids) == 2:
        label_value = next(i for i in schema.ids if i != background)
        log.info("%s has no field %r: every polygon is class %d, the rest background %d", path, label_field,
                 label_value, background)
    if label_value is not None:
        values = np.full(len(gdf), label_value, np.int64)
    else:
        if label_field not in gdf.columns:
            fields = [c for c in gdf.columns if c != gdf.geometry.name]
            raise DatasetError(f"{path}: has no field {label_field!r}; fields are {fields}. Set label_field.")
        values = _field_to_ids(gdf[label_field].to_numpy(), schema, f"{path} field {label_field!r}")
        keep = np.isfinite(values.astype(np.float64))  # polygons without a class are left unlabelled
        gdf, values = gdf[keep], values[keep].astype(np.int64)
    if background is not None and background not in schema.ids:
        raise DatasetError(f"background class id {background} is not in schema {schema.name!r} {list(schema.ids)}")
    encode_labels(values, schema, source=f"{path} field {label_field!r}")  # lists unknown ids
    gdf = gdf.to_crs(scene.crs.to_wkt())
    fill = -1 if background is None else background
    shapes = [(geom, int(v)) for geom, v in zip(gdf.geometry, values, strict=True)]
    burnt = rasterize(shapes, out_shape=scene.shape, transform=scene.transform, fill=fill, all_touched=False,
                      dtype="int32") if shapes else np.full(scene.shape, fill, np.int32)
    return encode_labels(burnt, schema, nodata=-1, source=str(path))


def _field_to_ids(values: np.ndarray, schema: ClassSchema, source: str) -> np.ndarray:
    """Class ids (float64, NaN where missing) from a column of ids (numbers) or class names (text)."""
    if values.dtype.kind in "iufb":
        ids = values.astype(np.float64)
        if not np.all(np.isnan(ids) | (ids == np.round(ids))):
            raise DatasetError(f"{source}: holds non-integer values; class ids must be integers")
        return ids
    names = {c.name: c.id for c in schema.classes}
    missing = [v is None or (isinstance(v, float) and np.isnan(v)) for v in values]
    unknown = sorted({str(v) for v, m in zip(values, missing, strict=True) if not m} - set(names))
    if unknown:
        raise DatasetError(f"{source}: values {unknown} are not class names of schema {schema.name!r} "
                           f"({list(names)}); use a field of class ids or names")
    return np.array([np.nan if m else names[str(v)] for v, m in zip(values, missing, strict=True)], np.float64)


def align_label_raster(path: str | Path, scene_path: str | Path, schema: ClassSchema) -> np.ndarray:
    """Read a label raster onto a scene's grid (nearest resampling when CRS or grid differ).

    A label raster without CRS or geotransform is taken to be on the scene's grid when it has the
    scene's shape (a warning is logged).

    Returns:
        ``(H, W)`` uint8 channel indices, ``schema.ignore_index`` where nodata or outside the labels.
    """
    from rasterio.warp import Resampling, reproject

    path = Path(path)
    scene = open_scene(scene_path)
    if not path.exists():
        raise DatasetError(f"{path}: no such label raster. Check the path (relative paths start at {Path.cwd()}).")
    with warnings.catch_warnings(), gdal_env():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            band, nodata = src.read(1), src.nodata
            same_grid = src.crs == scene.crs and src.transform == scene.transform and src.shape == scene.shape
            if src.crs is None and src.shape == scene.shape:
                log.warning("%s has no CRS; taking it to be on the grid of %s", path, scene.path)
                same_grid = True
            elif src.crs is None:
                raise DatasetError(f"{path}: has no CRS and its shape {src.shape} differs from the scene's "
                                   f"{scene.shape}; georeference it")
            if not same_grid:
                aligned = np.full(scene.shape, np.nan, np.float64)
                reproject(band.astype(np.float64), aligned, src_transform=src.transform, src_crs=src.crs,
                          src_nodata=nodata, dst_transform=scene.transform, dst_crs=scene.crs,
                          dst_nodata=np.nan, resampling=Resampling.nearest)
                band = aligned
    return encode_labels(band, schema, nodata=nodata, source=str(path))


#: Suffixes read as label rasters; anything else is read as vector labels.
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".img", ".jp2")


def read_labels(labels: str | Path, scene: str | Path, schema: ClassSchema, *, label_field: str = "id",
                label_value: int | None = None, background: int | None = None) -> np.ndarray:
    """Labels on the scene's grid as channel indices: a label raster (by suffix) or vector labels.

    ``label_value`` and ``background`` apply to vector labels (see :func:`rasterize_labels`).
    """
    path = Path(labels)
    if path.suffix.lower() in RASTER_SUFFIXES:
        return align_label_raster(path, scene, schema)
    return rasterize_labels(path, scene, schema, label_field=label_field, label_value=label_value,
                            background=background)
