"""The grid: blocks (units of distributed work) and tiles (units of model input), as pure values.

Tiles lie on one lattice over the whole scene, whatever the blocking::

    stride = tile - 2*margin              (neighbouring tiles overlap by 2*margin)
    K = ceil((n - tile) / stride) + 1     tiles along an axis of n pixels (1 when n <= tile)
    tile k < K-1 covers [k*stride, k*stride + tile)
    the last tile covers [o, o + tile),   o = min(ceil((n - tile) / 32) * 32, (K-1)*stride)

so the tiles cover ``[0, n)`` and the last one is moved back to end at the scene's edge (on a
multiple of 32, the feature grid of every network here) instead of reaching past it.  ``margin`` is
the band along a tile's edges whose predictions lack context (zero padding reaches them), derived
from the model's receptive field and output stride by :func:`context_margin` or set by the user.
With an overlap of ``2*margin`` every pixel that has ``margin`` px of scene around it lies at least
``margin`` away from the edge of some tile, so blending (see :mod:`geoseg.stitch`) can always favour
a tile that saw the pixel's full context.

A *block* is a square of the output, its *core*; cores partition the scene exactly and are aligned
to the output chunks.  Each lattice tile belongs to the block whose core holds its origin, so every
tile runs once per scene, in that block; its *read box* is the union of its tiles.  Near a core's
top and left edges the tiles of the blocks above and to the left reach in too: those *shared cells*
are finished from the partial sums of every block whose tiles cover them, in fixed point, so the
order of the sums does not matter (:mod:`geoseg.stitch`).  Each core pixel therefore gets exactly the
tiles that cover it in the whole scene: a blocked run reproduces a whole-scene run, and block
borders cannot show.  Cores whose size is a multiple of the stride (:func:`align_block_size`) have
their borders at tile origins: the shared cells are then bands ``2*margin`` wide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Box:
    """A rectangle of pixels ``[y0, y1) x [x0, x1)`` in scene coordinates (may reach past the scene)."""

    y0: int
    x0: int
    y1: int
    x1: int

    def __post_init__(self) -> None:
        if self.y1 <= self.y0 or self.x1 <= self.x0:
            raise ValueError(f"empty box {self}")

    @property
    def height(self) -> int:
        """Rows."""
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        """Columns."""
        return self.x1 - self.x0

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width)."""
        return self.height, self.width

    def intersection(self, other: Box) -> Box | None:
        """The overlap of two boxes, or None when they do not overlap."""
        y0, x0 = max(self.y0, other.y0), max(self.x0, other.x0)
        y1, x1 = min(self.y1, other.y1), min(self.x1, other.x1)
        return Box(y0, x0, y1, x1) if y1 > y0 and x1 > x0 else None

    def union(self, other: Box) -> Box:
        """The smallest box holding both."""
        return Box(min(self.y0, other.y0), min(self.x0, other.x0), max(self.y1, other.y1), max(self.x1, other.x1))

    def relative_to(self, outer: Box) -> tuple[slice, slice]:
        """Slices selecting this box inside an array that covers ``outer``."""
        return slice(self.y0 - outer.y0, self.y1 - outer.y0), slice(self.x0 - outer.x0, self.x1 - outer.x0)


#: Context margin of networks whose receptive field exceeds any tile (ResNet, MobileNetV3, ASPP): the
#: smallest margin whose seam index stays at or below 1.05 with every trained model, at its own tile and
#: at 512 px (``bench/seams.py``; the README's "Seams and overlap" table).  Past it the seam index does
#: not fall any further (it moves by +-0.05 from margin to margin), while every doubling of the margin
#: costs more tiles.
SEAM_FREE_MARGIN = 16


def context_margin(tile: int, output_stride: int, receptive_field: int | None = None) -> int:
    """Width of the low-context band along a tile's edges.

    ``margin = min(ceil(r / q) * q, floor(tile / 4 / q) * q)`` with ``q = os / 2``: the reach ``r``
    of zero padding into the tile, rounded up to half the output stride ``os``, and capped at a
    quarter tile so the stride stays at least half a tile.  ``r`` is half the receptive field when
    it is known and small (the tiny stand-in CNN), else :data:`SEAM_FREE_MARGIN` (``receptive_field
    =None``: a network whose field exceeds any tile, e.g. ResNet-50 with ASPP, where the margin that
    hides the seams was measured instead).  Tile origins are ``k * (tile - 2 * margin)`` (see the
    module docstring), so a margin on multiples of ``os / 2`` keeps them on the feature grid when
    the tile is a multiple of ``os``.
    """
    if tile % output_stride:
        raise ValueError(f"tile {tile} is not a multiple of the output stride {output_stride}")
    q = max(output_stride // 2, 1)
    cap = (tile // 4) // q * q
    reach = SEAM_FREE_MARGIN if receptive_field is None else receptive_field / 2
    return min(math.ceil(reach / q) * q, cap)


#: The last tile's origin is moved back to a multiple of this: the feature grid of every network here.
FEATURE_GRID = 32


@dataclass(frozen=True)
class TileGrid:
    """The scene-wide tile lattice (see the module docstring for the formula)."""

    height: int
    width: int
    tile: int
    margin: int

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"scene must be at least 1x1, got {self.height}x{self.width}")
        if not 0 <= self.margin <= self.tile // 4:
            raise ValueError(f"margin {self.margin} must lie in [0, tile/4] for tile {self.tile}")

    @property
    def stride(self) -> int:
        """Distance between neighbouring tile origins."""
        return self.tile - 2 * self.margin

    def origins(self, n: int) -> tuple[int, ...]:
        """Tile origins along an axis of ``n`` pixels (see the module docstring)."""
        t, s = self.tile, self.stride
        if n <= t:
            return (0,)
        k = math.ceil((n - t) / s) + 1
        last = min(math.ceil((n - t) / FEATURE_GRID) * FEATURE_GRID, (k - 1) * s)
        return (*range(0, (k - 1) * s, s), last)

    @property
    def rows(self) -> int:
        """Tiles along y."""
        return len(self.origins(self.height))

    @property
    def cols(self) -> int:
        """Tiles along x."""
        return len(self.origins(self.width))

    def tile_edges(self, n: int) -> list[int]:
        """The lines inside an axis of ``n`` px where a tile starts or ends (where seams could show)."""
        return sorted({e for o in self.origins(n) for e in (o, o + self.tile) if 0 < e < n})

    def _span(self, a0: int, a1: int, n: int) -> list[int]:
        """Origins of the tiles along an axis of ``n`` px that intersect [a0, a1)."""
        return [o for o in self.origins(n) if o < a1 and o + self.tile > a0]

    def tiles_touching(self, box: Box) -> tuple[Box, ...]:
        """Every lattice tile that intersects ``box``, in row-major order."""
        t = self.tile
        return tuple(
            Box(y, x, y + t, x + t)
            for y in self._span(box.y0, box.y1, self.height)
            for x in self._span(box.x0, box.x1, self.width)
        )


@dataclass(frozen=True)
class Cell:
    """A rectangle of the core of block ``target`` and the blocks whose tiles cover it (``owners``, row-major)."""

    box: Box
    owners: tuple[tuple[int, int], ...]
    target: tuple[int, int]


@dataclass(frozen=True)
class Block:
    """One unit of distributed work: a core to write, the tiles it runs, and who else covers its core.

    ``tiles`` are the lattice tiles the block *owns* (their origin lies in its core), so every tile
    of the scene runs in exactly one block.  ``cells`` split the core into rectangles by the blocks
    whose tiles cover them: a cell covered by this block's tiles only is finished by this block
    alone; a *shared* cell also gets other blocks' tiles and is finished from every owner's partial
    sums (:mod:`geoseg.stitch`).  ``sends`` are the shared cells, of any block, this block's tiles
    cover: it hands its partial sums over them on.
    """

    row: int
    col: int
    core: Box
    tiles: tuple[Box, ...]
    cells: tuple[Cell, ...] = ()
    sends: tuple[Cell, ...] = ()

    @property
    def key(self) -> tuple[int, int]:
        """(row, col)."""
        return self.row, self.col

    @property
    def read(self) -> Box | None:
        """The union of the block's tiles, read once (None for a block that owns no tile)."""
        return bounding_box(self.tiles) if self.tiles else None

    @property
    def shared(self) -> tuple[Cell, ...]:
        """The cells of the core that other blocks' tiles cover too."""
        return tuple(c for c in self.cells if c.owners != (self.key,))

    @property
    def local(self) -> tuple[Cell, ...]:
        """The cells of the core only this block's tiles cover."""
        return tuple(c for c in self.cells if c.owners == (self.key,))


def align_block_size(block_size: int, grid: TileGrid) -> int:
    """Round ``block_size`` down to a multiple of the tile stride (at least one stride).

    Core borders then lie on tile origins, inside the previous tile's inner part, so neighbouring
    blocks share one row or column of tiles.
    """
    return max(grid.stride, block_size // grid.stride * grid.stride)


def plan_blocks(grid: TileGrid, block_size: int) -> tuple[Block, ...]:
    """Cut the scene into blocks of ``block_size`` cores (last row/column truncated), row-major.

    Each lattice tile goes to the block whose core holds its origin; each core is split into the
    cells its owners' tiles cover (see :class:`Block`). ``block_size`` is used as given; pass it
    through :func:`align_block_size` first to keep cores on tile origins (then a shared cell is a
    band ``2 * margin`` wide along a core's top and left edges).
    """
    cores = partition(grid.height, grid.width, block_size)
    cols = math.ceil(grid.width / block_size)
    keys = [(i // cols, i % cols) for i in range(len(cores))]
    owned = {k: [] for k in keys}
    for t in grid.tiles_touching(Box(0, 0, grid.height, grid.width)):
        owned[(t.y0 // block_size, t.x0 // block_size)].append(t)
    extents = {k: bounding_box(ts) for k, ts in owned.items() if ts}
    cells = {k: _cells(k, core, extents) for k, core in zip(keys, cores, strict=True)}
    sends: dict[tuple[int, int], list[Cell]] = {k: [] for k in keys}
    for k in keys:
        for cell in cells[k]:
            if cell.owners != (k,):
                for owner in cell.owners:
                    sends[owner].append(cell)
    return tuple(
        Block(*k, core, tuple(owned[k]), cells[k], tuple(sends[k])) for k, core in zip(keys, cores, strict=True)
    )


def bounding_box(boxes: Sequence[Box]) -> Box:
    """The smallest box holding all of ``boxes`` (at least one)."""
    box = boxes[0]
    for b in boxes[1:]:
        box = box.union(b)
    return box


def _cells(key: tuple[int, int], core: Box, extents: dict[tuple[int, int], Box]) -> tuple[Cell, ...]:
    """``core`` cut along the edges of the tile extents that cover part of it, each piece with its owners."""
    covering = {k: e.intersection(core) for k, e in extents.items()}
    covering = {k: c for k, c in covering.items() if c is not None}
    ys = sorted({core.y0, core.y1, *(v for c in covering.values() for v in (c.y0, c.y1))})
    xs = sorted({core.x0, core.x1, *(v for c in covering.values() for v in (c.x0, c.x1))})
    out = []
    for y0, y1 in zip(ys, ys[1:], strict=False):
        for x0, x1 in zip(xs, xs[1:], strict=False):
            box = Box(y0, x0, y1, x1)
            owners = tuple(sorted(k for k, c in covering.items() if c.intersection(box) == box))
            assert owners, f"{box} is covered by no tile"
            out.append(Cell(box, owners, key))
    return tuple(out)


def partition(height: int, width: int, size: int) -> tuple[Box, ...]:
    """Squares of side ``size`` covering ``[0, height) x [0, width)`` exactly (last row/column cut), row-major.

    The block cores of a predict run, and the blocks the vectorise stage polygonises.
    """
    if size < 1:
        raise ValueError(f"block size must be positive, got {size}")
    return tuple(
        Box(y0, x0, min(y0 + size, height), min(x0 + size, width))
        for y0 in range(0, height, size)
        for x0 in range(0, width, size)
    )


def block_layout(grid: TileGrid, block_size: int) -> tuple[int, int]:
    """Number of block rows and columns for a scene."""
    return math.ceil(grid.height / block_size), math.ceil(grid.width / block_size)
