"""The client side of a predict run: plan → blocks (locally or on Dask) → COGs → areas → polygons → summary.

:func:`predict_raster` runs them all; the Prefect flow (``flows/predict.py``) and the CLI call the
same stage functions through :func:`run_stages`, so every entry point writes the same bytes. The plan
stage checks every input and the output folder before anything is written or any cluster starts;
the rest runs holding the output folder's lock (:mod:`geoseg.runlock`) and one cluster, which does
the blocks and then the polygons. What a worker does with its blocks is :mod:`geoseg.worker`.

Output folder::

    <stem>_classes.tif        class map COG (colour table, class names, mode overviews), nodata 255
    <stem>_classes.tif.aux.xml  its category names and raster attribute table (GDAL PAM)
    <stem>_classes.qml        its QGIS style: a legend of exactly the model's classes
    <stem>_confidence.tif     confidence COG (max blended probability), nodata 0
    <stem>_quicklook.png      input in natural colours beside the class map, with the legend
    <stem>_polygons.gpkg      polygons (when vectorise is on; .shp / .parquet by setting)
    prediction.zarr           the Zarr store blocks write into (resumable)
    summary.json              inputs, settings, checkpoint hash, timings, class areas

The output folder may be an object-storage prefix (``s3://bucket/run/``): the store is then written
there by the workers, and the rest is made in a local staging folder and uploaded when complete
(:mod:`geoseg.publish`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client, as_completed

import geoseg
from geoseg.atomic import ensure_folder, write_bytes, write_error, write_text
from geoseg.checkpoint import ModelContract, check_scene, file_sha256, load_checkpoint, local_checkpoint
from geoseg.cluster import GPU_RESOURCE, cluster_for, gpu_workers
from geoseg.config import PredictConfig
from geoseg.errors import BandMismatchError, OutputExistsError
from geoseg.export.cog import write_class_cog, write_confidence_cog
from geoseg.export.legend import style_path
from geoseg.export.quicklook import quicklook_png
from geoseg.location import basename, is_url, location_str, redact, version
from geoseg.predict import resolve_device
from geoseg.publish import check_prefix, existing, publish, remote_url, staging_folder
from geoseg.raster import SceneInfo, open_scene, pixel_areas_m2, require_valid_pixels, resolve_bands
from geoseg.runlock import check_unlocked, run_lock
from geoseg.stitch import CLASS_NODATA
from geoseg.store import (
    StoreLocation,
    done_blocks,
    has_partial,
    iter_chunks,
    prepare_store,
    remove_partials,
    store_exists,
    store_fingerprint,
)
from geoseg.tiling import Block, Box, TileGrid, align_block_size, block_layout, plan_blocks
from geoseg.worker import BlockJob, finish_blocks, process_blocks, resend_partials

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


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
    overwrite: bool = False
    remote: str | None = None

    @property
    def store(self) -> StoreLocation:
        """The Zarr store: in the output folder, or under the remote prefix."""
        return f"{self.remote}/prediction.zarr" if self.remote else self.out_dir / "prediction.zarr"

    @property
    def class_map(self) -> Path:
        """The class map COG."""
        return self.out_dir / f"{self.scene.stem}_classes.tif"

    @property
    def confidence_map(self) -> Path:
        """The confidence COG."""
        return self.out_dir / f"{self.scene.stem}_confidence.tif"

    @property
    def quicklook(self) -> Path:
        """The quick-look PNG (input beside the class map, with the legend)."""
        return self.out_dir / f"{self.scene.stem}_quicklook.png"

    @property
    def polygons(self) -> Path:
        """The polygon file."""
        return self.out_dir / f"{self.scene.stem}_polygons.{self.config.vector_format}"

    @property
    def summary(self) -> Path:
        """The run summary JSON."""
        return self.out_dir / "summary.json"

    @property
    def tiles(self) -> int:
        """Model tiles the run runs: each lattice tile once, in the block that owns it."""
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
    overwrite: bool = False,
) -> RunPlan:
    """Validate every input and the output folder, and plan the grid; nothing is written.

    Raises:
        GeosegError: a bad scene, checkpoint, band mismatch, setting or output folder, before any
            work starts (see :func:`check_outputs`).
    """
    config = config or PredictConfig()
    remote = str(out_dir).rstrip("/") if is_url(out_dir) else None
    folder = staging_folder(remote) if remote else Path(out_dir)
    info = open_scene(scene)
    local = local_checkpoint(checkpoint)
    _, contract = load_checkpoint(local)
    bands = _model_bands(contract, info, config.bands)
    require_valid_pixels(info)
    device = resolve_device(config.device)
    tile = config.tile_size or contract.tile_size
    margin = contract.margin(tile, config.margin)
    grid = TileGrid(info.height, info.width, tile, margin)
    block_size = align_block_size(config.block_size, grid)
    sha = file_sha256(local)
    scaling = contract.for_scene(info, bands)  # normalisation == "scene": the scene's own band statistics
    job = BlockJob(
        scene=info.source or location_str(scene), bands=bands, checkpoint=location_str(checkpoint),
        checkpoint_sha256=sha, scales=config.scales, flip=config.flip, device=device.type,
        batch_size=config.batch_size, margin=margin, probabilities=config.probabilities,
        store=f"{remote}/prediction.zarr" if remote else str((folder / "prediction.zarr").resolve()),
        torch_threads=config.threads,
        mean=scaling.mean, std=scaling.std,
    )
    fingerprint = hashlib.sha256(json.dumps({
        "scene": [basename(scene), *version(scene), info.shape, info.crs.to_wkt(), tuple(info.transform)],
        "settings": config.output_settings(rasters_only=True),
        "checkpoint": sha, "bands": bands, "tile": tile, "margin": margin, "block_size": block_size,
        "device": device.type, "mean": scaling.mean, "std": scaling.std, "version": geoseg.__version__,
        "stitch": "fixed-point sums, tiles owned by one block",
    }, sort_keys=True, default=str).encode()).hexdigest()
    plan = RunPlan(
        scene=info, contract=contract, config=config, grid=grid, block_size=block_size,
        blocks=plan_blocks(grid, block_size), out_dir=folder, job=job, fingerprint=fingerprint,
        overwrite=overwrite, remote=remote,
    )
    check_outputs(plan)
    return plan


def _model_bands(contract: ModelContract, scene: SceneInfo, bands: Sequence[int | str] | None) -> tuple[int, ...]:
    """The scene's bands in the model's order: as ``bands`` says, else matched by name or count."""
    if bands is None:
        return check_scene(contract, scene)
    chosen = resolve_bands(scene, bands)
    if len(chosen) != len(contract.band_names):
        raise BandMismatchError(
            f"{scene.path}: --bands names {len(chosen)} bands but the model expects {len(contract.band_names)} "
            f"({list(contract.band_names)}). Name one scene band per model band, in the model's order."
        )
    return chosen


def check_outputs(plan: RunPlan) -> None:
    """Check the output folder before any work: writable, not in use, no other run's outputs in it.

    Raises:
        OutputWriteError: the folder (or the nearest folder above it that exists) is not writable.
        OutputLockedError: another live run is writing into it.
        OutputExistsError: it holds outputs of other inputs or settings, or finished outputs of this
            run, and ``plan.overwrite`` is False.
    """
    folder = plan.out_dir
    nearest = next(p for p in (folder, *folder.parents) if p.exists())
    if not nearest.is_dir():
        raise OutputExistsError(f"{nearest}: is a file, not a folder. Pick another output folder.")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise write_error(nearest, PermissionError(errno.EACCES, "Permission denied"))
    check_unlocked(folder)
    if plan.remote:
        check_prefix(plan.remote)
    if plan.overwrite or store_fingerprint(plan.store) == plan.fingerprint:
        return
    if store_exists(plan.store):
        raise OutputExistsError(f"{plan.store}: holds a prediction of other inputs or settings. "
                                "Pick another output folder or pass --overwrite.")
    finished = (plan.class_map, plan.confidence_map, plan.polygons, plan.summary)
    found = existing(plan.remote, [p.name for p in finished]) if plan.remote else [p for p in finished if p.exists()]
    if found:
        raise OutputExistsError(f"{found[0]}: already exists. Pick another output folder or pass --overwrite.")


def prepare_outputs(plan: RunPlan) -> bool:
    """Create the output folder and store, or resume a matching one. Returns True when resuming.

    Call it holding the folder's lock (:func:`geoseg.runlock.run_lock`).
    """
    ensure_folder(plan.out_dir)
    return prepare_store(
        plan.store, plan.fingerprint, overwrite=plan.overwrite, scene=plan.scene, block_size=plan.block_size,
        layout=block_layout(plan.grid, plan.block_size),
        classes=plan.contract.classes, probabilities=plan.config.probabilities,
    )


def block_groups(blocks: Sequence[Block], workers: int) -> list[tuple[Block, ...]]:
    """Split blocks, in order, into groups of consecutive blocks: one Dask task each.

    A group of ``g = clip(ceil(n / (4 * workers)), 1, 8)`` blocks lets a worker overlap one block's I/O
    with the next block's compute, while every worker still gets about four groups to balance load.
    """
    g = min(8, max(1, math.ceil(len(blocks) / (4 * max(workers, 1)))))
    return [tuple(blocks[i : i + g]) for i in range(0, len(blocks), g)]


def run_blocks(plan: RunPlan, *, client: Client | None = None, progress: Progress | None = None) -> tuple[int, int]:
    """Create the store (or resume it), run every block's tiles not run yet, then finish the shared cells.

    Both passes (:mod:`geoseg.worker`) run here or over ``client``; the partial sums are removed once
    every block is done.

    Returns:
        ``(computed, skipped)`` block counts.
    """
    resuming = prepare_outputs(plan)
    tiled = done_blocks(plan.store, "tiles_done")
    if resuming:
        log.info("resuming: the tiles of %d of %d blocks already ran", int(tiled.sum()), len(plan.blocks))
    run_tiles = [b for b in plan.blocks if not tiled[b.row, b.col]]
    skipped = len(plan.blocks) - len(run_tiles)
    total = len(plan.blocks)
    finished = skipped
    if progress:
        progress(finished, total)

    def one_more(n: int = 1) -> None:
        nonlocal finished
        finished += n
        if progress:
            progress(finished, total)

    ids = plan.contract.classes.ids
    rerun = {b.key for b in run_tiles}
    if client is None:
        process_blocks(plan.job, run_tiles, on_block=one_more)
        to_finish, resend = _unfinished(plan, rerun)
        resend_partials(plan.job, resend)
        finish_blocks(plan.job, to_finish, ids)
    else:
        resources = {GPU_RESOURCE: 1} if plan.job.device == "cuda" and gpu_workers(client) else None
        workers = len(client.scheduler_info()["workers"])
        tag = plan.fingerprint[:12]
        for group, _ in _fan_out(client, process_blocks, block_groups(run_tiles, workers), plan.job, resources,
                                 f"geoseg-tiles-{tag}"):
            one_more(len(group))
        to_finish, resend = _unfinished(plan, rerun)
        for _ in _fan_out(client, resend_partials, [tuple(resend)] if resend else [], plan.job, resources,
                          f"geoseg-resend-{tag}"):
            pass
        for _ in _fan_out(client, finish_blocks, block_groups(to_finish, workers), plan.job, None,
                          f"geoseg-finish-{tag}", ids):
            pass
    remove_partials(plan.store)
    return len(run_tiles), skipped


def _unfinished(plan: RunPlan, rerun: set[tuple[int, int]]) -> tuple[list[Block], list[tuple[Block, tuple[Box, ...]]]]:
    """The blocks whose shared cells still wait, and the partial sums they need that the store lacks.

    Only a resumed store can lack sums (they are removed once every block is done), from blocks not
    rerun (``rerun``: those whose tiles ran in this run): those owners rerun just the tiles that
    reach the cells, and their cores are kept.
    """
    done = done_blocks(plan.store)
    to_finish = [b for b in plan.blocks if not done[b.row, b.col]]
    by_key = {b.key: b for b in plan.blocks}
    wanted: dict[tuple[int, int], list[Box]] = {}
    for block in to_finish:
        for cell in block.shared:
            for owner in cell.owners:
                if owner not in rerun and not has_partial(plan.store, owner, cell.box):
                    wanted.setdefault(owner, []).append(cell.box)
    return to_finish, [(by_key[k], tuple(boxes)) for k, boxes in sorted(wanted.items())]


def _fan_out(client: Client, fn: Callable[..., int], groups: Sequence[tuple], job: BlockJob,
             resources: dict[str, int] | None, prefix: str, *extra: Any) -> Iterator[tuple[tuple, int]]:
    """Run ``fn(job, group, *extra)`` for each group as one Dask task; yield (group, result) as each ends.

    The job travels inside each task (a few hundred bytes): a broadcast scatter would name workers
    that may die before it lands.
    """
    futures = client.map(fn, [job] * len(groups), groups, *([e] * len(groups) for e in extra), resources=resources,
                         pure=False, key=[f"{prefix}-{i}" for i in range(len(groups))])
    group_of = {f.key: g for f, g in zip(futures, groups, strict=True)}
    for future in as_completed(futures):
        yield group_of[future.key], future.result()


def finalise(plan: RunPlan, *, overwrite: bool = False) -> dict[str, str]:
    """Write the class and confidence COGs from the store, and the quick-look PNG.

    The confidence COG is written in a second thread (GDAL releases the GIL) while this one writes
    the class map and then the quick-look, which reads the class map's overviews.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="geoseg-cog") as pool:
        confidence = pool.submit(write_confidence_cog, plan.store, plan.confidence_map, overwrite=overwrite)
        write_class_cog(plan.store, plan.class_map, plan.contract.classes, overwrite=overwrite)
        write_bytes(plan.quicklook, quicklook_png(plan.scene.opens, plan.class_map, plan.contract.classes))
        confidence.result()
    return {"class_map": str(plan.class_map), "class_style": str(style_path(plan.class_map)),
            "confidence": str(plan.confidence_map), "quicklook": str(plan.quicklook), "store": str(plan.store)}


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
        "scene": {"path": redact(str(plan.scene.path)), "width": plan.scene.width, "height": plan.scene.height,
                  "bands": list(plan.scene.band_names), "crs": plan.scene.crs.to_string()},
        "checkpoint": {"path": redact(plan.job.checkpoint), "sha256": plan.job.checkpoint_sha256,
                       "arch": plan.contract.arch, "backbone": plan.contract.backbone},
        "settings": plan.config.model_dump(mode="json"),
        "grid": {"tile": plan.grid.tile, "margin": plan.grid.margin, "stride": plan.grid.stride,
                 "block_size": plan.block_size, "blocks": len(plan.blocks), "tiles": plan.tiles,
                 "device": plan.job.device, "bands": list(plan.job.bands)},
        **asdict(result),
    }
    return write_text(plan.summary, json.dumps(summary, indent=2))


def vectorise_stage(plan: RunPlan, *, client: Client | None = None) -> str:
    """Polygons from the class map (with mean confidence), merged across block borders.

    The blocks are polygonised on ``client``'s cluster, or without one in this process.
    """
    from geoseg.vector import vectorize

    vectorize(
        plan.class_map, plan.polygons, classes=plan.contract.classes, block_size=plan.block_size,
        min_area=plan.config.min_area, simplify=plan.config.simplify, confidence=plan.confidence_map,
        overwrite=True, client=client, workers=1,
    )
    return str(plan.polygons)


Cluster = Callable[[], AbstractContextManager[Client | None]]


@dataclass(frozen=True)
class Stages:
    """The stages of a predict job, each a plain callable; the Prefect flow passes task-wrapped ones.

    ``plan(scene, checkpoint, out_dir, config, overwrite)`` validates and plans (:func:`plan_run`);
    ``blocks`` and ``vectorise`` also take the run's Dask client (or None); the others take the plan
    (``summary`` also the result) and return what :func:`run_stages` records.
    """

    plan: Callable[[str | Path, str | Path, str | Path, PredictConfig, bool], RunPlan]
    blocks: Callable[[RunPlan, Client | None], tuple[int, int]]
    finalise: Callable[[RunPlan], dict[str, str]]
    areas: Callable[[RunPlan], list[dict[str, Any]]]
    vectorise: Callable[[RunPlan, Client | None], str]
    summary: Callable[[RunPlan, RunResult], Any]


def plan_stage(
    scene: str | Path, checkpoint: str | Path, out_dir: str | Path, config: PredictConfig, overwrite: bool
) -> RunPlan:
    """The plan stage: :func:`plan_run` with positional settings, as :class:`Stages` calls it."""
    return plan_run(scene, checkpoint, out_dir, config=config, overwrite=overwrite)


def run_stages(
    stages: Stages,
    scene: str | Path,
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    config: PredictConfig,
    overwrite: bool,
    cluster: Cluster = lambda: nullcontext(None),
) -> RunResult:
    """Run the stages in order, timing each: plan → blocks → COGs → areas (→ polygons) → summary (→ upload).

    Everything after the plan runs holding the output folder's lock and inside ``cluster()`` (a
    context giving the Dask client that runs the blocks and the polygons, or None), which starts only
    once every input has been checked and is closed after the polygons.
    """
    timings: dict[str, float] = {}

    def timed(name: str, stage: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        out = stage(*args)
        timings[name] = time.perf_counter() - t0
        log.info("%s: done in %.1f s", name, timings[name])
        return out

    plan = timed("plan", stages.plan, scene, checkpoint, out_dir, config, overwrite)
    log.info("%d blocks of %d px, %d tiles of %d px (margin %d)", len(plan.blocks), plan.block_size,
             plan.tiles, plan.grid.tile, plan.grid.margin)
    with run_lock(plan.out_dir), cluster() as client:
        computed, skipped = timed("blocks", stages.blocks, plan, client)
        outputs = timed("finalise", stages.finalise, plan)
        areas = timed("areas", stages.areas, plan)
        if config.vectorize:
            # a remote run's class map is staged on this machine only: its workers could not read it
            outputs["polygons"] = timed("vectorise", stages.vectorise, plan, None if plan.remote else client)
        outputs["summary"] = str(plan.summary)
        if plan.remote:
            outputs = {k: v if is_url(v) else remote_url(plan.remote, v) for k, v in outputs.items()}
        result = RunResult(outputs, areas, computed, skipped, timings)
        stages.summary(plan, result)
        if plan.remote:
            timed("publish", publish, plan.out_dir, plan.remote)
    if plan.remote:
        shutil.rmtree(plan.out_dir, ignore_errors=True)
    return result


def predict_raster(
    scene: str | Path,
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    config: PredictConfig | None = None,
    client: Client | None = None,
    start_cluster: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> RunResult:
    """Classify a scene: the whole job in one call (see the module docstring for the outputs).

    Args:
        scene: input GeoTIFF.
        checkpoint: a geoseg checkpoint (its contract says bands, normalisation and classes).
        out_dir: output folder; re-running into it with the same inputs resumes.
        config: inference settings (defaults: :class:`PredictConfig`).
        client: a Dask client to run blocks and polygons on; ``None`` runs them in this process.
        start_cluster: without ``client``, start the cluster the settings ask for
            (:func:`geoseg.cluster.cluster_for`) once the inputs are checked, as the CLI does.
        overwrite: replace outputs of another run in ``out_dir``.
        progress: called with ``(blocks_done, blocks_total)``.
    """
    config = config or PredictConfig()
    stages = Stages(
        plan=plan_stage,
        blocks=lambda plan, c: run_blocks(plan, client=c, progress=progress),
        finalise=lambda plan: finalise(plan, overwrite=True),
        areas=class_areas,
        vectorise=lambda plan, c: vectorise_stage(plan, client=c),
        summary=write_summary,
    )
    if client is not None or not start_cluster:
        cluster: Cluster = lambda: nullcontext(client)  # noqa: E731
    else:
        cluster = lambda: cluster_for(config)  # noqa: E731
    return run_stages(stages, scene, checkpoint, out_dir, config=config, overwrite=overwrite, cluster=cluster)
