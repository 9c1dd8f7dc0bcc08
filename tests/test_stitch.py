"""Seam-free stitching: blocked equals whole-scene, and borders do not show in the class map."""

import numpy as np
import pytest
import rasterio
from conftest import NC_SCENE

from geoseg.checkpoint import load_checkpoint
from geoseg.predict import Predictor
from geoseg.raster import read_window
from geoseg.stitch import CLASS_NODATA, blend_block, blend_window, seam_index
from geoseg.tiling import TileGrid, align_block_size, plan_blocks


def stitch_scene(checkpoint, grid: TileGrid, block_size: int):
    """Run every block of the real sample through blend_block and assemble class map + confidence."""
    model, contract = load_checkpoint(checkpoint)
    predictor = Predictor(model, contract, device="cpu", batch_size=4)
    class_map = np.full((grid.height, grid.width), 7, dtype=np.uint8)
    conf = np.zeros((grid.height, grid.width), dtype=np.float32)
    with rasterio.open(NC_SCENE) as src:
        for b in plan_blocks(grid, block_size):
            data, valid = read_window(src, b.read)
            r = blend_block(b, contract.normalise(data, valid), valid, predictor.predict_proba,
                            margin=grid.margin, class_ids=contract.classes.ids, batch_size=4)
            class_map[b.core.y0:b.core.y1, b.core.x0:b.core.x1] = r.class_id
            conf[b.core.y0:b.core.y1, b.core.x0:b.core.x1] = r.confidence
    return class_map, conf


def test_blend_window_shape():
    w = blend_window(64, 16)
    assert w.shape == (64, 64) and w[16:48, 16:48].min() == 1.0
    assert 0 < w[0, 0] < 2e-5 and np.allclose(w, w.T) and np.allclose(w, w[::-1, ::-1])
    assert (np.diff(w[32, :17]) > 0).all()
    assert (blend_window(64, 0) == 1).all()


@pytest.fixture(scope="module")
def whole_scene(tiny_checkpoint):
    grid = TileGrid(443, 489, 64, 16)
    return grid, stitch_scene(tiny_checkpoint, grid, 4096)


@pytest.mark.parametrize("block_size", [32, 100, 160])
def test_blocked_equals_whole_scene(tiny_checkpoint, whole_scene, block_size):
    grid, (ref_cls, ref_conf) = whole_scene
    cls, conf = stitch_scene(tiny_checkpoint, grid, align_block_size(block_size, grid))
    np.testing.assert_array_equal(cls, ref_cls)
    np.testing.assert_allclose(conf, ref_conf, rtol=0, atol=1e-6)


def test_nodata_pixels_get_nodata_class(whole_scene):
    _, (cls, conf) = whole_scene
    with rasterio.open(NC_SCENE) as src:
        invalid = ~np.all(src.read_masks() > 0, axis=0)
    assert invalid.any()
    assert (cls[invalid] == CLASS_NODATA).all() and (cls[~invalid] != CLASS_NODATA).all()
    assert (conf[invalid] == 0).all() and (conf[~invalid] >= 1 / 7 - 1e-6).all()


def test_seam_index_blended_vs_naive(tiny_checkpoint, whole_scene):
    grid, (cls, _) = whole_scene
    block = align_block_size(96, grid)
    blended, _ = stitch_scene(tiny_checkpoint, grid, block)
    m, s = grid.margin, grid.stride
    lines = np.unique(np.r_[np.arange(-m, 500, s), np.arange(m, 500, s), np.arange(0, 500, block)])
    blended_index = seam_index(blended, lines, lines)

    naive_grid = TileGrid(443, 489, 64, 0)
    naive, _ = stitch_scene(tiny_checkpoint, naive_grid, 4096)
    naive_lines = np.arange(0, 500, 64)
    naive_index = seam_index(naive, naive_lines, naive_lines)
    print(f"seam index: blended {blended_index:.3f}, naive {naive_index:.3f}")
    assert blended_index <= 1.05
    assert naive_index > 1.3


def test_seam_index_counts_border_changes():
    a = np.zeros((8, 8), dtype=np.uint8)
    a[:, 4:] = 1  # one vertical edge exactly on line 4
    assert seam_index(a, [], [4]) == pytest.approx(1 / (8 / (8 * 7 + 7 * 8)))
    assert seam_index(a, [], [2]) == 0.0
