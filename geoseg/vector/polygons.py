"""Polygons as flat numpy arrays (GeoArrow's ragged layout), and their WKB.

Vectorising keeps every polygon in this form, from tracing to writing: integer pixel coordinates
(int32, 8 bytes per vertex) until the attribute table is made, where they are mapped to the scene CRS
and encoded straight to WKB. No shapely object is made on the exact path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import shapely
from affine import Affine

#: Vertices handled at once where per-vertex work needs temporaries (so memory follows it, not a polygon).
CHUNK = 1 << 20
#: WKB header of a polygon: byte order (1 = little endian), geometry type (3 = Polygon), ring count.
_WKB_HEADER = np.dtype([("order", "u1"), ("type", "<u4"), ("rings", "<u4")])


@dataclass(frozen=True)
class Polygons:
    """Polygons as flat arrays: ``xy`` holds every ring's vertices (closed).

    Ring ``r`` is ``xy[ring_offsets[r]:ring_offsets[r+1]]``; polygon ``p`` owns rings
    ``poly_offsets[p]:poly_offsets[p+1]``, its shell first.
    """

    xy: np.ndarray
    ring_offsets: np.ndarray
    poly_offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.poly_offsets) - 1

    @classmethod
    def empty(cls, dtype: type = np.int32) -> Polygons:
        """No polygons."""
        zero = np.zeros(1, np.int64)
        return cls(np.zeros((0, 2), dtype), zero, zero)

    @classmethod
    def concat(cls, parts: list[Polygons]) -> Polygons:
        """The polygons of ``parts``, one after another."""
        if not parts:
            return cls.empty()
        vertices = offsets([p.ring_offsets[-1] for p in parts])[:-1]
        rings = offsets([len(p.ring_offsets) - 1 for p in parts])[:-1]
        return cls(
            np.concatenate([p.xy for p in parts]),
            np.concatenate([[0]] + [p.ring_offsets[1:] + v for p, v in zip(parts, vertices, strict=True)]),
            np.concatenate([[0]] + [p.poly_offsets[1:] + r for p, r in zip(parts, rings, strict=True)]),
        )

    @classmethod
    def from_geometries(cls, geoms: np.ndarray) -> Polygons:
        """Shapely polygons as flat arrays."""
        if not len(geoms):
            return cls.empty(np.float64)
        _, xy, (ring_offsets, poly_offsets) = shapely.to_ragged_array(geoms)
        return cls(xy, ring_offsets.astype(np.int64), poly_offsets.astype(np.int64))

    def geometries(self) -> np.ndarray:
        """The polygons as shapely objects."""
        if not len(self):
            return np.empty(0, object)
        xy = self.xy.astype(np.float64)
        return shapely.from_ragged_array(shapely.GeometryType.POLYGON, xy, (self.ring_offsets, self.poly_offsets))

    def take(self, index: np.ndarray) -> Polygons:
        """The polygons at ``index`` (indices or a boolean mask), in that order."""
        index = np.flatnonzero(index) if index.dtype == bool else index
        rings_per_poly = np.diff(self.poly_offsets)[index]
        lengths = np.diff(self.ring_offsets)[ragged_arange(self.poly_offsets[index], rings_per_poly)]
        return Polygons(self.xy[self.vertices(index)], offsets(lengths), offsets(rings_per_poly))

    def vertices(self, index: np.ndarray) -> np.ndarray:
        """Indices into ``xy`` of the vertices of the polygons at ``index`` (indices), in order."""
        first = self.ring_offsets[self.poly_offsets[index]]
        return ragged_arange(first, self.ring_offsets[self.poly_offsets[index + 1]] - first)

    def ring_areas(self) -> np.ndarray:
        """Each ring's signed (shoelace) area in coordinate units."""

        def cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            a, b = a.astype(np.float64), b.astype(np.float64)
            return a[:, 0] * b[:, 1] - b[:, 0] * a[:, 1]

        return self._ring_sums(cross) / 2.0

    def areas(self) -> np.ndarray:
        """Each polygon's area in coordinate units (shell less holes, whatever their orientation)."""
        sign = np.full(len(self.ring_offsets) - 1, -1.0)
        sign[self.poly_offsets[:-1]] = 1.0
        return _per_poly(sign * np.abs(self.ring_areas()), self.poly_offsets)

    def perimeters(self, sx: float = 1.0, sy: float = 1.0) -> np.ndarray:
        """Each polygon's boundary length, x scaled by ``sx`` and y by ``sy``."""

        def length(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            d = (b - a).astype(np.float64)
            return np.hypot(d[:, 0] * sx, d[:, 1] * sy)

        return _per_poly(self._ring_sums(length), self.poly_offsets)

    def to_wkb(self, transform: Affine) -> pa.Array:
        """The polygons as WKB (binary Arrow array), mapped to the scene CRS by ``transform``."""
        n = len(self)
        ring_len = np.diff(self.ring_offsets)
        rings_per_poly = np.diff(self.poly_offsets)
        ring_end = np.cumsum(4 + 16 * ring_len)  # bytes of all rings up to and including each
        before = np.r_[0, ring_end][self.poly_offsets]
        value_offsets = offsets(9 + np.diff(before))
        buf = np.empty(int(value_offsets[-1]), np.uint8)
        header = np.empty(n, _WKB_HEADER)
        header["order"], header["type"], header["rings"] = 1, 3, rings_per_poly
        buf[(value_offsets[:-1, None] + np.arange(9)).ravel()] = header.view(np.uint8)
        ring_poly = np.repeat(np.arange(n), rings_per_poly)
        ring_start = value_offsets[:-1][ring_poly] + 9 + (ring_end - 4 - 16 * ring_len) - before[ring_poly]
        buf[(ring_start[:, None] + np.arange(4)).ravel()] = ring_len.astype("<u4").view(np.uint8)
        first = ring_start + 4  # the byte where each ring's points start
        for v0, v1, rings, start, count in self._chunks(len(self.xy), 0):
            points = apply_affine(self.xy[v0:v1], transform).view("V16").ravel()
            dst = first[rings] + 16 * (start - self.ring_offsets[rings])
            for shift in np.unique(dst % 16).tolist():  # copy the 16-byte points at each alignment at once
                m = np.flatnonzero(dst % 16 == shift)
                cells = buf[shift : shift + (len(buf) - shift) // 16 * 16].view("V16")
                cells[ragged_arange((dst[m] - shift) // 16, count[m])] = points[ragged_arange(start[m] - v0, count[m])]
        large = value_offsets[-1] >= 2**31
        kind, ends = (pa.large_binary(), value_offsets) if large else (pa.binary(), value_offsets.astype(np.int32))
        return pa.Array.from_buffers(kind, n, [None, pa.py_buffer(ends), pa.py_buffer(buf)])

    def _chunks(self, n: int, tail: int) -> Iterator[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
        """Ranges of at most :data:`CHUNK` of the first ``n`` vertices, and the parts of rings in each.

        A ring's last ``tail`` vertices are left out of its parts (1: a ring's segments, by first vertex).

        Yields:
            ``(v0, v1, rings, start, count)``: the range, and each ring part's ring, first vertex, length.
        """
        for v0 in range(0, n, CHUNK):
            v1 = min(v0 + CHUNK, n)
            r0 = int(np.searchsorted(self.ring_offsets, v0, "right")) - 1
            rings = np.arange(r0, int(np.searchsorted(self.ring_offsets, v1, "left")))
            start = np.maximum(self.ring_offsets[rings], v0)
            count = np.minimum(self.ring_offsets[rings + 1] - tail, v1) - start
            keep = count > 0
            yield v0, v1, rings[keep], start[keep], count[keep]

    def _ring_sums(self, per_segment: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
        """Per ring, the sum of ``per_segment(a, b)`` over its segments (``a``, ``b``: start and end vertices)."""
        out = np.zeros(len(self.ring_offsets) - 1)
        for v0, v1, rings, start, count in self._chunks(len(self.xy) - 1, 1):
            values = np.append(per_segment(self.xy[v0:v1], self.xy[v0 + 1 : v1 + 1]), 0.0)
            bounds = np.stack([start - v0, start + count - v0], axis=1).ravel()
            out[rings] += np.add.reduceat(values, bounds)[::2]  # a ring has one part per range
        return out


def apply_affine(xy: np.ndarray, t: Affine) -> np.ndarray:
    """Map (n, 2) pixel coordinates by ``t`` as GDAL does (``x = c + col*a + row*b``, ...), as float64."""
    out = np.empty(xy.shape, np.float64)
    out[:, 0] = xy[:, 0] * t.a + xy[:, 1] * t.b + t.c
    out[:, 1] = xy[:, 0] * t.d + xy[:, 1] * t.e + t.f
    return out


def ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])`` without the loop (int32 if it fits)."""
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    if not total:
        return np.zeros(0, np.int64)
    starts = np.asarray(starts, np.int64)
    ends = np.cumsum(lengths)
    small = max(total, int((starts + lengths).max())) < 2**31 and int(starts.min()) >= 0
    kind = np.int32 if small else np.int64
    return np.repeat((starts - ends + lengths).astype(kind), lengths) + np.arange(total, dtype=kind)


def offsets(lengths: np.ndarray | list[int]) -> np.ndarray:
    """Offsets of consecutive runs of ``lengths``: ``[0, l0, l0 + l1, ...]`` (int64)."""
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


def _per_poly(ring_values: np.ndarray, poly_offsets: np.ndarray) -> np.ndarray:
    if len(poly_offsets) < 2:
        return np.zeros(0, ring_values.dtype)
    return np.add.reduceat(ring_values, poly_offsets[:-1])
