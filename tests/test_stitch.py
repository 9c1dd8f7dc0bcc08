"""Seam-free stitching: blocked equals whole-scene, and borders do not show in the class map."""

import numpy as np
import pytest
import rasterio
from conftest import DATA, NC_SCENE

from geoseg.checkpoint import load_checkpoint
from geoseg.predict import Predictor
from geoseg.raster import read_window
from geoseg.stitch import CLASS_NODATA, blend_block, blend_window, seam_index
from geoseg.tiling import TileGrid, align_block_size, plan_blocks

DEMO_MODEL = DATA / "models" / "nc_landsat_deeplabv3_mobilenetv3.pt"


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


def line_families(class_map, period: int, step: int = 4) -> dict[int, float]:
    """Seam index of every family of lines ``offset + k * period``, for offsets on a ``step`` grid."""
    n = max(class_map.shape)
    return {o: seam_index(class_map, np.arange(o, n, period), np.arange(o, n, period)) for o in range(0, period, step)}


def test_seam_index_blended_vs_naive():
    """Class changes are no more frequent along tile borders than along any other family of lines.

    Model: the demo DeepLabV3 (a real receptive field: atrous convolutions and ASPP image pooling).
    The index of a single line family on this 443 x 489 sample scatters by about +-40 % from line to
    line (few, spatially coherent class changes), so the border family is compared with the other
    families of the same period: blended, it must not stand out (<= 1.05 x the largest other family);
    naive tiling must stand out clearly. Block borders are covered exactly by
    test_blocked_equals_whole_scene (a blocked run equals the whole-scene run).
    """
    grid = TileGrid(443, 489, 128, 32)  # the demo model's tile size; lattice edges at 32 mod 64
    blended, _ = stitch_scene(DEMO_MODEL, grid, 4096)
    fam = line_families(blended, grid.stride)
    border = fam.pop((-grid.margin) % grid.stride)
    naive, _ = stitch_scene(DEMO_MODEL, TileGrid(443, 489, 128, 0), 4096)
    naive_fam = line_families(naive, 128, step=8)
    naive_border = naive_fam.pop(0)
    print(f"seam index blended {border:.3f} (other lines up to {max(fam.values()):.3f}), "
          f"naive {naive_border:.3f} (other lines up to {max(naive_fam.values()):.3f})")
    assert border <= 1.05 * max(fam.values())
    assert naive_border > 3 * max(naive_fam.values())


def test_seam_index_counts_border_changes():
    a = np.zeros((8, 8), dtype=np.uint8)
    a[:, 4:] = 1  # one vertical edge exactly on line 4
    assert seam_index(a, [], [4]) == pytest.approx(1 / (8 / (8 * 7 + 7 * 8)))
    assert seam_index(a, [], [2]) == 0.0
