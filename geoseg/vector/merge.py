"""Join the pieces of regions cut by block borders into whole polygons.

:func:`merge_regions` is exact and linear in the pieces' size, for the pixel polygons of
:mod:`geoseg.vector.trace`; :func:`merge_pieces` unions any polygons (e.g. simplified ones) with GEOS.
"""

from __future__ import annotations

import numpy as np
import shapely

from geoseg.vector.polygons import Polygons, offsets, ragged_arange
from geoseg.vector.trace import walk_cycles

#: Direction of an axis-parallel step: 0 = +x, 1 = +y, 2 = -x, 3 = -y.
_STEP = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], np.int32)


class TraceError(RuntimeError):
    """The pieces' edges do not form closed rings as expected."""


def merge_regions(
    pieces: Polygons, group: np.ndarray, *, cuts: np.ndarray, block_size: int, height: int, width: int
) -> Polygons:
    """Join the pieces of each region, all regions at once, exactly.

    Every piece is a traced pixel polygon (integer vertices, axis-parallel edges, a vertex only where
    its rings turn, shell of positive shoelace area) inside one block, and the pieces of a region
    meet only along block-border lines. A piece's holes lie inside its block and are kept as they
    are. Its shell is cut where it runs along a border line: the stretches in between (*chains*)
    are kept whole; the border segments are cut into unit edges, and a unit edge two pieces of the
    region share lies inside the region and is dropped. Chains and the remaining edges are then
    linked end to start into rings (taking the right turn where a region touches itself at a
    vertex, as the tracer does); the ring of positive area is the shell, the others are holes.
    Vertices where rings run straight on across a border are dropped, so each polygon equals the
    one :func:`~geoseg.vector.trace.trace_regions` gives for the whole region.

    Two pieces of a region in one block (a region that leaves the block and comes back) may touch
    at a vertex inside it, where the joined region then touches itself: chains are also cut at
    ``cuts``, vertices where a piece touches another piece of its class diagonally, so that rings
    can turn either way there.

    Args:
        pieces: the pieces, in pixel coordinates.
        group: the region (0..k-1) of each piece, non-decreasing.
        cuts: indices into ``pieces.xy`` of vertices where two pieces of one class touch diagonally.
        block_size: block side in pixels (border lines are its multiples).
        height: raster height in pixels.
        width: raster width in pixels.

    Returns:
        One polygon per region, in region order.

    Raises:
        TraceError: the pieces do not fit together as described.
    """
    n_groups = int(group[-1]) + 1 if len(group) else 0
    alone = np.bincount(group, minlength=n_groups)[group] == 1
    if alone.all():
        return pieces
    cut = np.zeros(len(pieces.xy), bool)
    cut[cuts] = True
    if not alone.any():
        return _join(pieces, group, cut, block_size, height, width)
    several = np.flatnonzero(~alone)
    joined = _join(pieces.take(several), group[several], cut[pieces.vertices(several)], block_size, height, width)
    # regions of one piece pass through; then everything in region order
    out = Polygons.concat([pieces.take(np.flatnonzero(alone)), joined])
    regions = np.r_[group[alone], np.unique(group[several])]
    return out.take(np.argsort(regions, kind="stable"))


def _join(pieces: Polygons, group: np.ndarray, cut: np.ndarray, block_size: int, height: int, width: int) -> Polygons:
    """:func:`merge_regions` for regions of two or more pieces; ``cut`` flags vertices to cut chains at."""
    group = np.unique(group, return_inverse=True)[1].ravel()
    segs = _Segments(pieces, block_size, height, width)
    heads, chain_len = segs.chains(cut[segs.pos])
    del cut
    units, u_start, u_step = segs.unit_edges(group, height, width)
    # nodes: the chains, then the unit edges left
    ring = segs.ring(heads)
    start = np.concatenate([segs.start(heads), u_start])
    end = np.concatenate([segs.start(segs.wrap(heads + chain_len, ring)), u_start + u_step])
    first_dir = np.concatenate([segs.direction[heads], segs.direction[units]])
    last_dir = np.concatenate([segs.direction[segs.wrap(heads + chain_len - 1, ring)], segs.direction[units]])
    node_group = np.concatenate([group[ring], group[segs.ring(units)]])
    nodes, ring_offsets = walk_cycles(_link(start, end, first_dir, last_dir, node_group, height, width))
    # each node gives its start vertex where the ring turns there, then a chain its inner vertices
    pred = np.roll(nodes, 1)
    pred[ring_offsets[:-1]] = nodes[ring_offsets[1:] - 1]
    corner = first_dir[nodes] != last_dir[pred]
    is_chain = nodes < len(heads)
    inner = np.zeros(len(nodes), np.int64)
    inner[is_chain] = chain_len[nodes[is_chain]] - 1
    emitted = offsets(corner + inner)
    out_offsets = offsets(emitted[ring_offsets[1:]] - emitted[ring_offsets[:-1]] + 1)  # closed rings
    slot = emitted[:-1] + np.repeat(out_offsets[:-1] - emitted[ring_offsets[:-1]], np.diff(ring_offsets))
    coords = np.empty((int(out_offsets[-1]), 2), pieces.xy.dtype)
    coords[slot[corner]] = start[nodes[corner]]
    chained = np.flatnonzero(inner > 0)
    coords[ragged_arange(slot[chained] + corner[chained], inner[chained])] = pieces.xy[
        segs.inner_vertices(heads[nodes[chained]], inner[chained])
    ]
    coords[out_offsets[1:] - 1] = coords[out_offsets[:-1]]
    traced_group = node_group[nodes[ring_offsets[:-1]]]
    is_shell = Polygons(coords, out_offsets, np.arange(len(out_offsets))).ring_areas() > 0
    if (np.bincount(traced_group[is_shell], minlength=int(group[-1]) + 1) != 1).any():
        raise TraceError("a region did not come out as one shell")
    # each region: its shell, the traced holes, then the pieces' own holes (they lie inside their block)
    holes = np.setdiff1d(np.arange(len(pieces.ring_offsets) - 1), pieces.poly_offsets[:-1])
    piece_of_ring = np.repeat(np.arange(len(pieces)), np.diff(pieces.poly_offsets))
    owner = np.r_[traced_group, group[piece_of_ring[holes]]]
    rank = np.r_[np.where(is_shell, 0, 1), np.full(len(holes), 2)]
    length = np.r_[np.diff(out_offsets), np.diff(pieces.ring_offsets)[holes]]
    order = np.lexsort((rank, owner))
    ring_offsets = offsets(length[order])
    place = np.empty(len(order), np.int64)
    place[order] = ring_offsets[:-1]  # where each ring goes
    xy = np.empty((int(ring_offsets[-1]), 2), coords.dtype)
    k = len(is_shell)
    xy[ragged_arange(place[:k], length[:k])] = coords
    del coords
    xy[ragged_arange(place[k:], length[k:])] = pieces.xy[ragged_arange(pieces.ring_offsets[holes], length[k:])]
    return Polygons(xy, ring_offsets, offsets(np.bincount(owner)))


class _Segments:
    """The shell segments of pieces, ring after ring: segment ``s`` runs from vertex ``pos[s]`` to ``pos[s] + 1``.

    Per segment only ``pos`` (int32), ``direction`` (int8) and ``on_border`` are kept.
    """

    def __init__(self, pieces: Polygons, block_size: int, height: int, width: int) -> None:
        shell = pieces.poly_offsets[:-1]
        self.xy = pieces.xy
        self.count = pieces.ring_offsets[shell + 1] - pieces.ring_offsets[shell] - 1
        self.first = offsets(self.count)[:-1]
        self.pos = ragged_arange(pieces.ring_offsets[shell], self.count)
        a = self.xy[self.pos]
        d = self.xy[self.pos + 1] - a
        horizontal = d[:, 1] == 0
        self.direction = (~horizontal).astype(np.int8)  # 0 = +x, 1 = +y, 2 = -x, 3 = -y
        self.direction += 2 * ((d[:, 0] < 0) | (d[:, 1] < 0)).astype(np.int8)
        del d
        line = np.where(horizontal, a[:, 1], a[:, 0])
        del a
        on = line % block_size == 0
        on &= line > 0
        on &= np.where(horizontal, line < height, line < width)
        self.on_border = on
        if np.bincount(self.ring(np.flatnonzero(on)), minlength=len(pieces)).min() == 0:
            raise TraceError("a piece does not reach a block border")

    def ring(self, seg: np.ndarray) -> np.ndarray:
        """The ring (piece) of each segment."""
        return np.searchsorted(self.first, seg, "right") - 1

    def start(self, seg: np.ndarray) -> np.ndarray:
        """The first vertex of each segment."""
        return self.xy[self.pos[seg]]

    def wrap(self, seg: np.ndarray, ring: np.ndarray) -> np.ndarray:
        """Segment indices taken cyclically within their ring."""
        return self.first[ring] + (seg - self.first[ring]) % self.count[ring]

    def inner_vertices(self, heads: np.ndarray, inner: np.ndarray) -> np.ndarray:
        """Indices into ``xy`` of the starts of segments ``head + 1 ... head + inner`` (cyclic in the ring)."""
        ring = self.ring(heads)
        last = self.first[ring] + self.count[ring]  # one past the ring's last segment
        before = np.minimum(inner, last - heads - 1)  # the part up to the ring's end, then from its start
        at = self.pos[np.minimum(heads + 1, len(self.pos) - 1)]
        starts = np.stack([at, self.pos[self.first[ring]]], axis=1).ravel()
        return ragged_arange(starts, np.stack([before, inner - before], axis=1).ravel())

    def chains(self, cut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Runs of off-border segments, also cut before each segment where ``cut``: first segment, length."""
        after_border = np.empty_like(self.on_border)
        after_border[1:] = self.on_border[:-1]
        after_border[self.first] = self.on_border[self.first + self.count - 1]
        heads = np.flatnonzero(~self.on_border & (after_border | cut))
        del after_border
        ring = self.ring(heads)
        b = np.flatnonzero(self.on_border | cut)  # where chains stop; every ring has a border segment
        nxt = np.minimum(np.searchsorted(b, heads, "right"), len(b) - 1)
        first_stop = b[np.searchsorted(b, self.first)]
        wraps = (b[nxt] <= heads) | (self.ring(b[nxt]) != ring)  # none after it in its ring: wrap round
        stop = np.where(wraps, first_stop[ring] + self.count[ring], b[nxt])
        return heads, stop - heads

    def unit_edges(self, group: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The border segments cut into unit edges, less those found twice in a region.

        Returns:
            ``(segment, start, step)`` of each unit edge left.
        """
        borders = np.flatnonzero(self.on_border)
        step = _STEP[self.direction[borders]]
        length = np.abs(self.xy[self.pos[borders] + 1] - self.start(borders)).sum(axis=1)
        seg = np.repeat(borders, length)
        step = np.repeat(step, length, axis=0)
        start = self.start(seg) + (np.arange(len(seg)) - np.repeat(offsets(length)[:-1], length))[:, None] * step
        low = np.minimum(start, start + step).astype(np.int64)
        key = (group[self.ring(seg)] * (height + 1) + low[:, 1]) * (width + 1) + low[:, 0]
        key = key * 2 + (step[:, 1] == 0)
        _, inverse, count = np.unique(key, return_inverse=True, return_counts=True)
        keep = count[inverse.ravel()] == 1
        return seg[keep], start[keep], step[keep]


def _link(
    start: np.ndarray,
    end: np.ndarray,
    first_dir: np.ndarray,
    last_dir: np.ndarray,
    group: np.ndarray,
    height: int,
    width: int,
) -> np.ndarray:
    """Each node's successor: the node of its region starting where it ends (the right turn if two do)."""

    def vertex(p: np.ndarray) -> np.ndarray:
        return (group.astype(np.int64) * (height + 1) + p[:, 1]) * (width + 1) + p[:, 0]

    start_key = vertex(start)
    order = np.argsort(start_key, kind="stable")
    start_key = start_key[order]
    end_key = vertex(end)
    lo = np.searchsorted(start_key, end_key, "left")
    ways = np.searchsorted(start_key, end_key, "right") - lo
    n = len(start)
    if n == 0 or ways.min() < 1 or ways.max() > 2:
        raise TraceError("open or branching boundary")
    first, second = order[lo], order[np.minimum(lo + 1, n - 1)]
    succ = np.where((ways == 2) & (first_dir[second] == (last_dir + 3) % 4), second, first)
    if np.bincount(succ, minlength=n).max() > 1:
        raise TraceError("edges do not chain one to one")
    return succ


def merge_pieces(parts: np.ndarray) -> shapely.Polygon:
    """Union the pieces of one region with GEOS (any polygons, e.g. simplified ones).

    A hole of a piece lies inside its block and never reaches a block side, so no other piece can
    touch it: only the shells need a union, and the pieces' holes are added back unchanged.
    """
    if len(parts) == 1:
        return parts[0]
    union = shapely.union_all(shapely.polygons(shapely.get_exterior_ring(parts)))
    if union.geom_type != "Polygon":  # pieces of one region always form one polygon; be safe anyway
        return shapely.simplify(shapely.union_all(parts), 0.0)
    holes = [*union.interiors, *(r for part in parts for r in part.interiors)]
    return shapely.simplify(shapely.Polygon(union.exterior, holes), 0.0)
