"""The main job at real shape, as users run it: several blocks, polygons on, CLI and flow, in real processes.

Each command runs with a timeout that fails the test instead of hanging CI (the vectorise stage
once hung forever here: it forked a process that held torch and Dask threads).
"""

import json

import numpy as np
import pytest
import rasterio
from processes import cli, flow, polygons, run

from geoseg.config import load_config
from geoseg.vector import vectorize

CLASSES = "configs/classes/nc_landcover.yaml"


def check_run(out, scene, finished, *, stem="nc_x2"):
    assert finished.returncode == 0, finished.stderr
    assert "Traceback" not in finished.stderr + finished.stdout
    assert not finished.left_running(), "no worker, pool or server process outlives the run"
    with rasterio.open(scene) as src, rasterio.open(out / f"{stem}_classes.tif") as cls:
        assert (cls.crs, cls.transform, cls.shape) == (src.crs, src.transform, src.shape)
        invalid = ~np.all(src.read_masks() > 0, axis=0)
        classes = cls.read(1)
        assert (classes[invalid] == 255).all() and (classes[~invalid] != 255).all()
    # the polygons equal `geoseg vectorize` of the same class map, polygonised as one block
    reference = out.parent / f"{out.name}_reference.gpkg"
    vectorize(out / f"{stem}_classes.tif", reference, classes=load_config(CLASSES),
              confidence=out / f"{stem}_confidence.tif", block_size=4096, workers=1)
    got = polygons(out / f"{stem}_polygons.gpkg")
    assert len(got) > 100
    assert got == polygons(reference)
    return classes


@pytest.mark.slow
def test_cli_predict_with_polygons_on_many_blocks(scene_x2, tiny_checkpoint, tmp_path):
    """One worker (blocks and polygons in the CLI's process) and two (both on a local Dask cluster)."""
    maps = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        finished = run(cli("predict", scene_x2, "-c", tiny_checkpoint, "-o", out, "--block-size", "256",
                           "--workers", workers), timeout=300)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["grid"]["blocks"] >= 16 and f"{summary['grid']['blocks']} blocks computed" in finished.stdout
        maps.append(check_run(out, scene_x2, finished))
        if workers == 2:
            assert len(finished.started("spawn_main")) >= 2, "the blocks and polygons ran on worker processes"
    np.testing.assert_array_equal(*maps)


@pytest.mark.slow
def test_flow_predict_with_polygons_on_many_blocks(scene_x2, tiny_checkpoint, tmp_path):
    config = tmp_path / "predict.yaml"
    config.write_text("block_size: 256\nworkers: 2\n")
    out = tmp_path / "flow"
    finished = run(flow(scene_x2, tiny_checkpoint, out, config), timeout=400)
    check_run(out, scene_x2, finished)
    assert "vectorise: done" in finished.stderr and f"outputs in {out}" in finished.stdout


def test_vectorize_pool_matches_one_process(scene_x2, tiny_checkpoint, tmp_path):
    """`geoseg vectorize` polygonises blocks in spawned processes: same polygons as in one process."""
    out = tmp_path / "p"
    assert run(cli("predict", scene_x2, "-c", tiny_checkpoint, "-o", out, "--block-size", "512", "--workers", 1,
                   "--no-vectorize"), timeout=300).returncode == 0
    pooled = tmp_path / "pooled.gpkg"
    finished = run(cli("vectorize", out / "nc_x2_classes.tif", "-o", pooled, "--classes", CLASSES,
                       "--block-size", "200"), timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert finished.started("spawn_main") and not finished.left_running(), "blocks ran in spawned processes"
    single = vectorize(out / "nc_x2_classes.tif", tmp_path / "single.gpkg", classes=load_config(CLASSES),
                       block_size=4096, workers=1)
    assert polygons(pooled) == polygons(single.path)
