"""Odd but valid scenes get a correct map; broken ones get one clear line.

Each scene is predicted with a checkpoint of its own band count, vectorise on, several blocks where
the scene has room: the class map has the input's grid, input-invalid pixels are nodata (255) and
every valid pixel has a class; the polygons cover exactly the valid pixels.
"""

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from conftest import make_tiny_checkpoint, random_scene, scene_with_alpha, scene_with_mask, write_geotiff
from processes import cli, run
from rasterio.crs import CRS
from rasterio.enums import ColorInterp
from rasterio.transform import Affine, from_origin

from geoseg.config import PredictConfig
from geoseg.pipeline import predict_raster

CFG = PredictConfig(block_size=64, vectorize=True)
F32_MIN = float(np.finfo(np.float32).min)  # -3.4e38, a common float nodata


def scene(tmp_path, name, shape, dtype, *, invalid=None, fill=None, **kw):
    data = random_scene(shape, dtype, seed=len(name))
    if invalid is not None:
        data[(slice(None), *invalid)] = fill
    return write_geotiff(tmp_path / f"{name}.tif", data, **kw)


HOLE = (slice(5, 20), slice(8, 30))
SCENES = {
    "geographic": lambda p: scene(p, "wgs84", (4, 80, 100), "float32", invalid=HOLE, fill=np.nan, crs="EPSG:4326",
                                  transform=from_origin(5.0, 45.0, 0.001, 0.001)),
    "geostationary": lambda p: scene(p, "geos", (3, 70, 90), "int16", invalid=HOLE, fill=-9999, nodata=-9999,
                                     crs="+proj=geos +h=35785831 +lon_0=0 +sweep=y +datum=WGS84 +units=m",
                                     transform=from_origin(-500000.0, 4500000.0, 3000.0, 3000.0)),
    "esri_wkt": lambda p: scene(p, "esri", (3, 70, 90), "uint16", crs=CRS.from_user_input("ESRI:102003").to_wkt(),
                                transform=from_origin(-2000000.0, 3000000.0, 30.0, 30.0)),
    "2x2": lambda p: scene(p, "tiny", (3, 2, 2), "uint8"),
    "1_band": lambda p: scene(p, "one", (1, 70, 90), "uint8", invalid=HOLE, fill=0, nodata=0),
    "13_bands_nan_nodata": lambda p: scene(p, "thirteen", (13, 70, 90), "float32", invalid=HOLE, fill=np.nan,
                                           nodata=np.nan),
    "uint16": lambda p: scene(p, "u16", (4, 70, 90), "uint16", invalid=HOLE, fill=0, nodata=0),
    "int16_negative_nodata": lambda p: scene(p, "i16", (6, 70, 90), "int16", invalid=HOLE, fill=-9999,
                                             nodata=-9999),
    "float32_min_nodata": lambda p: scene(p, "f32min", (4, 70, 90), "float32", invalid=HOLE, fill=F32_MIN,
                                          nodata=F32_MIN),
    "alpha_band": scene_with_alpha,
    "gdal_mask": scene_with_mask,
}


@pytest.mark.parametrize("kind", list(SCENES))
def test_odd_scene_gets_a_correct_map(kind, tmp_path):
    path = SCENES[kind](tmp_path)
    with rasterio.open(path) as src:
        data_bands = [i + 1 for i, c in enumerate(src.colorinterp) if c != ColorInterp.alpha]
        valid = np.all(src.read_masks() > 0, axis=0)
        if src.dtypes[0].startswith("float"):
            valid &= np.isfinite(src.read()).all(axis=0)
        grid = (src.crs, src.transform, src.shape)
        model_scene = path
        if len(data_bands) < src.count:  # the model knows the colour bands, not the alpha band
            model_scene = write_geotiff(tmp_path / "colour.tif", src.read(data_bands), crs=src.crs,
                                        transform=src.transform)
    checkpoint = make_tiny_checkpoint(tmp_path / "model.pt", model_scene)
    result = predict_raster(path, checkpoint, tmp_path / "out", config=CFG)
    with rasterio.open(result.outputs["class_map"]) as cls:
        assert (cls.crs, cls.transform, cls.shape) == grid
        classes = cls.read(1)
    assert (classes[~valid] == 255).all() and (classes[valid] != 255).all()
    assert valid.sum() == sum(a["pixels"] for a in result.class_areas) > 0
    polygons = gpd.read_file(result.outputs["polygons"])
    assert polygons.is_valid.all() and len(polygons) > 0
    pixel = abs(grid[1].a * grid[1].e)
    if not grid[0].is_geographic:
        unit = grid[0].linear_units_factor[1]
        assert polygons.area_m2.sum() == pytest.approx(valid.sum() * pixel * unit**2)


def corrupt(tmp_path):
    path = tmp_path / "corrupt.tif"
    path.write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    return path


def truncated(tmp_path):
    whole = scene(tmp_path, "whole", (3, 300, 300), "uint16", blocksize=64)
    data = whole.read_bytes()
    (tmp_path / "truncated.tif").write_bytes(data[: len(data) // 2])
    return tmp_path / "truncated.tif"


BROKEN = {
    "corrupt": (corrupt, "not a raster GDAL can read"),
    "truncated": (truncated, "corrupt or truncated"),
    "no_crs": (lambda p: scene(p, "nocrs", (3, 40, 40), "uint8", crs=None), "has no CRS"),
    "rotated": (lambda p: scene(p, "rot", (3, 40, 40), "uint8",
                                transform=Affine(10.0, 2.0, 500000.0, 2.0, -10.0, 4600000.0)), "rotated"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_scene_is_one_clear_line(kind, tiny_checkpoint, tmp_path):
    make, expected = BROKEN[kind]
    path = make(tmp_path)
    finished = run(cli("predict", path, "-c", tiny_checkpoint, "-o", tmp_path / "out"), timeout=120)
    assert finished.returncode == 2
    line = finished.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith(f"error: {path}: ") and expected in line, line
    assert not finished.started(), "refused before any worker started"
    assert not (tmp_path / "out").exists()
