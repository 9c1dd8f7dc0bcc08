"""The batch flow and the deployments against a real Prefect server (subprocess).

The server, the inbox and the first batch run are made once per session and shared with
``test_prefect_ui.py`` (see :func:`prefect_server` and :func:`first_batch`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import rasterio
from conftest import NC_SCENE, ROOT
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.settings import PREFECT_API_URL, temporary_settings
from rasterio.windows import Window

from flows.batch import batch
from flows.serve import PrefectServer, build_deployments
from geoseg.inbox import LEDGER

#: Fast predict settings for the tests (one Dask worker, no polygons, small blocks).
FAST = {"vectorize": False, "block_size": 256, "workers": 1}


# --------------------------------------------------------------------------------------------------
# Shared, session-wide resources (also used by test_prefect_ui.py, hence stash-based, not fixtures).


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SERVER = pytest.StashKey[PrefectServer]()
_BATCH = pytest.StashKey["BatchRun"]()


def shared_server(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> PrefectServer:
    """One ``prefect server start`` per test session (SQLite in a tmp dir), stopped at the end."""
    if _SERVER not in config.stash:
        home = tmp_path_factory.mktemp("prefect-server")
        server = PrefectServer(free_port(), home, env={
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "true",
        })
        config.add_cleanup(server.stop)
        server.start(timeout=180)
        config.stash[_SERVER] = server
    return config.stash[_SERVER]


@contextlib.contextmanager
def use_server(server: PrefectServer):
    """Point this process (settings, threads, subprocesses) at ``server``.

    Prefect's events worker, which also creates task runs, is one per process whatever the API URL:
    it is drained on the way in and out, so each server gets its own runs' events (else a flow run
    here after one on the test harness sent its task runs to the harness).
    """
    from prefect import context
    from prefect.events.worker import EventsWorker

    # Threads that do not copy the context see the global settings; prefect_test_harness sets them too.
    global_settings = getattr(context, "_temporary_global_settings_context", None)
    EventsWorker.drain_all(timeout=30, at_exit=False)
    with pytest.MonkeyPatch.context() as mp, temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        mp.setenv("PREFECT_API_URL", server.api_url)
        with global_settings(context.get_settings_context()) if global_settings else contextlib.nullcontext():
            try:
                yield server
            finally:
                EventsWorker.drain_all(timeout=30, at_exit=False)


def write_crop(dst: Path, rows: slice, cols: slice) -> Path:
    """A crop of the NC sample (same bands, names and CRS; other content)."""
    window = Window(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start)
    with rasterio.open(NC_SCENE) as src:
        profile = src.profile | {"width": window.width, "height": window.height,
                                 "transform": src.window_transform(window)}
        with rasterio.open(dst, "w", **profile) as out:
            out.write(src.read(window=window))
            out.descriptions = src.descriptions
    return dst


def make_inbox(folder: Path) -> dict[str, Path]:
    """Two good scenes (the real sample and a crop of it) and a truncated one."""
    folder.mkdir(parents=True, exist_ok=True)
    good_a = Path(shutil.copy(NC_SCENE, folder / "nc_full.tif"))
    good_b = write_crop(folder / "nc_crop.tif", slice(100, 356), slice(50, 306))
    bad = folder / "broken.tif"
    bad.write_bytes(NC_SCENE.read_bytes()[:100_000])
    return {"a": good_a, "b": good_b, "bad": bad}


@dataclass
class BatchRun:
    """The first batch run of the session and where it worked."""

    state: Any
    inbox: dict[str, Path]
    out_root: Path
    checkpoint: Path
    seconds: float

    @property
    def flow_run_id(self):
        return self.state.state_details.flow_run_id


def first_batch(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> BatchRun:
    """Run the batch once per session (inbox of 2 good + 1 bad scene, concurrency 2); return its state."""
    if _BATCH not in config.stash:
        base = tmp_path_factory.mktemp("batch")
        inbox = make_inbox(base / "inbox")
        t0 = time.perf_counter()
        state = batch(str(base / "inbox"), str(checkpoint), str(base / "out"), config=FAST, concurrency=2,
                      return_state=True)
        config.stash[_BATCH] = BatchRun(state, inbox, base / "out", checkpoint, time.perf_counter() - t0)
    return config.stash[_BATCH]


@pytest.fixture(scope="session")
def prefect_server(request, tmp_path_factory):
    with use_server(shared_server(request.config, tmp_path_factory)) as server:
        yield server


@pytest.fixture(scope="session")
def batch_run(request, tmp_path_factory, prefect_server, tiny_checkpoint) -> BatchRun:
    return first_batch(request.config, tmp_path_factory, tiny_checkpoint)


def subflow_runs(client, parent_id) -> list:
    return client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))


def artifacts_of(client, flow_run_id, key: str | None = None) -> list:
    return client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
        **({"key": ArtifactFilterKey(any_=[key])} if key else {}),
    ))


def table_rows(artifact) -> list[dict[str, Any]]:
    data = artifact.data
    return json.loads(data) if isinstance(data, str) else data


# --------------------------------------------------------------------------------------------------
# Batch flow against the server.


@pytest.mark.slow
def test_batch_processes_good_scenes_and_reports_the_bad_one(batch_run):
    state, inbox, out_root = batch_run.state, batch_run.inbox, batch_run.out_root
    assert state.is_failed(), state
    assert state.message.startswith("1 of 3 scenes failed: broken.tif: ")
    assert "not a raster GDAL can read" in state.message and "\n" not in state.message
    err = state.result(raise_on_failure=False)
    assert type(err).__name__ == "BatchFailedError" and str(err) == state.message

    folders = sorted(p for p in out_root.iterdir() if p.is_dir())
    finished = [p for p in folders if (p / "summary.json").is_file()]
    assert sorted(p.name.rsplit("-", 1)[0] for p in finished) == ["nc_crop", "nc_full"]
    for folder in finished:
        assert len(folder.name.rsplit("-", 1)[1]) == 12
        summary = json.loads((folder / "summary.json").read_text())
        assert Path(summary["scene"]["path"]).name == folder.name.rsplit("-", 1)[0] + ".tif"
        with rasterio.open(next(folder.glob("*_classes.tif"))) as cls, rasterio.open(summary["scene"]["path"]) as src:
            assert (cls.crs, cls.transform, cls.shape) == (src.crs, src.transform, src.shape)

    ledger = json.loads((out_root / LEDGER).read_text())
    by_scene = {Path(e["scene"]).name: e for e in ledger["scenes"].values()}
    assert {k: e["status"] for k, e in by_scene.items()} == {
        "nc_full.tif": "processed", "nc_crop.tif": "processed", "broken.tif": "failed"}
    assert "not a raster GDAL can read" in by_scene["broken.tif"]["error"]
    assert by_scene["nc_full.tif"]["outputs"]["class_map"].endswith("nc_full_classes.tif")
    assert set(ledger["files"]) == {str(p.resolve()) for p in inbox.values()}
    assert not list(out_root.glob(f".{LEDGER}*"))  # no partial ledger left behind


@pytest.mark.slow
def test_runs_task_runs_and_artifacts_are_in_the_server(batch_run):
    with get_client(sync_client=True) as client:
        parent = client.read_flow_run(batch_run.flow_run_id)
        assert parent.state.is_failed() and "broken.tif" in parent.state.message
        tasks = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(
            any_=[parent.id])))
        names = sorted(t.name for t in tasks)
        assert {"scene broken.tif", "scene nc_crop.tif", "scene nc_full.tif"} <= set(names)
        assert any(n.startswith("inventory") for n in names) and any(n.startswith("report") for n in names)
        scene_states = {t.name: t.state for t in tasks if t.name.startswith("scene ")}
        assert scene_states["scene broken.tif"].is_failed()
        assert "not a raster GDAL can read" in scene_states["scene broken.tif"].message
        assert scene_states["scene nc_full.tif"].is_completed()

        subs = {r.name.rsplit("-", 1)[0]: r for r in subflow_runs(client, parent.id)}
        assert set(subs) == {"nc_full", "nc_crop", "broken"}
        assert all(r.flow_id == subs["nc_full"].flow_id for r in subs.values())
        failed = subs["broken"]
        assert failed.state.is_failed()
        assert "InvalidSceneError" in failed.state.message and "broken.tif" in failed.state.message

        for stem in ("nc_full", "nc_crop"):
            run = subs[stem]
            assert run.state.is_completed()
            assert run.parameters["config"]["block_size"] == 256
            sub_tasks = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(
                any_=[run.id])))
            stages = {t.name.rsplit("-", 1)[0] for t in sub_tasks}
            assert {"plan", "blocks", "finalise", "class-areas", "summary"} <= stages
            arts = {a.type: a for a in artifacts_of(client, run.id)}
            assert set(arts) >= {"progress", "table", "markdown"}
            assert arts["progress"].data == 100.0
            rows = table_rows(arts["table"])
            assert [r["class"] for r in rows] == ["developed", "agriculture", "herbaceous", "shrubland", "forest",
                                                  "water", "sediment"]
            assert sum(r["percent"] for r in rows) == pytest.approx(100, abs=0.05)
            summary = json.loads((Path(run.parameters["out_dir"]) / "summary.json").read_text())
            assert [r["class"] for r in rows] == [a["class_name"] for a in summary["class_areas"]]
            [summary_md] = artifacts_of(client, run.id, "predict-summary")
            md = summary_md.data
            assert f"{stem}_classes.tif" in md and str(Path(run.parameters["out_dir"]) / "summary.json") in md
            [look] = artifacts_of(client, run.id, "quicklook")
            assert "](data:image/png;base64," in look.data and f"{stem}_quicklook.png" in look.data

        [report] = artifacts_of(client, parent.id, "batch-report")
        assert "2 processed, 0 skipped, 1 failed" in report.data
        assert "broken.tif" in report.data and "not a raster GDAL can read" in report.data
        assert f"/runs/flow-run/{failed.id}" in report.data  # links the failed predict run
        [looks] = artifacts_of(client, parent.id, "batch-quicklooks")  # the two processed scenes
        assert looks.data.count("](data:image/png;base64,") == 2 and "broken.tif" not in looks.data
        [table] = artifacts_of(client, parent.id, "batch-scenes")
        rows = {Path(r["scene"]).name: r for r in table_rows(table)}
        assert {k: r["status"] for k, r in rows.items()} == {
            "broken.tif": "failed", "nc_crop.tif": "processed", "nc_full.tif": "processed"}
        assert "not a raster GDAL can read" in rows["broken.tif"]["error"] and rows["nc_full.tif"]["error"] == ""


@pytest.mark.slow
def test_rerun_skips_processed_scenes_by_content(batch_run, tmp_path):
    inbox = batch_run.inbox
    renamed = Path(shutil.copy(inbox["a"], tmp_path / "same_bytes_other_name.tif"))
    before = (batch_run.out_root / LEDGER).read_text()
    t0 = time.perf_counter()
    state = batch([str(inbox["a"]), str(inbox["b"]), str(renamed)], str(batch_run.checkpoint),
                  str(batch_run.out_root), config={**FAST, "workers": 2}, return_state=True)  # workers: not in key
    assert time.perf_counter() - t0 < batch_run.seconds
    assert state.is_completed(), state
    result = state.result()
    assert (result["processed"], result["skipped"], result["failed"]) == (0, 3, 0)
    notes = {Path(r["scene"]).name: r["note"] for r in result["scenes"]}
    assert notes["nc_full.tif"].startswith("already processed into ")
    assert notes["same_bytes_other_name.tif"].startswith("already processed into ")
    assert notes["nc_full.tif"].split(" into ")[1] == notes["same_bytes_other_name.tif"].split(" into ")[1]
    with get_client(sync_client=True) as client:
        assert subflow_runs(client, state.state_details.flow_run_id) == []
        [report] = artifacts_of(client, state.state_details.flow_run_id, "batch-report")
        assert "0 processed, 3 skipped, 0 failed" in report.data
    after = json.loads((batch_run.out_root / LEDGER).read_text())
    assert after["scenes"] == json.loads(before)["scenes"]


@pytest.mark.slow
def test_missing_checkpoint_fails_the_batch_with_a_clear_error(prefect_server, tmp_path):
    state = batch(str(tmp_path), str(tmp_path / "nope.pt"), str(tmp_path / "out"), return_state=True)
    assert state.is_failed()
    assert "nope.pt: no such checkpoint file" in state.message


# --------------------------------------------------------------------------------------------------
# Deployments.


def test_deployments_are_built_from_configs(caplog):
    deployments = {d.name: d for d in build_deployments(checkpoint="/models/m.pt", inbox="/in", out_root="/out")}
    train_exists = (ROOT / "flows" / "train.py").is_file()
    assert set(deployments) == {"predict", "nightly"} | ({"train"} if train_exists else set())
    nightly = deployments["nightly"]
    assert nightly.schedules[0].schedule.cron == "0 2 * * *"
    assert nightly.parameters == {"inbox": "/in", "out_root": "/out", "checkpoint": "/models/m.pt",
                                  "config": "configs/predict/default.yaml", "concurrency": 1}
    assert nightly.entrypoint == "flows/batch.py:batch" or nightly.entrypoint.endswith("flows/batch.py:batch")
    assert deployments["predict"].parameters == {"config": "configs/predict/default.yaml"}
    assert not deployments["predict"].schedules
    for path in ("configs/predict/default.yaml", "configs/train/nc_landclass96.yaml"):
        assert (ROOT / path).is_file()
    if train_exists:
        assert deployments["train"].parameters == {"config": "configs/train/nc_landclass96.yaml"}


def test_train_deployment_skipped_with_a_log_line_while_missing(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "flows.train", None)  # import fails as if the file did not exist
    with caplog.at_level("WARNING", logger="geoseg.serve"):
        names = [d.name for d in build_deployments(scheduler="tcp://10.0.0.5:8786")]
    assert names == ["predict", "nightly"]
    assert "train deployment skipped: flows/train.py does not exist yet" in caplog.text
    assert "nightly batch not scheduled: no --checkpoint given" in caplog.text


@pytest.mark.slow
def test_served_nightly_deployment_runs_the_batch(prefect_server, tiny_checkpoint, tmp_path):
    """The one command (flows/serve.py) against the test server; a run of the nightly deployment."""
    from prefect.deployments import run_deployment

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_crop(inbox / "small.tif", slice(0, 200), slice(0, 200))
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "PREFECT_API_URL": prefect_server.api_url, "PREFECT_HOME": str(tmp_path / "home")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "flows" / "serve.py"), "--checkpoint", str(tiny_checkpoint), "--inbox",
             str(inbox), "--out-root", str(tmp_path / "out"), "--cron", "30 3 * * *"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while "being served" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("geoseg-batch/nightly")
            assert deployment.schedules[0].schedule.cron == "30 3 * * *"
            assert deployment.parameters["inbox"] == str(inbox)
        run = run_deployment("geoseg-batch/nightly", parameters={"config": FAST}, timeout=300)
        assert run.state.is_completed(), (run.state, log_path.read_text()[-3000:])
        ledger = json.loads((tmp_path / "out" / LEDGER).read_text())
        [entry] = ledger["scenes"].values()
        assert entry["status"] == "processed" and Path(entry["out_dir"], "summary.json").is_file()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
