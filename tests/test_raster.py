import ctypes
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import NC_SCENE, random_scene, scene_with_alpha, scene_with_mask, write_geotiff
from rasterio.transform import Affine

from geoseg.errors import BandMismatchError, GeosegError, InvalidSceneError, SceneNotFoundError
from geoseg.raster import (
    band_stats,
    check_bands,
    gdal_env,
    open_scene,
    read_valid,
    read_window,
    require_valid_pixels,
    resolve_bands,
)
from geoseg.tiling import Box


def test_open_real_sample():
    s = open_scene(NC_SCENE)
    assert (s.width, s.height, s.count, s.dtype) == (489, 443, 6, "uint8")
    assert s.band_names == ("blue", "green", "red", "nir", "swir1", "swir2")
    assert s.transform.a == 28.5 and s.crs.is_projected and s.nodata == 0


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
@pytest.mark.parametrize("bands", [3, 4, 13])
def test_open_generated(make_scene, dtype, bands):
    s = open_scene(make_scene((bands, 23, 19), dtype))
    assert (s.count, s.dtype, s.height, s.width) == (bands, dtype, 23, 19)


def test_missing_file(tmp_path):
    with pytest.raises(SceneNotFoundError, match="no such file"):
        open_scene(tmp_path / "nope.tif")
    with pytest.raises(FileNotFoundError):
        open_scene(tmp_path / "nope.tif")


def test_not_a_raster(tmp_path):
    p = tmp_path / "notes.tif"
    p.write_text("hello, I am not a GeoTIFF")
    with pytest.raises(InvalidSceneError, match="not a raster"):
        open_scene(p)


def test_truncated(tmp_path):
    p = write_geotiff(tmp_path / "full.tif", random_scene((3, 300, 300), "uint16"), blocksize=64)
    data = p.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InvalidSceneError, match="corrupt or truncated") as e:
        open_scene(cut)
    assert str(cut) in str(e.value)


def test_no_crs(tmp_path):
    p = write_geotiff(tmp_path / "nocrs.tif", random_scene((3, 10, 10), "uint8"), crs=None)
    with pytest.raises(InvalidSceneError, match="no CRS"):
        open_scene(p)


def test_no_geotransform(tmp_path):
    p = write_geotiff(tmp_path / "nogt.tif", random_scene((3, 10, 10), "uint8"), transform=Affine.identity())
    with pytest.raises(InvalidSceneError, match="no geotransform"):
        open_scene(p)


def test_rotated(tmp_path):
    t = Affine(10, 2, 500000, 1, -10, 4600000)
    p = write_geotiff(tmp_path / "rot.tif", random_scene((3, 10, 10), "uint8"), transform=t)
    with pytest.raises(InvalidSceneError, match="rotated or sheared"):
        open_scene(p)


def test_unsupported_dtype(tmp_path):
    p = write_geotiff(tmp_path / "c.tif", (np.ones((1, 5, 5)) * (1 + 1j)).astype("complex64"))
    with pytest.raises(InvalidSceneError, match="complex64"):
        open_scene(p)


def test_all_invalid(tmp_path):
    p = write_geotiff(tmp_path / "empty.tif", np.zeros((3, 20, 20), "uint8"), nodata=0)
    s = open_scene(p)
    with pytest.raises(InvalidSceneError, match="every pixel is invalid"):
        band_stats(s)
    with pytest.raises(InvalidSceneError, match="every pixel is invalid"):
        require_valid_pixels(s)


def test_valid_pixels_in_one_edge_strip_are_found(tmp_path):
    data = np.zeros((3, 64, 20), "uint8")
    data[:, 0, 3] = 7  # one valid pixel in the first row: the strip read last
    require_valid_pixels(open_scene(write_geotiff(tmp_path / "edge.tif", data, nodata=0)))
    nan = np.full((1, 64, 20), np.nan, "float32")
    with pytest.raises(InvalidSceneError, match="every pixel is invalid"):
        require_valid_pixels(open_scene(write_geotiff(tmp_path / "nan.tif", nan)))


def test_bands_by_name_and_index(rgb_uint8):
    s = open_scene(rgb_uint8)
    assert resolve_bands(s, ["blue", "red"]) == (3, 1)
    assert resolve_bands(s, [2, "3"]) == (2, 3)
    assert resolve_bands(s, None) == (1, 2, 3)
    with pytest.raises(BandMismatchError, match="nir"):
        resolve_bands(s, ["nir"])
    with pytest.raises(BandMismatchError, match="1..3"):
        resolve_bands(s, [4])


def test_check_bands_order_and_count(rgb_uint8, utm_uint16):
    s = open_scene(rgb_uint8)
    assert check_bands(s, ["blue", "green", "red"]) == (3, 2, 1)
    with pytest.raises(BandMismatchError, match="do not match"):
        check_bands(s, ["a", "b", "c"])
    with pytest.raises(BandMismatchError, match="expects 6"):
        check_bands(open_scene(utm_uint16), list("abcdef"))
    assert check_bands(open_scene(utm_uint16), list("abcd")) == (1, 2, 3, 4)


def test_read_window_padding_and_mask(utm_uint16):
    s = open_scene(utm_uint16)
    with rasterio.open(s.path) as src:
        full = src.read().astype(np.float32)
        data, valid = read_window(src, Box(-3, -2, 10, 12))
    assert data.shape == (4, 13, 14) and valid.shape == (13, 14)
    np.testing.assert_array_equal(data[:, 3:, 2:], full[:, :10, :12])
    np.testing.assert_array_equal(data[:, 2, 2:], full[:, 1, :12])  # mirrored about the top edge
    assert not valid[:3].any() and not valid[:, :2].any()
    assert not valid[3:8, 2:9].any()  # nodata corner (rows 0-4, cols 0-6)
    assert valid[8:, 9:].all()


def test_read_window_nan_is_invalid(wgs84_float_nan):
    with rasterio.open(wgs84_float_nan) as src:
        data, valid = read_window(src, Box(0, 0, 29, 31))
    assert not valid[10:14, 10:15].any() and valid.sum() == 29 * 31 - 20
    assert np.isfinite(data).all()


@pytest.mark.parametrize("kind", ["nodata", "nan", "alpha", "mask"])
@pytest.mark.parametrize("out_shape", [None, (20, 16)])
def test_read_valid_equals_gdal_masks(kind, out_shape, utm_uint16, wgs84_float_nan, tmp_path):
    """Validity judged from the values (integer nodata) or read from GDAL equals GDAL's masks, decimated too."""
    scenes = {"nodata": lambda: utm_uint16, "nan": lambda: wgs84_float_nan,
              "alpha": lambda: scene_with_alpha(tmp_path), "mask": lambda: scene_with_mask(tmp_path)}
    path = scenes[kind]()
    with rasterio.open(path) as src:
        bands = list(range(1, 4))
        data, valid = read_valid(src, bands, out_shape=out_shape)
        shape = None if out_shape is None else (3, *out_shape)
        expected = src.read(bands, out_shape=shape, out_dtype="float32")
        gdal_valid = np.all(src.read_masks(bands, out_shape=shape) > 0, axis=0) & np.isfinite(expected).all(axis=0)
    np.testing.assert_array_equal(valid, gdal_valid)
    np.testing.assert_array_equal(data, np.nan_to_num(expected, nan=0.0))
    assert 0 < valid.sum() < valid.size


def test_band_stats_match_numpy_on_small_scene(utm_uint16):
    s = open_scene(utm_uint16)
    mean, std = band_stats(s)
    with rasterio.open(s.path) as src:
        a = src.read().astype(np.float64)
    ok = (a != 0).all(axis=0)
    np.testing.assert_allclose(mean, a[:, ok].mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(std, a[:, ok].std(axis=1), rtol=1e-4)


def test_band_stats_sample_windows_only(tmp_path):
    p = write_geotiff(tmp_path / "big.tif", random_scene((2, 600, 700), "uint16", seed=4), blocksize=128)
    mean, std = band_stats(open_scene(p), windows=4, window_size=64)
    assert mean.shape == (2,) and (std > 0).all()


def test_errors_share_root(tmp_path):
    with pytest.raises(GeosegError):
        open_scene(tmp_path / "missing.tif")


@pytest.mark.parametrize("box", [Box(-40, -3, 5, 90), Box(50, 30, 130, 60), Box(-7, -7, 68, 54), Box(3, 4, 9, 11)])
def test_read_window_equals_whole_scene_reflect(utm_uint16, box):
    with rasterio.open(utm_uint16) as src:
        full = src.read().astype(np.float32)
        data, valid = read_window(src, box)
    pad = 200
    ref = np.pad(full, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    np.testing.assert_array_equal(data, ref[:, box.y0 + pad:box.y1 + pad, box.x0 + pad:box.x1 + pad])
    inside = box.intersection(Box(0, 0, 61, 47))
    assert valid.sum() <= inside.height * inside.width


def _rasterio_libgdal() -> ctypes.CDLL:
    """The libgdal rasterio loaded into this process (pyogrio's wheel maps its own copy beside it)."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    paths = {line.split()[-1] for line in maps if "libgdal" in line}
    ours = {p for p in paths if "rasterio" in p} or paths
    assert len(ours) == 1, f"cannot tell rasterio's libgdal among {sorted(paths)}"
    lib = ctypes.CDLL(ours.pop())
    lib.GDALGetCacheMax64.restype = ctypes.c_int64
    return lib


def test_gdal_env_bounds_the_block_cache_to_64_mb():
    lib = _rasterio_libgdal()
    with gdal_env():
        assert lib.GDALGetCacheMax64() == 64 * 2**20


def test_an_unnamed_equivalent_of_an_epsg_crs_is_named_and_a_custom_one_kept():
    from rasterio.crs import CRS

    from geoseg.raster import identified_crs

    with rasterio.open(NC_SCENE) as src:  # PROJCS["unnamed", ... DATUM["unknown" ...: EPSG:32119
        assert src.crs.to_authority(confidence_threshold=100) is None
        named = identified_crs(src.crs)
    assert named.to_authority(confidence_threshold=100) == ("EPSG", "32119") and named == src.crs
    custom = CRS.from_proj4("+proj=tmerc +lat_0=0 +lon_0=15.5 +k=0.9996 +x_0=500000 +y_0=0 +datum=WGS84 +units=m")
    assert identified_crs(custom) is custom
    utm = CRS.from_epsg(32633)
    assert identified_crs(utm) is utm
