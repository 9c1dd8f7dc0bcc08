"""Seam-free stitching: predict a block's tiles in batches and blend them, in fixed point.

Each tile's probabilities are weighted by :func:`blend_window`, which is 1 in the tile's inner part
and falls smoothly towards its edges over the low-context ``margin``; a pixel's probability is the
weighted mean over every lattice tile covering it::

    p(x) = sum_t w_t(x) p_t(x) / sum_t w_t(x)

Every tile runs once, in the block that owns it (:mod:`geoseg.tiling`); near block borders a pixel
gets tiles of several blocks, whose partial sums meet in the store.  The sums are kept in fixed
point (int64 in units of 2**-40, :data:`FIXED_POINT`): each product ``w * p`` is computed in float32
and rounded once to an integer, and integer sums do not depend on their order or grouping.  So a
pixel gets the same sums whichever blocks its tiles ran in, and a blocked run equals a whole-scene
run to the bit.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
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


#: Units of the fixed-point sums: 2**40 per 1.0 (probabilities and weights are at most 1; a pixel
#: gets at most a few tiles, so the sums stay far below 2**63).
FIXED_POINT = 2.0**40


@dataclass(frozen=True)
class BlockResult:
    """What a block writes: class ids, confidence (max probability) and optionally probabilities."""

    class_id: np.ndarray
    confidence: np.ndarray
    probabilities: np.ndarray | None = None


@dataclass(frozen=True)
class Sums:
    """Fixed-point sums over ``box``: ``acc`` (K, h, w) of weighted probabilities, ``weight`` (h, w) of weights."""

    box: Box
    acc: torch.Tensor
    weight: torch.Tensor

    def crop(self, box: Box) -> Sums:
        """The sums over ``box`` (inside this one)."""
        ys, xs = box.relative_to(self.box)
        return Sums(box, self.acc[:, ys, xs], self.weight[ys, xs])

    def clone(self) -> Sums:
        """A copy that does not keep the larger sums it was cropped from alive."""
        return Sums(self.box, self.acc.clone(), self.weight.clone())

    def __add__(self, other: Sums) -> Sums:
        if other.box != self.box:
            raise ValueError(f"sums over {self.box} and {other.box} do not add up")
        return Sums(self.box, self.acc + other.acc.to(self.acc.device), self.weight + other.weight.to(self.acc.device))


def _batches(tiles: Sequence[Box], batch_size: int) -> Iterator[Sequence[Box]]:
    for i in range(0, len(tiles), batch_size):
        yield tiles[i : i + batch_size]


def accumulate(
    tiles: Sequence[Box],
    image: torch.Tensor,
    read: Box,
    proba: ProbaFn,
    *,
    margin: int,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> Sums:
    """Predict ``tiles`` in batches on ``device`` and sum their weighted probabilities over ``read``.

    Args:
        tiles: the tiles to run, all inside ``read``.
        image: normalised bands over ``read``, (C, h, w) float32, on ``device`` (or the CPU).
        read: the box ``image`` covers.
        proba: class probabilities of a batch of tiles, on ``device`` (e.g. ``Predictor.proba``).
        margin: the tile grid's context margin (sets the blend window).
        batch_size: tiles per forward call.
        device: where the image, the probabilities and the sums live.
    """
    device = torch.device(device)
    tile = tiles[0].height
    with torch.inference_mode():
        image = image.to(device)
        weights = torch.from_numpy(blend_window(tile, margin).copy()).to(device)
        scaled = weights * FIXED_POINT  # p * (w * 2**40) == (p * w) * 2**40 exactly: a power of two
        fixed_weights = scaled.round().to(torch.int64)
        acc: torch.Tensor | None = None
        weight = torch.zeros(read.shape, dtype=torch.int64, device=device)
        for batch in _batches(tiles, batch_size):
            prob = proba(torch.stack([image[(slice(None), *t.relative_to(read))] for t in batch]))
            if acc is None:
                acc = torch.zeros((prob.shape[1], *read.shape), dtype=torch.int64, device=device)
                product = torch.empty(prob.shape[1:], dtype=torch.float32, device=device)
                fixed = torch.empty(prob.shape[1:], dtype=torch.int64, device=device)
            for t, p in zip(batch, prob, strict=True):
                ys, xs = t.relative_to(read)
                acc[:, ys, xs].add_(fixed.copy_(torch.mul(p, scaled, out=product).round_()))
                weight[ys, xs].add_(fixed_weights)
        assert acc is not None, "accumulate needs at least one tile"
        return Sums(read, acc, weight)


def _argmax(acc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, value) of the largest of the K channels at each pixel, the first on a tie.

    One pass per channel over contiguous planes: ``argmax(dim=0)`` strides across them and is ten
    times slower on the CPU.
    """
    top = acc[0].clone()
    best = torch.zeros(top.shape, dtype=torch.int64, device=acc.device)
    for k in range(1, acc.shape[0]):
        better = acc[k] > top
        top = torch.where(better, acc[k], top)
        best.masked_fill_(better, k)
    return best, top


def finish(sums: Sums, valid: np.ndarray, class_ids: Sequence[int], *, keep_probabilities: bool = False
           ) -> BlockResult:
    """Class ids, confidences (and probabilities) from complete sums; invalid pixels get nodata.

    ``valid`` is the (h, w) validity over ``sums.box``. The class is the channel with the largest
    sum (the first one on a tie); probabilities are ``acc / weight`` in float64, stored as float32.
    """
    with torch.inference_mode():
        acc, weight = sums.acc, sums.weight.to(torch.float64)
        best, top = _argmax(acc)
        confidence = (top.to(torch.float64) / weight).to(torch.float32)
        class_id = torch.as_tensor(tuple(class_ids), dtype=torch.uint8, device=acc.device)[best]
        invalid = ~torch.from_numpy(np.ascontiguousarray(valid)).to(acc.device)
        class_id[invalid] = CLASS_NODATA
        confidence[invalid] = CONFIDENCE_NODATA
        probabilities = None
        if keep_probabilities:
            probabilities = (acc.to(torch.float64) / weight).to(torch.float32)
            probabilities[:, invalid] = CONFIDENCE_NODATA
            probabilities = probabilities.cpu().numpy()
        return BlockResult(class_id.cpu().numpy(), confidence.cpu().numpy(), probabilities)


def core_result(block: Block, sums: Sums | None, valid: np.ndarray | None, class_ids: Sequence[int], *,
                keep_probabilities: bool = False) -> BlockResult:
    """A block's core with its local cells finished from its own ``sums`` (``valid`` over ``block.read``).

    Shared cells hold nodata until :func:`place` puts their finished values in.
    """
    h, w = block.core.shape
    result = BlockResult(np.full((h, w), CLASS_NODATA, dtype=np.uint8),
                         np.full((h, w), CONFIDENCE_NODATA, dtype=np.float32),
                         np.zeros((len(class_ids), h, w), dtype=np.float32) if keep_probabilities else None)
    for cell in block.local:
        part = finish(sums.crop(cell.box), valid[cell.box.relative_to(block.read)], class_ids,
                      keep_probabilities=keep_probabilities)
        place(result, block.core, cell.box, part)
    return result


def place(result: BlockResult, core: Box, box: Box, part: BlockResult) -> None:
    """Copy ``part`` (over ``box``) into ``result`` (over ``core``)."""
    ys, xs = box.relative_to(core)
    result.class_id[ys, xs] = part.class_id
    result.confidence[ys, xs] = part.confidence
    if result.probabilities is not None:
        result.probabilities[:, ys, xs] = part.probabilities


def finish_cell(result: BlockResult, core: Box, parts: Sequence[Sums], valid: np.ndarray, class_ids: Sequence[int],
                *, keep_probabilities: bool = False) -> None:
    """Finish a shared cell from every owner's partial sums over it and put it into ``result`` (over ``core``)."""
    total = sum(parts[1:], parts[0])
    place(result, core, total.box, finish(total, valid, class_ids, keep_probabilities=keep_probabilities))


def stitch_blocks(
    blocks: Sequence[Block],
    read: Callable[[Box], tuple[torch.Tensor, np.ndarray]],
    proba: ProbaFn,
    *,
    margin: int,
    class_ids: Sequence[int],
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    wanted: Collection[tuple[int, int]] | None = None,
) -> dict[tuple[int, int], BlockResult]:
    """Both passes of a run in memory, for images that fit in it: each block's tiles, then the shared cells.

    ``read(box)`` gives the normalised bands (C, h, w) and the validity (h, w) over ``box``.
    ``wanted``: the block keys to return (default all); only their tiles and those of the blocks
    sharing cells with them run.
    """
    by_key = {b.key: b for b in blocks}
    wanted = set(by_key) if wanted is None else set(wanted)
    needed = wanted | {o for k in wanted for c in by_key[k].shared for o in c.owners}
    partials: dict[tuple[tuple[int, int], Box], Sums] = {}
    results: dict[tuple[int, int], BlockResult] = {}
    for block in blocks:
        if block.key not in needed or not block.tiles:
            continue
        image, valid = read(block.read)
        sums = accumulate(block.tiles, image, block.read, proba, margin=margin, batch_size=batch_size, device=device)
        partials.update({(block.key, c.box): sums.crop(c.box) for c in block.sends})
        if block.key in wanted:
            results[block.key] = core_result(block, sums, valid, class_ids)
    for key in sorted(wanted):
        block = by_key[key]
        result = results.get(key) or core_result(block, None, None, class_ids)
        for cell in block.shared:
            finish_cell(result, block.core, [partials[owner, cell.box] for owner in cell.owners], read(cell.box)[1],
                        class_ids)
        results[key] = result
    return results


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
