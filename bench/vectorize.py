"""Benchmark: blocked ``geoseg.vectorize`` against whole-raster ``rasterio.features.shapes``.

Generates synthetic class maps (a low-frequency noise field with some speckle, quantised into 7
classes, with a nodata lake; written block-wise as tiled, deflate-compressed uint8 GeoTIFFs under
.tmp/), or takes given maps, and measures each method in its own subprocess: wall time,
CPU seconds of the whole process tree (steadier than wall time on a shared machine), polygons/s
(wall), and peak memory: the process tree's proportional set size (PSS) summed, polled with psutil
("peak MB"), and the main process's own peak RSS from getrusage ("main MB").

    python bench/vectorize.py --sizes 10000 30000
    python bench/vectorize.py --worldcover          # also the ESA WorldCover tile, if present
    python bench/vectorize.py --maps my_map.tif --keep

Methods: ``imports`` (only ``import geoseg.vectorize``: the memory floor of the others that import
geoseg); ``vectorize`` (GeoPackage out, all attributes); ``shapes`` (whole array in memory,
``rasterio.features.shapes(connectivity=4)`` consumed, GeoJSON-like dicts discarded, nothing
written); ``shapes+gpkg`` (whole array, shapes turned into a GeoDataFrame and written to a
GeoPackage: the naive pipeline that produces the same file).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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
    if method == "imports":  # the memory floor: what importing geoseg costs before any work
        import geoseg.vectorize  # noqa: F401

        polygons = 0
    elif method == "vectorize":
        from geoseg.vectorize import vectorize

        summary = vectorize(raster, out, block_size=block_size, workers=workers, overwrite=True)
        polygons = summary.polygons
    else:
        import rasterio
        from rasterio.features import shapes

        with rasterio.open(raster) as src:
            data = src.read(1)
            transform, nodata = src.transform, src.nodata
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
            with rasterio.open(raster) as src:
                crs = src.crs
            gdf = gpd.GeoDataFrame({"class_id": values}, geometry=geoms, crs=crs)
            gdf["area_m2"] = gdf.area
            gdf["perimeter_m"] = gdf.length
            gdf.to_file(out, driver="GPKG", engine="pyogrio")
            polygons = len(gdf)
    seconds = time.perf_counter() - t0
    self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": method, "seconds": seconds, "polygons": polygons, "self_peak_mb": self_peak}


def measure(method: str, raster: Path, out: Path, block_size: int, workers: int | None) -> dict:
    """Run ``method`` in a fresh subprocess, polling the RSS of its whole process tree."""
    import psutil

    cmd = [
        sys.executable,
        __file__,
        "--child",
        method,
        str(raster),
        str(out),
        str(block_size),
        str(workers or 0),
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = psutil.Popen(cmd, stdout=subprocess.PIPE, cwd=ROOT)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            # PSS: pages shared by forked workers are counted once across the tree
            peak = max(peak, sum(p.memory_full_info().pss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    stdout = proc.stdout.read().decode()
    if proc.returncode:
        raise SystemExit(f"{method} on {raster} failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # includes the workers the child waited for
    result["tree_peak_mb"] = peak / 1024**2
    result["cpu_s"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=[10000, 30000], help="synthetic map sides")
    parser.add_argument("--maps", type=Path, nargs="*", default=[], help="existing class maps to add")
    parser.add_argument("--worldcover", action="store_true", help=f"add {WORLDCOVER.name} if present")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--block-size", type=int, default=2048)
    parser.add_argument(
        "--workers", type=int, default=None, help="vectorize workers (default: CPU count, max 4)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per method, interleaved; best is shown")
    parser.add_argument("--keep", action="store_true", help="keep the generated maps and outputs")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        method, raster, out, block_size, workers = args.child
        print(json.dumps(run_one(method, raster, out, int(block_size), int(workers) or None)))
        return

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
            f"{'map':<34} {'method':<12} {'polygons':>9} {'wall s':>7} {'CPU s':>7} {'poly/s':>8} "
            f"{'peak MB':>8} {'main MB':>8}"
        )
        for raster in maps:
            best: dict[str, dict] = {}
            for _ in range(args.repeat):
                for method in args.methods:
                    out = work / f"{Path(raster).stem}.{method.replace('+', '_')}.gpkg"
                    r = measure(method, raster, out, args.block_size, args.workers)
                    out.unlink(missing_ok=True)
                    if method not in best or r["seconds"] < best[method]["seconds"]:
                        best[method] = r
            for method, r in best.items():
                rate = r["polygons"] / r["seconds"]
                print(
                    f"{Path(raster).name[:34]:<34} {method:<12} {r['polygons']:>9} {r['seconds']:>7.1f} "
                    f"{r['cpu_s']:>7.1f} {rate:>8.0f} {r['tree_peak_mb']:>8.0f} {r['self_peak_mb']:>8.0f}",
                    flush=True,
                )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
