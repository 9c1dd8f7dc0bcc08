"""Benchmark: blocked ``geoseg.vector`` against whole-raster ``rasterio.features.shapes``.

Generates synthetic class maps (a low-frequency noise field with some speckle, quantised into 7
classes, with a nodata lake; written block-wise as tiled, deflate-compressed uint8 GeoTIFFs under
.tmp/), or takes given maps, and runs each method in its own subprocess (``bench/measure.py``):
``work s`` is the method's own wall time (imports excluded), ``import s`` the time its imports took,
``total s`` the whole child process, ``CPU s`` the CPU seconds of the whole process tree (steadier
than wall time on a shared machine), and ``peak MB`` the tree's peak proportional set size (PSS:
pages shared by forked workers counted once).

    python bench/vectorize.py --sizes 10000 30000
    python bench/vectorize.py --sizes 10000 --repeat 2 --baseline .tmp/before   # also an older geoseg
    python bench/vectorize.py --worldcover          # also the ESA WorldCover tile, if present
    python bench/vectorize.py --maps my_map.tif --keep

Methods: ``imports`` (only ``import geoseg.vector``: the memory floor of the others that import
geoseg); ``vectorize`` (GeoPackage out, all attributes); ``shapes`` (whole array in memory,
``rasterio.features.shapes(connectivity=4)`` consumed, GeoJSON-like dicts discarded, nothing
written); ``shapes+gpkg`` (whole array, shapes turned into a GeoDataFrame and written to a
GeoPackage: the naive pipeline that produces the same file). With ``--baseline DIR`` (a folder
holding a ``geoseg`` package, e.g. ``git archive HEAD geoseg | tar -x -C DIR``), ``baseline`` runs
``vectorize`` from that copy, interleaved with the others.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import run_measured  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORLDCOVER = Path("/work/shared/data/variety/ESA_WorldCover_10m_2021_v200_N00E006_Map.tif")
METHODS = ("imports", "vectorize", "shapes", "shapes+gpkg")


# -- synthetic maps -----------------------------------------------------------------------------


def make_map(path: Path, size: int, *, seed: int = 0, chunk: int = 2048) -> Path:
    """Write a ``size``² synthetic class map block by block (memory follows ``chunk``, not ``size``)."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window
    from scipy.ndimage import map_coordinates

    rng = np.random.default_rng(seed)
    # octaves of value noise: (cell size in px, amplitude); large fields, field-scale detail, speckle
    octaves = [(1024, 1.0), (256, 0.5), (64, 0.25), (16, 0.12), (4, 0.06)]
    grids = [(cell, amp, rng.standard_normal((size // cell + 3, size // cell + 3))) for cell, amp in octaves]
    edges = np.quantile(rng.standard_normal(100_000) * 1.1, np.linspace(0, 1, 8)[1:-1])
    profile = dict(
        driver="GTiff",
        width=size,
        height=size,
        count=1,
        dtype="uint8",
        nodata=255,
        crs="EPSG:32632",
        transform=from_origin(300000.0, 5000000.0, 10.0, 10.0),
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
        zlevel=1,
    )
    with rasterio.open(path, "w", **profile) as dst:
        for y0 in range(0, size, chunk):
            for x0 in range(0, size, chunk):
                h, w = min(chunk, size - y0), min(chunk, size - x0)
                yy, xx = np.meshgrid(
                    np.arange(y0, y0 + h, dtype=np.float32),
                    np.arange(x0, x0 + w, dtype=np.float32),
                    indexing="ij",
                )
                field = np.zeros((h, w), np.float32)
                for cell, amp, grid in grids:
                    field += amp * map_coordinates(grid, [yy / cell, xx / cell], order=1).astype(np.float32)
                classes = (np.digitize(field, edges) + 1).astype(np.uint8)
                lake = (yy - size * 0.3) ** 2 + (xx - size * 0.6) ** 2 < (size * 0.05) ** 2
                classes[lake] = 255
                dst.write(classes, 1, window=Window(x0, y0, w, h))
    return path


# -- one measured run (in a subprocess) ----------------------------------------------------------


def run_one(method: str, raster: str, out: str, block_size: int, workers: int | None) -> dict:
    """Run one method in this process and return its figures."""
    t0 = time.perf_counter()
    if method in ("imports", "vectorize", "baseline"):
        try:
            from geoseg.vector import vectorize
        except ImportError:  # a baseline from before the vectorise stage moved into geoseg/vector/
            from geoseg.vectorize import vectorize
    else:
        import rasterio
        from rasterio.features import shapes
    t1 = time.perf_counter()
    polygons = 0
    if method in ("vectorize", "baseline"):
        summary = vectorize(raster, out, block_size=block_size, workers=workers, overwrite=True)
        polygons = summary.polygons
    elif method != "imports":
        with rasterio.open(raster) as src:
            data = src.read(1)
            transform, nodata, crs = src.transform, src.nodata, src.crs
        mask = data != (255 if nodata is None else nodata)
        if method == "shapes":
            polygons = sum(1 for _ in shapes(data, mask=mask, connectivity=4, transform=transform))
        else:
            import geopandas as gpd
            import shapely.geometry

            geoms, values = [], []
            for geom, value in shapes(data, mask=mask, connectivity=4, transform=transform):
                geoms.append(shapely.geometry.shape(geom))
                values.append(int(value))
            del data, mask
            gdf = gpd.GeoDataFrame({"class_id": values}, geometry=geoms, crs=crs)
            gdf["area_m2"] = gdf.area
            gdf["perim_m"] = gdf.length
            gdf.to_file(out, driver="GPKG", engine="pyogrio")
            polygons = len(gdf)
    return {"method": method, "import_s": t1 - t0, "seconds": time.perf_counter() - t1, "polygons": polygons}


def measure(method: str, raster: Path, out: Path, block_size: int, workers: int | None, baseline: Path | None) -> dict:
    """Run ``method`` in a fresh subprocess and add what its process tree used."""
    cmd = [sys.executable, __file__, "--child", method, str(raster), str(out), str(block_size), str(workers or 0)]
    if method == "baseline":
        cmd.append(str(Path(baseline).resolve()))
    m = run_measured(cmd, cwd=ROOT)
    result = json.loads(m.stdout.strip().splitlines()[-1])
    result.update(total_s=m.seconds, cpu_s=m.cpu_s, peak_mb=m.peak_pss_mb)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[10000, 30000], help="synthetic map sides")
    parser.add_argument("--maps", type=Path, nargs="*", default=[], help="existing class maps to add")
    parser.add_argument("--worldcover", action="store_true", help=f"add {WORLDCOVER.name} if present")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--baseline", type=Path, help="folder with an older geoseg package to run as 'baseline'")
    parser.add_argument("--block-size", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=None, help="vectorize workers (default: CPU count, max 4)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per method, interleaved; best is shown")
    parser.add_argument("--keep", action="store_true", help="keep the generated maps and outputs")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        method, raster, out, block_size, workers, *baseline = args.child
        sys.path[:0] = baseline  # the older geoseg comes first
        print(json.dumps(run_one(method, raster, out, int(block_size), int(workers) or None)))
        return
    methods = list(args.methods)
    if args.baseline:
        if not any((args.baseline / "geoseg" / p).exists() for p in ("vector/vectorise.py", "vectorize.py")):
            raise SystemExit(f"--baseline {args.baseline}: no geoseg vectorise stage there")
        methods.insert(methods.index("vectorize") + 1 if "vectorize" in methods else 0, "baseline")

    (ROOT / ".tmp").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-vectorize-", dir=ROOT / ".tmp"))
    try:
        maps = list(args.maps)
        for size in args.sizes:
            t0 = time.perf_counter()
            maps.append(make_map(work / f"synthetic_{size}.tif", size))
            print(f"generated {size}x{size} map in {time.perf_counter() - t0:.0f} s", flush=True)
        if args.worldcover:
            if WORLDCOVER.exists():
                maps.append(WORLDCOVER)
            else:
                print(f"{WORLDCOVER} not found; skipped")
        print(
            f"{'map':<26} {'method':<12} {'polygons':>9} {'work s':>7} {'import s':>8} {'total s':>7} "
            f"{'CPU s':>7} {'poly/s':>8} {'peak MB':>8}"
        )
        for raster in maps:
            best: dict[str, dict] = {}
            for _ in range(args.repeat):
                for method in methods:
                    out = work / f"{Path(raster).stem}.{method.replace('+', '_')}.gpkg"
                    r = measure(method, raster, out, args.block_size, args.workers, args.baseline)
                    out.unlink(missing_ok=True)
                    if method not in best or r["seconds"] < best[method]["seconds"]:
                        best[method] = r
            for method, r in best.items():
                rate = r["polygons"] / r["seconds"] if r["seconds"] else 0.0
                print(
                    f"{Path(raster).name[:26]:<26} {method:<12} {r['polygons']:>9} {r['seconds']:>7.1f} "
                    f"{r['import_s']:>8.1f} {r['total_s']:>7.1f} {r['cpu_s']:>7.1f} {rate:>8.0f} "
                    f"{r['peak_mb']:>8.0f}",
                    flush=True,
                )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
