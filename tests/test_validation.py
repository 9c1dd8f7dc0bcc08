"""Every input is checked before any cluster or server starts; messages only suggest what exists;
the demo command prints its stages and outputs, no tracebacks."""

import shutil
import subprocess

import pytest
import rasterio
from conftest import NC_SCENE, ROOT, random_scene, write_geotiff
from processes import cli, flow, run


def test_band_mismatch_is_refused_before_the_cluster_starts(tiny_checkpoint, tmp_path):
    rgb = write_geotiff(tmp_path / "rgb.tif", random_scene((3, 60, 60), "uint8"))
    for command in (cli("predict", rgb, "-c", tiny_checkpoint, "-o", tmp_path / "a", "--workers", 2),
                    flow(rgb, tiny_checkpoint, tmp_path / "b")):
        finished = run(command, timeout=120)
        assert finished.returncode == 2
        line = finished.stderr.strip()
        assert len(line.splitlines()) == 1 and "expects 6" in line and "--bands" in line, line
        assert not finished.started(), "no Dask worker and no Prefect server was started"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bands_option_picks_the_model_bands(tiny_checkpoint, tmp_path):
    """A 7-band scene (the six of the model, then a pan band), as the 2002 NC scene is delivered."""
    with rasterio.open(NC_SCENE) as src:
        bands = src.read()
        seven = write_geotiff(tmp_path / "seven.tif", bands[[0, 1, 2, 3, 4, 5, 2]], crs=src.crs,
                              transform=src.transform, nodata=0)
    out = tmp_path / "out"
    finished = run(cli("predict", seven, "-c", tiny_checkpoint, "-o", out, "--workers", 1, "--no-vectorize",
                       "--bands", "1,2,3,4,5,6"), timeout=300)
    assert finished.returncode == 0, finished.stderr
    reference = run(cli("predict", NC_SCENE, "-c", tiny_checkpoint, "-o", tmp_path / "ref", "--workers", 1,
                        "--no-vectorize"), timeout=300)
    assert reference.returncode == 0
    with rasterio.open(out / "seven_classes.tif") as a, \
            rasterio.open(tmp_path / "ref" / "lsat7_2000_6band_classes.tif") as b:
        assert (a.read() == b.read()).all()
    wrong = run(cli("predict", seven, "-c", tiny_checkpoint, "-o", tmp_path / "w", "--bands", "1,2,3"), timeout=120)
    assert wrong.returncode == 2 and "names 3 bands but the model expects 6" in wrong.stderr


def test_refusal_to_overwrite_names_the_cli_option(tiny_checkpoint, tmp_path):
    args = ("predict", NC_SCENE, "-c", tiny_checkpoint, "-o", tmp_path, "--workers", 1, "--no-vectorize")
    assert run(cli(*args), timeout=300).returncode == 0
    finished = run(cli(*args, "--block-size", "128"), timeout=120)
    assert finished.returncode == 2 and "--overwrite" in finished.stderr and "overwrite=True" not in finished.stderr
    assert not finished.started()


@pytest.mark.slow
def test_demo_command_is_short_and_has_no_traceback(tmp_path):
    make = shutil.which("make")
    finished = subprocess.run([make, "demo", f"DEMO_OUT={tmp_path / 'demo'}"], cwd=ROOT, capture_output=True,
                              text=True, timeout=600)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output
    assert "Traceback" not in output and "ERROR" not in output, output
    lines = output.strip().splitlines()
    assert len(lines) <= 25, output
    for stage in ("plan", "blocks", "finalise", "areas", "vectorise"):
        assert any(line.startswith(f"{stage}: done in") for line in lines), stage
    assert (tmp_path / "demo" / "lsat7_2000_6band_polygons.gpkg").is_file()
