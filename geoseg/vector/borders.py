"""Pieces of regions cut by block borders: spilled to disk, joined, handed out when complete.

After a block row, a region with no pixel on that row's last line can grow no further:
:class:`BorderMerger` reads its pieces back from the spill file (:class:`PieceStore`) and joins them
(:func:`~geoseg.vector.merge.merge_regions`). Pieces are kept as int32 pixel coordinates (8 bytes
per vertex) from the block worker to the merge.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geoseg.tiling import Box
from geoseg.vector.merge import TraceError, merge_pieces, merge_regions
from geoseg.vector.polygons import Polygons, offsets, ragged_arange
from geoseg.vector.regions import Edges
from geoseg.vector.sweep import Sweep

log = logging.getLogger(__name__)

#: Spilled piece bytes (about 8 per vertex) merged in one go when many regions finish together.
MERGE_CHUNK_BYTES = 8 * 1024**2


@dataclass(frozen=True)
class Pieces:
    """A block's border pieces: label, spill records (:func:`encode_pieces`), pixel count, confidence sums."""

    labels: np.ndarray
    data: bytes
    sizes: np.ndarray
    pixels: np.ndarray
    conf_sum: np.ndarray
    conf_n: np.ndarray


@dataclass
class Group:
    """A region being assembled: class, where its pieces are spilled, pixel count, confidence sums."""

    cls: int
    pieces: list[tuple[int, int, int]]
    pixels: int
    conf_sum: float
    conf_n: int


def encode_pieces(polys: Polygons, cuts: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Spill records of polygons with integer vertices, and the bytes of each record's two parts.

    A record is int32 values: a header (the ring count, each ring's vertex count, the count of *cut*
    vertices, their indices within the polygon), then the coordinates. ``cuts`` (sorted indices into
    ``polys.xy``) are where :func:`~geoseg.vector.merge.merge_regions` must let rings turn either way.

    Returns:
        ``(data, sizes)``: the records one after another, and per record its header and coordinate bytes.
    """
    rings = np.diff(polys.poly_offsets)
    first = polys.ring_offsets[polys.poly_offsets[:-1]]
    vertices = polys.ring_offsets[polys.poly_offsets[1:]] - first
    cut_poly = np.searchsorted(first, cuts, "right") - 1
    n_cuts = np.bincount(cut_poly, minlength=len(polys))
    head = 2 + rings + n_cuts
    start = offsets(head + 2 * vertices)
    buf = np.empty(int(start[-1]), np.int32)
    buf[start[:-1]] = rings
    ring_poly = np.repeat(np.arange(len(polys)), rings)
    buf[start[ring_poly] + 1 + np.arange(len(ring_poly)) - polys.poly_offsets[ring_poly]] = np.diff(polys.ring_offsets)
    buf[start[:-1] + 1 + rings] = n_cuts
    cut_rank = np.arange(len(cuts)) - offsets(n_cuts)[cut_poly]
    buf[start[cut_poly] + 2 + rings[cut_poly] + cut_rank] = cuts - first[cut_poly]
    buf[ragged_arange(start[:-1] + head, 2 * vertices)] = polys.xy.ravel()
    return buf.tobytes(), 4 * np.stack([head, 2 * vertices], axis=1)


def decode_pieces(head: np.ndarray, head_sizes: np.ndarray, xy: np.ndarray) -> tuple[Polygons, np.ndarray]:
    """The polygons and cut vertices (indices into ``xy``) of records whose parts were read apart.

    ``head`` holds the records' headers one after another (``head_sizes`` int32 values each), ``xy``
    their coordinates.
    """
    start = offsets(head_sizes)[:-1]
    rings = head[start].astype(np.int64)
    ring_offsets = offsets(head[ragged_arange(start + 1, rings)])
    poly_offsets = offsets(rings)
    n_cuts = head[start + 1 + rings].astype(np.int64)
    cuts = head[ragged_arange(start + 2 + rings, n_cuts)] + np.repeat(ring_offsets[poly_offsets[:-1]], n_cuts)
    return Polygons(xy, ring_offsets, poly_offsets), cuts


class PieceStore:
    """Append-only spill file of piece records; only ``(offset, header bytes, coordinate bytes)`` stay in memory."""

    def __init__(self, folder: Path) -> None:
        fd, name = tempfile.mkstemp(prefix="pieces-", suffix=".i32", dir=folder)
        self._fd, self.path, self._end = fd, Path(name), 0

    def put(self, data: bytes, sizes: np.ndarray) -> list[tuple[int, int, int]]:
        """Append records (:func:`encode_pieces`) in one write; returns where each lies."""
        os.pwrite(self._fd, data, self._end)
        at = self._end + offsets(sizes.sum(axis=1))[:-1]
        self._end += len(data)
        return list(zip(at.tolist(), sizes[:, 0].tolist(), sizes[:, 1].tolist(), strict=True))

    def get(self, places: list[tuple[int, int, int]]) -> tuple[Polygons, np.ndarray]:
        """Read back records stored by :meth:`put`, in the order given (see :func:`decode_pieces`).

        Each record's parts are read straight into their place in one header array and one
        coordinate array, so the coordinates are held once.
        """
        sizes = np.array([(h, c) for _, h, c in places], np.int64).reshape(-1, 2)
        head = np.empty(int(sizes[:, 0].sum()) // 4, np.int32)
        xy = np.empty((int(sizes[:, 1].sum()) // 8, 2), np.int32)
        head_view, xy_view = memoryview(head).cast("B"), memoryview(xy).cast("B")
        h = c = 0
        for at, nh, nc in places:
            if os.preadv(self._fd, [head_view[h : h + nh], xy_view[c : c + nc]], at) != nh + nc:
                raise OSError(f"{self.path}: short read")
            h, c = h + nh, c + nc
        return decode_pieces(head, sizes[:, 0] // 4, xy)

    def close(self) -> None:
        """Close and delete the spill file."""
        os.close(self._fd)
        self.path.unlink(missing_ok=True)


class BorderMerger(Sweep):
    """Collect border pieces and hand out whole regions as soon as they cannot grow any more.

    ``exact`` pieces are traced pixel polygons, joined by :func:`~geoseg.vector.merge.merge_regions`;
    otherwise (simplified pieces) by :func:`~geoseg.vector.merge.merge_pieces`.
    """

    def __init__(self, store: PieceStore, *, block_size: int, height: int, width: int, exact: bool = True) -> None:
        super().__init__(width)
        self.groups: dict[int, Group] = {}
        self.store = store
        self.block_size, self.height, self.width, self.exact = block_size, height, width, exact

    def add(self, box: Box, cls: np.ndarray, edges: Edges, pieces: Pieces) -> None:
        """Add one block (row-major order): its border pieces and its sides."""
        off = self.register(len(cls) - 1, pieces.labels)
        places = self.store.put(pieces.data, pieces.sizes)
        for lab, where, pixels, conf_sum, conf_n in zip(
            pieces.labels.tolist(),
            places,
            pieces.pixels.tolist(),
            pieces.conf_sum.tolist(),
            pieces.conf_n.tolist(),
            strict=True,
        ):
            self.groups[off + lab] = Group(int(cls[lab]), [where], pixels, conf_sum, conf_n)
        self.stitch(box, cls, edges, off)

    def merged(self, keep: int, gone: int) -> None:  # noqa: D102
        g, h = self.groups[keep], self.groups.pop(gone)
        g.pieces.extend(h.pieces)
        g.pixels += h.pixels
        g.conf_sum += h.conf_sum
        g.conf_n += h.conf_n

    def finished(self, *, last_row: bool) -> Iterator[tuple[list[Group], Polygons]]:
        """Regions complete after a block row, with their polygons (pixel coordinates).

        Yields them in chunks of at most :data:`MERGE_CHUNK_BYTES` of spilled pieces (or one region),
        so memory follows the chunk, not the number of regions finishing at once.
        """
        still_open = set() if last_row else self.open_roots()
        chunk: list[Group] = []
        size = 0
        for root in [r for r in self.groups if r not in still_open]:
            group = self.groups.pop(root)
            self.drop(root)
            spilled = sum(h + c for _, h, c in group.pieces)
            if chunk and size + spilled > MERGE_CHUNK_BYTES:  # a large region goes alone
                yield self._finish(chunk)
                chunk, size = [], 0
            chunk.append(group)
            size += spilled
        if chunk:
            yield self._finish(chunk)

    def _finish(self, chunk: list[Group]) -> tuple[list[Group], Polygons]:
        pieces, cuts = self.store.get([w for g in chunk for w in g.pieces])
        owner = np.repeat(np.arange(len(chunk)), [len(g.pieces) for g in chunk])
        return chunk, self._merge(pieces, owner, cuts)

    def _merge(self, pieces: Polygons, owner: np.ndarray, cuts: np.ndarray) -> Polygons:
        if self.exact:
            try:
                return merge_regions(
                    pieces, owner, cuts=cuts, block_size=self.block_size, height=self.height, width=self.width
                )
            except TraceError as err:  # not expected for traced pieces; the general union is safe
                log.warning("falling back to a polygon union for %d regions (%s)", int(owner[-1]) + 1, err)
        parts = pieces.geometries()
        cut = np.flatnonzero(np.diff(owner)) + 1
        return Polygons.from_geometries(np.array([merge_pieces(p) for p in np.split(parts, cut)], dtype=object))
