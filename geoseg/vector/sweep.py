"""A row-major sweep over the blocks that joins the regions cut by block borders (a union-find).

Blocks are visited in row-major order. Pieces on an internal border get a global id; along each
border the sweep joins the ids of same-class pixels that are 4-neighbours across it. Only one row
of ids across the raster and one column are kept, so memory follows the block size and the raster
width, plus the regions still open. :class:`~geoseg.vector.borders.BorderMerger` (polygons) and
:class:`~geoseg.vector.sieve.SieveRound` (sizes and neighbours) build on it.
"""

from __future__ import annotations

import numpy as np

from geoseg.tiling import Box
from geoseg.vector.regions import Edges


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
