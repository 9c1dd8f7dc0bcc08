"""Prefect flow: the scheduled batch: classify every scene of an inbox that has not been processed yet.

A scene is keyed by the SHA-256 of its bytes, of the effective predict settings and of the checkpoint,
so it is processed once per model and settings, whatever its file name or date; a copy delivered
twice is skipped. Each scene runs through the predict flow as a subflow into
``OUT_ROOT/<scene stem>-<key[:12]>/``; at most ``concurrency`` scenes run at a time, all on one Dask
cluster (a local one started for the batch, or ``scheduler``).

Bookkeeping lives in ``OUT_ROOT/processed.json`` (the ledger, replaced atomically after every scene):
per key the scene, its output folder, status and error, plus a cache of file hashes so unchanged files
are not re-read every night. A finished ``summary.json`` in the scene's folder is the proof of a
result: with the ledger lost, nothing is redone. Failed scenes are retried on the next run.

One scene failing (corrupt file, band mismatch, ...) never stops the others. The run publishes a
``batch-report`` markdown artifact and a ``batch-scenes`` table (every scene: processed / skipped /
failed, with the one-line error) and ends **Failed** when any scene failed, with the failures in its
state message, so the UI, notifications and automations see it.

The bookkeeping (finding scenes, keys, the ledger, the report) is plain Python in :mod:`geoseg.inbox`;
this file only runs it as Prefect tasks.

Run it: ``python flows/batch.py INBOX CHECKPOINT OUT_ROOT [CONFIG_YAML] [--concurrency N]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.settings import PREFECT_UI_URL
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from geoseg.cluster import dask_client
from geoseg.command import run_command, setup_logging
from geoseg.config import PredictConfig, settings_with_overrides
from geoseg.errors import CheckpointError, ConfigError, GeosegError
from geoseg.inbox import (
    Scene,
    count_rows,
    counts_line,
    error_line,
    failure_message,
    ledger_entry,
    report_markdown,
    report_table,
    take_inventory,
    write_ledger,
)
from geoseg.location import basename

try:
    from flows.predict import predict, quicklook_markdown
    from flows.serve import prefect_api
except ModuleNotFoundError:  # loaded by path (python flows/batch.py, a Prefect entrypoint)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from flows.predict import predict, quicklook_markdown
    from flows.serve import prefect_api


class BatchFailedError(GeosegError, RuntimeError):
    """Some scenes of a batch failed; the message names them and their errors."""


@task(name="inventory", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def inventory_task(
    inbox: str | list[str], checkpoint: str, out_root: str, config: PredictConfig, reprocess: bool
) -> tuple[list[Scene], dict[str, Any]]:
    """Find the scenes, hash them and the checkpoint, and decide which to process."""
    scenes, ledger = take_inventory(inbox, checkpoint, out_root, config, reprocess=reprocess)
    get_run_logger().info(
        "%d scene(s): %d to process, %d skipped, %d failed", len(scenes),
        *(sum(s.status == k for s in scenes) for k in ("todo", "skipped", "failed")),
    )
    return scenes, ledger


@task(name="scene", cache_policy=NO_CACHE)
def scene_task(
    scene: Scene, checkpoint: str, config: dict[str, Any], scheduler: str | None, overwrite: bool
) -> dict[str, Any] | State:
    """Run the predict flow on one scene as a subflow; a failure ends this task Failed with the error."""
    started = time.perf_counter()
    state = predict.with_options(flow_run_name=Path(scene.out_dir).name)(
        scene.scene, checkpoint, scene.out_dir, config=config, overwrite=overwrite, scheduler=scheduler,
        return_state=True,
    )
    record = {**asdict(scene), "flow_run_id": str(state.state_details.flow_run_id),
              "seconds": round(time.perf_counter() - started, 1)}
    if state.is_completed():
        return {**record, "status": "processed", "note": "", "outputs": state.result()}
    error = error_line(state.result(raise_on_failure=False) if state.is_failed() else state.message)
    return Failed(message=error, data={**record, "status": "failed", "note": error})


@task(name="report", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def report_task(rows: list[dict[str, Any]], out_root: str) -> str:
    """Publish the batch report (markdown) and the per-scene table as artifacts."""
    create_table_artifact(
        key="batch-scenes",
        table=report_table(rows),
        description="Every scene of this batch: processed / skipped / failed",
    )
    markdown = report_markdown(rows, out_root=out_root, ui_url=PREFECT_UI_URL.value())
    create_markdown_artifact(key="batch-report", markdown=markdown, description="Outcome of this batch")
    looks = [quicklook_markdown(basename(r["scene"]), Path(r["outputs"]["quicklook"]), level=2)
             for r in rows if r["status"] == "processed" and "quicklook" in (r.get("outputs") or {})]
    if looks:
        create_markdown_artifact(key="batch-quicklooks", markdown="# Quick-looks\n\n" + "\n".join(looks),
                                 description="Input and class map of every scene processed in this batch")
    return markdown


@contextmanager
def _dask_scheduler(config: PredictConfig, needed: bool) -> Iterator[str | None]:
    """The Dask scheduler every scene of the batch uses: the configured one, or a local cluster."""
    if config.scheduler or not needed:
        yield config.scheduler
        return
    with dask_client(workers=config.workers, device=config.device, threads=config.threads) as client:
        yield client.scheduler.address


@flow(name="geoseg-batch", log_prints=True)
def batch(
    inbox: str | list[str],
    checkpoint: str,
    out_root: str,
    config: str | dict[str, Any] | None = None,
    concurrency: int = 1,
    workers: int | None = None,
    scheduler: str | None = None,
    reprocess: bool = False,
) -> dict[str, Any] | State:
    """Classify every scene of ``inbox`` not processed yet with this checkpoint and these settings.

    Args:
        inbox: a folder (its *.tif / *.tiff), a glob (``data/in/**/*.tif``), or a list of paths.
        checkpoint: geoseg checkpoint file.
        out_root: output root: one folder per scene, ``<stem>-<key>``, and the ledger ``processed.json``.
        config: predict settings: a YAML path (configs/predict/*.yaml) or a dict.
        concurrency: scenes processed at the same time (each one a predict subflow).
        workers: local Dask worker processes shared by all scenes (overrides the config).
        scheduler: address of an existing Dask scheduler, e.g. tcp://host:8786 (overrides the config).
        reprocess: process every scene again, replacing its outputs.

    Returns:
        Counts and one row per scene; the run ends Failed (raising :class:`BatchFailedError` when
        called directly) when any scene failed.
    """
    if concurrency < 1:
        raise ConfigError(f"concurrency must be at least 1 (scenes at the same time), got {concurrency}")
    logger = get_run_logger()
    cfg = settings_with_overrides(PredictConfig, config, workers=workers, scheduler=scheduler)
    if not Path(checkpoint).is_file():
        raise CheckpointError(f"{checkpoint}: no such checkpoint file. Pass a geoseg checkpoint (.pt).")
    scenes, ledger = inventory_task(inbox, checkpoint, out_root, cfg, reprocess)
    rows = [{**asdict(s), "status": s.status} for s in scenes if s.status != "todo"]
    todo = [s for s in scenes if s.status == "todo"]
    settings = cfg.output_settings()
    with _dask_scheduler(cfg, needed=bool(todo)) as address, ThreadPoolTaskRunner(concurrency) as runner:
        futures = [
            runner.submit(
                scene_task.with_options(task_run_name=f"scene {Path(s.scene).name}"),
                {"scene": s, "checkpoint": checkpoint, "config": settings, "scheduler": address,
                 "overwrite": reprocess},
            )
            for s in todo
        ]
        for future in as_completed(futures):
            row = future.result(raise_on_failure=False)
            if isinstance(row, BaseException):  # the task itself broke (not the predict subflow)
                scene = todo[futures.index(future)]
                row = {**asdict(scene), "status": "failed", "note": error_line(row)}
            rows.append(row)
            ledger["scenes"][row["key"]] = ledger_entry(row)
            write_ledger(out_root, ledger)
            logger.info("%s: %s%s", Path(row["scene"]).name, row["status"],
                        f": {row['note']}" if row["status"] == "failed" else f" into {row['out_dir']}")
    write_ledger(out_root, ledger)  # the file-hash cache, even when nothing ran
    rows.sort(key=lambda r: r["scene"])
    report_task(rows, out_root)
    print(f"batch: {counts_line(rows)}")
    message = failure_message(rows)
    if message:
        return Failed(message=message, data=BatchFailedError(message))
    return {**count_rows(rows), "scenes": rows}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python flows/batch.py INBOX CHECKPOINT OUT_ROOT [CONFIG_YAML] [--concurrency N]``."""
    parser = argparse.ArgumentParser(description="Classify every new scene of an inbox (Prefect flow).")
    parser.add_argument("inbox", help="folder, glob (quote it) or scene file")
    parser.add_argument("checkpoint")
    parser.add_argument("out_root")
    parser.add_argument("config", nargs="?", help="predict settings YAML (configs/predict/*.yaml)")
    parser.add_argument("--concurrency", type=int, default=1, help="scenes at the same time (default 1)")
    parser.add_argument("--scheduler", help="address of an existing Dask scheduler")
    parser.add_argument("--reprocess", action="store_true", help="process every scene again")
    parser.add_argument("-v", "--verbose", action="store_true", help="show every library's log lines")
    args = parser.parse_args(argv)
    setup_logging(verbose=args.verbose)

    def body() -> None:
        with prefect_api() as ui:
            print(f"Prefect UI: {ui}", file=sys.stderr)
            result = batch(args.inbox, args.checkpoint, args.out_root, config=args.config,
                           concurrency=args.concurrency, scheduler=args.scheduler, reprocess=args.reprocess)
        print(json.dumps({k: v for k, v in result.items() if k != "scenes"}))

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
