"""`geoseg evaluate`: the predict path over the whole scene, scored against raster or vector labels."""

import json

import numpy as np
import pytest
import rasterio
from conftest import NC_SCENE, ROOT
from processes import cli, run

from geoseg.config import PredictConfig
from geoseg.train.evaluate import evaluate
from geoseg.train.labels import align_label_raster

LABEL_RASTER = ROOT / "data" / "nc-landsat-lulc" / "landsat96_labelled_pixels.tif"
LABEL_POLYGONS = ROOT / "data" / "nc-landsat-lulc" / "landsat96_polygons.shp"
CFG = PredictConfig(block_size=128)


def test_scores_equal_a_direct_count(tiny_checkpoint, tmp_path):
    result = evaluate(NC_SCENE, LABEL_RASTER, tiny_checkpoint, out_dir=tmp_path, config=CFG)
    m = result.metrics
    with rasterio.open(result.files["class_map"]) as cls:
        pred_ids = cls.read(1)
    from geoseg.checkpoint import load_checkpoint

    schema = load_checkpoint(tiny_checkpoint)[1].classes
    target = align_label_raster(LABEL_RASTER, NC_SCENE, schema)
    pred = np.full(pred_ids.shape, 255, np.uint8)
    for k, cid in enumerate(schema.ids):
        pred[pred_ids == cid] = k
    scored = (target != 255) & (pred != 255)
    cm = np.zeros((7, 7), np.int64)
    np.add.at(cm, (target[scored], pred[scored]), 1)
    assert m["confusion_matrix"] == cm.tolist()
    assert m["labelled_pixels"] == int(scored.sum()) > 1000
    assert m["labelled_without_data"] == int(((target != 255) & (pred == 255)).sum())
    assert m["pixel_accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    present = (cm.sum(0) + cm.sum(1)) > 0
    iou = np.diag(cm) / np.maximum(cm.sum(0) + cm.sum(1) - np.diag(cm), 1)
    assert m["miou_macro"] == pytest.approx(iou[present].mean(), abs=1e-6)
    f1 = 2 * np.diag(cm) / np.maximum(cm.sum(0) + cm.sum(1), 1)
    assert [v for v in m["f1"] if v is not None] == pytest.approx(f1[present].tolist())
    assert json.loads((tmp_path / "evaluation.json").read_text())["miou_macro"] == m["miou_macro"]
    for png in ("confusion", "comparison"):
        assert open(result.files[png], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "lsat7_2000_6band_polygons.gpkg").exists()


def test_vector_labels_are_burnt_onto_the_scene_grid(tiny_checkpoint):
    from geoseg.checkpoint import load_checkpoint
    from geoseg.train.labels import rasterize_labels

    m = evaluate(NC_SCENE, LABEL_POLYGONS, tiny_checkpoint, config=CFG).metrics
    burnt = rasterize_labels(LABEL_POLYGONS, NC_SCENE, load_checkpoint(tiny_checkpoint)[1].classes)
    assert m["labelled_pixels"] + m["labelled_without_data"] == int((burnt != 255).sum()) > 1000
    with rasterio.open(NC_SCENE) as src:
        valid = np.all(src.read_masks() > 0, axis=0)
    rows = np.array(m["confusion_matrix"]).sum(axis=1)
    assert rows.tolist() == [int(((burnt == k) & valid).sum()) for k in range(7)]


def test_cli_prints_scores_and_files(tiny_checkpoint, tmp_path):
    finished = run(cli("evaluate", NC_SCENE, LABEL_RASTER, "-c", tiny_checkpoint, "-o", tmp_path), timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.startswith("macro mIoU ") and "forest" in finished.stdout
    assert str(tmp_path / "evaluation.json") in finished.stdout


def test_labels_off_the_scene_are_one_clear_line_before_any_work(tiny_checkpoint, tmp_path):
    zion = ROOT / "data" / "zion-landsat8-nlcd" / "nlcd_train.tif"  # Utah, the scene is North Carolina
    finished = run(cli("evaluate", NC_SCENE, zion, "-c", tiny_checkpoint, "-o", tmp_path / "e"), timeout=120)
    assert finished.returncode == 2 and "no labelled pixel" in finished.stderr
    assert len(finished.stderr.strip().splitlines()) == 1 and not (tmp_path / "e").exists()
