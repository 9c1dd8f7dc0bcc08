"""Trace the outlines of a block's labelled regions on the pixel grid: GDAL's polygons, made in numpy.

Each pixel edge between two different labels is a boundary edge. Directed with its region on the
left (pixel coordinates, x right, y down: a lone pixel's shell runs (0,0) (1,0) (1,1) (0,1)), the
edges of a region chain into closed rings. At a vertex a ring turns right if its region goes on
there, else goes straight on if it can, else turns left. Where a region touches itself only at a
vertex (two diagonal pixels of the four around it), this rule keeps the rings apart, so a region
gives one shell (positive shoelace area in pixel coordinates) plus one ring per hole, touching at
most at single points: valid polygons, vertex for vertex the ones GDAL's 4-connected polygonizer
(``rasterio.features.shapes(connectivity=4)``) makes, with a vertex only where a ring turns (tested
against it). Only the *corner* edges (where the ring turns) become nodes, and rings alternate
horizontal and vertical corners, so the walk round the rings (:func:`walk_cycles`) takes half of them.

Why not GDAL's polygonizer itself: ``shapes`` hands every ring back as Python GeoJSON lists, and
building and copying those took about 60 % of vectorising a 10000² map (profiled), which made a
block-wise run slower than one whole-raster ``shapes`` call. Tracing here keeps rings as int32
arrays from labels to WKB; the test suite checks it against ``shapes`` vertex for vertex.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components, depth_first_order

from geoseg.vector.polygons import Polygons, offsets, ragged_arange
from geoseg.vector.regions import Regions


def trace_regions(regions: Regions, *, x0: int = 0, y0: int = 0) -> tuple[Polygons, np.ndarray]:
    """The polygon of each region (polygon ``i`` is label ``i + 1``), and where regions touch diagonally.

    Vertices are int32 pixel coordinates offset by ``(x0, y0)``.

    Returns:
        ``(polygons, touching)``: ``touching`` flags the vertices where the polygon's region touches
        another region of its class at that vertex only (two diagonal pixels of the four around it).
    """
    labels, n = regions.labels, regions.n
    h, w = labels.shape
    if n == 0:
        return Polygons.empty(), np.zeros(0, bool)
    W = w + 2
    grid = np.zeros((h + 2, W), np.int32)
    grid[1:-1, 1:-1] = labels
    flat = grid.ravel()
    # boundary edges on horizontal lines (line y, cell x) and on vertical lines (line x, cell y)
    hy, hx = np.divmod(np.flatnonzero(grid[1:, 1:-1] != grid[:-1, 1:-1]), w)
    vy, vx = np.divmod(np.flatnonzero(grid[1:-1, :-1] != grid[1:-1, 1:]), w + 1)
    below = (hy + 1) * W + hx + 1
    left = (vy + 1) * W + vx
    # per direction, horizontal ones first (0 = +x, 2 = -x, 1 = +y, 3 = -y): owner pixel, end vertex,
    # offsets of the pixels ahead-left and ahead-right of the end vertex (from the owner pixel)
    edges = {
        0: (below, hx + 1, hy, 1, 1 - W),
        2: (below - W, hx, hy, -1, W - 1),
        1: (left, vx, vy + 1, W, W + 1),
        3: (left + 1, vx, vy, -W, -W - 1),
    }
    cls = regions.cls
    ex, ey, turn, owner, touch = [], [], [], [], []
    for d, (pix, x, y, ahead_left, ahead_right) in edges.items():
        own = flat[pix]
        m = np.flatnonzero(own)
        pix, own = pix[m], own[m]
        diagonal = flat[pix + ahead_right]
        right = diagonal == own
        c = np.flatnonzero(right | (flat[pix + ahead_left] != own))  # a corner: the ring turns at its end
        if d % 2:  # vertical: in column-major order, the order runs follow the lines
            c = c[_sort_by(x[m[c]])]
        own, diagonal, right, m = own[c], diagonal[c], right[c], m[c]
        ex.append(x[m])
        ey.append(y[m])
        turn.append(np.where(right, (d + 3) % 4, (d + 1) % 4).astype(np.int8))
        owner.append(own)
        touch.append(~right & (diagonal != 0) & (cls[diagonal] == cls[own]))
    base = dict(zip(edges, offsets([len(t) for t in turn])[:-1].tolist(), strict=True))
    n_horizontal = len(turn[0]) + len(turn[1])
    ex, ey, turn, owner, touch = (np.concatenate(a) for a in (ex, ey, turn, owner, touch))
    # a corner's successor ends the straight run that starts at its end vertex; along each line runs
    # are disjoint, so the k-th run start (in line order) belongs to the k-th run end
    succ = np.empty(len(ex), np.int64)
    for d in edges:
        starts = np.flatnonzero(turn == d)
        line, pos = (ey, ex) if d % 2 == 0 else (ex, ey)
        starts = starts[_sort_by(pos[starts])]
        starts = starts[_sort_by(line[starts])]
        succ[starts] = np.arange(base[d], base[d] + len(starts))
    # rings alternate horizontal and vertical corners: walk the horizontal ones two steps at a time
    seq, ring_offsets = walk_cycles(succ[succ[:n_horizontal]])
    seq = np.stack([seq, succ[seq]], axis=1).ravel()
    ring_offsets = 2 * ring_offsets
    rx, ry = ex[seq].astype(np.int64), ey[seq].astype(np.int64)
    nxt = np.arange(1, len(seq) + 1)
    nxt[ring_offsets[1:] - 1] = ring_offsets[:-1]
    area = np.add.reduceat(rx * ry[nxt] - rx[nxt] * ry, ring_offsets[:-1])
    ring_owner = owner[seq[ring_offsets[:-1]]]
    order = np.lexsort((area < 0, ring_owner))  # per label: its shell, then its holes
    lengths = np.diff(ring_offsets)[order]
    pick = ragged_arange(ring_offsets[:-1][order], lengths + 1)
    out_offsets = offsets(lengths + 1)
    pick[out_offsets[1:] - 1] = ring_offsets[:-1][order]  # close each ring
    xy = np.empty((len(pick), 2), np.int32)
    xy[:, 0] = rx[pick] + x0
    xy[:, 1] = ry[pick] + y0
    return Polygons(xy, out_offsets, offsets(np.bincount(ring_owner, minlength=n + 1)[1:])), touch[seq][pick]


def _sort_by(key: np.ndarray) -> np.ndarray:
    """A stable argsort of non-negative coordinates (a radix sort when they fit in 16 bits)."""
    return np.argsort(key.astype(np.int16 if len(key) and key.max() < 2**15 else np.int64), kind="stable")


def walk_cycles(succ: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a permutation into its cycles.

    Returns:
        ``(nodes, offsets)``: the nodes cycle by cycle, each cycle from its lowest node in successor
        order; cycle ``k`` is ``nodes[offsets[k]:offsets[k+1]]``.
    """
    n = len(succ)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(1, np.int64)
    succ = succ.astype(np.int32)
    graph = csr_matrix((np.ones(n, np.int8), succ, np.arange(n + 1, dtype=np.int32)), shape=(n, n))
    _, cycle = connected_components(graph, directed=True, connection="weak")  # numbered by lowest node
    head = np.empty(n, bool)
    head[0] = True
    np.greater(cycle[1:], np.maximum.accumulate(cycle)[:-1], out=head[1:])
    heads = np.flatnonzero(head).astype(np.int32)
    # one path through all cycles: each cycle's last node leads on to the next cycle's head
    last = head[succ]
    succ[last] = np.append(heads[1:], -1)[cycle[last]]
    has = succ >= 0
    path = csr_matrix((np.ones(n - 1, np.int8), succ[has], offsets(has).astype(np.int32)), shape=(n, n))
    nodes = depth_first_order(path, 0, directed=True, return_predecessors=False)
    return nodes.astype(np.int64), offsets(np.bincount(cycle))
