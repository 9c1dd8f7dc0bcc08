"""The geoseg command as a user runs it: subprocesses, exit codes, one-line errors, no overwrite."""

import subprocess
import sys

import geopandas as gpd
import rasterio
from conftest import NC_SCENE, ROOT


def geoseg(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "geoseg", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=600)


def test_info():
    r = geoseg("info", NC_SCENE)
    assert r.returncode == 0 and "489 x 443 px, 6 bands" in r.stdout and "EPSG:32119" in r.stdout


def test_bad_input_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_text("garbage")
    r = geoseg("info", bad)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: ") and "not a raster" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_predict_then_vectorize_and_refuse_overwrite(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    args = ("predict", NC_SCENE, "--checkpoint", tiny_checkpoint, "--out", out, "--block-size", "256",
            "--workers", "1", "--no-vectorize")
    r = geoseg(*args)
    assert r.returncode == 0, r.stderr
    assert "blocks computed" in r.stdout
    with rasterio.open(out / "lsat7_2000_6band_classes.tif") as cls, rasterio.open(NC_SCENE) as src:
        assert cls.transform == src.transform and cls.crs == src.crs

    r = geoseg(*args[:-3], "--block-size", "128", "--workers", "1", "--no-vectorize")
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr

    gpkg = tmp_path / "polygons.gpkg"
    r = geoseg("vectorize", out / "lsat7_2000_6band_classes.tif", "--out", gpkg,
               "--classes", ROOT / "configs/classes/nc_landcover.yaml")
    assert r.returncode == 0, r.stderr
    polygons = gpd.read_file(gpkg)
    assert len(polygons) > 0 and set(polygons.class_name) <= {"developed", "agriculture", "herbaceous",
                                                               "shrubland", "forest", "water", "sediment"}
    r = geoseg("vectorize", out / "lsat7_2000_6band_classes.tif", "--out", gpkg)
    assert r.returncode == 2 and "exists" in r.stderr
