"""Open and validate scenes, windowed reads with padding and a validity mask, band statistics.

A *scene* is one georeferenced raster (GeoTIFF or anything GDAL reads). :func:`open_scene` checks
everything later stages rely on before any work starts, and raises an :class:`InvalidSceneError`
(or :class:`SceneNotFoundError`) naming the file, the problem and the fix.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyproj
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from geoseg.errors import BandMismatchError, InvalidSceneError, SceneNotFoundError
from geoseg.location import basename, configure_gdal, head, is_url, redact, stem
from geoseg.stac import is_stac, item_scene
from geoseg.tiling import Box

log = logging.getLogger(__name__)

#: GDAL settings for every read and write geoseg does: a 64 MB block cache, no sidecar scans.
#: rasterio hands an integer GDAL_CACHEMAX to GDALSetCacheMax64, so it is in bytes (64 would be 64 B).
GDAL_OPTIONS = {"GDAL_CACHEMAX": 64 * 2**20, "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
                "GDAL_NUM_THREADS": "ALL_CPUS"}


def gdal_env() -> rasterio.Env:
    """Return the GDAL environment geoseg reads and writes in (:data:`GDAL_OPTIONS`).

    Object storage is set up first (:func:`geoseg.location.configure_gdal`).
    """
    configure_gdal()
    return rasterio.Env(**GDAL_OPTIONS)


#: Pixel types geoseg reads; complex and 64-bit integers are refused.
SUPPORTED_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")


@dataclass(frozen=True)
class SceneInfo:
    """What geoseg needs to know about a scene, read once from its header."""

    path: Path | str
    width: int
    height: int
    count: int
    dtype: str
    crs: CRS
    transform: Affine
    nodata: float | None
    band_names: tuple[str, ...]
    block_shapes: tuple[tuple[int, int], ...]
    alpha: tuple[int, ...] = ()
    source: str | None = None
    label: str | None = None

    @property
    def opens(self) -> Path | str:
        """What GDAL opens: the file or URL, or the VRT a STAC Item was resolved into."""
        return self.source or self.path

    @property
    def name(self) -> str:
        """The file name (the last part of the path or URL)."""
        return basename(self.path)

    @property
    def stem(self) -> str:
        """What names the scene's outputs: the STAC Item's id, else the file name without its suffix."""
        return self.label or stem(self.path)

    @property
    def data_bands(self) -> tuple[int, ...]:
        """1-based indexes of the bands that hold data: all but alpha bands (which are validity masks)."""
        return tuple(i for i in range(1, self.count + 1) if i not in self.alpha)

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.height, self.width

    @property
    def pixel_area(self) -> float:
        """Area of one pixel in CRS units squared (m² for projected CRSs)."""
        return abs(self.transform.a * self.transform.e)


def pixel_areas_m2(crs: CRS, transform: Affine, height: int) -> np.ndarray:
    """Area in m² of one pixel in each of ``height`` rows (all pixels of a row share it).

    Projected CRS: ``|a * e| * unit²`` (metres per CRS unit). Geographic CRS: the exact ellipsoidal
    area of the cell, ``Δλ * (q(φ1) - q(φ2))`` with the authalic function
    ``q(φ) = b²/2 * (sinφ / (1 - e² sin²φ) + atanh(e sinφ) / e)`` on the CRS's ellipsoid.
    """
    if not crs.is_geographic:
        unit = crs.linear_units_factor[1]
        return np.full(height, abs(transform.a * transform.e) * unit * unit)
    ellipsoid = pyproj.CRS.from_wkt(crs.to_wkt()).ellipsoid
    a, inv_f = ellipsoid.semi_major_metre, ellipsoid.inverse_flattening
    f = 1 / inv_f if inv_f else 0.0
    b, e2 = a * (1 - f), f * (2 - f)
    e = np.sqrt(e2)
    lat = np.radians(transform.f + np.arange(height + 1) * transform.e)
    s = np.sin(lat)
    q = s / (1 - e2 * s * s) + (np.arctanh(e * s) / e if e else s)
    return np.abs(np.diff(q)) * b * b / 2 * abs(np.radians(transform.a))


def identified_crs(crs: CRS) -> CRS:
    """``crs``, or the EPSG CRS it is an unnamed equivalent of (so outputs carry a named CRS).

    Many GeoTIFFs store a custom WKT ("unnamed", datum "unknown") that is the same CRS as an EPSG
    code; QGIS, GeoPackage and ``.prj`` readers then show a custom CRS.  The EPSG CRS is taken only
    when PROJ identifies it and GDAL finds the two the same (same projection, datum and units).
    """
    if crs.to_authority(confidence_threshold=100) is not None:
        return crs
    code = crs.to_epsg()
    if code is None:
        return crs
    named = CRS.from_epsg(code)
    return named if named == crs else crs


def _fail(path: Path | str, what: str, fix: str) -> InvalidSceneError:
    return InvalidSceneError(f"{redact(str(path))}: {what}. {fix}")


def open_scene(path: str | Path) -> SceneInfo:
    """Open ``path`` (a file, a URL, or a STAC Item's JSON: see :mod:`geoseg.stac`) and validate it as a scene.

    Checks that the file exists and is a raster GDAL can read to its last block, has a CRS and a
    north-up geotransform, and a supported pixel type.

    Raises:
        SceneNotFoundError: the file does not exist.
        InvalidSceneError: the file is not a usable scene; the message says why and what to do.
    """
    if is_url(path):
        head(path)  # a missing object, denied access or an unreachable store fail here, in one line
    else:
        path = Path(path)
        if not path.exists():
            raise SceneNotFoundError(f"{path}: no such file. Check the path (relative paths start at {Path.cwd()}).")
    with gdal_env():
        item = item_scene(path) if is_stac(path) else None
    try:
        with warnings.catch_warnings(), gdal_env():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = rasterio.open(item.vrt if item else path)
    except RasterioIOError as err:
        raise _fail(path, f"not a raster GDAL can read ({redact(str(err))})",
                    "Pass a GeoTIFF or another GDAL raster.") from None
    with src:
        if src.dtypes[0] not in SUPPORTED_DTYPES:
            raise _fail(path, f"pixel type {src.dtypes[0]} is not supported",
                        f"Convert it to one of {', '.join(SUPPORTED_DTYPES)} (e.g. gdal_translate -ot Float32).")
        if src.crs is None:
            raise _fail(path, "has no CRS", "Assign one, e.g. `gdal_edit.py -a_srs EPSG:32633 FILE`.")
        t = src.transform
        if t == Affine.identity() and not src.gcps[0]:
            raise _fail(path, "has no geotransform (pixel coordinates only)",
                        "Georeference it, e.g. `gdal_edit.py -a_ullr ulx uly lrx lry FILE`.")
        if t.b != 0 or t.d != 0:
            raise _fail(path, f"has a rotated or sheared geotransform {tuple(t)[:6]}",
                        "Warp it north-up first, e.g. `gdalwarp FILE north_up.tif`.")
        _check_readable(src, path)
        return SceneInfo(
            path=path,
            width=src.width,
            height=src.height,
            count=src.count,
            dtype=src.dtypes[0],
            crs=identified_crs(src.crs),
            transform=t,
            nodata=src.nodata,
            band_names=tuple(d or f"band_{i + 1}" for i, d in enumerate(src.descriptions)),
            block_shapes=tuple(tuple(b) for b in src.block_shapes),
            alpha=tuple(i + 1 for i, c in enumerate(src.colorinterp) if c == ColorInterp.alpha),
            source=item.vrt if item else None,
            label=item.id if item else None,
        )


def _check_readable(src: rasterio.DatasetReader, path: Path) -> None:
    """Read the first and last internal block so a truncated or corrupt file fails now, not mid-run."""
    bh, bw = src.block_shapes[0]
    corners = [Window(0, 0, min(bw, src.width), min(bh, src.height))]
    last_row = (src.height - 1) // bh * bh
    last_col = (src.width - 1) // bw * bw
    corners.append(Window(last_col, last_row, src.width - last_col, src.height - last_row))
    try:
        for w in corners:
            src.read(window=w)
    except RasterioIOError as err:
        raise _fail(path, f"is corrupt or truncated ({err})", "Re-download or re-export the file.") from None


def resolve_bands(scene: SceneInfo, bands: Sequence[int | str] | None) -> tuple[int, ...]:
    """Turn band names or 1-based indexes into 1-based indexes; ``None`` means all bands.

    Raises:
        BandMismatchError: an index is out of range or a name is not a band description.
    """
    if bands is None:
        return tuple(range(1, scene.count + 1))
    out = []
    for b in bands:
        if isinstance(b, str) and not b.isdigit():
            if b not in scene.band_names:
                raise BandMismatchError(f"{scene.path}: no band named {b!r}; bands are {list(scene.band_names)}")
            out.append(scene.band_names.index(b) + 1)
        else:
            i = int(b)
            if not 1 <= i <= scene.count:
                raise BandMismatchError(f"{scene.path}: band {i} out of range; the scene has bands 1..{scene.count}")
            out.append(i)
    return tuple(out)


def check_bands(scene: SceneInfo, expected: Sequence[str]) -> tuple[int, ...]:
    """Match the scene's data bands (alpha bands aside) to a model's expected band names, by name, else by count.

    Returns the 1-based band indexes in the model's order.

    Raises:
        BandMismatchError: the scene lacks bands the model needs, or has a different count.
    """
    expected = list(expected)
    data = scene.data_bands
    names = [scene.band_names[i - 1] for i in data]
    if all(name in names for name in expected):
        return tuple(data[names.index(name)] for name in expected)
    named = [n for n in names if not n.startswith("band_")]
    if named and len(data) == len(expected):
        raise BandMismatchError(
            f"{scene.path}: band names {names} do not match the model's {expected}. "
            "Reorder or rename the bands (band descriptions), or pass --bands (1-based indexes or names) "
            "in the model's order."
        )
    if len(data) != len(expected):
        raise BandMismatchError(
            f"{scene.path}: has {len(data)} data bands but the model expects {len(expected)} ({expected}). "
            "Pick the model's bands with --bands (e.g. --bands 1,2,3), or use a model trained on this sensor."
        )
    return data


def _reflect(start: int, stop: int, n: int) -> np.ndarray:
    """Indices ``start..stop-1`` mirrored into ``[0, n)`` about the scene edges (numpy ``reflect``)."""
    idx = np.arange(start, stop)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx)


def read_valid(
    src: rasterio.DatasetReader,
    bands: Sequence[int] | None = None,
    *,
    window: Window | None = None,
    out_shape: tuple[int, int] | None = None,
    dtype: str | None = "float32",
) -> tuple[np.ndarray, np.ndarray]:
    """Read bands (of ``window``, decimated to ``out_shape`` nearest) and their (h, w) validity.

    A pixel is valid when every band is valid per GDAL's mask (nodata value, alpha or mask band) and
    finite (NaN is invalid and read as 0). Integer bands masked by a nodata value only are judged
    from the values read, so a decimated read of a whole scene passes over the file once; other
    masks are read from GDAL.
    """
    bands = list(bands or range(1, src.count + 1))
    shape = None if out_shape is None else (len(bands), *out_shape)
    data = src.read(bands, window=window, out_shape=shape, out_dtype=dtype)
    if all(src.dtypes[b - 1][0] in "iu" and src.mask_flag_enums[b - 1] in ([MaskFlags.nodata], [MaskFlags.all_valid])
           for b in bands):
        valid = np.ones(data.shape[1:], dtype=bool)
        for values, b in zip(data, bands, strict=True):
            if src.nodatavals[b - 1] is not None:
                valid &= values != src.nodatavals[b - 1]
    else:
        valid = np.all(src.read_masks(bands, window=window, out_shape=shape) > 0, axis=0)
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            valid &= finite.all(axis=0)
            data[~finite] = 0
    return data, valid


def read_window(
    src: rasterio.DatasetReader,
    box: Box,
    *,
    bands: Sequence[int] | None = None,
    dtype: str | None = "float32",
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``box`` (scene pixel coordinates, may reach past the edges) with a validity mask.

    Pixels outside the scene are filled by mirroring the scene about its edges (numpy's ``reflect``
    applied to the whole scene), so the values never depend on which window asked for them; they are
    marked invalid. Validity is :func:`read_valid`'s.

    Args:
        src: the open scene.
        box: the pixels to read.
        bands: 1-based band indexes (default: all).
        dtype: the returned data type; ``None`` keeps the scene's own (a uint8 scene then costs a
            quarter of float32's memory, e.g. while a block waits to be processed).

    Returns:
        ``(data, valid)``: ``data`` is (bands, h, w), ``valid`` is (h, w) bool.
    """
    bands = list(bands or range(1, src.count + 1))
    if box.intersection(Box(0, 0, src.height, src.width)) is None:
        raise ValueError(f"{box} lies wholly outside the {src.height}x{src.width} scene")
    rows = _reflect(box.y0, box.y1, src.height)
    cols = _reflect(box.x0, box.x1, src.width)
    r0, c0 = int(rows.min()), int(cols.min())
    window = Window(c0, r0, int(cols.max()) - c0 + 1, int(rows.max()) - r0 + 1)
    data, valid = read_valid(src, bands, window=window, dtype=dtype)
    inside = box.intersection(Box(0, 0, src.height, src.width))
    if (rows.size, cols.size) != (window.height, window.width) or inside != box:
        index = np.ix_(rows - r0, cols - c0)  # one copy of the mirrored window, not one per axis
        data = data[(slice(None), *index)]
        valid = valid[index]
        outside = np.ones(box.shape, dtype=bool)
        outside[inside.relative_to(box)] = False
        valid[outside] = False
    return data, valid


def band_stats(
    scene: SceneInfo,
    *,
    bands: Sequence[int] | None = None,
    windows: int = 64,
    window_size: int = 256,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and standard deviation of valid pixels, from a seeded sample of windows.

    Reads at most ``windows`` windows of ``window_size``² pixels, never the whole scene (unless the
    scene is smaller than that).

    Raises:
        InvalidSceneError: no sampled pixel is valid and a coarse whole-scene mask finds none either.
    """
    bands = list(bands or range(1, scene.count + 1))
    rng = np.random.default_rng(seed)
    h, w = min(window_size, scene.height), min(window_size, scene.width)
    total = np.zeros(len(bands))
    total_sq = np.zeros(len(bands))
    n = 0
    with gdal_env(), rasterio.open(scene.opens) as src:
        for _ in range(windows if (h, w) != scene.shape else 1):
            y = int(rng.integers(0, scene.height - h + 1))
            x = int(rng.integers(0, scene.width - w + 1))
            data, valid = read_window(src, Box(y, x, y + h, x + w), bands=bands)
            px = data[:, valid].astype(np.float64)
            total += px.sum(axis=1)
            total_sq += (px**2).sum(axis=1)
            n += px.shape[1]
        if n == 0:
            _require_some_valid(src, scene)
            raise InvalidSceneError(
                f"{scene.path}: no valid pixel in {windows} sampled windows; band statistics need valid pixels. "
                "Pass more windows, or normalisation values from the checkpoint."
            )
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean**2, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def _require_some_valid(src: rasterio.DatasetReader, scene: SceneInfo, *, strips: int = 16) -> None:
    """Raise if a coarse (at most 1024² px) read of the masks finds no valid pixel at all.

    The scene is read decimated in ``strips`` horizontal strips, middle first, stopping at the first
    valid pixel: a usual scene costs one strip, not a pass over the whole file; only a scene that is
    all invalid is read through (once; callers read under :func:`gdal_env`, whose cache is bounded).
    """
    scale = max(1, int(np.ceil(max(scene.shape) / 1024)))
    out_w = max(1, scene.width // scale)
    edges = np.linspace(0, scene.height, min(strips, scene.height) + 1).astype(int)
    middle_first = sorted(range(len(edges) - 1), key=lambda i: abs(2 * i + 1 - (len(edges) - 1)))
    for i in middle_first:
        window = Window(0, int(edges[i]), scene.width, int(edges[i + 1] - edges[i]))
        shape = (src.count, max(1, window.height // scale), out_w)
        valid = np.all(src.read_masks(window=window, out_shape=shape) > 0, axis=0)
        if scene.dtype.startswith("float") and valid.any():
            valid &= np.all(np.isfinite(src.read(window=window, out_shape=shape)), axis=0)
        if valid.any():
            return
    raise InvalidSceneError(
        f"{scene.path}: every pixel is invalid (nodata, masked or NaN); there is nothing to classify. "
        "Check the nodata value (`gdalinfo`) or pick another scene."
    )


def require_valid_pixels(scene: SceneInfo) -> None:
    """Raise :class:`InvalidSceneError` if the scene has no valid pixel (checked on a coarse mask)."""
    with gdal_env(), rasterio.open(scene.opens) as src:
        _require_some_valid(src, scene)
