"""The grid: blocks (units of distributed work) and tiles (units of model input), as pure values.

Tiles lie on one lattice over the whole scene, whatever the blocking::

    tile k along an axis covers [k*stride - phase - margin, k*stride - phase - margin + tile)
    its inner part is           [k*stride - phase, (k+1)*stride - phase)
    stride = tile - 2*margin          (neighbouring tiles overlap by 2*margin)
    phase = stride // 2 if margin else 0
    k = 0 .. ceil((n + phase) / stride) - 1      (the inner parts cover [0, n))

``margin`` is the band along a tile's edges whose predictions lack context (zero padding reaches
them).  It is derived from the model's receptive field and output stride by :func:`context_margin`.
With an overlap of ``2*margin`` every pixel lies at least ``margin`` away from the edge of some tile,
so blending (see :mod:`geoseg.stitch`) can always favour a tile that saw the pixel's full context.
The *phase* puts block borders, which lie on multiples of the stride, through the middle of a
tile's inner part, where exactly one tile straddles them (two would without it): every block
border costs one row or column of tiles computed twice, not two.

A *block* is a square of the output, its *core*; cores partition the scene exactly and are aligned
to the output chunks.  A block processes every lattice tile that touches its core; its *read box*
(core plus *halo*) is the union of those tiles.  Because each core pixel gets exactly the tiles that
cover it in the whole scene, a blocked run reproduces a whole-scene run: block borders cannot show.
"""

from __future__ import annotations

import math
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


def context_margin(tile: int, output_stride: int, receptive_field: int | None = None) -> int:
    """Width of the low-context band along a tile's edges.

    ``margin = min(ceil(rf / 2 / q) * q, floor(tile / 4 / q) * q)`` with ``q = os / 2``: half the
    receptive field ``rf`` (the reach of padding into the tile), rounded up to half the output stride
    ``os``, and capped at a quarter tile so the stride stays at least half a tile.  Tile origins are
    ``k * (tile - 2 * margin) - tile / 2`` (see the module docstring), so a margin on multiples of
    ``os / 2`` keeps them on the feature grid when the tile is a multiple of ``2 * os`` (e.g. a 64 px
    tile at os 32 gets 16 px, not 0).  ``receptive_field=None`` (networks whose field exceeds any
    tile, e.g. ResNet-50 with ASPP) takes the cap.
    """
    if tile % output_stride:
        raise ValueError(f"tile {tile} is not a multiple of the output stride {output_stride}")
    q = max(output_stride // 2, 1)
    cap = (tile // 4) // q * q
    if receptive_field is None:
        return cap
    return min(math.ceil(receptive_field / 2 / q) * q, cap)


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

    @property
    def phase(self) -> int:
        """Shift of the lattice: half a stride when tiles overlap, else 0 (see the module docstring).

        A border at a multiple of the stride is straddled by the tiles k with
        ``k*s - p - m < border < k*s - p - m + t``, an open interval of length ``1 + 2m/s`` in k: with
        ``p = s/2`` (and ``m <= s/2``, true as ``m <= t/4``) it holds one integer; with ``m = 0`` the
        unshifted lattice holds none.
        """
        return self.stride // 2 if self.margin else 0

    def _count(self, n: int) -> int:
        return math.ceil((n + self.phase) / self.stride)

    @property
    def rows(self) -> int:
        """Tiles along y."""
        return self._count(self.height)

    @property
    def cols(self) -> int:
        """Tiles along x."""
        return self._count(self.width)

    def _span(self, a0: int, a1: int, n: int) -> range:
        """Lattice indices k whose tile [k*s - p - m, k*s - p - m + t) intersects [a0, a1)."""
        s, m, t, p = self.stride, self.margin, self.tile, self.phase
        first = max(0, (a0 + p + m - t) // s + 1)
        last = min(self._count(n) - 1, (a1 - 1 + p + m) // s)
        return range(first, last + 1)

    def tile_box(self, row: int, col: int) -> Box:
        """The pixels tile (row, col) reads."""
        y0 = row * self.stride - self.phase - self.margin
        x0 = col * self.stride - self.phase - self.margin
        return Box(y0, x0, y0 + self.tile, x0 + self.tile)

    def tiles_touching(self, box: Box) -> tuple[Box, ...]:
        """Every lattice tile that intersects ``box``, in row-major order."""
        return tuple(
            self.tile_box(r, c)
            for r in self._span(box.y0, box.y1, self.height)
            for c in self._span(box.x0, box.x1, self.width)
        )


@dataclass(frozen=True)
class Block:
    """One unit of distributed work: a core to write and the tiles that cover it."""

    row: int
    col: int
    core: Box
    tiles: tuple[Box, ...]

    @property
    def read(self) -> Box:
        """Core plus halo: the union of the block's tiles, read once."""
        box = self.tiles[0]
        for t in self.tiles[1:]:
            box = box.union(t)
        return box

    @property
    def halo(self) -> int:
        """Widest reach of the read box beyond the core, in pixels."""
        r, c = self.read, self.core
        return max(c.y0 - r.y0, c.x0 - r.x0, r.y1 - c.y1, r.x1 - c.x1)


def align_block_size(block_size: int, grid: TileGrid) -> int:
    """Round ``block_size`` down to a multiple of the tile stride (at least one stride).

    Core borders then lie where the lattice's phase puts them: mid-way through one tile's inner part,
    so neighbouring blocks share one row or column of tiles.
    """
    return max(grid.stride, block_size // grid.stride * grid.stride)


def plan_blocks(grid: TileGrid, block_size: int) -> tuple[Block, ...]:
    """Cut the scene into blocks of ``block_size`` cores (last row/column truncated), row-major.

    ``block_size`` is used as given; pass it through :func:`align_block_size` first to keep cores
    on tile origins.
    """
    cols = math.ceil(grid.width / block_size) if block_size >= 1 else 0
    return tuple(
        Block(i // cols, i % cols, core, grid.tiles_touching(core))
        for i, core in enumerate(partition(grid.height, grid.width, block_size))
    )


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
