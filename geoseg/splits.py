"""Spatially disjoint train/val/test splits and the tiles drawn from them.

A split assigns *units* to parts: square *blocks* of ``block`` px cut from each scene (the last
row and column truncated), or whole files for a tile folder.  Pixels are never split at random and
tiles never overlap two parts:

- **Grouping.**  With sparse labels (polygons) a labelled region that straddles a block border would
  put half a field in train and half in test.  So the blocks touched by one connected labelled
  region (8-connected, any classes) form one group and go to the same part, as long as the region
  touches at most :data:`MAX_GROUP` blocks; larger regions (dense labels) do not group blocks.
- **Stratified assignment.**  Units without a labelled pixel go to train (they hold no label for
  any part, and leave room for whole training tiles).  Labelled groups are assigned in
  :data:`TRIALS` seeded random draws (each group to part ``p`` with probability ``fractions[p]``);
  the draw kept maximises, in order: classes present in train, (part, class) pairs present in val and
  test, then closeness of each part's share of every class's pixels to its fraction.
- **Training tiles** (:func:`sample_tiles`) lie wholly inside train units (and inside the image, when
  the image is at least a tile wide) and hold at least one labelled pixel.
- **Evaluation tiles** (:func:`eval_tiles`) cover val/test units with cores of ``tile/2`` px, each
  read with ``tile/4`` px of image context; only core pixels inside the unit are scored.  Reading
  image context from neighbouring units is fine: a map is predicted from the whole image.

The split is saved as JSON with the run (:meth:`Split.save`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from geoseg.atomic import write_text
from geoseg.errors import DatasetError
from geoseg.tiling import Box

PARTS = ("train", "val", "test")
#: Largest number of blocks one labelled region may tie together into one group.
MAX_GROUP = 4
#: Random assignments scored to pick the split.
TRIALS = 2000


@dataclass(frozen=True)
class Unit:
    """One unit of a split: a block of a scene, or a whole tile file."""

    image: int
    box: Box
    part: int


@dataclass(frozen=True)
class Split:
    """Which units of which images belong to train (0), val (1) and test (2).

    Attributes:
        images: image names, indexed by :attr:`Unit.image`.
        block: block side in px, or ``None`` when split by file.
        units: every unit, in image then row-major order.
        seed: the seed the assignment was drawn with.
        fractions: the requested (train, val, test) fractions.
    """

    images: tuple[str, ...]
    block: int | None
    units: tuple[Unit, ...]
    seed: int = 0
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)

    def boxes(self, part: str | int) -> list[tuple[int, Box]]:
        """``(image index, box)`` of every unit in ``part`` (``train``, ``val``, ``test`` or 0/1/2)."""
        p = PARTS.index(part) if isinstance(part, str) else part
        return [(u.image, u.box) for u in self.units if u.part == p]

    def to_dict(self) -> dict[str, Any]:
        """JSON form: per image, one string per block row of part letters ``t``/``v``/``e`` (test)."""
        letters = "tve"
        out: dict[str, Any] = {"block": self.block, "seed": self.seed, "fractions": list(self.fractions),
                               "parts": {"t": "train", "v": "val", "e": "test"}, "images": []}
        for i, name in enumerate(self.images):
            units = [u for u in self.units if u.image == i]
            entry: dict[str, Any] = {"name": name, "height": max(u.box.y1 for u in units),
                                     "width": max(u.box.x1 for u in units)}
            if self.block is None:
                entry["part"] = PARTS[units[0].part]
            else:
                rows: dict[int, str] = {}
                for u in units:
                    rows[u.box.y0] = rows.get(u.box.y0, "") + letters[u.part]
                entry["rows"] = [rows[y] for y in sorted(rows)]
            out["images"].append(entry)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Split:
        """Inverse of :meth:`to_dict`."""
        block, units, names = d["block"], [], []
        for i, e in enumerate(d["images"]):
            names.append(e["name"])
            h, w = e["height"], e["width"]
            if block is None:
                units.append(Unit(i, Box(0, 0, h, w), PARTS.index(e["part"])))
                continue
            for r, row in enumerate(e["rows"]):
                for c, letter in enumerate(row):
                    box = Box(r * block, c * block, min((r + 1) * block, h), min((c + 1) * block, w))
                    units.append(Unit(i, box, "tve".index(letter)))
        fractions = tuple(d.get("fractions", (0.7, 0.15, 0.15)))
        return cls(tuple(names), block, tuple(units), int(d.get("seed", 0)), fractions)  # type: ignore[arg-type]

    def save(self, path: str | Path) -> Path:
        """Write the split as JSON."""
        return write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Split:
        """Read a split written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def summary(self, labels: Sequence[np.ndarray], num_classes: int) -> dict[str, Any]:
        """Units and labelled pixels per class in each part (JSON-able)."""
        out = {}
        for p, name in enumerate(PARTS):
            counts = np.zeros(num_classes, np.int64)
            boxes = self.boxes(p)
            for i, b in boxes:
                lab = labels[i][b.y0 : b.y1, b.x0 : b.x1]
                counts += np.bincount(lab[lab < num_classes].ravel(), minlength=num_classes)[:num_classes]
            out[name] = {"units": len(boxes), "labelled_pixels": counts.tolist()}
        return out


def _units(shapes: Sequence[tuple[int, int]], block: int | None) -> list[tuple[int, Box]]:
    out = []
    for i, (h, w) in enumerate(shapes):
        if block is None:
            out.append((i, Box(0, 0, h, w)))
        else:
            out += [(i, Box(y, x, min(y + block, h), min(x + block, w)))
                    for y in range(0, h, block) for x in range(0, w, block)]
    return out


def _groups(labels: Sequence[np.ndarray], units: list[tuple[int, Box]], block: int | None,
            ignore_index: int) -> np.ndarray:
    """Group id per unit: blocks touched by one small labelled region share a group (union-find)."""
    parent = np.arange(len(units))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    if block is not None:
        first = 0
        for lab in labels:
            h, w = lab.shape
            ncols = math.ceil(w / block)
            comp, n = ndimage.label(lab != ignore_index, structure=np.ones((3, 3)))
            if n:
                yy, xx = np.nonzero(comp)
                unit = first + (yy // block) * ncols + xx // block
                pairs = np.unique(np.stack([comp[yy, xx], unit], 1), axis=0)
                for c in np.unique(pairs[:, 0]):
                    members = pairs[pairs[:, 0] == c, 1]
                    if len(members) <= MAX_GROUP:
                        root = find(int(members[0]))
                        for m in members[1:]:
                            parent[find(int(m))] = root
            first += math.ceil(h / block) * ncols
    return np.array([find(u) for u in range(len(units))])


def make_split(
    labels: Sequence[np.ndarray],
    names: Sequence[str],
    *,
    num_classes: int,
    block: int | None,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    ignore_index: int = 255,
) -> Split:
    """Assign blocks (or, with ``block=None``, whole images) to train/val/test; see the module docstring.

    Args:
        labels: per image, ``(H, W)`` channel indices with ``ignore_index`` where unlabelled.
        names: per image, a name for the JSON.
        num_classes: number of classes ``K`` (indices ``0..K-1``).
        block: block side in px; ``None`` splits by image (tile folders).
        fractions: (train, val, test) shares, summing to 1.
        seed: seeds the assignment.
        ignore_index: the label value of unlabelled pixels.
    """
    frac = np.asarray(fractions, np.float64)
    units = _units([lab.shape for lab in labels], block)
    hist = np.zeros((len(units), num_classes), np.int64)
    for u, (i, b) in enumerate(units):
        lab = labels[i][b.y0 : b.y1, b.x0 : b.x1]
        hist[u] = np.bincount(lab[lab < num_classes].ravel(), minlength=num_classes)[:num_classes]
    group = _groups(labels, units, block, ignore_index)
    labelled = hist.sum(1) > 0
    gids = np.unique(group[labelled])
    ghist = np.stack([hist[group == g].sum(0) for g in gids]) if len(gids) else np.zeros((0, num_classes))
    rng = np.random.default_rng(seed)
    part_of_group = _best_assignment(ghist, frac, rng)
    parts = np.zeros(len(units), np.int64)
    for g, p in zip(gids, part_of_group, strict=True):
        parts[group == g] = p
    return Split(tuple(names), block, tuple(Unit(i, b, int(p)) for (i, b), p in zip(units, parts, strict=True)),
                 seed, tuple(float(f) for f in frac))  # type: ignore[arg-type]


def _best_assignment(ghist: np.ndarray, frac: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The best of :data:`TRIALS` random group→part draws (score in the module docstring)."""
    g = len(ghist)
    if g == 0:
        return np.zeros(0, np.int64)
    trials = max(1, min(TRIALS, 20_000_000 // (g * 3)))
    draws = rng.choice(3, size=(trials, g), p=frac / frac.sum())
    onehot = np.eye(3)[draws]  # (T, G, 3)
    counts = np.einsum("tgp,gk->tpk", onehot, ghist)  # (T, 3, K)
    total = ghist.sum(0)
    present = total > 0
    share = counts[:, :, present] / total[present]
    train_cov = (counts[:, 0, present] > 0).sum(1)
    held = [p for p in (1, 2) if frac[p] > 0]
    vt_cov = sum((counts[:, p, present] > 0).sum(1) for p in held) if held else np.zeros(trials)
    dev = np.abs(share - frac[None, :, None]).mean((1, 2))
    score = train_cov * 1e4 + vt_cov * 1e2 - dev
    return draws[int(np.argmax(score))]


def _candidates(split: Split, labels: Sequence[np.ndarray], tile: int, ignore_index: int) -> list[np.ndarray]:
    """Per image, flat indices (int64) of tile origins whose tile lies in train and holds a label.

    Origins run over ``[0, max(H - tile, 0)]`` x ``[0, max(W - tile, 0)]``; a tile longer than the
    image reaches past its edge (those pixels are invalid and ignored).
    """
    out = []
    for i, lab in enumerate(labels):
        h, w = lab.shape
        allowed = np.zeros((h, w), bool)
        for j, b in split.boxes("train"):
            if j == i:
                allowed[b.y0 : b.y1, b.x0 : b.x1] = True
        th, tw = min(tile, h), min(tile, w)
        bad = _box_sums(~allowed, th, tw)
        has_label = _box_sums(lab != ignore_index, th, tw)
        out.append(np.flatnonzero((bad == 0) & (has_label > 0)))
    return out


def _box_sums(mask: np.ndarray, th: int, tw: int) -> np.ndarray:
    """Sum of ``mask`` over every ``th x tw`` window, indexed by the window's top-left corner."""
    s = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return s[th:, tw:] - s[:-th, tw:] - s[th:, :-tw] + s[:-th, :-tw]


class TileSampler:
    """Draws training tiles that stay inside the train part (see :func:`_candidates`).

    Args:
        split: the split.
        labels: per image, ``(H, W)`` channel indices.
        tile: tile side in px.
        ignore_index: the label value of unlabelled pixels.

    Raises:
        DatasetError: no tile of that size fits in the train part with a labelled pixel.
    """

    def __init__(self, split: Split, labels: Sequence[np.ndarray], tile: int, ignore_index: int = 255) -> None:
        self.tile = tile
        self.widths = [max(lab.shape[1] - tile, 0) + 1 for lab in labels]
        self.candidates = _candidates(split, labels, tile, ignore_index)
        self.counts = np.array([len(c) for c in self.candidates], np.int64)
        if self.counts.sum() == 0:
            raise DatasetError(
                f"no {tile} px tile fits inside the train blocks and holds a labelled pixel; use a smaller "
                "tile_size, a larger split_block, or a larger train fraction"
            )

    def sample(self, n: int, rng: np.random.Generator) -> list[tuple[int, Box]]:
        """``n`` tiles, uniform over all valid origins of all images."""
        flat = rng.integers(0, int(self.counts.sum()), size=n)
        starts = np.concatenate([[0], np.cumsum(self.counts)])
        out = []
        for f in flat:
            i = int(np.searchsorted(starts, f, side="right") - 1)
            origin = int(self.candidates[i][f - starts[i]])
            y, x = divmod(origin, self.widths[i])
            out.append((i, Box(y, x, y + self.tile, x + self.tile)))
        return out


def eval_tiles(boxes: Sequence[tuple[int, Box]], tile: int) -> list[tuple[int, Box, Box]]:
    """Tiles scoring the units ``boxes``: ``(image, tile box, core box)`` with ``core`` inside its unit.

    Cores of ``tile - 2*(tile//4)`` px partition each unit; each tile adds ``tile//4`` px of context
    on every side (it may reach past the image edge; ``read_window`` mirrors the image there).
    """
    m = tile // 4
    core = tile - 2 * m
    out = []
    for i, unit in boxes:
        for y in range(unit.y0, unit.y1, core):
            for x in range(unit.x0, unit.x1, core):
                c = Box(y, x, min(y + core, unit.y1), min(x + core, unit.x1))
                out.append((i, Box(y - m, x - m, y - m + tile, x - m + tile), c))
    return out
