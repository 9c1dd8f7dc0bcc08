"""Seam-free stitching: predict a block's tiles in batches and blend them into the block's core.

Each tile's probabilities are weighted by :func:`blend_window`, which is 1 in the tile's inner part
and falls smoothly towards its edges over the low-context ``margin``; the core pixel's probability is
the weighted mean over every lattice tile covering it::

    p(x) = sum_t w_t(x) p_t(x) / sum_t w_t(x)

A block gets exactly the tiles that cover its core in the whole scene (:mod:`geoseg.tiling`), summed
in the same order, so a blocked run equals a whole-scene run and block borders cannot show.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import astuple, dataclass
from functools import lru_cache

import numpy as np
import torch

from geoseg.tiling import Block, Box

#: Class id written where the input was invalid (nodata, masked, NaN) in the class map.
CLASS_NODATA = 255
#: Confidence written where the input was invalid (no class has any probability there).
CONFIDENCE_NODATA = 0.0
#: Weight at a tile's very edge: small but positive, so pixels at the scene edge stay defined.
EDGE_WEIGHT = 1e-3

#: (N, C, t, t) float32 tiles on the device → (N, K, t, t) class probabilities on the same device.
ProbaFn = Callable[[torch.Tensor], torch.Tensor]


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
    image: torch.Tensor,
    valid: np.ndarray,
    proba: ProbaFn,
    *,
    margin: int,
    class_ids: tuple[int, ...],
    batch_size: int = 8,
    keep_probabilities: bool = False,
    device: str | torch.device = "cpu",
) -> BlockResult:
    """Predict and blend one block on ``device``; only the results come back to the host.

    The weighted sums run on the device with one multiply and one add per tile and pixel (no fused
    multiply-add), tiles in block order, so every pixel gets the same float operations whatever the
    blocking and whichever kernel path handles it.

    Args:
        block: the block to process.
        image: normalised bands over ``block.read``, (C, h, w) float32, on ``device`` (or the CPU).
        valid: validity over ``block.read``, (h, w) bool; invalid core pixels get :data:`CLASS_NODATA`.
        proba: class probabilities of a batch of tiles, on ``device`` (e.g. ``Predictor.proba``).
        margin: the tile grid's context margin (sets the blend window).
        class_ids: class id of each probability channel.
        batch_size: tiles per forward call.
        keep_probabilities: also return the blended (K, H, W) probabilities.
        device: where the image, the probabilities and the sums live.
    """
    read, core = block.read, block.core
    tile = block.tiles[0].height
    device = torch.device(device)
    with torch.inference_mode():
        image = image.to(device)
        weights = torch.from_numpy(blend_window(tile, margin).copy()).to(device)
        acc: torch.Tensor | None = None
        scratch: torch.Tensor | None = None
        wsum = torch.zeros(core.shape, dtype=torch.float32, device=device)
        for batch in _batches(block, batch_size):
            prob = proba(torch.stack([image[(slice(None), *t.relative_to(read))] for t in batch]))
            if acc is None:
                acc = torch.zeros((prob.shape[1], *core.shape), dtype=torch.float32, device=device)
                scratch = torch.empty((prob.shape[1], tile, tile), dtype=torch.float32, device=device)
            for t, p in zip(batch, prob, strict=True):
                part = t.intersection(core)
                in_tile, in_core = part.relative_to(t), part.relative_to(core)
                w = weights[in_tile]
                weighted = scratch[:, : part.height, : part.width]
                torch.mul(p[(slice(None), *in_tile)], w, out=weighted)
                acc[(slice(None), *in_core)].add_(weighted)
                wsum[in_core].add_(w)
        assert acc is not None, "a block always has at least one tile"
        acc.div_(wsum)
        confidence, best = acc.max(dim=0)
        class_id = torch.as_tensor(class_ids, dtype=torch.uint8, device=device)[best]
        invalid = ~torch.from_numpy(np.ascontiguousarray(valid[core.relative_to(read)])).to(device)
        class_id[invalid] = CLASS_NODATA
        confidence[invalid] = 0.0
        return BlockResult(
            class_id.cpu().numpy(), confidence.cpu().numpy(), acc.cpu().numpy() if keep_probabilities else None
        )


@dataclass(frozen=True)
class SeamCounts:
    """Class changes and neighbour pairs across given border lines and across all lines of a map.

    Counts add up, so the index can be pooled over several maps (e.g. the same scene with the tile
    lattice at several offsets, which averages out how class edges happen to fall on lines).
    """

    border_changes: int
    border_pairs: int
    changes: int
    pairs: int

    def __add__(self, other: SeamCounts) -> SeamCounts:
        return SeamCounts(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    @property
    def index(self) -> float:
        """(changes per pair across the border lines) / (changes per pair across all lines); 1 = invisible."""
        overall = self.changes / max(self.pairs, 1)
        border = self.border_changes / max(self.border_pairs, 1)
        return border / overall if overall else 1.0


def seam_counts(class_map: np.ndarray, rows: Sequence[int], cols: Sequence[int]) -> SeamCounts:
    """Count class changes across the given grid lines and across all lines.

    ``rows``/``cols`` are the indices ``i`` of horizontal/vertical lines lying between pixel ``i - 1``
    and ``i`` (tile or block borders). Pairs touching :data:`CLASS_NODATA` are left out.
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
    return SeamCounts(by + bx, my + mx, cy + cx, ny + nx)


def seam_index(class_map: np.ndarray, rows: Sequence[int], cols: Sequence[int]) -> float:
    """How much more often the class changes across the given grid lines than across any line.

    The index is (changes per neighbour pair across those lines) / (changes per neighbour pair across
    all lines), see :func:`seam_counts`; 1 means borders are invisible.
    """
    return seam_counts(class_map, rows, cols).index
