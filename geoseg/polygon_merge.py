"""Regions of a class raster found block by block and joined across block borders.

Words used here: a *region* is a 4-connected set of pixels of one class (nodata pixels belong to
none); a *block* is the rectangle of the class raster processed at once; a *piece* is the part of a
region inside one block. A region that touches an internal block border falls apart into pieces.

Each block is polygonised by GDAL (:func:`polygonize`), one polygon per piece. Which piece holds each
pixel along the block's sides is read off the polygons' own side segments
(:meth:`Polygons.side_owners`), so no pixel labelling is needed; the sieve and confidence sums label
pixels with :func:`label_regions` instead. Blocks are visited in row-major order by a :class:`Sweep`:
pieces on an internal border get a global id in a union-find, and along each border the sweep joins
the ids of same-class pixels that are 4-neighbours across it. Only one row of ids across the raster
and one column are kept, so memory follows the block size and the raster width, plus the regions
still open.

After a block row, a region with no pixel on that row's last line can grow no further:
:class:`BorderMerger` reads its pieces back from a spill file (:class:`PieceStore`) and merges them
(:func:`merge_regions`: exact, linear-time edge cancelling and ring tracing). :class:`SieveRound`
uses the same sweep to find each region's global size and the border lengths it shares with its
neighbours, for the minimum-mapping-unit sieve of :func:`geoseg.vectorize.vectorize`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import shapely
from affine import Affine
from rasterio.features import shapes
from scipy import ndimage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import depth_first_order

from geoseg.tiling import Box

log = logging.getLogger(__name__)

#: Spilled piece bytes (about 16 per vertex) merged in one go when many regions finish together.
MERGE_CHUNK_BYTES = 8 * 1024**2


@dataclass(frozen=True)
class Regions:
    """The regions of one block: ``labels`` (h, w) int32, 0 on nodata, 1..n; ``cls[label]`` its class."""

    labels: np.ndarray
    cls: np.ndarray

    @property
    def n(self) -> int:
        """Number of regions."""
        return len(self.cls) - 1

    def edges(self) -> Edges:
        """The labels along the block's four sides."""
        lab = self.labels
        return Edges(lab[0].copy(), lab[-1].copy(), lab[:, 0].copy(), lab[:, -1].copy())

    def border_labels(self, box: Box, height: int, width: int) -> np.ndarray:
        """Sorted labels of the regions that touch a side of ``box`` shared with another block."""
        lab = self.labels
        sides = [
            lab[0] if box.y0 > 0 else None,
            lab[-1] if box.y1 < height else None,
            lab[:, 0] if box.x0 > 0 else None,
            lab[:, -1] if box.x1 < width else None,
        ]
        found = np.zeros(self.n + 1, bool)
        for side in sides:
            if side is not None:
                found[side] = True
        found[0] = False
        return np.flatnonzero(found)

    def sizes(self, row_weights: np.ndarray | None = None) -> np.ndarray:
        """Per-label size: pixel count, or the sum of ``row_weights[row]`` over the label's pixels."""
        if row_weights is None:
            return np.bincount(self.labels.ravel(), minlength=self.n + 1).astype(np.float64)
        w = np.broadcast_to(row_weights[:, None], self.labels.shape)
        return np.bincount(self.labels.ravel(), weights=w.ravel(), minlength=self.n + 1)


@dataclass(frozen=True)
class Edges:
    """Labels along a block's sides: first and last row, first and last column."""

    top: np.ndarray
    bottom: np.ndarray
    left: np.ndarray
    right: np.ndarray


def label_regions(classes: np.ndarray, valid: np.ndarray) -> Regions:
    """Label the 4-connected regions of equal class among the ``valid`` pixels of a block.

    The labelling depends only on the block's pixels (classes in increasing order, then raster
    order within a class), so reading the same block twice gives the same labels.
    """
    labels = np.zeros(classes.shape, np.int32)
    if classes.dtype.itemsize <= 2 and classes.dtype.kind == "u":
        values = np.flatnonzero(np.bincount(classes[valid].ravel(), minlength=1))
    else:
        values = np.unique(classes[valid])
    parts = [np.array([-1], np.int64)]
    n = 0
    for value in values:
        mask = valid & (classes == value)
        lab, k = ndimage.label(mask)
        np.add(lab, n, out=labels, where=mask)
        parts.append(np.full(k, int(value), np.int64))
        n += k
    return Regions(labels, np.concatenate(parts))


@dataclass(frozen=True)
class Polygons:
    """GDAL's polygons of one block in scene pixel coordinates, as flat arrays.

    ``xy`` holds every ring's vertices (closed); ring ``r`` is ``xy[ring_offsets[r]:ring_offsets[r+1]]``
    and polygon ``p`` owns rings ``poly_offsets[p]:poly_offsets[p+1]``, its shell first.
    """

    values: np.ndarray
    xy: np.ndarray
    ring_offsets: np.ndarray
    poly_offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.values)

    def geometries(self, transform: Affine | None = None) -> np.ndarray:
        """The polygons as shapely objects, in pixel coordinates or mapped by ``transform``."""
        xy = self.xy if transform is None else apply_affine(self.xy, transform)
        return shapely.from_ragged_array(
            shapely.GeometryType.POLYGON, xy, (self.ring_offsets, self.poly_offsets)
        )

    def side_owners(self, box: Box) -> Edges:
        """Which polygon (index + 1; 0 for none) holds each pixel along the four sides of ``box``.

        A ring segment lying on a side line of the block bounds the pixels just inside it, so this
        needs no pixel labels.
        """
        a, b = self.xy[:-1], self.xy[1:]
        ok = np.ones(len(a), bool)
        ok[self.ring_offsets[1:-1] - 1] = False  # no segment from a ring's last vertex to the next ring
        ring = np.repeat(np.arange(len(self.ring_offsets) - 1), np.diff(self.ring_offsets))[:-1]
        owner = np.repeat(np.arange(1, len(self) + 1), np.diff(self.poly_offsets))[ring]

        def side(axis: int, line: int, start: int, n: int) -> np.ndarray:
            m = ok & (a[:, axis] == line) & (b[:, axis] == line)
            other = 1 - axis
            lo = np.minimum(a[m, other], b[m, other]).astype(np.int64) - start
            hi = np.maximum(a[m, other], b[m, other]).astype(np.int64) - start
            out = np.zeros(n, np.int64)
            lengths = hi - lo
            pos = np.repeat(lo - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
            out[pos] = np.repeat(owner[m], lengths)
            return out

        return Edges(
            side(1, box.y0, box.x0, box.width),
            side(1, box.y1, box.x0, box.width),
            side(0, box.x0, box.y0, box.height),
            side(0, box.x1, box.y0, box.height),
        )

    def subset(self, keep: np.ndarray) -> Polygons:
        """The polygons where ``keep`` is True."""
        rings = np.diff(self.poly_offsets)[keep]
        ring_idx = np.repeat(self.poly_offsets[:-1][keep] - np.cumsum(rings) + rings, rings) + np.arange(
            rings.sum()
        )
        lengths = np.diff(self.ring_offsets)[ring_idx]
        starts = self.ring_offsets[:-1][ring_idx]
        coord_idx = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        return Polygons(
            self.values[keep], self.xy[coord_idx], np.r_[0, np.cumsum(lengths)], np.r_[0, np.cumsum(rings)]
        )


def apply_affine(xy: np.ndarray, t: Affine) -> np.ndarray:
    """Map (n, 2) pixel coordinates by ``t`` as GDAL does (``x = c + col*a + row*b``, ...)."""
    out = np.empty_like(xy, dtype=np.float64)
    out[:, 0] = xy[:, 0] * t.a + xy[:, 1] * t.b + t.c
    out[:, 1] = xy[:, 0] * t.d + xy[:, 1] * t.e + t.f
    return out


def polygonize(data: np.ndarray, *, x0: int, y0: int, mask: np.ndarray | None = None) -> Polygons:
    """Polygons of a block's 4-connected areas of equal value, in scene pixel coordinates.

    Uses GDAL's polygonizer with 4-connectivity, so each area gives one valid polygon (holes
    included), exactly as :func:`rasterio.features.shapes` on the whole raster gives it. Pixels
    outside ``mask`` give none. Vertices are exact integers. GDAL's output streams into flat
    buffers, so memory stays near 16 bytes per vertex.
    """
    buf = array("d")
    ring_lengths = array("q")
    ring_counts = array("q")
    values = array("d")
    for geom, value in shapes(data, mask=mask, connectivity=4, transform=Affine.translation(x0, y0)):
        coords = geom["coordinates"]
        for ring in coords:
            ring_lengths.append(len(ring))
            buf.extend(chain.from_iterable(ring))
        ring_counts.append(len(coords))
        values.append(value)
    return Polygons(
        np.frombuffer(values, np.float64).astype(np.int64),
        np.frombuffer(buf, np.float64).reshape(-1, 2),
        np.r_[0, np.cumsum(np.frombuffer(ring_lengths, np.int64))],
        np.r_[0, np.cumsum(np.frombuffer(ring_counts, np.int64))],
    )


def adjacency(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shared border lengths of a block's regions, in pixel edges.

    Returns:
        ``(p, q, count)``: region ``p`` shares ``count`` pixel edges with region ``q``; both
        orders are listed; nodata (label 0) is left out.
    """
    pairs = []
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:])):
        m = (a != b) & (a > 0) & (b > 0)
        pairs.append((a[m], b[m]))
    p = np.concatenate([x for x, _ in pairs] + [y for _, y in pairs]).astype(np.int64)
    q = np.concatenate([y for _, y in pairs] + [x for x, _ in pairs]).astype(np.int64)
    if not len(p):
        return p, q, p.copy()
    base = int(labels.max()) + 1
    keys, count = np.unique(p * base + q, return_counts=True)
    return keys // base, keys % base, count


class Sweep:
    """Union-find over the global ids of border regions, fed block by block in row-major order.

    Global id of label ``l`` in a block = the block's offset + ``l`` (offsets count all labels of the
    blocks before). Only labels touching an internal border are registered.
    """

    def __init__(self, width: int) -> None:
        self.parent: dict[int, int] = {}
        self.members: dict[int, list[int]] = {}
        self.offset = 0
        self._front = (np.zeros(width, np.int64), np.full(width, -1, np.int64))
        self._left = (np.zeros(0, np.int64), np.zeros(0, np.int64))

    def find(self, g: int) -> int:
        """The root id of ``g``'s region."""
        parent = self.parent
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    def register(self, n: int, border: np.ndarray) -> int:
        """Reserve ids for a block with ``n`` labels, register its ``border`` labels; return the offset."""
        off = self.offset
        self.offset += n
        for g in (border + off).tolist():
            self.parent[g] = g
            self.members[g] = [g]
        return off

    def stitch(self, box: Box, cls: np.ndarray, edges: Edges, off: int) -> None:
        """Join the block's regions with those of the blocks above and to the left."""

        def gid(lab: np.ndarray) -> np.ndarray:
            return np.where(lab > 0, lab.astype(np.int64) + off, 0)

        if box.y0 > 0:
            ids, c = self._front
            self._join_side(ids[box.x0 : box.x1], c[box.x0 : box.x1], gid(edges.top), cls[edges.top])
        if box.x0 > 0:
            self._join_side(*self._left, gid(edges.left), cls[edges.left])
        self._front[0][box.x0 : box.x1] = gid(edges.bottom)
        self._front[1][box.x0 : box.x1] = cls[edges.bottom]
        self._left = (gid(edges.right), cls[edges.right])

    def _join_side(self, a: np.ndarray, ca: np.ndarray, b: np.ndarray, cb: np.ndarray) -> None:
        valid = (a > 0) & (b > 0)
        same = valid & (ca == cb)
        if same.any():
            for x, y in np.unique(np.stack([a[same], b[same]], axis=1), axis=0).tolist():
                self.union(x, y)
        diff = valid & ~same
        if diff.any():
            self.cross(a[diff], b[diff])

    def union(self, a: int, b: int) -> None:
        """Join the regions of ids ``a`` and ``b``."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if len(self.members[ra]) < len(self.members[rb]):
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.members[ra].extend(self.members.pop(rb))
        self.merged(ra, rb)

    def merged(self, keep: int, gone: int) -> None:
        """Hook: root ``gone`` was joined into root ``keep``."""

    def cross(self, a: np.ndarray, b: np.ndarray) -> None:
        """Hook: ids ``a[i]`` and ``b[i]`` (different classes) are neighbours across a block border."""

    def open_roots(self) -> set[int]:
        """Roots of the regions with a pixel on the last line of the block row just finished."""
        ids = np.unique(self._front[0])
        return {self.find(g) for g in ids[ids > 0].tolist()}

    def drop(self, root: int) -> None:
        """Forget a finished region."""
        for g in self.members.pop(root):
            del self.parent[g]


class PieceStore:
    """Append-only spill file of WKB pieces; only ``(offset, length)`` pairs stay in memory."""

    def __init__(self, folder: Path) -> None:
        fd, name = tempfile.mkstemp(prefix="pieces-", suffix=".wkb", dir=folder)
        self._fd, self.path, self._end = fd, Path(name), 0

    def put_many(self, items: list[bytes]) -> list[tuple[int, int]]:
        """Append several items in one write; returns where each lies."""
        lengths = [len(b) for b in items]
        starts = np.r_[0, np.cumsum(lengths)][:-1] + self._end
        os.pwrite(self._fd, b"".join(items), self._end)
        self._end += sum(lengths)
        return list(zip(starts.tolist(), lengths, strict=True))

    def get(self, where: tuple[int, int]) -> bytes:
        """Read back an item stored by :meth:`put_many`."""
        return os.pread(self._fd, where[1], where[0])

    def close(self) -> None:
        """Close and delete the spill file."""
        os.close(self._fd)
        self.path.unlink(missing_ok=True)


@dataclass
class Group:
    """A region being assembled from pieces: class, spilled pieces, pixel count, confidence sums."""

    cls: int
    pieces: list[tuple[int, int]]
    pixels: int
    conf_sum: float
    conf_n: int


@dataclass(frozen=True)
class Pieces:
    """A block's border pieces: label, polygon WKB (pixel coordinates), pixel count, confidence sums."""

    labels: np.ndarray
    wkb: list[bytes]
    pixels: np.ndarray
    conf_sum: np.ndarray
    conf_n: np.ndarray


class BorderMerger(Sweep):
    """Collect border pieces and hand out whole regions as soon as they cannot grow any more.

    ``exact`` pieces are GDAL's pixel polygons (axis-parallel edges), merged by :func:`merge_regions`;
    otherwise (simplified pieces) by :func:`merge_pieces`.
    """

    def __init__(
        self, store: PieceStore, *, block_size: int, height: int, width: int, exact: bool = True
    ) -> None:
        super().__init__(width)
        self.groups: dict[int, Group] = {}
        self.store = store
        self.block_size, self.height, self.width, self.exact = block_size, height, width, exact

    def add(self, box: Box, cls: np.ndarray, edges: Edges, pieces: Pieces) -> None:
        """Add one block (row-major order): its border pieces and its sides."""
        off = self.register(len(cls) - 1, pieces.labels)
        places = self.store.put_many(pieces.wkb)
        for i, (lab, where) in enumerate(zip(pieces.labels.tolist(), places, strict=True)):
            self.groups[off + lab] = Group(
                int(cls[lab]),
                [where],
                int(pieces.pixels[i]),
                float(pieces.conf_sum[i]),
                int(pieces.conf_n[i]),
            )
        self.stitch(box, cls, edges, off)

    def merged(self, keep: int, gone: int) -> None:  # noqa: D102
        g, h = self.groups[keep], self.groups.pop(gone)
        g.pieces.extend(h.pieces)
        g.pixels += h.pixels
        g.conf_sum += h.conf_sum
        g.conf_n += h.conf_n

    def finished(self, *, last_row: bool) -> Iterator[tuple[list[Group], list[shapely.Polygon]]]:
        """Regions complete after a block row, with their merged polygons (pixel coordinates).

        Yields them in chunks of at most :data:`MERGE_CHUNK_BYTES` of spilled pieces (or one region),
        so memory follows the chunk, not the number of regions finishing at once.
        """
        still_open = set() if last_row else self.open_roots()
        roots = [r for r in self.groups if r not in still_open]
        chunk: list[Group] = []
        size = 0
        for i, root in enumerate(roots):
            group = self.groups.pop(root)
            self.drop(root)
            chunk.append(group)
            size += sum(n for _, n in group.pieces)
            if size >= MERGE_CHUNK_BYTES or i == len(roots) - 1:
                yield (
                    chunk,
                    self._merge([shapely.from_wkb([self.store.get(w) for w in g.pieces]) for g in chunk]),
                )
                chunk, size = [], 0

    def _merge(self, parts: list[np.ndarray]) -> list[shapely.Polygon]:
        if self.exact:
            try:
                return merge_regions(parts, block_size=self.block_size, height=self.height, width=self.width)
            except _TraceError as err:  # not expected for GDAL's polygons; the general union is safe
                log.warning("falling back to a polygon union for %d regions (%s)", len(parts), err)
        return [merge_pieces(p) for p in parts]


class _TraceError(RuntimeError):
    """The pieces' edges do not form closed rings as expected."""


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


def merge_regions(
    groups: list[np.ndarray], *, block_size: int, height: int, width: int
) -> list[shapely.Polygon]:
    """Union the pieces of each region, all regions at once, exactly and in linear time.

    Every piece is a GDAL pixel polygon (integer vertices, axis-parallel edges) inside one block,
    and pieces of a region meet only along block-border lines. So: shell segments lying on a border
    line are cut into unit edges, and a unit edge that two pieces of the region share is dropped;
    the remaining edges, directed with the region on their left, are chained into rings (taking the
    right turn where a vertex has two ways on, so rings touch at that point instead of crossing);
    rings running counter-clockwise are shells, the others holes. The pieces' own holes lie inside
    their blocks and are kept as they are. Straight runs become single segments, so each polygon
    equals the one GDAL gives for the whole region.

    Args:
        groups: for each region, the array of its pieces (pixel coordinates).
        block_size: block side in pixels (border lines are its multiples).
        height: raster height in pixels.
        width: raster width in pixels.
    """
    out = [g[0] if len(g) == 1 else None for g in groups]
    multi = [i for i, g in enumerate(groups) if len(g) > 1]
    if not multi:
        return out
    parts = np.concatenate([groups[i] for i in multi])
    part_group = np.repeat(np.arange(len(multi), dtype=np.int64), [len(groups[i]) for i in multi])
    start, end, dirs, edge_group = _boundary_edges(parts, part_group, block_size, height, width)
    coords, ring_offsets, ring_group, shell = _trace_rings(start, end, dirs, edge_group, height, width)
    if (np.bincount(ring_group[shell], minlength=len(multi)) != 1).any():
        raise _TraceError("a region did not come out as one shell")
    # the pieces' own holes, unchanged
    rings, owner = shapely.get_rings(parts, return_index=True)
    inner = np.r_[False, owner[1:] == owner[:-1]]
    hole_xy, hole_ring = shapely.get_coordinates(rings[inner], return_index=True)
    hole_offsets = np.r_[0, np.cumsum(np.bincount(hole_ring, minlength=int(inner.sum())))]
    # every polygon's rings: shell, traced holes, then the pieces' holes, copied straight into place
    n_traced = len(ring_offsets) - 1
    all_offsets = np.r_[ring_offsets, ring_offsets[-1] + hole_offsets[1:]]
    all_group = np.r_[ring_group, part_group[owner[inner]]]
    rank = np.r_[np.where(shell, 0, 1), np.full(int(inner.sum()), 2)]
    ring_order = np.lexsort((rank, all_group))
    lengths = np.diff(all_offsets)[ring_order]
    out_offsets = np.r_[0, np.cumsum(lengths)]
    place = np.empty(len(ring_order), np.int64)
    place[ring_order] = out_offsets[:-1]  # where each ring (in source order) starts in the output
    xy = np.empty((int(out_offsets[-1]), 2))
    for src, offsets, first in ((coords, ring_offsets, 0), (hole_xy, hole_offsets, n_traced)):
        counts = np.diff(offsets)
        shift = np.repeat(place[first : first + len(counts)] - offsets[:-1], counts)
        xy[np.arange(len(src)) + shift] = src
        del shift
    del coords, hole_xy
    polys = shapely.from_ragged_array(
        shapely.GeometryType.POLYGON,
        xy,
        (out_offsets, np.r_[0, np.cumsum(np.bincount(all_group, minlength=len(multi)))]),
    )
    for j, i in enumerate(multi):
        out[i] = polys[j]
    return out


def _boundary_edges(
    parts: np.ndarray, part_group: np.ndarray, block_size: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The directed boundary edges of each region's shells joined: (start, end, direction, region).

    Directions: 0 = +x, 1 = +y, 2 = -x, 3 = -y; every shell runs with its interior on the left.
    """
    xy, ring = shapely.get_coordinates(shapely.get_exterior_ring(parts), return_index=True)
    xy, ring = xy.astype(np.int32), ring.astype(np.int32)
    same = ring[:-1] == ring[1:]
    a, b, ring = xy[:-1][same], xy[1:][same], ring[:-1][same]
    del xy, same
    cross = a[:, 0].astype(np.float64) * b[:, 1] - b[:, 0].astype(np.float64) * a[:, 1]
    flip = (np.bincount(ring, weights=cross, minlength=len(parts)) < 0)[ring]
    del cross
    a[flip], b[flip] = b[flip], a[flip].copy()
    group = part_group.astype(np.int32)[ring]
    del ring, flip
    d = b - a
    direction = np.select([d[:, 0] > 0, d[:, 1] > 0, d[:, 0] < 0], [0, 1, 2], 3).astype(np.int8)
    horiz = d[:, 1] == 0
    line = np.where(horiz, a[:, 1], a[:, 0])
    on_border = (line % block_size == 0) & (line > 0) & (line < np.where(horiz, height, width))
    del line
    # segments on a border line become unit edges; a unit edge two pieces share lies inside: drop it
    idx = np.flatnonzero(on_border)
    length = np.abs(d[idx]).sum(axis=1)
    rep = np.repeat(idx, length)
    step = np.sign(d[rep])
    us = a[rep] + (np.arange(len(rep)) - np.repeat(np.cumsum(length) - length, length))[:, None] * step
    ue = us + step
    lo = np.minimum(us, ue).astype(np.int64)
    key = ((group[rep] * (height + 1) + lo[:, 1]) * (width + 1) + lo[:, 0]) * 2 + horiz[rep]
    del lo, step
    _, inverse, count = np.unique(key, return_inverse=True, return_counts=True)
    single = count[inverse.ravel()] == 1
    del key, inverse, count
    whole = ~on_border
    return (
        np.concatenate([a[whole], us[single]]),
        np.concatenate([b[whole], ue[single]]),
        np.concatenate([direction[whole], direction[rep][single]]),
        np.concatenate([group[whole], group[rep][single]]),
    )


def _trace_rings(
    start: np.ndarray, end: np.ndarray, dirs: np.ndarray, group: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Chain directed edges into closed rings without collinear vertices.

    Returns:
        ``(coords, ring_offsets, ring_region, is_shell)``.
    """
    n = len(start)

    def vertex(p: np.ndarray) -> np.ndarray:
        return (group.astype(np.int64) * (height + 1) + p[:, 1]) * (width + 1) + p[:, 0]

    start_key = vertex(start)
    order = np.argsort(start_key, kind="stable").astype(np.int32)
    start_key = start_key[order]
    end_key = vertex(end)
    lo = np.searchsorted(start_key, end_key, "left").astype(np.int32)
    ways = (np.searchsorted(start_key, end_key, "right") - lo).astype(np.int8)
    del start_key, end_key
    if n == 0 or ways.min() < 1 or ways.max() > 2:
        raise _TraceError("open or branching boundary")
    first = order[lo]
    second = order[np.minimum(lo + 1, n - 1)]
    del order, lo
    # at a pinch vertex (two ways on) take the right turn: rings then touch there, never cross
    succ = np.where((ways == 2) & (dirs[second] == (dirs + 3) % 4), second, first)
    del first, second, ways
    pred = np.full(n, -1, np.int32)
    pred[succ] = np.arange(n, dtype=np.int32)
    if (pred < 0).any():
        raise _TraceError("edges do not chain one to one")
    # walk the rings: depth-first from a virtual node linked to every edge visits each ring whole, in
    # order, one after another (an edge whose tree parent is the virtual node starts a ring)
    indices = np.concatenate([succ, np.arange(n, dtype=np.int32)])
    indptr = np.concatenate([np.arange(n + 1, dtype=np.int32), np.array([2 * n], np.int32)])
    graph = csr_matrix((np.ones(2 * n, np.int8), indices, indptr), shape=(n + 1, n + 1))
    del indices, indptr
    del succ
    seq, parent = depth_first_order(graph, n, directed=True, return_predecessors=True)
    del graph
    seq = seq[1:]
    ring = np.cumsum(parent[seq] == n) - 1
    n_rings = int(ring[-1]) + 1
    del parent
    keep = dirs[seq] != dirs[pred[seq]]  # a vertex only where the direction changes
    del pred
    seq, ring_of = seq[keep], ring[keep]
    counts = np.bincount(ring_of, minlength=n_rings)
    firsts = seq[np.r_[0, np.cumsum(counts)[:-1]]]
    ring_offsets = np.r_[0, np.cumsum(counts + 1)]
    coords = np.empty((len(seq) + n_rings, 2), np.float64)
    coords[np.arange(len(seq)) + ring_of] = start[seq]
    coords[ring_offsets[1:] - 1] = start[firsts]  # close each ring
    a, b = coords[:-1], coords[1:]
    rid = np.repeat(np.arange(n_rings), counts + 1)[:-1]
    ok = np.ones(len(a), bool)
    ok[ring_offsets[1:-1] - 1] = False
    area = np.bincount(rid[ok], weights=(a[:, 0] * b[:, 1] - b[:, 0] * a[:, 1])[ok], minlength=n_rings)
    return coords, ring_offsets, group[firsts], area > 0


class SieveRound(Sweep):
    """One round of the sieve: global region sizes and the borders small regions share with large ones.

    A region is *small* when its size (pixel count, or area units for a geographic CRS) is below
    ``threshold``. Feed every block to :meth:`collect`, call :meth:`resolve`, then :meth:`new_classes`
    gives, block by block, the class each region takes (see :func:`geoseg.vectorize.vectorize`).
    """

    def __init__(self, width: int, threshold: float) -> None:
        super().__init__(width)
        self.threshold = threshold
        self.size: dict[int, float] = {}
        self.root_cls: dict[int, int] = {}
        self.offsets: list[int] = []
        self.decision: dict[int, int] = {}
        # rows (small-candidate id, other, count, kind): kind 0 = other is the class of a large region
        # wholly inside the block, kind 1 = other is the id of a border region
        self._records: list[np.ndarray] = []

    def collect(self, box: Box, regions: Regions, size: np.ndarray, border: np.ndarray) -> None:
        """Add one block (row-major order), with its per-label ``size`` and ``border`` labels."""
        off = self.register(regions.n, border)
        self.offsets.append(off)
        for lab in border.tolist():
            self.size[off + lab] = float(size[lab])
            self.root_cls[off + lab] = int(regions.cls[lab])
        is_border = np.zeros(regions.n + 1, bool)
        is_border[border] = True
        p, q, count = adjacency(regions.labels)
        keep = is_border[p] & (size[p] < self.threshold)
        p, q, count = p[keep], q[keep], count[keep]
        inner = ~is_border[q] & (size[q] >= self.threshold)
        self._record(p[inner] + off, regions.cls[q[inner]], count[inner], 0)
        outer = is_border[q]
        self._record(p[outer] + off, q[outer] + off, count[outer], 1)
        self.stitch(box, regions.cls, regions.edges(), off)

    def _record(self, a: np.ndarray, b: np.ndarray, count: np.ndarray, kind: int) -> None:
        if len(a):
            self._records.append(np.stack([a, b, count, np.full(len(a), kind)], axis=1).astype(np.int64))

    def merged(self, keep: int, gone: int) -> None:  # noqa: D102
        self.size[keep] += self.size.pop(gone)

    def cross(self, a: np.ndarray, b: np.ndarray) -> None:  # noqa: D102
        self._record(np.concatenate([a, b]), np.concatenate([b, a]), np.ones(2 * len(a), np.int64), 1)

    def resolve(self) -> None:
        """Decide the new class of every small border region from the records of all blocks."""
        rec = np.concatenate(self._records) if self._records else np.zeros((0, 4), np.int64)
        self._records = []
        root = {g: self.find(g) for g in self.parent}
        small = {r for r in self.members if self.size[r] < self.threshold}
        score: dict[tuple[int, int], int] = {}
        for g, other, count, kind in rec.tolist():
            r = root[g]
            if r not in small:
                continue
            if kind == 0:
                k = other
            else:
                ro = root[other]
                if ro in small:
                    continue
                k = self.root_cls[ro]
            score[r, k] = score.get((r, k), 0) + count
        best: dict[int, tuple[int, int]] = {}
        for (r, k), count in score.items():
            if r not in best or (count, -k) > (best[r][1], -best[r][0]):
                best[r] = (k, count)
        self.decision = {r: k for r, (k, _) in best.items()}

    def new_classes(self, index: int, regions: Regions, size: np.ndarray, border: np.ndarray) -> np.ndarray:
        """The class each label of block number ``index`` takes in this round (``cls`` where kept)."""
        off = self.offsets[index]
        size = size.copy()
        new = regions.cls.copy()
        for lab in border.tolist():
            r = self.find(off + lab)
            size[lab] = self.size[r]
            if r in self.decision:
                new[lab] = self.decision[r]
        large = size >= self.threshold
        large[0] = False
        is_border = np.zeros(regions.n + 1, bool)
        is_border[border] = True
        p, q, count = adjacency(regions.labels)
        m = ~is_border[p] & ~large[p] & large[q]
        p, k, count = p[m], regions.cls[q[m]], count[m]
        if len(p):
            keys, inverse = np.unique(np.stack([p, k], axis=1), axis=0, return_inverse=True)
            total = np.bincount(inverse.ravel(), weights=count)
            order = np.lexsort((keys[:, 1], -total, keys[:, 0]))  # by label, longest border, lowest class
            keys = keys[order]
            first = np.r_[True, keys[1:, 0] != keys[:-1, 0]]
            new[keys[first, 0]] = keys[first, 1]
        return new
