"""Seam-free stitching: predict a block's tiles in batches and blend them into the block's core.

Each tile's probabilities are weighted by :func:`blend_window`, which is 1 in the tile's inner part
and falls smoothly towards its edges over the low-context ``margin``; the core pixel's probability is
the weighted mean over every lattice tile covering it::

    p(x) = sum_t w_t(x) p_t(x) / sum_t w_t(x)

A block gets exactly the tiles that cover its core in the whole scene (:mod:`geoseg.tiling`), summed
in the same order, so a blocked run equals a whole-scene run and block borders cannot show.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from geoseg.tiling import Block, Box

#: Class id written where the input was invalid (nodata, masked, NaN) in the class map.
CLASS_NODATA = 255
#: Weight at a tile's very edge: small but positive, so pixels at the scene edge stay defined.
EDGE_WEIGHT = 1e-3

ProbaFn = Callable[[np.ndarray], np.ndarray]


@lru_cache(maxsize=8)
def blend_window(tile: int, margin: int) -> np.ndarray:
    """Separable (tile, tile) weights: a raised-cosine ramp over ``margin`` px at each edge, 1 inside.

    ``w(d) = e + (1 - e) * (1 - cos(pi * (d + 0.5) / margin)) / 2`` for a pixel ``d < margin`` px from
    the nearest edge, ``e`` = :data:`EDGE_WEIGHT`; ``margin = 0`` gives uniform weights (no blending).
    """
    ramp = np.ones(tile, dtype=np.float32)
    if margin:
        d = np.arange(margin, dtype=np.float64)
        r = EDGE_WEIGHT + (1 - EDGE_WEIGHT) * (1 - np.cos(np.pi * (d + 0.5) / margin)) / 2
        ramp[:margin] = r
        ramp[tile - margin :] = r[::-1]
    w = np.outer(ramp, ramp)
    w.setflags(write=False)
    return w


@dataclass(frozen=True)
class BlockResult:
    """What a block writes: class ids, confidence (max probability) and optionally probabilities."""

    class_id: np.ndarray
    confidence: np.ndarray
    probabilities: np.ndarray | None = None


def _batches(block: Block, batch_size: int) -> Iterator[tuple[Box, ...]]:
    for i in range(0, len(block.tiles), batch_size):
        yield block.tiles[i : i + batch_size]


def blend_block(
    block: Block,
    image: np.ndarray,
    valid: np.ndarray,
    predict_proba: ProbaFn,
    *,
    margin: int,
    class_ids: tuple[int, ...],
    batch_size: int = 8,
    keep_probabilities: bool = False,
) -> BlockResult:
    """Predict and blend one block.

    Args:
        block: the block to process.
        image: normalised bands over ``block.read``, (C, h, w) float32.
        valid: validity over ``block.read``, (h, w) bool; invalid core pixels get :data:`CLASS_NODATA`.
        predict_proba: (N, C, t, t) float32 → (N, K, t, t) class probabilities.
        margin: the tile grid's context margin (sets the blend window).
        class_ids: class id of each probability channel.
        batch_size: tiles per forward call.
        keep_probabilities: also return the blended (K, H, W) probabilities.
    """
    read, core = block.read, block.core
    tile = block.tiles[0].height
    weights = blend_window(tile, margin)
    acc: np.ndarray | None = None
    wsum = np.zeros(core.shape, dtype=np.float32)
    for batch in _batches(block, batch_size):
        x = np.stack([image[(slice(None), *t.relative_to(read))] for t in batch])
        proba = predict_proba(x)
        if acc is None:
            acc = np.zeros((proba.shape[1], *core.shape), dtype=np.float32)
        for t, p in zip(batch, proba, strict=True):
            part = t.intersection(core)
            in_tile, in_core = part.relative_to(t), part.relative_to(core)
            w = weights[in_tile]
            acc[(slice(None), *in_core)] += w * p[(slice(None), *in_tile)]
            wsum[in_core] += w
    assert acc is not None, "a block always has at least one tile"
    acc /= wsum
    best = acc.argmax(axis=0)
    confidence = np.take_along_axis(acc, best[None], axis=0)[0]
    lut = np.asarray(class_ids, dtype=np.uint8)
    class_id = lut[best]
    core_valid = valid[core.relative_to(read)]
    class_id[~core_valid] = CLASS_NODATA
    confidence[~core_valid] = 0.0
    return BlockResult(class_id, confidence, acc if keep_probabilities else None)


def seam_index(class_map: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> float:
    """How much more often the class changes across the given grid lines than across any line.

    ``rows``/``cols`` are the indices ``i`` of horizontal/vertical lines lying between pixel ``i - 1``
    and ``i`` (tile or block borders). The index is (changes per neighbour pair across those lines) /
    (changes per neighbour pair across all lines); 1 means borders are invisible. Pairs touching
    :data:`CLASS_NODATA` are left out.
    """
    def changes(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
        ok = (a != CLASS_NODATA) & (b != CLASS_NODATA)
        return int((ok & (a != b)).sum()), int(ok.sum())

    cy, ny = changes(class_map[1:], class_map[:-1])
    cx, nx = changes(class_map[:, 1:], class_map[:, :-1])
    rows = np.asarray([r for r in rows if 0 < r < class_map.shape[0]], dtype=int)
    cols = np.asarray([c for c in cols if 0 < c < class_map.shape[1]], dtype=int)
    by, my = changes(class_map[rows], class_map[rows - 1])
    bx, mx = changes(class_map[:, cols], class_map[:, cols - 1])
    overall = (cy + cx) / max(ny + nx, 1)
    border = (by + bx) / max(my + mx, 1)
    return border / overall if overall else 1.0
