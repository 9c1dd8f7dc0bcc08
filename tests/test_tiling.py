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
def test_every_tile_runs_once_in_the_block_holding_its_origin(args):
    grid, block_size = args
    lattice = grid.tiles_touching(Box(0, 0, grid.height, grid.width))
    blocks = plan_blocks(grid, block_size)
    owned = [(b.core, t) for b in blocks for t in b.tiles]
    assert sorted(t for _, t in owned) == sorted(lattice)
    for core, t in owned:
        assert core.y0 <= t.y0 < core.y1 and core.x0 <= t.x0 < core.x1
        assert t.shape == (grid.tile, grid.tile) and t.y0 >= 0 and t.x0 >= 0, "tiles start inside the scene"


@settings(max_examples=60, deadline=None)
@given(grids)
def test_cells_split_each_core_by_exactly_the_blocks_whose_tiles_reach_them(args):
    grid, block_size = args
    blocks = plan_blocks(grid, block_size)
    sent: dict = {}
    for b in blocks:
        count = np.zeros(b.core.shape, dtype=np.int32)
        for cell in b.cells:
            count[cell.box.relative_to(b.core)] += 1
            reaching = tuple(sorted(o.key for o in blocks if any(t.intersection(cell.box) for t in o.tiles)))
            assert cell.owners == reaching  # no tile's sums can be missed, none is counted twice
            if cell.owners != (b.key,):
                for owner in cell.owners:
                    sent.setdefault(owner, []).append(cell)
        assert (count == 1).all()
        assert set(b.local) | set(b.shared) == set(b.cells)
    assert {b.key: list(b.sends) for b in blocks if b.sends} == sent


@settings(max_examples=60, deadline=None)
@given(grids)
def test_every_pixel_with_context_lies_in_a_tiles_inner_part(args):
    grid, block_size = args
    m = grid.margin
    inner = np.zeros((grid.height, grid.width), dtype=bool)
    for b in plan_blocks(grid, block_size):
        assert all(b.read.intersection(t) == t for t in b.tiles)
        for t in b.tiles:
            # the inner part of the tile, `margin` away from its edges
            centre = Box(t.y0 + m, t.x0 + m, t.y1 - m, t.x1 - m).intersection(Box(0, 0, grid.height, grid.width))
            if centre:
                inner[centre.relative_to(Box(0, 0, grid.height, grid.width))] = True
    ys, xs = np.mgrid[:grid.height, :grid.width]
    away = (ys >= m) & (ys < grid.height - m) & (xs >= m) & (xs < grid.width - m)
    assert inner[away].all(), "some pixel is not in any tile's full-context part"


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


@pytest.mark.parametrize(("tile", "margin"), [(64, 16), (64, 8), (640, 160), (320, 64), (64, 0)])
def test_aligned_blocks_share_bands_twice_the_margin_wide(tile, margin):
    """An inner block runs (block / stride)² tiles; the tiles above and left of it reach 2*margin into its core."""
    grid = TileGrid(5000, 5000, tile, margin)
    block_size = align_block_size(1000, grid)
    blocks = {(b.row, b.col): b for b in plan_blocks(grid, block_size)}
    inner = blocks[1, 1]
    assert len(inner.tiles) == (block_size // grid.stride) ** 2
    core, band = inner.core, 2 * margin
    shared = np.zeros(core.shape, dtype=bool)
    for cell in inner.shared:
        shared[cell.box.relative_to(core)] = True
    expected = np.zeros(core.shape, dtype=bool)
    expected[:band, :] = expected[:, :band] = True
    np.testing.assert_array_equal(shared, expected)
    if margin:
        corner = next(c for c in inner.shared if (c.box.y0, c.box.x0) == (core.y0, core.x0))
        assert corner.owners == ((0, 0), (0, 1), (1, 0), (1, 1))


def test_box_rejects_empty():
    with pytest.raises(ValueError):
        Box(0, 0, 0, 5)
