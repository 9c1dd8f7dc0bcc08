"""The predict job end to end on the real sample: georeferencing, workers, resume, clusters."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import rasterio
import zarr
from conftest import NC_SCENE, random_scene, write_geotiff
from distributed import Client

from geoseg.cluster import dask_client
from geoseg.config import PredictConfig
from geoseg.errors import BandMismatchError, ConfigError, OutputExistsError, SceneNotFoundError
from geoseg.pipeline import plan_run, predict_raster
from geoseg.worker import worker_predictor

CFG = PredictConfig(block_size=128, batch_size=8, vectorize=False)


def read_outputs(out):
    with rasterio.open(out / "lsat7_2000_6band_classes.tif") as c, \
            rasterio.open(out / "lsat7_2000_6band_confidence.tif") as f:
        return c.read(1), f.read(1)


@pytest.fixture(scope="module")
def plan(tiny_checkpoint, tmp_path_factory):
    return plan_run(NC_SCENE, tiny_checkpoint, tmp_path_factory.mktemp("plan"), config=CFG)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    result = predict_raster(NC_SCENE, tiny_checkpoint, out, config=CFG)
    return out, result


def test_outputs_keep_the_input_grid(reference, plan):
    out, result = reference
    with rasterio.open(NC_SCENE) as src, rasterio.open(out / "lsat7_2000_6band_classes.tif") as cls:
        assert cls.crs == src.crs and cls.transform == src.transform
        assert (cls.width, cls.height) == (src.width, src.height)
        assert cls.nodata == 255 and cls.colormap(1)[5][:3] == (0x1A, 0x96, 0x41)
        assert cls.tags(1)["CLASS_6"] == "water"
        assert cls.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        invalid = ~np.all(src.read_masks() > 0, axis=0)
        assert (cls.read(1)[invalid] == 255).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["grid"]["blocks"] == result.blocks_computed == len(plan.blocks) > 4
    assert len(summary["checkpoint"]["sha256"]) == 64
    total = sum(a["pixels"] for a in summary["class_areas"])
    assert total == int((~invalid).sum())
    assert sum(a["percent"] for a in summary["class_areas"]) == pytest.approx(100)
    assert summary["class_areas"][0]["area_km2"] == pytest.approx(
        summary["class_areas"][0]["pixels"] * 28.5 * 28.5 / 1e6)


def test_two_worker_processes_give_identical_bytes(reference, plan, tiny_checkpoint, tmp_path):
    out, _ = reference
    with dask_client(workers=2, device="cpu") as client:
        result = predict_raster(NC_SCENE, tiny_checkpoint, tmp_path, config=CFG, client=client)
        loads = client.run(lambda: worker_predictor.cache_info().misses)
    assert result.blocks_computed == len(plan.blocks)
    assert sorted(loads.values()) == [1, 1], "each worker loads the checkpoint exactly once"
    ref_cls, ref_conf = read_outputs(out)
    cls, conf = read_outputs(tmp_path)
    np.testing.assert_array_equal(cls, ref_cls)
    np.testing.assert_array_equal(conf, ref_conf)


def test_resume_redoes_only_unfinished_blocks(reference, plan, tiny_checkpoint, tmp_path):
    out, _ = reference
    predict_raster(NC_SCENE, tiny_checkpoint, tmp_path, config=CFG)
    # simulate a crash: three blocks lost their data and were never marked done; the partial sums of
    # the finished run are gone, so the neighbours rerun the tiles that reach the three blocks' shared cells
    group = zarr.open_group(tmp_path / "prediction.zarr", mode="r+")
    for b in (plan.blocks[0], plan.blocks[5], plan.blocks[-1]):
        group["block_done"][b.row, b.col] = group["tiles_done"][b.row, b.col] = 0
        group["class_id"][b.core.y0:b.core.y1, b.core.x0:b.core.x1] = 0
    (tmp_path / "lsat7_2000_6band_classes.tif").unlink()
    result = predict_raster(NC_SCENE, tiny_checkpoint, tmp_path, config=CFG)
    assert (result.blocks_computed, result.blocks_skipped) == (3, len(plan.blocks) - 3)
    np.testing.assert_array_equal(read_outputs(tmp_path)[0], read_outputs(out)[0])


def test_used_out_dir_with_other_settings_is_refused(reference, tiny_checkpoint):
    out, _ = reference
    other = PredictConfig(block_size=256, vectorize=False)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        predict_raster(NC_SCENE, tiny_checkpoint, out, config=other)


def test_overwrite_replaces(tiny_checkpoint, tmp_path):
    predict_raster(NC_SCENE, tiny_checkpoint, tmp_path, config=CFG)
    other = PredictConfig(block_size=256, vectorize=False)
    result = predict_raster(NC_SCENE, tiny_checkpoint, tmp_path, config=other, overwrite=True)
    assert result.blocks_computed < 16
    assert json.loads((tmp_path / "summary.json").read_text())["settings"]["block_size"] == 256


def test_band_mismatch_refused_before_compute(tiny_checkpoint, tmp_path):
    scene = write_geotiff(tmp_path / "rgb.tif", random_scene((3, 40, 40), "uint8"))
    with pytest.raises(BandMismatchError, match="expects 6"):
        predict_raster(scene, tiny_checkpoint, tmp_path / "out", config=CFG)
    assert not (tmp_path / "out").exists()


def test_missing_scene(tiny_checkpoint, tmp_path):
    with pytest.raises(SceneNotFoundError):
        predict_raster(tmp_path / "none.tif", tiny_checkpoint, tmp_path / "out", config=CFG)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_real_scheduler_and_worker_processes(reference, plan, tiny_checkpoint, tmp_path):
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bin_dir = os.path.dirname(sys.executable)
    procs = [subprocess.Popen([f"{bin_dir}/dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(2):
            procs.append(subprocess.Popen(
                [f"{bin_dir}/dask", "worker", addr, "--nthreads", "1", "--no-dashboard",
                 "--local-directory", str(tmp_path / "dask")],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with Client(addr, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
            assert len(client.scheduler_info()["workers"]) == 2
        cfg = PredictConfig(block_size=128, vectorize=False, scheduler=addr)
        with dask_client(scheduler=addr) as client:
            result = predict_raster(NC_SCENE, tiny_checkpoint, tmp_path / "out", config=cfg, client=client)
            hosts = client.run(lambda: worker_predictor.cache_info().misses)
        assert result.blocks_computed == len(plan.blocks) and sum(hosts.values()) == 2
        np.testing.assert_array_equal(read_outputs(tmp_path / "out")[0], read_outputs(reference[0])[0])
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_vectorise_stage_writes_polygons_matching_the_class_map(tiny_checkpoint, tmp_path):
    import geopandas as gpd

    cfg = PredictConfig(block_size=128, vectorize=True)
    result = predict_raster(NC_SCENE, tiny_checkpoint, tmp_path, config=cfg)
    polygons = gpd.read_file(result.outputs["polygons"])
    # the scene's unnamed WKT is EPSG:32119: the polygons carry the EPSG-named CRS
    assert polygons.crs.to_epsg() == 32119 and polygons.crs.name == "NAD83 / North Carolina"
    assert rasterio.crs.CRS.from_wkt(polygons.crs.to_wkt()) == rasterio.open(NC_SCENE).crs
    assert polygons.is_valid.all()
    for area in result.class_areas:
        got = polygons.loc[polygons.class_id == area["class_id"], "area_m2"].sum()
        assert got == pytest.approx(area["area_km2"] * 1e6, rel=1e-6)
    assert polygons["mean_conf"].between(1 / 7 - 1e-6, 1).all()


def test_release_freed_memory_returns_pages_to_the_os():
    """After a block, freed heap pages go back to the OS (see geoseg.heap); True wherever glibc is."""
    import ctypes.util
    import sys

    import psutil

    from geoseg.heap import one_arena, release_freed_memory

    glibc = sys.platform.startswith("linux") and "libc.so" in (ctypes.util.find_library("c") or "")
    assert release_freed_memory() is glibc
    assert one_arena() is glibc
    if glibc:
        chunks = [bytearray(64 * 1024) for _ in range(4000)]  # 250 MiB of heap (below the mmap threshold)
        del chunks[:-1]  # all but the top one free: glibc cannot shrink the heap by itself
        before = psutil.Process().memory_info().rss
        release_freed_memory()
        assert psutil.Process().memory_info().rss < before - 100 * 2**20


def test_margin_setting_overrides_the_models_and_is_checked(tiny_checkpoint, tmp_path):
    default = plan_run(NC_SCENE, tiny_checkpoint, tmp_path / "a", config=PredictConfig())
    assert default.grid.margin == 8  # the tiny model's 15 px receptive field, half of it rounded up
    wide = plan_run(NC_SCENE, tiny_checkpoint, tmp_path / "a", config=PredictConfig(margin=16))
    assert (wide.grid.margin, wide.grid.stride) == (16, 32) and wide.tiles > default.tiles
    assert plan_run(NC_SCENE, tiny_checkpoint, tmp_path / "a", config=PredictConfig(margin=0)).grid.stride == 64
    with pytest.raises(ConfigError, match="margin 17 px does not fit tile 64 px of this model: use one of 0, 1,"):
        plan_run(NC_SCENE, tiny_checkpoint, tmp_path / "a", config=PredictConfig(margin=17))
