"""The predict job as stages: plan → run blocks (locally or on Dask) → finalise COGs → areas → summary.

:func:`predict_raster` runs them all; the Prefect flow (``flows/predict.py``) and the CLI call the
same stage functions, so every entry point writes the same bytes.

Output folder::

    <stem>_classes.tif        class map COG (colour table, class names, mode overviews)
    <stem>_confidence.tif     confidence COG (max blended probability)
    <stem>_polygons.gpkg      polygons (when vectorise is on; .shp / .parquet by setting)
    prediction.zarr           the Zarr store blocks write into (resumable)
    summary.json              inputs, settings, checkpoint hash, timings, class areas
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from distributed import Client, as_completed

import geoseg
from geoseg.checkpoint import ModelContract, check_scene, file_sha256, load_checkpoint
from geoseg.cluster import GPU_RESOURCE, gpu_workers
from geoseg.config import PredictConfig
from geoseg.errors import OutputExistsError
from geoseg.export.cog import write_class_cog, write_confidence_cog
from geoseg.heap import one_arena, release_freed_memory
from geoseg.predict import Predictor, resolve_device
from geoseg.raster import SceneInfo, gdal_env, open_scene, pixel_areas_m2, read_window, require_valid_pixels
from geoseg.stitch import CLASS_NODATA, blend_block
from geoseg.store import done_blocks, iter_chunks, prepare_store, store_fingerprint, write_block
from geoseg.tiling import Block, TileGrid, align_block_size, block_layout, context_margin, plan_blocks

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class BlockJob:
    """What a worker needs to process blocks: small, picklable, identical for every block of a run."""

    scene: str
    bands: tuple[int, ...]
    checkpoint: str
    checkpoint_sha256: str
    scales: tuple[float, ...]
    flip: bool
    device: str
    batch_size: int
    margin: int
    probabilities: bool
    store: str
    torch_threads: int


@dataclass(frozen=True)
class RunPlan:
    """Everything decided before any compute: validated inputs, the grid, the blocks, the outputs."""

    scene: SceneInfo
    contract: ModelContract
    config: PredictConfig
    grid: TileGrid
    block_size: int
    blocks: tuple[Block, ...]
    out_dir: Path
    job: BlockJob
    fingerprint: str

    @property
    def store(self) -> Path:
        """The Zarr store."""
        return self.out_dir / "prediction.zarr"

    @property
    def class_map(self) -> Path:
        """The class map COG."""
        return self.out_dir / f"{self.scene.path.stem}_classes.tif"

    @property
    def confidence_map(self) -> Path:
        """The confidence COG."""
        return self.out_dir / f"{self.scene.path.stem}_confidence.tif"

    @property
    def polygons(self) -> Path:
        """The polygon file."""
        return self.out_dir / f"{self.scene.path.stem}_polygons.{self.config.vector_format}"

    @property
    def summary(self) -> Path:
        """The run summary JSON."""
        return self.out_dir / "summary.json"

    @property
    def tiles(self) -> int:
        """Model tiles over all blocks (tiles shared by neighbouring blocks count once per block)."""
        return sum(len(b.tiles) for b in self.blocks)


@dataclass
class RunResult:
    """What a finished run produced and how long each stage took (seconds)."""

    outputs: dict[str, str]
    class_areas: list[dict[str, Any]]
    blocks_computed: int
    blocks_skipped: int
    timings: dict[str, float] = field(default_factory=dict)


def plan_run(
    scene: str | Path,
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    config: PredictConfig | None = None,
) -> RunPlan:
    """Validate the inputs and plan the grid; no model compute.

    Raises:
        GeosegError: a bad scene, checkpoint, band mismatch or setting, before any work starts.
    """
    config = config or PredictConfig()
    info = open_scene(scene)
    _, contract = load_checkpoint(checkpoint)
    bands = check_scene(contract, info)
    require_valid_pixels(info)
    device = resolve_device(config.device)
    tile = config.tile_size or contract.tile_size
    margin = context_margin(tile, contract.required_stride, contract.receptive_field)
    grid = TileGrid(info.height, info.width, tile, margin)
    block_size = align_block_size(config.block_size, grid)
    sha = file_sha256(checkpoint)
    job = BlockJob(
        scene=str(Path(scene).resolve()), bands=bands, checkpoint=str(Path(checkpoint).resolve()),
        checkpoint_sha256=sha, scales=config.scales, flip=config.flip, device=device.type,
        batch_size=config.batch_size, margin=margin, probabilities=config.probabilities,
        store=str((Path(out_dir) / "prediction.zarr").resolve()), torch_threads=config.threads,
    )
    stat = Path(scene).stat()
    fingerprint = hashlib.sha256(json.dumps({
        "scene": [Path(scene).name, stat.st_size, stat.st_mtime_ns, info.shape, info.crs.to_wkt(),
                  tuple(info.transform)],
        "checkpoint": sha, "bands": bands, "tile": tile, "margin": margin, "block_size": block_size,
        "scales": config.scales, "flip": config.flip, "device": device.type, "threads": config.threads,
        "probabilities": config.probabilities,
        "version": geoseg.__version__,
    }, default=str).encode()).hexdigest()
    return RunPlan(
        scene=info, contract=contract, config=config, grid=grid, block_size=block_size,
        blocks=plan_blocks(grid, block_size), out_dir=Path(out_dir), job=job, fingerprint=fingerprint,
    )


def prepare_outputs(plan: RunPlan, *, overwrite: bool = False) -> bool:
    """Create the output folder and store, or resume a matching one. Returns True when resuming.

    Raises:
        OutputExistsError: the folder holds outputs of other inputs or settings, or finished outputs
            of this run, and ``overwrite`` is False.
    """
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    if not overwrite and store_fingerprint(plan.store) != plan.fingerprint:
        for p in (plan.class_map, plan.confidence_map, plan.polygons, plan.summary):
            if p.exists():
                raise OutputExistsError(f"{p}: already exists. Pick another output folder or pass --overwrite.")
    return prepare_store(
        plan.store, plan.fingerprint, overwrite=overwrite, scene=plan.scene, block_size=plan.block_size,
        layout=block_layout(plan.grid, plan.block_size), class_ids=plan.contract.classes.ids,
        class_names=plan.contract.classes.names, probabilities=plan.config.probabilities,
    )


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch CPU ops with exactly ``n`` threads (results depend on it), then restore the old count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@lru_cache(maxsize=2)
def _worker_predictor(job: BlockJob) -> Predictor:
    """Load the checkpoint once per worker process and keep it (keyed by path, hash and settings)."""
    model, contract = load_checkpoint(job.checkpoint, device=job.device)
    return Predictor(model, contract, scales=job.scales, flip=job.flip, device=job.device, batch_size=job.batch_size)


def read_block(job: BlockJob, block: Block) -> tuple[np.ndarray, np.ndarray]:
    """A block's read box in the scene's data type: (C, h, w) bands and the (h, w) validity mask."""
    with gdal_env(), rasterio.open(job.scene) as src:
        return read_window(src, block.read, bands=job.bands, dtype=None)


def process_blocks(job: BlockJob, blocks: Sequence[Block], *, on_block: Callable[[], None] | None = None) -> int:
    """Read, predict, blend and write blocks (runs on a worker). Returns the tiles it ran.

    The model never waits for I/O: while block ``i`` is normalised, predicted and blended on this
    thread (on the predictor's device, its bands copied there in the scene's data type), a reader
    thread reads block ``i + 1`` and a writer thread writes block ``i - 1`` into the store. At most
    one block is read ahead (native dtype) and one write is pending (class ids and confidences).
    ``on_block`` is called as each block's write completes.
    """
    one_arena()
    predictor = _worker_predictor(job)
    contract = predictor.contract
    writing: Future | None = None

    def finish_write() -> None:
        if writing is not None:
            writing.result()
            release_freed_memory()
            if on_block:
                on_block()

    with ThreadPoolExecutor(1, thread_name_prefix="geoseg-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="geoseg-write") as writer:
        ahead = reader.submit(read_block, job, blocks[0]) if blocks else None
        for i, block in enumerate(blocks):
            data, valid = ahead.result()
            ahead = reader.submit(read_block, job, blocks[i + 1]) if i + 1 < len(blocks) else None
            with torch_threads(job.torch_threads):
                bands = torch.from_numpy(data).to(predictor.device)
                image = contract.normalise(bands, torch.from_numpy(valid), inplace=True)
                del data, bands
                result = blend_block(
                    block, image, valid, predictor.proba, margin=job.margin, class_ids=contract.classes.ids,
                    batch_size=job.batch_size, keep_probabilities=job.probabilities, device=predictor.device,
                )
            del image
            finish_write()
            writing = writer.submit(write_block, Path(job.store), block, result)
        finish_write()
    return sum(len(b.tiles) for b in blocks)


def block_groups(blocks: Sequence[Block], workers: int) -> list[tuple[Block, ...]]:
    """Split blocks, in order, into groups of consecutive blocks: one Dask task each.

    A group of ``g = clip(ceil(n / (4 * workers)), 1, 8)`` blocks lets a worker overlap one block's I/O
    with the next block's compute, while every worker still gets about four groups to balance load.
    """
    g = min(8, max(1, math.ceil(len(blocks) / (4 * max(workers, 1)))))
    return [tuple(blocks[i : i + g]) for i in range(0, len(blocks), g)]


def run_blocks(plan: RunPlan, *, client: Client | None = None, progress: Progress | None = None) -> tuple[int, int]:
    """Process every block not yet done, in-process or fanned out over ``client``.

    Returns:
        ``(computed, skipped)`` block counts.
    """
    done = done_blocks(plan.store)
    todo = [b for b in plan.blocks if not done[b.row, b.col]]
    skipped = len(plan.blocks) - len(todo)
    total = len(plan.blocks)
    finished = skipped
    if progress:
        progress(finished, total)

    def one_more(n: int = 1) -> None:
        nonlocal finished
        finished += n
        if progress:
            progress(finished, total)

    if client is None:
        process_blocks(plan.job, todo, on_block=one_more)
        return len(todo), skipped
    resources = {GPU_RESOURCE: 1} if plan.job.device == "cuda" and gpu_workers(client) else None
    groups = block_groups(todo, len(client.scheduler_info()["workers"]))
    [job] = client.scatter([plan.job], broadcast=True)
    futures = client.map(
        process_blocks, [job] * len(groups), groups, resources=resources, pure=False,
        key=[f"geoseg-blocks-{plan.fingerprint[:12]}-{g[0].row}-{g[0].col}" for g in groups],
    )
    size = {f.key: len(g) for f, g in zip(futures, groups, strict=True)}
    for future in as_completed(futures):
        future.result()
        one_more(size[future.key])
    return len(todo), skipped


def finalise(plan: RunPlan, *, overwrite: bool = False) -> dict[str, str]:
    """Write the class and confidence COGs from the store, side by side (GDAL releases the GIL)."""
    with ThreadPoolExecutor(2, thread_name_prefix="geoseg-cog") as pool:
        cogs = [
            pool.submit(write_class_cog, plan.store, plan.class_map, plan.contract.classes, overwrite=overwrite),
            pool.submit(write_confidence_cog, plan.store, plan.confidence_map, overwrite=overwrite),
        ]
        for cog in cogs:
            cog.result()
    return {"class_map": str(plan.class_map), "confidence": str(plan.confidence_map), "store": str(plan.store)}


def class_areas(plan: RunPlan) -> list[dict[str, Any]]:
    """Pixels, km² and % of the valid area per class, read chunk by chunk from the store."""
    row_area = pixel_areas_m2(plan.scene.crs, plan.scene.transform, plan.scene.height)
    sums = np.zeros(256)
    counts = np.zeros(256, dtype=np.int64)
    for box, values in iter_chunks(plan.store, "class_id"):
        weights = np.broadcast_to(row_area[box.y0 : box.y1, None], values.shape)
        sums += np.bincount(values.ravel(), weights=weights.ravel(), minlength=256)
        counts += np.bincount(values.ravel(), minlength=256)
    valid = sums.sum() - sums[CLASS_NODATA]
    return [
        {"class_id": c.id, "class_name": c.name, "pixels": int(counts[c.id]), "area_km2": sums[c.id] / 1e6,
         "percent": 100 * sums[c.id] / valid if valid else 0.0}
        for c in plan.contract.classes.classes
    ]


def write_summary(plan: RunPlan, result: RunResult) -> Path:
    """Write ``summary.json`` atomically and return its path."""
    summary = {
        "geoseg": geoseg.__version__,
        "scene": {"path": str(plan.scene.path), "width": plan.scene.width, "height": plan.scene.height,
                  "bands": list(plan.scene.band_names), "crs": plan.scene.crs.to_string()},
        "checkpoint": {"path": plan.job.checkpoint, "sha256": plan.job.checkpoint_sha256,
                       "arch": plan.contract.arch, "backbone": plan.contract.backbone},
        "settings": plan.config.model_dump(mode="json"),
        "grid": {"tile": plan.grid.tile, "margin": plan.grid.margin, "stride": plan.grid.stride,
                 "block_size": plan.block_size, "blocks": len(plan.blocks), "tiles": plan.tiles,
                 "device": plan.job.device},
        **asdict(result),
    }
    partial = plan.summary.with_name(plan.summary.name + ".partial")
    partial.write_text(json.dumps(summary, indent=2))
    os.replace(partial, plan.summary)
    return plan.summary


def vectorise_stage(plan: RunPlan, *, overwrite: bool = False) -> str:
    """Polygons from the class map (with mean confidence), merged across block borders."""
    from geoseg.vectorize import vectorize

    vectorize(
        plan.class_map, plan.polygons, classes=plan.contract.classes, block_size=plan.block_size,
        min_area=plan.config.min_area, simplify=plan.config.simplify, confidence=plan.confidence_map,
        overwrite=overwrite,
    )
    return str(plan.polygons)


@dataclass(frozen=True)
class Stages:
    """The stages of a predict job, each a plain callable; the Prefect flow passes task-wrapped ones.

    ``plan(scene, checkpoint, out_dir, config, overwrite)`` validates, plans and prepares the store;
    the others take the plan (``summary`` also the result) and return what :func:`run_stages` records.
    """

    plan: Callable[[str | Path, str | Path, str | Path, PredictConfig, bool], RunPlan]
    blocks: Callable[[RunPlan], tuple[int, int]]
    finalise: Callable[[RunPlan], dict[str, str]]
    areas: Callable[[RunPlan], list[dict[str, Any]]]
    vectorise: Callable[[RunPlan], str]
    summary: Callable[[RunPlan, RunResult], Any]


def plan_and_prepare(
    scene: str | Path, checkpoint: str | Path, out_dir: str | Path, config: PredictConfig, overwrite: bool
) -> RunPlan:
    """The plan stage: :func:`plan_run`, then :func:`prepare_outputs` (create or resume the store)."""
    plan = plan_run(scene, checkpoint, out_dir, config=config)
    prepare_outputs(plan, overwrite=overwrite)
    return plan


def run_stages(
    stages: Stages,
    scene: str | Path,
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    config: PredictConfig,
    overwrite: bool,
) -> RunResult:
    """Run the stages in order, timing each: plan → blocks → finalise → areas (+ vectorise) → summary."""
    timings: dict[str, float] = {}

    def timed(name: str, stage: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        out = stage(*args)
        timings[name] = time.perf_counter() - t0
        return out

    plan = timed("plan", stages.plan, scene, checkpoint, out_dir, config, overwrite)
    computed, skipped = timed("blocks", stages.blocks, plan)
    outputs = timed("finalise", stages.finalise, plan)
    areas = timed("areas", stages.areas, plan)
    if config.vectorize:
        outputs["polygons"] = timed("vectorise", stages.vectorise, plan)
    outputs["summary"] = str(plan.summary)
    result = RunResult(outputs, areas, computed, skipped, timings)
    stages.summary(plan, result)
    return result


def predict_raster(
    scene: str | Path,
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    config: PredictConfig | None = None,
    client: Client | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> RunResult:
    """Classify a scene: the whole job in one call (see the module docstring for the outputs).

    Args:
        scene: input GeoTIFF.
        checkpoint: a geoseg checkpoint (its contract says bands, normalisation and classes).
        out_dir: output folder; re-running into it with the same inputs resumes.
        config: inference settings (defaults: :class:`PredictConfig`).
        client: a Dask client to fan blocks out over; ``None`` runs them in this process.
        overwrite: replace outputs of another run in ``out_dir``.
        progress: called with ``(blocks_done, blocks_total)``.
    """
    stages = Stages(
        plan=plan_and_prepare,
        blocks=lambda plan: run_blocks(plan, client=client, progress=progress),
        finalise=lambda plan: finalise(plan, overwrite=True),
        areas=class_areas,
        vectorise=lambda plan: vectorise_stage(plan, overwrite=True),
        summary=write_summary,
    )
    return run_stages(stages, scene, checkpoint, out_dir, config=config or PredictConfig(), overwrite=overwrite)
