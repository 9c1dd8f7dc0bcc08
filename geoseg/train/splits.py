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
- **Training tiles** (:class:`TileSampler`) are placed around labelled train pixels and may reach
  into val/test units for image context; they are trained on the train part's labels only
  (:func:`part_labels`), so no val or test label is ever seen.
- **Scoring** predicts whole images as ``geoseg predict`` does and scores only the pixels of the
  part (:mod:`geoseg.train.scoring`): a map is predicted from the whole image.

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
        offsets: per image, the (row, col) where its second block row and column start (its first
            ones are cut short so that block edges fall on the first image's, on the ground);
            ``None``: every image's blocks start at (0, 0).
    """

    images: tuple[str, ...]
    block: int | None
    units: tuple[Unit, ...]
    seed: int = 0
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    offsets: tuple[tuple[int, int], ...] | None = None

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
                entry["offset"] = list(self.offset(i))
                rows: dict[int, str] = {}
                for u in units:
                    rows[u.box.y0] = rows.get(u.box.y0, "") + letters[u.part]
                entry["rows"] = [rows[y] for y in sorted(rows)]
            out["images"].append(entry)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Split:
        """Inverse of :meth:`to_dict`."""
        block, units, names, offsets = d["block"], [], [], []
        for i, e in enumerate(d["images"]):
            names.append(e["name"])
            h, w = e["height"], e["width"]
            if block is None:
                units.append(Unit(i, Box(0, 0, h, w), PARTS.index(e["part"])))
                continue
            offset = tuple(e.get("offset", (0, 0)))
            offsets.append(offset)
            boxes = _blocks(h, w, block, offset)
            letters = "".join(e["rows"])
            units += [Unit(i, box, "tve".index(letter)) for box, letter in zip(boxes, letters, strict=True)]
        fractions = tuple(d.get("fractions", (0.7, 0.15, 0.15)))
        aligned = tuple(offsets) if any(o != (0, 0) for o in offsets) else None
        return cls(tuple(names), block, tuple(units), int(d.get("seed", 0)), fractions, aligned)  # type: ignore[arg-type]

    def offset(self, image: int) -> tuple[int, int]:
        """Where image ``image``'s second block row and column start (see :attr:`offsets`)."""
        return self.offsets[image] if self.offsets is not None else (0, 0)

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


def _edges(n: int, block: int, offset: int) -> list[int]:
    """Block edges along an axis of ``n`` px: 0, then ``offset`` (if > 0), then every ``block`` px, then n."""
    inner = range(offset if offset > 0 else block, n, block)
    return [0, *inner, n]


def _blocks(h: int, w: int, block: int, offset: tuple[int, int]) -> list[Box]:
    """The blocks of an ``h`` x ``w`` image, row-major, edges as in :func:`_edges`."""
    rows, cols = _edges(h, block, offset[0]), _edges(w, block, offset[1])
    return [Box(y0, x0, y1, x1) for y0, y1 in zip(rows, rows[1:], strict=False)
            for x0, x1 in zip(cols, cols[1:], strict=False)]


def _units(shapes: Sequence[tuple[int, int]], block: int | None,
           offsets: Sequence[tuple[int, int]]) -> list[tuple[int, Box]]:
    out = []
    for i, (h, w) in enumerate(shapes):
        if block is None:
            out.append((i, Box(0, 0, h, w)))
        else:
            out += [(i, b) for b in _blocks(h, w, block, offsets[i])]
    return out


def _groups(labels: Sequence[np.ndarray], units: list[tuple[int, Box]], block: int | None,
            ignore_index: int, places: Sequence[tuple[float, float]] | None,
            offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """Group id per unit (union-find), for blocks that must go to one part.

    Blocks touched by one small labelled region share a group, and so do blocks of different images
    on the same ground (the same block of the first image's lattice).
    """
    parent = np.arange(len(units))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def join(members: Sequence[int]) -> None:
        root = find(int(members[0]))
        for m in members[1:]:
            parent[find(int(m))] = root

    if block is not None:
        first = 0
        for i, lab in enumerate(labels):
            h, w = lab.shape
            rows, cols = _edges(h, block, offsets[i][0]), _edges(w, block, offsets[i][1])
            ncols = len(cols) - 1
            comp, n = ndimage.label(lab != ignore_index, structure=np.ones((3, 3)))
            if n:
                yy, xx = np.nonzero(comp)
                unit = first + (np.searchsorted(rows, yy, side="right") - 1) * ncols + \
                    np.searchsorted(cols, xx, side="right") - 1
                pairs = np.unique(np.stack([comp[yy, xx], unit], 1), axis=0)
                for c in np.unique(pairs[:, 0]):
                    members = pairs[pairs[:, 0] == c, 1]
                    if len(members) <= MAX_GROUP:
                        join(members)
            first += (len(rows) - 1) * ncols
        if places is not None:
            ground: dict[tuple[int, int], list[int]] = {}
            for u, (i, b) in enumerate(units):
                y, x = places[i][0] + (b.y0 + b.y1) / 2, places[i][1] + (b.x0 + b.x1) / 2
                ground.setdefault((math.floor(y / block), math.floor(x / block)), []).append(u)
            for members in ground.values():
                join(members)
    return np.array([find(u) for u in range(len(units))])


def block_offsets(places: Sequence[tuple[float, float]], block: int) -> list[tuple[int, int]]:
    """Per image, the block offsets that put its block edges on the first image's lattice.

    ``places[i]``: where image ``i``'s top-left corner lies, in pixels of the first image.
    """
    return [(round(-y) % block, round(-x) % block) for y, x in places]


def make_split(
    labels: Sequence[np.ndarray],
    names: Sequence[str],
    *,
    num_classes: int,
    block: int | None,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    ignore_index: int = 255,
    places: Sequence[tuple[float, float]] | None = None,
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
        places: scenes of one area: per image, where its top-left corner lies in pixels of the first
            image (same pixel size); block edges then fall on the same ground in every image and a
            place is in the same part in all of them. ``None``: images of different places.
    """
    frac = np.asarray(fractions, np.float64)
    offsets = block_offsets(places, block) if places is not None and block else [(0, 0)] * len(labels)
    units = _units([lab.shape for lab in labels], block, offsets)
    hist = np.zeros((len(units), num_classes), np.int64)
    for u, (i, b) in enumerate(units):
        lab = labels[i][b.y0 : b.y1, b.x0 : b.x1]
        hist[u] = np.bincount(lab[lab < num_classes].ravel(), minlength=num_classes)[:num_classes]
    group = _groups(labels, units, block, ignore_index, places, offsets)
    labelled = hist.sum(1) > 0
    gids = np.unique(group[labelled])
    ghist = np.stack([hist[group == g].sum(0) for g in gids]) if len(gids) else np.zeros((0, num_classes))
    rng = np.random.default_rng(seed)
    part_of_group = _best_assignment(ghist, frac, rng)
    parts = np.zeros(len(units), np.int64)
    for g, p in zip(gids, part_of_group, strict=True):
        parts[group == g] = p
    aligned = tuple(offsets) if any(o != (0, 0) for o in offsets) else None
    return Split(tuple(names), block, tuple(Unit(i, b, int(p)) for (i, b), p in zip(units, parts, strict=True)),
                 seed, tuple(float(f) for f in frac), aligned)  # type: ignore[arg-type]


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


def part_labels(split: Split, labels: Sequence[np.ndarray], part: str | int, ignore_index: int = 255
                ) -> list[np.ndarray]:
    """Per image, a copy of ``labels`` with every pixel outside the units of ``part`` set to ``ignore_index``."""
    out = []
    for i, lab in enumerate(labels):
        keep = np.zeros(lab.shape, bool)
        for j, b in split.boxes(part):
            if j == i:
                keep[b.y0 : b.y1, b.x0 : b.x1] = True
        out.append(np.where(keep, lab, np.uint8(ignore_index)).astype(lab.dtype))
    return out


class TileSampler:
    """Draws training tiles around labelled train pixels, optionally balancing the classes.

    Each tile is placed at a random offset around one labelled pixel of the train part: with
    probability ``balance`` the pixel's class is drawn first, uniformly among the classes present in
    train, else the pixel is drawn uniformly among all labelled train pixels (so ``balance=0`` follows
    the label frequencies and ``balance=1`` shows every class equally often).  Tiles stay inside the
    image when it is at least a tile wide.  A tile may reach into val or test blocks: there the image
    is context only, because the labels it is trained on are ``part_labels(split, labels, "train")``.

    Args:
        labels: per image, ``(H, W)`` channel indices of the train part only (see :func:`part_labels`).
        tile: tile side in px.
        num_classes: number of classes ``K``.
        balance: share of tiles drawn for a uniformly chosen class, 0..1.

    Raises:
        DatasetError: the train part holds no labelled pixel.
    """

    def __init__(self, labels: Sequence[np.ndarray], tile: int, num_classes: int, balance: float = 0.0) -> None:
        self.tile = tile
        self.balance = balance
        self.shapes = [lab.shape for lab in labels]
        # per class: (image index, flat pixel index) of its train pixels
        pixels: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
        for i, lab in enumerate(labels):
            flat = lab.ravel()
            for k in range(num_classes):
                idx = np.flatnonzero(flat == k)
                pixels[k].append(np.stack([np.full(len(idx), i), idx], 1))
        self.pixels = [np.concatenate(p) for p in pixels]
        self.counts = np.array([len(p) for p in self.pixels], np.int64)
        if self.counts.sum() == 0:
            raise DatasetError("the train part holds no labelled pixel; use a larger train fraction or "
                               "check the labels")

    def sample(self, n: int, rng: np.random.Generator) -> list[tuple[int, Box]]:
        """``n`` tiles (image index, box), drawn from ``rng``."""
        present = np.flatnonzero(self.counts)
        frequency = self.counts[present] / self.counts.sum()
        out = []
        for _ in range(n):
            weights = np.full(len(present), 1 / len(present)) if rng.random() < self.balance else frequency
            k = int(present[rng.choice(len(present), p=weights)])
            i, flat = self.pixels[k][int(rng.integers(self.counts[k]))]
            h, w = self.shapes[i]
            y, x = divmod(int(flat), w)
            oy = int(np.clip(y - rng.integers(self.tile), 0, max(h - self.tile, 0)))
            ox = int(np.clip(x - rng.integers(self.tile), 0, max(w - self.tile, 0)))
            out.append((int(i), Box(oy, ox, oy + self.tile, ox + self.tile)))
        return out
