"""Ctrl-C and SIGTERM at every stage: the run ends within 10 s (exit 130 / 143) with one line saying how
to resume, leaves no process behind, and the rerun resumes to the same bytes as an undisturbed run."""

import pytest
import rasterio
from processes import cli, hooked, run, same_outputs

from geoseg.command import RESUME_HINT

ARGS = ("--block-size", "256", "--workers", "2")
#: Where each stage is entered, and how long after entering it the signal comes (mid-work).
STAGES = {
    "plan": ("geoseg.pipeline:plan_stage", 0.0),
    "blocks": ("geoseg.pipeline:run_blocks", 1.0),
    "cogs": ("geoseg.pipeline:finalise", 0.05),
    "polygons": ("geoseg.pipeline:vectorise_stage", 0.1),
}
OUTPUTS = ("nc_x2_classes.tif", "nc_x2_confidence.tif")  # the 2-worker runs write the 1-worker bytes


def check_interrupted(finished, signal_name):
    status = {"TERM": 143, "INT": 130}[signal_name]
    assert finished.returncode == status, finished.stderr
    assert "Traceback" not in finished.stderr
    lines = [ln for ln in finished.stderr.splitlines() if ln.startswith("interrupted")]
    assert lines == [RESUME_HINT]
    sent = next(t for line, t in finished.marks.items() if line.startswith("hooked: "))
    assert finished.seconds - sent < 10, f"took {finished.seconds - sent:.1f} s to stop"
    assert not finished.left_running(), "no worker, pool or server process outlives the run"


def check_resumes_to_same_bytes(out, reference, scene, checkpoint):
    rerun = run(cli("predict", scene, "-c", checkpoint, "-o", out, *ARGS), timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    same_outputs(out, reference)


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "signal_name"), [
    ("plan", "TERM"), ("blocks", "TERM"), ("cogs", "TERM"), ("polygons", "TERM"),
    ("blocks", "INT"), ("polygons", "INT"),
])
def test_cli_interrupted(stage, signal_name, undisturbed, scene_x2, tiny_checkpoint, tmp_path):
    at, delay = STAGES[stage]
    finished = run(hooked(at, signal_name, "cli", "predict", scene_x2, "-c", tiny_checkpoint, "-o", tmp_path, *ARGS,
                          delay=delay, group=signal_name == "INT"), timeout=300)
    check_interrupted(finished, signal_name)
    for name in OUTPUTS:  # an output is there whole or not at all
        if (tmp_path / name).exists():
            with rasterio.open(tmp_path / name) as done:
                assert done.read(1).shape == done.shape and done.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
    check_resumes_to_same_bytes(tmp_path, undisturbed, scene_x2, tiny_checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "signal_name"), [("blocks", "TERM"), ("polygons", "INT")])
def test_flow_interrupted(stage, signal_name, undisturbed, scene_x2, tiny_checkpoint, tmp_path):
    config = tmp_path / "predict.yaml"
    config.write_text("block_size: 256\nworkers: 2\n")
    out = tmp_path / "out"
    at, delay = STAGES[stage]
    finished = run(hooked(at, signal_name, "flow", scene_x2, tiny_checkpoint, out, config, delay=delay,
                          group=signal_name == "INT"), timeout=300)
    check_interrupted(finished, signal_name)
    check_resumes_to_same_bytes(out, undisturbed, scene_x2, tiny_checkpoint)
