"""Regions of a block: 4-connected sets of pixels of one class, labelled from pixel runs.

A *region* is a 4-connected set of valid pixels of one class; a *block* is the rectangle of the
class raster processed at once; a *piece* is the part of a region inside one block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from geoseg.tiling import Box


@dataclass(frozen=True)
class Edges:
    """Labels along a block's sides: first and last row, first and last column."""

    top: np.ndarray
    bottom: np.ndarray
    left: np.ndarray
    right: np.ndarray


@dataclass(frozen=True)
class Regions:
    """The regions of one block.

    ``labels`` (h, w) int32: 0 on nodata, else 1..n; ``cls[label]``: its class; ``pixels[label]``:
    its pixel count.
    """

    labels: np.ndarray
    cls: np.ndarray
    pixels: np.ndarray

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
            return self.pixels.astype(np.float64)
        w = np.broadcast_to(row_weights[:, None], self.labels.shape)
        return np.bincount(self.labels.ravel(), weights=w.ravel(), minlength=self.n + 1)


def label_regions(classes: np.ndarray, valid: np.ndarray) -> Regions:
    """Label the 4-connected regions of equal class among the ``valid`` pixels of a block.

    ``valid`` must follow from the class alone (as nodata values do). Each row is cut into runs of
    equal class; runs of one class that overlap in consecutive rows are joined (connected
    components of the run graph). Labels are numbered in raster order of each region's first pixel,
    so they depend only on the block's pixels.
    """
    h, w = classes.shape
    start = np.empty((h, w), bool)
    start[:, 0] = True
    np.not_equal(classes[:, 1:], classes[:, :-1], out=start[:, 1:])
    run = np.cumsum(start, dtype=np.int32)
    run -= 1
    first = np.flatnonzero(start)
    # two runs overlap in consecutive rows iff they do at a pixel where one of them starts
    link = start[1:] | start[:-1]
    link &= classes[1:] == classes[:-1]
    link &= valid[1:]
    at = np.flatnonzero(link)
    graph = csr_matrix((np.ones(len(at), np.int8), (run[at], run[at + w])), shape=(len(first), len(first)))
    _, component = connected_components(graph, directed=False)  # numbered by lowest run
    run_valid = valid.ravel()[first]
    number = np.zeros(component.max() + 1, np.int32)
    number[component[run_valid]] = 1
    number = np.cumsum(number, dtype=np.int32) * number  # 1..n in order of first run, 0 for nodata
    run_label = number[component]
    n = int(number.max())
    cls = np.full(n + 1, -1, np.int64)
    cls[run_label[run_valid]] = classes.ravel()[first[run_valid]]
    pixels = np.bincount(run_label, weights=np.diff(first, append=h * w), minlength=n + 1).astype(np.int64)
    return Regions(run_label[run].reshape(h, w), cls, pixels)


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
