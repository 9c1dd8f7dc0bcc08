"""Shared fixtures: tiny seeded GeoTIFFs with a real CRS, written on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.enums import ColorInterp
from rasterio.transform import from_origin
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
NC_SCENE = DATA / "nc-landsat-lulc" / "lsat7_2000_6band.tif"

os.environ.setdefault("PREFECT_HOME", str(ROOT / ".tmp" / "prefect"))
os.environ.setdefault("DASK_TEMPORARY_DIRECTORY", str(ROOT / ".tmp" / "dask"))


def write_geotiff(
    path: Path,
    data: np.ndarray,
    *,
    crs: str | None = "EPSG:32633",
    transform=None,
    nodata: float | None = None,
    band_names: list[str] | None = None,
    blocksize: int | None = None,
) -> Path:
    """Write ``data`` (bands, h, w) as a GeoTIFF with a real CRS and a 10 m north-up transform."""
    if data.ndim == 2:
        data = data[None]
    count, h, w = data.shape
    profile = dict(
        driver="GTiff", width=w, height=h, count=count, dtype=data.dtype.name, crs=crs, nodata=nodata,
        transform=transform if transform is not None else from_origin(500000.0, 4600000.0, 10.0, 10.0),
    )
    if blocksize:
        profile.update(tiled=True, blockxsize=blocksize, blockysize=blocksize)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, name in enumerate(band_names or []):
            dst.set_band_description(i + 1, name)
    return path


def random_scene(shape: tuple[int, int, int], dtype: str, seed: int = 0) -> np.ndarray:
    """Seeded, spatially smooth-ish random bands in the range of ``dtype``."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    base = rng.random((c, h, w)).cumsum(axis=1).cumsum(axis=2)
    base = (base - base.min()) / (np.ptp(base) + 1e-9)
    base = 0.7 * base + 0.3 * rng.random((c, h, w))
    if np.issubdtype(np.dtype(dtype), np.integer):
        return (base * np.iinfo(dtype).max * 0.9).astype(dtype)
    return base.astype(dtype)


@pytest.fixture
def make_scene(tmp_path):
    """Factory: ``make_scene(shape=(3, 37, 53), dtype='uint8', crs=..., nodata=..., name=...)``."""

    def _make(shape=(3, 37, 53), dtype="uint8", *, crs="EPSG:32633", nodata=None, seed=0, name=None, **kw):
        path = tmp_path / (name or f"scene_{shape[0]}b_{dtype}_{seed}.tif")
        return write_geotiff(path, random_scene(shape, dtype, seed), crs=crs, nodata=nodata, **kw)

    return _make


@pytest.fixture
def utm_uint16(tmp_path):
    """4-band uint16 scene in UTM 33N with nodata 0 in its top-left corner, odd size."""
    data = random_scene((4, 61, 47), "uint16", seed=1)
    data[:, :5, :7] = 0
    return write_geotiff(tmp_path / "utm_uint16.tif", data, nodata=0, blocksize=16)


@pytest.fixture
def wgs84_float_nan(tmp_path):
    """13-band float32 scene in EPSG:4326 with a NaN hole and no nodata value."""
    data = random_scene((13, 29, 31), "float32", seed=2)
    data[:, 10:14, 10:15] = np.nan
    return write_geotiff(
        tmp_path / "wgs84_float.tif", data, crs="EPSG:4326", transform=from_origin(5.0, 45.0, 0.001, 0.001)
    )


@pytest.fixture
def rgb_uint8(tmp_path):
    """3-band uint8 scene with named bands, 40x33."""
    return write_geotiff(
        tmp_path / "rgb.tif", random_scene((3, 40, 33), "uint8", seed=3), band_names=["red", "green", "blue"]
    )


def scene_with_alpha(tmp_path: Path) -> Path:
    """A 4-band uint8 RGBA scene, 70x90, whose alpha band masks rows 10-29, columns 20-49."""
    path = write_geotiff(tmp_path / "rgba.tif", random_scene((4, 70, 90), "uint8", seed=4))
    with rasterio.open(path, "r+") as dst:
        alpha = np.full((70, 90), 255, np.uint8)
        alpha[10:30, 20:50] = 0
        dst.write(alpha, 4)
        dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
    return path


def scene_with_mask(tmp_path: Path) -> Path:
    """A 3-band uint16 scene, 70x90, whose internal GDAL mask hides rows 40 on, columns 0-24."""
    path = write_geotiff(tmp_path / "masked.tif", random_scene((3, 70, 90), "uint16", seed=6))
    mask = np.full((70, 90), 255, np.uint8)
    mask[40:, :25] = 0
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "r+") as dst:
        dst.write_mask(mask)
    return path


def make_tiny_checkpoint(path: Path, scene: Path, *, tile: int = 64, seed: int = 0,
                         normalisation: str = "fixed") -> Path:
    """A seeded stand-in model (geoseg ``tiny`` arch, receptive field 15 px) for ``scene``'s bands."""
    import torch

    from geoseg.checkpoint import contract_for, save_checkpoint
    from geoseg.config import ModelConfig, load_config
    from geoseg.models import build_model
    from geoseg.raster import band_stats, open_scene

    info = open_scene(scene)
    classes = load_config(ROOT / "configs" / "classes" / "nc_landcover.yaml")
    torch.manual_seed(seed)
    model = build_model("tiny", "none", info.count, len(classes.classes))
    mean, std = band_stats(info)
    contract = contract_for(
        ModelConfig(arch="tiny", backbone="none", tile_size=tile), band_names=info.band_names,
        mean=mean, std=std, classes=classes, normalisation=normalisation,
    )
    return save_checkpoint(path, model, contract)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Tiny stand-in checkpoint for the real NC Landsat sample (6 bands, 7 classes), tile 64."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", NC_SCENE)


def upsampled_scene(path: Path, factor: int, *, source: Path = NC_SCENE, bands: tuple[int, ...] | None = None,
                    window: Window | None = None, dtype: str = "int16", nodata: float = -9999) -> Path:
    """A real scene (the NC sample by default) enlarged ``factor`` times (nearest), as a user's larger
    scene looks: ``bands`` of its ``window`` as ``dtype`` with invalid pixels set to ``nodata``, tiled
    256 px, deflate."""
    from rasterio.enums import Resampling

    with rasterio.open(source) as src:
        window = window or Window(0, 0, src.width, src.height)
        bands = bands or tuple(range(1, src.count + 1))
        h, w = int(window.height) * factor, int(window.width) * factor
        data = src.read(bands, window=window, out_shape=(len(bands), h, w), resampling=Resampling.nearest,
                        masked=True)
        transform = src.window_transform(window)
        profile = dict(driver="GTiff", width=w, height=h, count=len(bands), dtype=dtype, nodata=nodata,
                       crs=src.crs, transform=transform @ transform.scale(1 / factor), tiled=True, blockxsize=256,
                       blockysize=256, compress="deflate")
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(np.where(data.mask, nodata, data.filled(0)).astype(dtype))
            dst.descriptions = [src.descriptions[b - 1] for b in bands]
    return path


@pytest.fixture(scope="session")
def scene_x2(tmp_path_factory) -> Path:
    """The NC sample at 2x (978 x 886 px, int16, nodata -9999): 5 x 4 blocks at ``block_size: 256``."""
    return upsampled_scene(tmp_path_factory.mktemp("scenes") / "nc_x2.tif", 2)


@pytest.fixture(scope="session")
def undisturbed(scene_x2, tiny_checkpoint, tmp_path_factory) -> Path:
    """Outputs of an undisturbed `geoseg predict` of ``scene_x2`` (block size 256, one worker, polygons on)."""
    from processes import cli, run

    out = tmp_path_factory.mktemp("undisturbed")
    finished = run(cli("predict", scene_x2, "-c", tiny_checkpoint, "-o", out, "--block-size", "256", "--workers", 1),
                   timeout=300)
    assert finished.returncode == 0, finished.stderr
    return out


@pytest.fixture(scope="session")
def harness():
    """One temporary Prefect server (prefect_test_harness) shared by the flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def flow_run_artifacts(flow_run_id) -> list:
    """All artifacts of a flow run, read back through the Prefect client."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            )

    return asyncio.run(read())


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A 3-band 128x128 uint8 scene whose classes follow band 1, labels as a raster, a class schema."""
    d = tmp_path_factory.mktemp("tiny")
    img = random_scene((3, 128, 128), "uint8", seed=5)
    ids = np.digitize(img[0], np.percentile(img[0], [33, 66])).astype(np.uint8) + 1  # ids 1, 2, 3
    ids[:8, :8] = 0  # label nodata
    scene = write_geotiff(d / "scene.tif", img, band_names=["red", "green", "blue"])
    labels = write_geotiff(d / "labels.tif", ids, nodata=0)
    classes = d / "classes.yaml"
    classes.write_text(yaml.safe_dump({"name": "tiny", "classes": [
        {"id": 1, "name": "low", "color": "#0000ff"}, {"id": 2, "name": "mid", "color": "#00ff00"},
        {"id": 3, "name": "high", "color": "#ff0000"}]}))
    return {"kind": "scene_raster", "images": str(scene), "labels": str(labels), "classes": str(classes)}
