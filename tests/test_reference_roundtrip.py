"""Reading every block core of the real sample through the grid and writing it back loses nothing."""

import numpy as np
import pytest
import rasterio
from conftest import NC_SCENE

from geoseg.raster import open_scene, read_window
from geoseg.tiling import TileGrid, align_block_size, plan_blocks


@pytest.mark.parametrize("block_size,tile,margin", [(100, 64, 16), (128, 32, 0), (4096, 320, 80)])
def test_cores_rebuild_the_scene(tmp_path, block_size, tile, margin):
    scene = open_scene(NC_SCENE)
    grid = TileGrid(scene.height, scene.width, tile, margin)
    blocks = plan_blocks(grid, align_block_size(block_size, grid))
    out = tmp_path / "rebuilt.tif"
    with rasterio.open(NC_SCENE) as src:
        profile = src.profile
        with rasterio.open(out, "w", **profile) as dst:
            for b in blocks:  # local cells from the block's read box, shared cells read on their own
                data = read_window(src, b.read)[0] if b.read else None
                for cell in b.cells:
                    part = (data[(slice(None), *cell.box.relative_to(b.read))] if cell in b.local
                            else read_window(src, cell.box)[0])
                    dst.write(part.astype(profile["dtype"]),
                              window=((cell.box.y0, cell.box.y1), (cell.box.x0, cell.box.x1)))
    with rasterio.open(NC_SCENE) as a, rasterio.open(out) as b:
        assert a.crs == b.crs and a.transform == b.transform and a.shape == b.shape
        np.testing.assert_array_equal(a.read(), b.read())
