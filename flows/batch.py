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

Run it: ``python flows/batch.py INBOX CHECKPOINT OUT_ROOT [CONFIG_YAML] [--concurrency N]``.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.settings import PREFECT_UI_URL
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from geoseg.checkpoint import file_sha256
from geoseg.cluster import dask_client
from geoseg.config import PredictConfig, settings_with_overrides
from geoseg.errors import CheckpointError, ConfigError, GeosegError

try:
    from flows.predict import predict
except ModuleNotFoundError:  # loaded by path (python flows/batch.py, a Prefect entrypoint)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from flows.predict import predict

#: The ledger file in ``out_root``.
LEDGER = "processed.json"
#: File suffixes taken from an inbox folder (a glob or a list picks any raster).
SCENE_SUFFIXES = (".tif", ".tiff")
#: Predict settings that do not change the output bytes (design decision 4), so not part of the key.
RUNTIME_ONLY = frozenset({"workers", "scheduler"})
#: Hex digits of the key in output folder names.
SHORT_KEY = 12


class BatchFailedError(GeosegError, RuntimeError):
    """Some scenes of a batch failed; the message names them and their errors."""


@dataclass(frozen=True)
class Scene:
    """One scene of the batch and what the inventory decided for it."""

    scene: str
    status: str  # "todo", "skipped" or "failed"
    key: str = ""
    sha256: str = ""
    out_dir: str = ""
    note: str = ""  # why skipped, or the error


# --------------------------------------------------------------------------------------------------
# Plain helpers (no Prefect): finding scenes, keys, the ledger.


def find_scenes(inbox: str | Path | Sequence[str | Path], *, exclude: str | Path | None = None) -> list[Path]:
    """The scene files named by ``inbox``: a folder (its ``*.tif``/``*.tiff``), a glob, a file, or a list.

    Hidden files (``.name``, e.g. partial copies) and anything under ``exclude`` (the output root) are
    left out; paths that do not exist are kept, so the inventory reports them.
    """
    items = [inbox] if isinstance(inbox, str | Path) else list(inbox)
    found: list[Path] = []
    for item in items:
        text = os.path.expanduser(str(item))
        if any(c in text for c in "*?["):
            found += [Path(p) for p in sorted(glob.glob(text, recursive=True)) if Path(p).is_file()]
        elif Path(text).is_dir():
            found += sorted(
                p for p in Path(text).iterdir()
                if p.is_file() and p.suffix.lower() in SCENE_SUFFIXES and not p.name.startswith(".")
            )
        else:
            found.append(Path(text))
    skip = Path(exclude).resolve() if exclude else None
    unique: dict[Path, Path] = {}
    for p in found:
        full = p.resolve()
        if p.name.startswith(".") or (skip and full.is_relative_to(skip)):
            continue
        unique.setdefault(full, full)
    return list(unique)


def settings_sha256(config: PredictConfig) -> str:
    """SHA-256 of the settings that shape the output (everything but workers and scheduler)."""
    data = config.model_dump(mode="json", exclude=set(RUNTIME_ONLY))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def scene_key(scene_sha256: str, settings_hash: str, checkpoint_sha256: str) -> str:
    """The key a scene is processed once under: its bytes, the settings and the model."""
    return hashlib.sha256(f"{scene_sha256}\n{settings_hash}\n{checkpoint_sha256}".encode()).hexdigest()


def output_dir(out_root: str | Path, scene: str | Path, key: str) -> Path:
    """``out_root/<scene stem>-<key[:12]>``."""
    return Path(out_root) / f"{Path(scene).stem}-{key[:SHORT_KEY]}"


def is_finished(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a finished predict run (its summary.json is written last, atomically)."""
    return (Path(out_dir) / "summary.json").is_file()


def read_ledger(out_root: str | Path) -> dict[str, Any]:
    """The ledger of ``out_root``; empty when missing. An unreadable one is set aside, not trusted."""
    path = Path(out_root) / LEDGER
    empty: dict[str, Any] = {"version": 1, "scenes": {}, "files": {}}
    if not path.is_file():
        return empty
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("scenes"), dict):
            raise ValueError("not a geoseg ledger")
    except (ValueError, UnicodeDecodeError):
        aside = path.with_name(f"{LEDGER}.unreadable-{int(time.time())}")
        os.replace(path, aside)
        return empty
    data.setdefault("files", {})
    return data


def write_ledger(out_root: str | Path, ledger: dict[str, Any]) -> Path:
    """Write the ledger atomically (temporary name, then rename) and return its path."""
    path = Path(out_root) / LEDGER
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{LEDGER}.{os.getpid()}.partial")
    partial.write_text(json.dumps(ledger, indent=2, sort_keys=True))
    os.replace(partial, path)
    return path


def error_line(err: BaseException | str | None) -> str:
    """One line for an error: a GeosegError's message as is, anything else with its type."""
    if err is None:
        return "failed (no error message)"
    if isinstance(err, str):
        text = err
    elif isinstance(err, GeosegError):
        text = str(err)
    else:
        text = f"{type(err).__name__}: {err}"
    return " ".join(text.split()) or type(err).__name__


def _sha256_cached(path: Path, files: dict[str, Any]) -> str:
    """SHA-256 of ``path``, reusing the ledger's entry while size and mtime are unchanged."""
    st = path.stat()
    cached = files.get(str(path))
    if cached and cached.get("size") == st.st_size and cached.get("mtime_ns") == st.st_mtime_ns:
        return cached["sha256"]
    sha = file_sha256(path)
    files[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
    return sha


def plan_batch(
    paths: Sequence[Path],
    out_root: Path,
    ledger: dict[str, Any],
    *,
    settings_hash: str,
    checkpoint_sha256: str,
    reprocess: bool = False,
) -> list[Scene]:
    """Hash every scene and decide: todo, skipped (already processed, or a duplicate) or failed (unreadable).

    Updates the ledger's file-hash cache in place.
    """
    scenes: list[Scene] = []
    first: dict[str, str] = {}
    for path in paths:
        if not path.is_file():
            what = "is not a file" if path.exists() else "no such file"
            scenes.append(Scene(str(path), "failed", note=f"{path}: {what}. Check the inbox path or glob."))
            continue
        try:
            sha = _sha256_cached(path, ledger["files"])
        except OSError as err:
            scenes.append(Scene(str(path), "failed", note=f"{path}: cannot read it ({err.strerror or err})."))
            continue
        key = scene_key(sha, settings_hash, checkpoint_sha256)
        entry = ledger["scenes"].get(key, {})
        out = Path(entry["out_dir"]) if entry.get("out_dir") else output_dir(out_root, path, key)
        scene = Scene(str(path), "todo", key=key, sha256=sha, out_dir=str(out))
        if not reprocess and is_finished(out):
            scene = replace(scene, status="skipped", note=f"already processed into {out}")
        elif key in first:
            scene = replace(scene, status="skipped", note=f"same content as {first[key]}")
        first.setdefault(key, str(path))
        scenes.append(scene)
    return scenes


def count_rows(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How many scenes were processed, skipped and failed."""
    return {s: sum(r["status"] == s for r in rows) for s in ("processed", "skipped", "failed")}


def _counts_line(rows: Sequence[dict[str, Any]]) -> str:
    return ", ".join(f"{n} {status}" for status, n in count_rows(rows).items())


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def report_markdown(rows: Sequence[dict[str, Any]], *, out_root: str | Path, ui_url: str | None = None) -> str:
    """The batch report: counts, every scene with its outcome, and the failures with their errors."""
    root = Path(out_root)
    lines = [f"# geoseg batch: {_counts_line(rows)}", "", f"Output root: `{_cell(str(root))}`", ""]
    if rows:
        lines += ["| scene | status | output folder / note |", "|---|---|---|"]
    for r in rows:
        out = Path(r["out_dir"]) if r["out_dir"] else None
        where = f"`{out.name}`" if out and out.parent == root else f"`{_cell(str(out))}`"
        detail = {"processed": where, "failed": "see Failures"}.get(r["status"], _cell(r["note"]))
        status = f"**{r['status']}**" if r["status"] == "failed" else r["status"]
        lines.append(f"| `{_cell(Path(r['scene']).name)}` | {status} | {detail} |")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failures", ""]
        for r in failed:
            run = r.get("flow_run_id")
            link = f" ([predict run]({ui_url.rstrip('/')}/runs/flow-run/{run}))" if run and ui_url else ""
            lines += [f"- **{Path(r['scene']).name}**{link}: {' '.join(r['note'].split())}"]
    if not rows:
        lines += ["No scenes found in the inbox."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Prefect tasks and the flow.


@task(name="inventory", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def inventory_task(
    inbox: str | list[str], checkpoint: str, out_root: str, config: PredictConfig, reprocess: bool
) -> tuple[list[Scene], dict[str, Any]]:
    """Find the scenes, hash them and the checkpoint, and decide which to process."""
    root = Path(out_root)
    ledger = read_ledger(root)
    paths = find_scenes(inbox, exclude=root)
    scenes = plan_batch(
        paths, root, ledger, settings_hash=settings_sha256(config), checkpoint_sha256=file_sha256(checkpoint),
        reprocess=reprocess,
    )
    for s in scenes:  # finished outputs the ledger does not know of (e.g. it was lost): record them
        if s.status == "skipped" and s.key not in ledger["scenes"] and is_finished(s.out_dir):
            ledger["scenes"][s.key] = _ledger_entry({**asdict(s), "status": "processed", "note": ""})
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
        table=[{"scene": r["scene"], "status": r["status"], "key": r["key"][:SHORT_KEY],
                "output": r["out_dir"] if r["status"] != "failed" else "", "error": r["note"] if
                r["status"] == "failed" else ""} for r in rows],
        description="Every scene of this batch: processed / skipped / failed",
    )
    markdown = report_markdown(rows, out_root=out_root, ui_url=PREFECT_UI_URL.value())
    create_markdown_artifact(key="batch-report", markdown=markdown, description="Outcome of this batch")
    return markdown


@contextmanager
def _dask_scheduler(config: PredictConfig, needed: bool) -> Iterator[str | None]:
    """The Dask scheduler every scene of the batch uses: the configured one, or a local cluster."""
    if config.scheduler or not needed:
        yield config.scheduler
        return
    with dask_client(workers=config.workers, device=config.device, threads=config.threads) as client:
        yield client.scheduler.address


def _ledger_entry(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "scene": row["scene"], "scene_sha256": row["sha256"], "out_dir": row["out_dir"],
        "status": row["status"], "error": row["note"] if row["status"] == "failed" else None,
        "flow_run_id": row.get("flow_run_id"), "outputs": row.get("outputs"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def failure_message(rows: Sequence[dict[str, Any]]) -> str | None:
    """One line naming the first failed scene and its error (None when nothing failed)."""
    failed = [r for r in rows if r["status"] == "failed"]
    if not failed:
        return None
    more = f" (and {len(failed) - 1} more; see the batch-report artifact)" if len(failed) > 1 else ""
    first = failed[0]
    return f"{len(failed)} of {len(rows)} scenes failed: {Path(first['scene']).name}: {first['note']}{more}"


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
    settings = cfg.model_dump(mode="json", exclude=set(RUNTIME_ONLY))
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
            ledger["scenes"][row["key"]] = _ledger_entry(row)
            write_ledger(out_root, ledger)
            logger.info("%s: %s%s", Path(row["scene"]).name, row["status"],
                        f": {row['note']}" if row["status"] == "failed" else f" into {row['out_dir']}")
    write_ledger(out_root, ledger)  # the file-hash cache, even when nothing ran
    rows.sort(key=lambda r: r["scene"])
    report_task(rows, out_root)
    print(f"batch: {_counts_line(rows)}")
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
    args = parser.parse_args(argv)
    try:
        result = batch(args.inbox, args.checkpoint, args.out_root, config=args.config,
                       concurrency=args.concurrency, scheduler=args.scheduler, reprocess=args.reprocess)
    except GeosegError as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in result.items() if k != "scenes"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
