"""Seam index against the context margin: how much overlap the trained models need.

    python bench/seams.py                                   # the demo model on both NC scenes, 4x
    python bench/seams.py --checkpoint data/models/zion_nlcd_unet_resnet18.pt --scene zion
    python bench/seams.py --tiles 512 --margins 0,32,64,128 --factor 8 --crop 1536

For each checkpoint, scene, tile size and margin it predicts (``predict_raster``: the real blocks,
blending and stitching; polygons off) ``--crops`` crops of the real scene, each enlarged ``--factor``
times (nearest) so that tile borders fall inside land and shifted so that they fall on other land,
and prints, pooled over the crops:

* ``seam``: the seam index of the tile borders in the tiled map over the seam index of the same
  lines in the crop predicted untiled (one tile of ``--crop`` px, the same network); 1 = the tile
  borders do not show.  :func:`geoseg.stitch.seam_index` alone is class changes per neighbour pair
  across the lines where tiles start and end over changes per pair across all lines, but those
  lines lie on the enlarged input pixels' edges and on the network's feature grid (tile origins
  are multiples of 32 px), where class edges fall more often anyway: 1.2 on the untiled NC crops.
  Dividing by the untiled map's index at the same lines leaves what the tiling adds.  Block
  borders are exact by construction (blocked == whole scene).
* ``tiles/px``: tiles run x tile area / scene pixels (the redundancy the margin costs);
* ``s``: the wall time of the run.

The smallest margin whose seam index stays at or below ``--target`` (1.05) is marked ``<-``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from conftest import upsampled_scene  # noqa: E402

from geoseg.checkpoint import ModelContract, load_checkpoint  # noqa: E402
from geoseg.config import PredictConfig  # noqa: E402
from geoseg.errors import ConfigError  # noqa: E402
from geoseg.pipeline import predict_raster  # noqa: E402
from geoseg.stitch import SeamCounts, seam_counts  # noqa: E402
from geoseg.tiling import TileGrid  # noqa: E402

DEMO = ROOT / "data" / "models" / "nc_landclass96_deeplabv3_mobilenetv3.pt"
#: name: (scene, its bands in the model's order)
SCENES = {
    "nc2000": (ROOT / "data" / "nc-landsat-lulc" / "lsat7_2000_6band.tif", (1, 2, 3, 4, 5, 6)),
    "nc2002": (ROOT / "data" / "nc-landclass96" / "lsat7_2002.tif", (1, 2, 3, 4, 5, 6)),
    "zion": (ROOT / "data" / "zion-landsat8-nlcd" / "landsat8_2015_b2345.tif", (1, 2, 3, 4)),
}


def class_map(checkpoint: Path, scene: Path, tile: int, margin: int, work: Path) -> tuple[np.ndarray, int, float]:
    """(class map, tiles run, seconds) of one predict run: the real blocks, blending and stitching."""
    out = work / f"{scene.stem}_{tile}_{margin}"
    config = PredictConfig(tile_size=tile, margin=margin, vectorize=False, workers=1)
    t0 = time.perf_counter()
    result = predict_raster(scene, checkpoint, out, config=config, overwrite=True)
    seconds = time.perf_counter() - t0
    with rasterio.open(result.outputs["class_map"]) as src:
        values = src.read(1)
    tiles = json.loads(Path(result.outputs["summary"]).read_text())["grid"]["tiles"]  # what the run ran
    return values, tiles, seconds


@dataclass(frozen=True)
class Run:
    """Seam counts of the tiled map and of the untiled map at the same lines, pooled over runs."""

    tiled: SeamCounts
    untiled: SeamCounts
    tile_pixels: int
    pixels: int
    seconds: float

    def __add__(self, other: Run) -> Run:
        return Run(self.tiled + other.tiled, self.untiled + other.untiled, self.tile_pixels + other.tile_pixels,
                   self.pixels + other.pixels, self.seconds + other.seconds)

    @property
    def seam(self) -> float:
        """Seam index of the tiled map over that of the untiled map at the same lines (1 = no seam)."""
        return self.tiled.index / self.untiled.index


def measure(checkpoint: Path, scene: Path, tile: int, margin: int, work: Path, untiled: np.ndarray) -> Run:
    """Predict ``scene`` at ``tile``/``margin``; count class changes across its tile edges, in it and in ``untiled``."""
    values, tiles, seconds = class_map(checkpoint, scene, tile, margin, work)
    grid = TileGrid(*values.shape, tile, margin)
    rows, cols = grid.tile_edges(grid.height), grid.tile_edges(grid.width)
    return Run(seam_counts(values, rows, cols), seam_counts(untiled, rows, cols), tiles * tile * tile, values.size,
               seconds)


def crops(source: Path, side: int, n: int) -> list[Window]:
    """``n`` windows of ``side`` source px around the scene's centre, shifted diagonally by side/(2n) px each."""
    with rasterio.open(source) as src:
        y0, x0 = (src.height - side) // 2, (src.width - side) // 2
    step = side // (2 * n)
    return [Window(x0 + (i - n // 2) * step, y0 + (i - n // 2) * step, side, side) for i in range(n)]


def fits(contract: ModelContract, tile: int, margin: int) -> bool:
    """Whether the model takes ``margin`` at ``tile`` (:meth:`ModelContract.margin` would not refuse it)."""
    try:
        contract.margin(tile, margin)
    except ConfigError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEMO)
    parser.add_argument("--scene", nargs="+", choices=sorted(SCENES), default=["nc2000", "nc2002"])
    parser.add_argument("--tiles", default="own,512", help="tile sizes; 'own' = the checkpoint's")
    parser.add_argument("--margins", default="0,16,32,64,128",
                        help="margins in px (those the model refuses at a tile are skipped)")
    parser.add_argument("--factor", type=int, default=4, help="enlargement of the scene (nearest)")
    parser.add_argument("--crop", type=int, default=1024, help="side of the enlarged crop, in px")
    parser.add_argument("--crops", type=int, default=4, help="crops per scene, shifted, their counts pooled")
    parser.add_argument("--target", type=float, default=1.05)
    args = parser.parse_args()

    _, contract = load_checkpoint(args.checkpoint)
    tiles = [contract.tile_size if t == "own" else int(t) for t in args.tiles.split(",")]
    margins = [int(m) for m in args.margins.split(",")]
    print(f"checkpoint {args.checkpoint.name}: {contract.arch}/{contract.backbone}, own tile {contract.tile_size}, "
          f"default margin {contract.margin(contract.tile_size)}; scenes x{args.factor}, "
          f"{args.crops} crops of {args.crop} px pooled")
    print(f"{'scene':8} {'tile':>5} {'margin':>6} {'seam':>6} {'tiles/px':>8} {'s':>6}")
    with tempfile.TemporaryDirectory(dir=ROOT / ".tmp") as tmp:
        work = Path(tmp)
        for name in args.scene:
            source, bands = SCENES[name]
            scenes = [
                upsampled_scene(work / f"{name}_x{args.factor}_{i}.tif", args.factor, source=source, bands=bands,
                                window=window)
                for i, window in enumerate(crops(source, args.crop // args.factor, args.crops))
            ]
            untiled = [class_map(args.checkpoint, scene, args.crop, 0, work)[0] for scene in scenes]
            for tile in tiles:
                rows = []
                for margin in (m for m in margins if fits(contract, tile, m)):
                    runs = [measure(args.checkpoint, scene, tile, margin, work, whole)
                            for scene, whole in zip(scenes, untiled, strict=True)]
                    rows.append((margin, sum(runs[1:], runs[0])))
                best = next((m for m, run in rows if run.seam <= args.target), None)
                for margin, run in rows:
                    mark = " <-" if margin == best else ""
                    print(f"{name:8} {tile:5d} {margin:6d} {run.seam:6.3f} "
                          f"{run.tile_pixels / run.pixels:8.2f} {run.seconds:6.1f}{mark}", flush=True)

if __name__ == "__main__":
    main()
