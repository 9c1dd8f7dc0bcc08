"""The predict outputs opened the way GIS software opens them: through GDAL and OGR only.

GDAL here is rasterio's and pyogrio's own.  What GDAL understood of the class map's legend is read
back by asking GDAL to describe the dataset as a VRT (it writes the category names, colour table and
raster attribute table it found); the COG layout is checked with rio-cogeo's port of GDAL's
``validate_cloud_optimized_geotiff.py``.
"""

import io
import json
import sqlite3
import warnings
import xml.etree.ElementTree as ET

import numpy as np
import pyogrio
import pytest
import rasterio
import rasterio.shutil
from conftest import write_geotiff
from processes import cli, run
from rio_cogeo.cogeo import cog_validate

from geoseg.config import load_config

CLASSES = load_config("configs/classes/nc_landcover.yaml")
STEM = "nc_x2"


def gdal_description(path, tmp_path) -> ET.Element:
    """The dataset as GDAL itself describes it (a VRT of it, written by GDAL)."""
    vrt = tmp_path / f"{path.name}.vrt"
    rasterio.shutil.copy(path, vrt, driver="VRT")
    return ET.parse(vrt).getroot().find("VRTRasterBand")


def test_class_map_legend_is_exactly_the_models_classes(undisturbed, tmp_path):
    band = gdal_description(undisturbed / f"{STEM}_classes.tif", tmp_path)
    names = [c.text or "" for c in band.find("CategoryNames")]
    assert {i: n for i, n in enumerate(names) if n} == {c.id: c.name for c in CLASSES.classes}
    rat = band.find("GDALRasterAttributeTable")
    assert rat.get("tableType") == "thematic"
    fields = [(f.findtext("Name"), f.findtext("Usage")) for f in rat.findall("FieldDefn")]
    assert fields == [("Value", "5"), ("Class", "2"), ("Red", "6"), ("Green", "7"), ("Blue", "8")]
    rows = [[f.text for f in row.findall("F")] for row in rat.findall("Row")]
    assert rows == [[str(c.id), c.name, *map(str, c.rgb)] for c in CLASSES.classes]
    entries = band.find("ColorTable").findall("Entry")
    for c in CLASSES.classes:
        assert tuple(int(entries[c.id].get(k)) for k in ("c1", "c2", "c3")) == c.rgb

    # the QGIS style QGIS loads by itself: one legend entry per class, nodata transparent
    style = ET.parse(undisturbed / f"{STEM}_classes.qml").getroot()
    renderer = style.find("pipe/rasterrenderer")
    assert renderer.get("type") == "paletted" and renderer.get("band") == "1"
    palette = [(int(e.get("value")), e.get("label"), e.get("color")) for e in renderer.find("colorPalette")]
    assert palette == [(c.id, c.name, c.color) for c in CLASSES.classes]
    transparent = renderer.find("rasterTransparency/singleValuePixelList/pixelListEntry")
    assert (transparent.get("min"), transparent.get("percentTransparent")) == ("255", "100")


def test_outputs_carry_the_epsg_crs_the_summary_reports(undisturbed):
    summary = json.loads((undisturbed / "summary.json").read_text())
    assert summary["scene"]["crs"] == "EPSG:32119"
    for name in (f"{STEM}_classes.tif", f"{STEM}_confidence.tif"):
        with rasterio.open(undisturbed / name) as src:
            assert src.crs.to_authority(confidence_threshold=100) == ("EPSG", "32119")
    assert pyogrio.read_info(undisturbed / f"{STEM}_polygons.gpkg")["crs"] == "EPSG:32119"
    with sqlite3.connect(undisturbed / f"{STEM}_polygons.gpkg") as db:
        srs = db.execute("SELECT s.organization, s.organization_coordsys_id FROM gpkg_spatial_ref_sys s "
                         "JOIN gpkg_geometry_columns g ON g.srs_id = s.srs_id").fetchall()
    assert [(o.upper(), i) for o, i in srs] == [("EPSG", 32119)]


def test_cogs_are_valid_with_overviews_and_documented_nodata(undisturbed):
    for name, nodata, predictor in ((f"{STEM}_classes.tif", 255, None), (f"{STEM}_confidence.tif", 0, "3")):
        path = undisturbed / name
        valid, errors, _ = cog_validate(path, strict=True, quiet=True)
        assert valid, errors
        with rasterio.open(path) as src:
            assert src.width > 512 and src.overviews(1) == [2]  # bigger than one 512 px COG tile
            assert src.nodata == nodata
            assert src.tags(ns="IMAGE_STRUCTURE").get("PREDICTOR") == predictor


def test_zarr_store_opens_in_gdal_and_xarray_like_the_cogs(undisturbed):
    import rioxarray  # noqa: F401  (what a user imports for .rio)
    import xarray as xr

    store = undisturbed / "prediction.zarr"
    with rasterio.open(undisturbed / f"{STEM}_classes.tif") as cog:
        want, crs, transform = cog.read(1), cog.crs, cog.transform
    with rasterio.open(f'ZARR:"{store}":/class_id') as z:
        assert (z.crs, z.transform, z.nodata) == (crs, transform, 255)
        np.testing.assert_array_equal(z.read(1), want)
    with rasterio.open(f'ZARR:"{store}":/confidence') as z:
        assert z.nodata == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # consolidated metadata: xarray does not warn
        ds = xr.open_zarr(store)  # default decoding finds the CRS
    assert ds.class_id.rio.crs == crs and ds.rio.transform() == transform
    assert ds.class_id.encoding["_FillValue"] == 255 and ds.confidence.encoding["_FillValue"] == 0
    assert np.isnan(ds.class_id.values[want == 255]).all()  # CF decoding masks nodata, as GIS does
    assert [c["name"] for c in ds.attrs["class_schema"]["classes"]] == list(CLASSES.names)


def test_vectorize_takes_names_from_the_class_map_and_indexes_shapefiles(undisturbed, tmp_path):
    for source in (undisturbed / f"{STEM}_classes.tif", undisturbed / "prediction.zarr"):
        out = tmp_path / f"{source.stem}.shp"
        finished = run(cli("vectorize", source, "-o", out), timeout=300)
        assert finished.returncode == 0, finished.stderr
        info = pyogrio.read_info(out)
        assert info["crs"] == "EPSG:32119"
        assert list(info["fields"]) == ["class_id", "class_name", "area_m2", "perim_m"]
        assert out.with_suffix(".qix").stat().st_size > 0
        table = pyogrio.read_dataframe(out, read_geometry=False)
        assert set(table.class_name) <= set(CLASSES.names) and len(set(table.class_name)) >= 3
        names = dict(zip(CLASSES.ids, CLASSES.names, strict=True))
        assert (table.class_name == table.class_id.map(names)).all()


def test_quicklook_shows_the_class_map_in_its_colours_with_nodata_transparent(undisturbed):
    from PIL import Image

    png = np.asarray(Image.open(undisturbed / f"{STEM}_quicklook.png"))
    assert png.ndim == 3 and png.shape[2] == 4 and png.shape[1] == 900
    with rasterio.open(undisturbed / f"{STEM}_classes.tif") as src:
        ids = src.read(1)
    valid = ids != 255
    # the class map panel (right half, above the legend): each class's share of the picture's
    # coloured pixels follows its share of the map
    panel = png[: int(png.shape[0] * 0.85), png.shape[1] // 2 :]
    opaque = panel[..., 3] == 255
    colours = {c.id: c.rgb for c in CLASSES.classes}
    shown = {i: int((opaque & np.all(panel[..., :3] == rgb, axis=-1)).sum()) for i, rgb in colours.items()}
    total = sum(shown.values())
    assert total > 0.8 * opaque.sum()
    for i in colours:
        assert shown[i] / total == pytest.approx((ids[valid] == i).mean(), abs=0.03)


def test_quicklook_nodata_is_transparent_in_both_panels(tmp_path):
    from PIL import Image

    from geoseg.export.quicklook import quicklook_png

    rng = np.random.default_rng(0)
    ids = rng.choice(CLASSES.ids, size=(200, 200)).astype(np.uint8)
    bands = rng.integers(1, 200, size=(3, 200, 200)).astype(np.uint8)
    ids[75:125, 75:125] = 255  # a nodata hole in the middle: 1/16 of the area
    bands[:, 75:125, 75:125] = 0
    scene = write_geotiff(tmp_path / "s.tif", bands, nodata=0, band_names=["red", "green", "blue"])
    class_map = write_geotiff(tmp_path / "c.tif", ids, nodata=255)
    png = np.asarray(Image.open(io.BytesIO(quicklook_png(scene, class_map, CLASSES))))
    body = png[: int(png.shape[0] * 0.85)]
    for half in (body[:, : png.shape[1] // 2], body[:, png.shape[1] // 2 :]):
        opaque = half[..., 3] == 255
        rows = np.flatnonzero(opaque.sum(axis=1) > 0.5 * opaque.sum(axis=1).max())  # the image, not its title
        image = opaque[rows.min() : rows.max() + 1]
        cols = np.flatnonzero(image.any(axis=0))
        image = image[:, cols.min() : cols.max() + 1]
        assert not image[image.shape[0] // 2, image.shape[1] // 2]  # the hole is see-through
        assert (~image).mean() == pytest.approx(1 / 16, abs=0.01)  # and nothing else is
