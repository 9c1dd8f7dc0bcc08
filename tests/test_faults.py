"""Faults, with real processes: a Dask worker or the whole run killed, two runs into one folder,
a read-only folder and a full disk. Every run either completes or says so in one line, nothing
half-written appears under a final name, and the rerun resumes to the same bytes."""

import json
import os
import resource
import signal
import subprocess
import time

import pytest
import rasterio
from processes import cli, hooked, run, same_outputs

from geoseg.runlock import LOCK_NAME

ONE = ("--block-size", "256", "--workers", "1")
TWO = ("--block-size", "256", "--workers", "2")
FINAL = ("nc_x2_classes.tif", "nc_x2_confidence.tif", "nc_x2_polygons.gpkg", "summary.json")


def summary(out):
    return json.loads((out / "summary.json").read_text())


def resume(out, scene, checkpoint, undisturbed, *args):
    rerun = run(cli("predict", scene, "-c", checkpoint, "-o", out, *(args or ONE)), timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    same_outputs(out, undisturbed)
    assert not [p.name for p in out.iterdir() if ".partial" in p.name], "the rerun clears what the killed run left"
    return summary(out)


@pytest.mark.slow
def test_killed_dask_worker_mid_blocks(scene_x2, tiny_checkpoint, undisturbed, tmp_path):
    finished = run(hooked("geoseg.pipeline:run_blocks", "KILL", "cli", "predict", scene_x2, "-c", tiny_checkpoint,
                          "-o", tmp_path, *TWO, delay=1.0, worker=True), timeout=300)
    assert finished.returncode == 0, finished.stderr
    killed = next(t for line, t in finished.marks.items() if line.startswith("hooked: SIGKILL to worker"))
    assert killed < next(t for line, t in finished.marks.items() if line.startswith("blocks: done"))
    assert summary(tmp_path)["blocks_computed"] == summary(tmp_path)["grid"]["blocks"]
    same_outputs(tmp_path, undisturbed)
    assert not finished.left_running()


@pytest.mark.slow
def test_killed_run_mid_blocks_resumes(scene_x2, tiny_checkpoint, undisturbed, tmp_path):
    finished = run(hooked("geoseg.worker:write_block", "KILL", "cli", "predict", scene_x2, "-c", tiny_checkpoint,
                          "-o", tmp_path, *ONE, nth=6), timeout=300)
    assert finished.returncode == -signal.SIGKILL
    assert not any((tmp_path / name).exists() for name in FINAL)
    done = resume(tmp_path, scene_x2, tiny_checkpoint, undisturbed)
    assert done["blocks_skipped"] == 5 and done["blocks_computed"] == done["grid"]["blocks"] - 5


@pytest.mark.slow
def test_killed_run_takes_its_dask_workers_with_it(scene_x2, tiny_checkpoint, undisturbed, tmp_path):
    finished = run(hooked("geoseg.pipeline:run_blocks", "KILL", "cli", "predict", scene_x2, "-c", tiny_checkpoint,
                          "-o", tmp_path, *TWO, delay=1.0), timeout=300)
    assert finished.returncode == -signal.SIGKILL and len(finished.started("spawn_main")) >= 2
    deadline = time.monotonic() + 15
    while finished.left_running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not finished.left_running(), "Dask's workers notice their parent is gone and exit"
    resume(tmp_path, scene_x2, tiny_checkpoint, undisturbed, *TWO)


@pytest.mark.slow
def test_killed_run_mid_polygons_resumes(scene_x2, tiny_checkpoint, undisturbed, tmp_path):
    finished = run(hooked("geoseg.vector.blocks:polygonise_block", "KILL", "cli", "predict", scene_x2,
                          "-c", tiny_checkpoint, "-o", tmp_path, *ONE, nth=4), timeout=300)
    assert finished.returncode == -signal.SIGKILL
    assert not (tmp_path / FINAL[2]).exists() and not (tmp_path / "summary.json").exists()
    assert [p for p in tmp_path.iterdir() if ".partial" in p.name], "it was killed while writing the polygons"
    done = resume(tmp_path, scene_x2, tiny_checkpoint, undisturbed)
    assert done["blocks_skipped"] == done["grid"]["blocks"]


@pytest.mark.slow
def test_second_run_into_the_same_folder_is_refused(scene_x2, tiny_checkpoint, undisturbed, tmp_path):
    first = subprocess.Popen(cli("predict", scene_x2, "-c", tiny_checkpoint, "-o", tmp_path, *ONE),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / LOCK_NAME).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)  # the first run is alive and holds the folder, whatever the machine's speed
    try:
        second = run(cli("predict", scene_x2, "-c", tiny_checkpoint, "-o", tmp_path, *ONE), timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert second.returncode == 2
    assert f"pid {first.pid} on " in second.stderr and "Traceback" not in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    same_outputs(tmp_path, undisturbed)
    assert not (tmp_path / LOCK_NAME).exists()


def test_stale_lock_of_a_dead_run_is_taken_over(scene_x2, tiny_checkpoint, undisturbed, tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 2**22 + 1, "host": os.uname().nodename, "started": 0}))
    finished = run(cli("predict", scene_x2, "-c", tiny_checkpoint, "-o", tmp_path, *ONE), timeout=300)
    assert finished.returncode == 0, finished.stderr
    same_outputs(tmp_path, undisturbed)
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.fixture
def read_only(tmp_path):
    """A read-only folder: a read-only tmpfs for root (whom permissions do not stop), else mode 555."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], check=True)
        yield folder
        subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def test_read_only_folder_is_one_clear_line(scene_x2, tiny_checkpoint, read_only):
    for out in (read_only, read_only / "new"):
        finished = run(cli("predict", scene_x2, "-c", tiny_checkpoint, "-o", out, *ONE), timeout=120)
        assert finished.returncode == 2
        line = finished.stderr.strip()
        assert len(line.splitlines()) == 1 and "Traceback" not in line
        assert str(read_only) in line and "not writable" in line
        assert finished.seconds < 60 and not list(read_only.iterdir())


def file_size_limit(limit: int):
    def limited() -> None:  # as on a full disk: writes past `limit` bytes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limited


@pytest.mark.slow
@pytest.mark.parametrize(("limit", "fails_on"), [(48 * 1024, "prediction.zarr"), (400 * 1024, "_confidence.tif")])
def test_full_disk_is_one_clear_line_and_the_rerun_resumes(limit, fails_on, scene_x2, tiny_checkpoint, undisturbed,
                                                           tmp_path):
    finished = run(cli("predict", scene_x2, "-c", tiny_checkpoint, "-o", tmp_path, *ONE), timeout=300,
                   preexec_fn=file_size_limit(limit))
    assert finished.returncode == 2, finished.stderr
    line = finished.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and fails_on in line and "disk is full" in line, line
    assert "Traceback" not in finished.stderr
    for name in FINAL:
        if (tmp_path / name).exists():  # whatever exists under a final name is complete
            with rasterio.open(tmp_path / name) as done:
                assert done.read(1).shape == done.shape
    resume(tmp_path, scene_x2, tiny_checkpoint, undisturbed)
