"""bench/baseline.py: the per-pixel forest learns from the config's train part and is scored on its
val and test parts; on a scene whose classes a band separates, it scores (almost) perfectly."""

import json
import subprocess
import sys

import numpy as np
from conftest import ROOT, random_scene, write_geotiff


def test_forest_floor_on_a_separable_scene(tmp_path):
    bands = random_scene((3, 192, 192), "uint16", seed=4)
    labels = (bands[1] > np.median(bands[1])).astype(np.uint8)  # building where band 2 is bright
    labels[:8] = 255  # an unlabelled strip
    scene = write_geotiff(tmp_path / "scene.tif", bands)
    write_geotiff(tmp_path / "labels.tif", labels, nodata=255)
    config = tmp_path / "train.yaml"
    config.write_text(
        f"data: {{kind: scene_raster, images: {scene}, labels: {tmp_path / 'labels.tif'}, "
        f"classes: {ROOT / 'configs/classes/buildings.yaml'}}}\n"
        "model: {arch: tiny, backbone: none, tile_size: 64}\nsplit_block: 32\nseed: 0\n"
    )
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "baseline.py"), str(config), "--trees", "20"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    labelled = int((labels != 255).sum())
    parts = report["train_pixels"] + report["val"]["labelled_pixels"] + report["test"]["labelled_pixels"]
    assert parts == labelled, "train, val and test are the config's split, each pixel once"
    for part in ("val", "test"):
        assert report[part]["labelled_pixels"] > 500
        assert report[part]["pixel_accuracy"] > 0.97 and report[part]["miou_macro"] > 0.94
