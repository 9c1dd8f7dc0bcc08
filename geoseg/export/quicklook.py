"""Pictures of maps: natural-colour composites, coloured class maps and the run's quick-look PNG.

The quick-look (``<stem>_quicklook.png``) shows the input in natural colours beside the class map,
with a legend of the class names and colours; nodata is transparent in both.  Both rasters are read
decimated (from overviews where the file has them), so its memory follows the picture, not the scene.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling

from geoseg.config import ClassSchema
from geoseg.raster import gdal_env, read_valid

#: Longest side of each quick-look panel, in pixels.
QUICKLOOK_SIDE = 480
#: Titles sit on white: the picture's background is transparent (nodata too).
_LABEL_BOX = {"facecolor": "white", "edgecolor": "none", "pad": 2}


def rgb_composite(data: np.ndarray, valid: np.ndarray, band_names: Sequence[str]) -> np.ndarray:
    """(H, W, 3) float in [0, 1]: bands named red/green/blue (else the first three, or grey), 2–98 % stretch."""
    names = [b.lower() for b in band_names]
    if all(c in names for c in ("red", "green", "blue")):
        idx = [names.index(c) for c in ("red", "green", "blue")]
    else:
        idx = [0, 1, 2] if len(names) >= 3 else [0, 0, 0]
    rgb = np.moveaxis(data[idx], 0, -1).astype(np.float64)
    px = rgb[valid] if valid.any() else rgb.reshape(-1, 3)
    lo, hi = np.percentile(px, 2, axis=0), np.percentile(px, 98, axis=0)
    rgb = np.clip((rgb - lo) / np.maximum(hi - lo, 1e-9), 0, 1)
    rgb[~valid] = 1.0
    return rgb


def colourise(idx: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """(H, W, 3) float RGB of channel indices ``idx`` in ``colours`` (rows in [0, 1]); white elsewhere."""
    out = np.ones((*idx.shape, 3))
    known = idx < len(colours)
    out[known] = colours[idx[known]]
    return out


def png_data_uri(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URI for embedding a PNG in markdown (a Prefect artifact)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _with_alpha(rgb: np.ndarray, opaque: np.ndarray) -> np.ndarray:
    return np.dstack([rgb, opaque.astype(np.float64)])


def quicklook_png(scene: str | Path, class_map: str | Path, classes: ClassSchema, *,
                  side: int = QUICKLOOK_SIDE) -> bytes:
    """Input (natural colours) | class map, with a class legend; nodata transparent. PNG bytes."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    with gdal_env(), rasterio.open(class_map) as cm:
        step = max(1, int(np.ceil(max(cm.shape) / side)))
        shape = (int(np.ceil(cm.height / step)), int(np.ceil(cm.width / step)))
        ids = cm.read(1, out_shape=shape, resampling=Resampling.nearest)
    with gdal_env(), rasterio.open(scene) as src:
        data, valid = read_valid(src, out_shape=shape)
        names = tuple(d or f"band_{i + 1}" for i, d in enumerate(src.descriptions))
    colours = np.array([c.rgb for c in classes.classes], np.float64) / 255
    channel = np.full(256, len(colours), np.int64)  # class id -> channel; other ids stay unknown
    channel[list(classes.ids)] = np.arange(len(colours))
    mapped = channel[ids]
    panels = [(f"input ({Path(scene).name})", _with_alpha(rgb_composite(data, valid, names), valid)),
              ("class map", _with_alpha(colourise(mapped, colours), mapped < len(colours)))]
    aspect = shape[0] / shape[1]
    fig = Figure(figsize=(9, 4.3 * aspect + 0.9), dpi=100)
    for ax, (title, img) in zip(fig.subplots(1, 2), panels, strict=True):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=9, bbox=_LABEL_BOX)  # readable on dark pages too
        ax.set_axis_off()
    fig.legend(handles=[Patch(facecolor=colours[k], edgecolor="0.4", label=n) for k, n in enumerate(classes.names)],
               loc="lower center", ncol=min(len(colours), 8), fontsize=8, facecolor="white", framealpha=1)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97), pad=0.6)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", transparent=True)
    return buf.getvalue()
