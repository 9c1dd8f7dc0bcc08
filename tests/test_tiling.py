import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geoseg.tiling import Box, TileGrid, align_block_size, context_margin, plan_blocks

grids = st.builds(
    lambda h, w, t, q, bs: (TileGrid(h, w, t, (t // 4) * q // 4 // 4 * 4), bs),
    st.integers(1, 300), st.integers(1, 300), st.sampled_from([16, 32, 64]), st.integers(0, 4),
    st.integers(8, 200),
)


@settings(max_examples=60, deadline=None)
@given(grids)
def test_cores_cover_every_pixel_exactly_once(args):
    grid, block_size = args
    count = np.zeros((grid.height, grid.width), dtype=np.int32)
    for b in plan_blocks(grid, block_size):
        count[b.core.y0:b.core.y1, b.core.x0:b.core.x1] += 1
    assert (count == 1).all()


@settings(max_examples=60, deadline=None)
@given(grids)
def test_tiles_lie_in_read_box_and_cover_core_with_full_context(args):
    grid, block_size = args
    m = grid.margin
    for b in plan_blocks(grid, block_size):
        read = b.read
        assert read.intersection(b.core) == b.core
        inner = np.zeros(b.core.shape, dtype=bool)
        covered = np.zeros(b.core.shape, dtype=bool)
        for t in b.tiles:
            assert t.shape == (grid.tile, grid.tile)
            assert read.intersection(t) == t
            assert t.y0 >= 0 and t.x0 >= 0, "tiles start inside the scene"
            covered[t.intersection(b.core).relative_to(b.core)] = True
            # the inner part of the tile, `margin` away from its edges, may be outside the core
            centre = Box(t.y0 + m, t.x0 + m, t.y1 - m, t.x1 - m).intersection(b.core)
            if centre:
                inner[centre.relative_to(b.core)] = True
        assert covered.all()
        # every pixel with `margin` px of scene around it is in some tile's full-context part
        ys, xs = np.mgrid[b.core.y0:b.core.y1, b.core.x0:b.core.x1]
        away = (ys >= m) & (ys < grid.height - m) & (xs >= m) & (xs < grid.width - m)
        assert inner[away].all(), "some core pixel is not in any tile's full-context part"


@settings(max_examples=40, deadline=None)
@given(grids)
def test_block_tiles_are_exactly_the_scene_tiles_touching_the_core(args):
    grid, block_size = args
    scene = set(grid.tiles_touching(Box(0, 0, grid.height, grid.width)))
    assert len(scene) == grid.rows * grid.cols
    for b in plan_blocks(grid, block_size):
        expected = {t for t in scene if t.intersection(b.core)}
        assert set(b.tiles) == expected


@settings(max_examples=30, deadline=None)
@given(grids)
def test_plan_is_deterministic_and_row_major(args):
    grid, block_size = args
    a, b = plan_blocks(grid, block_size), plan_blocks(grid, block_size)
    assert a == b
    keys = [(blk.row, blk.col) for blk in a]
    assert keys == sorted(keys)
    for blk in a:
        assert list(blk.tiles) == sorted(blk.tiles)


def test_small_raster_one_tile():
    grid = TileGrid(5, 7, 64, 16)
    (block,) = plan_blocks(grid, 2048)
    assert block.core == Box(0, 0, 5, 7)
    assert block.tiles == (Box(0, 0, 64, 64),)  # one tile from the scene's corner


def test_context_margin_formula():
    assert context_margin(640, 16) == 16  # no finite receptive field -> the measured seam-free margin
    assert context_margin(512, 32) == 16 and context_margin(1024, 32) == 16
    assert context_margin(640, 16, receptive_field=15) == 8  # ceil(7.5/8)*8: on half the output stride
    assert context_margin(64, 32) == 16  # a 64 px DeepLabV3 tile still overlaps its neighbours
    assert context_margin(32, 32) == 0  # the cap: a quarter tile, on the feature grid
    assert context_margin(64, 1, receptive_field=15) == 8
    assert context_margin(64, 1, receptive_field=1000) == 16
    with pytest.raises(ValueError):
        context_margin(100, 16)


def test_align_block_size_to_stride():
    grid = TileGrid(1000, 1000, 640, 160)
    assert grid.stride == 320
    assert align_block_size(2048, grid) == 1920
    assert align_block_size(100, grid) == 320


def test_halo_is_reach_beyond_core():
    grid = TileGrid(1000, 1000, 64, 16)
    blocks = plan_blocks(grid, align_block_size(100, grid))
    inner = [b for b in blocks if b.row == 1 and b.col == 1][0]
    assert inner.halo == 32  # the tile straddling its first border starts one stride (32) before the core


@pytest.mark.parametrize(("tile", "margin"), [(64, 16), (64, 8), (640, 160), (320, 64), (64, 0)])
def test_neighbouring_blocks_share_one_line_of_tiles(tile, margin):
    """A block border is straddled by one tile per lattice line (none without overlap)."""
    grid = TileGrid(5000, 5000, tile, margin)
    block_size = align_block_size(1000, grid)
    blocks = {(b.row, b.col): b for b in plan_blocks(grid, block_size)}
    a, b = blocks[1, 1], blocks[1, 2]
    shared = {t.x0 for t in a.tiles} & {t.x0 for t in b.tiles}
    assert len(shared) == (1 if margin else 0)
    assert len({t.x0 for t in a.tiles}) == block_size // grid.stride + (1 if margin else 0)


def test_box_rejects_empty():
    with pytest.raises(ValueError):
        Box(0, 0, 0, 5)
