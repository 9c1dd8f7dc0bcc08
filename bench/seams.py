"""Seam index against the context margin: how much overlap the trained models need.

    python bench/seams.py                                   # the demo model on both NC scenes, 4x
    python bench/seams.py --checkpoint data/models/zion_nlcd_unet_resnet18.pt --scene zion
    python bench/seams.py --tiles 512 --margins 0,32,64,128 --factor 8 --crop 1536

For each checkpoint, scene, tile size and margin it predicts (``predict_raster``: the real blocks,
blending and stitching; polygons off) a crop of the real scene enlarged ``--factor`` times (nearest),
so that tile and block borders fall inside land, and prints:

* ``seam``: the seam index of the tile borders (:func:`geoseg.stitch.seam_index`: class changes per
  neighbour pair across the lines where tiles start and end, over changes per pair across all
  lines; 1 = borders do not show). Block borders are exact by construction (blocked == whole scene).
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
from pathlib import Path

import rasterio
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from conftest import upsampled_scene  # noqa: E402

from geoseg.checkpoint import load_checkpoint  # noqa: E402
from geoseg.config import PredictConfig  # noqa: E402
from geoseg.pipeline import predict_raster  # noqa: E402
from geoseg.stitch import seam_index  # noqa: E402
from geoseg.tiling import TileGrid  # noqa: E402

DEMO = ROOT / "data" / "models" / "nc_landclass96_deeplabv3_mobilenetv3.pt"
#: name: (scene, its bands in the model's order)
SCENES = {
    "nc2000": (ROOT / "data" / "nc-landsat-lulc" / "lsat7_2000_6band.tif", (1, 2, 3, 4, 5, 6)),
    "nc2002": (ROOT / "data" / "nc-landclass96" / "lsat7_2002.tif", (1, 2, 3, 4, 5, 6)),
    "zion": (ROOT / "data" / "zion-landsat8-nlcd" / "landsat8_2015_b2345.tif", (1, 2, 3, 4)),
}


def measure(checkpoint: Path, scene: Path, tile: int, margin: int, work: Path) -> tuple[float, float, float]:
    """(seam index, tiles x area / pixels, seconds) of one predict run."""
    out = work / f"{scene.stem}_{tile}_{margin}"
    config = PredictConfig(tile_size=tile, margin=margin, vectorize=False, workers=1, block_size=1024)
    t0 = time.perf_counter()
    result = predict_raster(scene, checkpoint, out, config=config, overwrite=True)
    seconds = time.perf_counter() - t0
    with rasterio.open(result.outputs["class_map"]) as src:
        class_map = src.read(1)
    grid = TileGrid(*class_map.shape, tile, margin)
    tiles = json.loads(Path(result.outputs["summary"]).read_text())["grid"]["tiles"]  # what the run ran
    seam = seam_index(class_map, grid.tile_edges(grid.height), grid.tile_edges(grid.width))
    return seam, tiles * tile * tile / class_map.size, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEMO)
    parser.add_argument("--scene", nargs="+", choices=sorted(SCENES), default=["nc2000", "nc2002"])
    parser.add_argument("--tiles", default="own,512", help="tile sizes; 'own' = the checkpoint's")
    parser.add_argument("--margins", default="0,16,32,64,128", help="margins in px (those past tile/4 are skipped)")
    parser.add_argument("--factor", type=int, default=4, help="enlargement of the scene (nearest)")
    parser.add_argument("--crop", type=int, default=1024, help="side of the enlarged crop, in px")
    parser.add_argument("--target", type=float, default=1.05)
    args = parser.parse_args()

    _, contract = load_checkpoint(args.checkpoint)
    tiles = [contract.tile_size if t == "own" else int(t) for t in args.tiles.split(",")]
    margins = [int(m) for m in args.margins.split(",")]
    print(f"checkpoint {args.checkpoint.name}: {contract.arch}/{contract.backbone}, own tile {contract.tile_size}, "
          f"default margin {contract.margin(contract.tile_size)}; scenes x{args.factor}, "
          f"{args.crop} px crops")
    print(f"{'scene':8} {'tile':>5} {'margin':>6} {'seam':>6} {'tiles/px':>8} {'s':>6}")
    with tempfile.TemporaryDirectory(dir=ROOT / ".tmp") as tmp:
        work = Path(tmp)
        for name in args.scene:
            source, bands = SCENES[name]
            side = args.crop // args.factor
            with rasterio.open(source) as src:
                window = Window((src.width - side) // 2, (src.height - side) // 2, side, side)
            scene = upsampled_scene(work / f"{name}_x{args.factor}.tif", args.factor, source=source, bands=bands,
                                    window=window)
            for tile in tiles:
                rows = []
                for margin in (m for m in margins if m <= tile // 4):
                    seam, redundancy, seconds = measure(args.checkpoint, scene, tile, margin, work)
                    rows.append((margin, seam, redundancy, seconds))
                best = next((m for m, s, _, _ in rows if s <= args.target), None)
                for margin, seam, redundancy, seconds in rows:
                    mark = " <-" if margin == best else ""
                    print(f"{name:8} {tile:5d} {margin:6d} {seam:6.3f} {redundancy:8.2f} {seconds:6.1f}{mark}",
                          flush=True)


if __name__ == "__main__":
    main()
