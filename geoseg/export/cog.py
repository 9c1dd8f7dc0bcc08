"""Finalise the Zarr store into Cloud-Optimized GeoTIFFs that open in QGIS as they are.

The class map carries an embedded colour table, its class names (band metadata and a GDAL PAM
``.aux.xml`` with category names), nodata 255 where the input was invalid, and overviews built
with mode resampling. Each output is written under a ``.partial`` name and renamed when complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from xml.sax.saxutils import escape

import rasterio
import rasterio.shutil
from rasterio.windows import Window

from geoseg.config import ClassSchema
from geoseg.errors import OutputExistsError
from geoseg.raster import gdal_env
from geoseg.stitch import CLASS_NODATA
from geoseg.store import iter_chunks, open_store

COG_OPTIONS = {"COMPRESS": "DEFLATE", "BLOCKSIZE": 512, "OVERVIEWS": "IGNORE_EXISTING", "BIGTIFF": "IF_SAFER"}


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def check_writable(path: Path, *, overwrite: bool) -> None:
    """Refuse to replace an existing output unless ``overwrite``."""
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: already exists. Pass --overwrite to replace it.")


def _category_xml(classes: ClassSchema) -> str:
    names = [""] * (max(classes.ids) + 1)
    for c in classes.classes:
        names[c.id] = c.name
    cats = "".join(f"<Category>{escape(n)}</Category>" for n in names)
    return (
        "<PAMDataset>\n  <PAMRasterBand band=\"1\">\n"
        f"    <CategoryNames>{cats}</CategoryNames>\n  </PAMRasterBand>\n</PAMDataset>\n"
    )


def _store_to_cog(store: Path, name: str, out: Path, *, nodata: float, resampling: str,
                  classes: ClassSchema | None) -> Path:
    ds = open_store(store)
    var = ds[name]
    profile = {
        "driver": "GTiff", "width": var.sizes["x"], "height": var.sizes["y"], "count": 1,
        "dtype": var.dtype.name, "crs": ds.rio.crs, "transform": ds.rio.transform(), "nodata": nodata,
        "tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate", "BIGTIFF": "IF_SAFER",
    }
    staging = out.with_name(out.name + ".staging.tif")
    partial = _partial(out)
    with gdal_env():
        with rasterio.open(staging, "w", **profile) as dst:
            for box, values in iter_chunks(store, name):
                dst.write(values, 1, window=Window(box.x0, box.y0, box.width, box.height))
            if classes is not None:
                dst.write_colormap(1, {c.id: (*c.rgb, 255) for c in classes.classes})
                dst.update_tags(1, **{f"CLASS_{c.id}": c.name for c in classes.classes})
                dst.set_band_description(1, "class_id")
            else:
                dst.set_band_description(1, name)
        rasterio.shutil.copy(staging, partial, driver="COG", RESAMPLING=resampling, **COG_OPTIONS)
    staging.unlink()
    if classes is not None:
        Path(str(out) + ".aux.xml").write_text(_category_xml(classes))
    os.replace(partial, out)
    return out


def write_class_cog(store: Path, out: Path, classes: ClassSchema, *, overwrite: bool = False) -> Path:
    """Write the class map COG (uint8, colour table, class names, mode overviews)."""
    check_writable(out, overwrite=overwrite)
    return _store_to_cog(store, "class_id", out, nodata=CLASS_NODATA, resampling="MODE", classes=classes)


def write_confidence_cog(store: Path, out: Path, *, overwrite: bool = False) -> Path:
    """Write the confidence COG (float32 max probability, 0 = nodata, average overviews)."""
    check_writable(out, overwrite=overwrite)
    return _store_to_cog(store, "confidence", out, nodata=0.0, resampling="AVERAGE", classes=None)
