"""The minimum-mapping-unit sieve, block by block: small regions take the class of large neighbours.

The blocks are swept in rounds. Over one sweep a :class:`SieveRound` gathers each border region's
global size and the border lengths it shares with its neighbours, then decides the new class of
each small region. The next sweep relabels every block by those decisions, writes it to a
temporary ``"blocks"`` source (which the next sweep and the polygonising read) and gathers for the
following round, until no region changes class. The rules are in :func:`geoseg.vectorize.vectorize`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from geoseg.tiling import Box
from geoseg.vector.inputs import Grid, Source, read_pixels, write_pixels
from geoseg.vector.regions import Regions, adjacency, label_regions
from geoseg.vector.sweep import Sweep

log = logging.getLogger(__name__)

#: Rounds of the sieve before giving up on regions that are still small (see :func:`geoseg.vectorize.vectorize`).
MAX_SIEVE_ROUNDS = 16


def sieve(
    source: Source, grid: Grid, blocks: list[Box], min_area: float, tmp: Path, tick: Callable[[int], None]
) -> tuple[Source, int]:
    """Apply the minimum-mapping-unit sieve; returns the source of the sieved blocks and the rounds run.

    ``tick(extra)`` is called after each block read, with the number of blocks a new round adds.
    """
    if grid.geographic:
        threshold = min_area * 100.0  # sizes in whole dm²

        def weights(box: Box) -> np.ndarray:
            return grid.row_areas_dm2(box.y0, box.y1)
    else:
        threshold = min_area / grid.pixel_area_m2()

        def weights(box: Box) -> np.ndarray | None:
            return None

    def analyse(src: Source, box: Box) -> tuple[np.ndarray, np.ndarray, Regions, np.ndarray, np.ndarray]:
        classes, valid = read_pixels(src, box)
        regions = label_regions(classes, valid)
        return (
            classes,
            valid,
            regions,
            regions.sizes(weights(box)),
            regions.border_labels(box, grid.height, grid.width),
        )

    current = SieveRound(grid.width, threshold)
    for box in blocks:
        _, _, regions, size, border = analyse(source, box)
        current.collect(box, regions, size, border)
        tick(0)
    current.resolve()
    sieved = Source("blocks", str(tmp / "sieved"), nodata=source.nodata, dtype=source.dtype)
    Path(sieved.path).mkdir(exist_ok=True)
    src, rounds = source, 0
    while rounds < MAX_SIEVE_ROUNDS:
        following = SieveRound(grid.width, threshold)
        changed = 0
        for i, box in enumerate(blocks):
            classes, valid, regions, size, border = analyse(src, box)
            new = current.new_classes(i, regions, size, border)
            moved = new != regions.cls
            if moved.any():
                changed += int(moved.sum())
                classes = np.where(valid, new[regions.labels], classes).astype(classes.dtype)
                regions = label_regions(classes, valid)
                size, border = (
                    regions.sizes(weights(box)),
                    regions.border_labels(box, grid.height, grid.width),
                )
            write_pixels(sieved, box, classes)
            following.collect(box, regions, size, border)
            tick(len(blocks) if i == 0 and rounds > 0 else 0)
        log.debug("sieve round %d: %d regions changed class", rounds + 1, changed)
        if not changed:
            break
        rounds += 1
        src = sieved
        following.resolve()
        current = following
    return src, rounds


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
