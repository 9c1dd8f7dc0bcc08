"""Prefect flow: classify one scene (validate → plan → blocks on Dask → COGs → polygons → summary).

Thin: every step is a ``geoseg.pipeline`` stage. Prefect tasks are stages, never tiles or blocks
(a Prefect task run costs ~55 ms of client and server CPU, a Dask task ~1 ms), so orchestration stays
a small fraction of the run. Blocks fan out over Dask; a progress artifact follows them.

Run it: ``python flows/predict.py SCENE CHECKPOINT OUT_DIR [CONFIG_YAML] [-v]``; the inputs are
checked before Prefect starts a (temporary) server, and the terminal shows one line per stage.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.states import State

try:
    from flows.serve import prefect_api
except ModuleNotFoundError:  # run by path (python flows/predict.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from flows.serve import prefect_api

if TYPE_CHECKING:
    from distributed import Client

from geoseg.cluster import cluster_for
from geoseg.command import run_command, setup_logging
from geoseg.config import PredictConfig, settings_with_overrides
from geoseg.errors import GeosegError
from geoseg.export.quicklook import png_data_uri
from geoseg.location import location_str
from geoseg.pipeline import (
    RunPlan,
    RunResult,
    Stages,
    class_areas,
    finalise,
    plan_stage,
    run_blocks,
    run_stages,
    vectorise_stage,
    write_summary,
)

#: Seconds between progress-artifact updates (each is an API call).
PROGRESS_EVERY_S = 2.0


def retry_io_only(task: object, task_run: object, state: State) -> bool:
    """Retry transient failures, never a GeosegError (bad input fails the same way every time)."""
    try:
        state.result()
    except GeosegError:
        return False
    except Exception:
        return True
    return False


@task(name="plan", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_io_only, cache_policy=NO_CACHE)
def plan_task(scene: str, checkpoint: str, out_dir: str, config: PredictConfig, overwrite: bool) -> RunPlan:
    """Validate every input and the output folder, and plan the blocks (nothing is written)."""
    plan = plan_stage(scene, checkpoint, out_dir, config, overwrite)
    get_run_logger().info(
        "%d blocks of %d px (%d tiles of %d px, margin %d)", len(plan.blocks), plan.block_size,
        plan.tiles, plan.grid.tile, plan.grid.margin,
    )
    return plan


@task(name="blocks", cache_policy=NO_CACHE)
def blocks_task(plan: RunPlan, client: Client | None) -> tuple[int, int]:
    """Create or resume the store and run the blocks on the run's cluster, with a progress artifact."""
    artifact = create_progress_artifact(
        progress=0.0, key=f"blocks-{plan.fingerprint[:16]}", description=f"Blocks of {plan.scene.name}"
    )
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= PROGRESS_EVERY_S:
            update_progress_artifact(artifact, progress=100.0 * done / total)
            last[0] = now

    return run_blocks(plan, client=client, progress=progress)


@task(name="finalise", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_io_only, cache_policy=NO_CACHE)
def finalise_task(plan: RunPlan) -> dict[str, str]:
    """Write the class and confidence COGs and the quick-look, which is published as an artifact."""
    outputs = finalise(plan, overwrite=True)
    create_markdown_artifact(
        key="quicklook",
        markdown=quicklook_markdown(plan.scene.name, Path(outputs["quicklook"])),
        description=f"Quick-look of {plan.scene.name}: input and class map",
    )
    return outputs


def quicklook_markdown(scene: str, png: Path, level: int = 1) -> str:
    """Markdown showing a run's quick-look PNG (embedded: the UI needs no access to the files)."""
    return f"{'#' * level} {scene}\n\n![quick-look of {scene}]({png_data_uri(png.read_bytes())})\n\n`{png}`\n"


@task(name="class-areas", cache_policy=NO_CACHE)
def areas_task(plan: RunPlan) -> list[dict[str, Any]]:
    """Class areas, published as a table artifact."""
    areas = class_areas(plan)
    create_table_artifact(
        key="class-areas",
        table=[{"class": a["class_name"], "id": a["class_id"], "area_km2": round(a["area_km2"], 4),
                "percent": round(a["percent"], 2)} for a in areas],
        description=f"Class areas of {plan.scene.name}",
    )
    return areas


@task(name="vectorise", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_io_only, cache_policy=NO_CACHE)
def vectorise_task(plan: RunPlan, client: Client | None) -> str:
    """Polygons merged across block borders, the blocks polygonised on the run's cluster."""
    return vectorise_stage(plan, client=client)


@task(name="summary", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_io_only, cache_policy=NO_CACHE)
def summary_task(plan: RunPlan, result: RunResult) -> str:
    """Write summary.json and publish a markdown summary with the output paths."""
    path = write_summary(plan, result)
    rows = "\n".join(f"| {k} | `{v}` |" for k, v in result.outputs.items())
    t = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items())
    create_markdown_artifact(
        key="predict-summary",
        markdown=(
            f"# geoseg predict: {plan.scene.name}\n\n"
            f"{plan.scene.width} x {plan.scene.height} px, {len(plan.blocks)} blocks "
            f"({result.blocks_computed} computed, {result.blocks_skipped} resumed), model "
            f"{plan.contract.arch}/{plan.contract.backbone}, tile {plan.grid.tile}.\n\n"
            f"| output | path |\n|---|---|\n{rows}\n\nTimings: {t}\n"
        ),
        description="Outputs of this run",
    )
    return str(path)


@flow(name="geoseg-predict", log_prints=True)
def predict(
    scene: str,
    checkpoint: str,
    out_dir: str,
    config: str | dict[str, Any] | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    scheduler: str | None = None,
) -> dict[str, str]:
    """Classify ``scene`` with ``checkpoint`` into ``out_dir``; returns the output paths.

    Args:
        scene: input GeoTIFF.
        checkpoint: geoseg checkpoint file.
        out_dir: output folder (re-running with the same inputs resumes).
        config: predict settings: a YAML path (configs/predict/*.yaml) or a dict.
        overwrite: replace outputs of another run.
        workers: local Dask worker processes (overrides the config).
        scheduler: address of an existing Dask scheduler (overrides the config).
    """
    cfg = settings_with_overrides(PredictConfig, config, workers=workers, scheduler=scheduler)
    stages = Stages(plan=plan_task, blocks=blocks_task, finalise=finalise_task, areas=areas_task,
                    vectorise=vectorise_task, summary=summary_task)
    return run_stages(
        stages, scene, checkpoint, out_dir, config=cfg, overwrite=overwrite, cluster=lambda: cluster_for(cfg)
    ).outputs


def main(argv: list[str]) -> int:
    """Command line: check the inputs first (no Prefect server starts for bad input), then run the flow."""
    verbose = "-v" in argv
    args = [a for a in argv if a != "-v"]
    if len(args) not in (3, 4):
        print("usage: python flows/predict.py SCENE CHECKPOINT OUT_DIR [CONFIG_YAML] [-v]", file=sys.stderr)
        return 2
    setup_logging(verbose=verbose)
    scene, checkpoint, out_dir, *config = args

    def body() -> None:
        cfg = settings_with_overrides(PredictConfig, config[0] if config else None)
        plan_stage(scene, checkpoint, out_dir, cfg, False)
        with prefect_api() as ui:
            print(f"Prefect UI: {ui}", file=sys.stderr)
            outputs = predict(scene, checkpoint, out_dir, config=config[0] if config else None)
        print(f"outputs in {location_str(out_dir)}:")
        for name, path in outputs.items():
            print(f"  {name:11s} {path}")

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
