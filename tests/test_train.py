"""Training: metrics, spatial split, loss goes down, exact resume, comparison report, the Prefect flow."""

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import flow_run_artifacts

from geoseg.checkpoint import load_checkpoint
from geoseg.config import ModelConfig, TrainConfig
from geoseg.tiling import Box
from geoseg.train import train
from geoseg.train.metrics import SegmentationMetrics
from geoseg.train.splits import PARTS, Split, TileSampler, make_split, part_labels

TINY = {"arch": "tiny", "backbone": "none", "tile_size": 32}


def _config(data, **kw):
    base = {"data": data, "model": TINY, "epochs": 3, "batch_size": 4, "tiles_per_epoch": 8, "lr": 0.01,
            "split_block": 32, "device": "cpu", "early_stopping": None, "seed": 1}
    base.update(kw)
    return TrainConfig.model_validate(base)


def test_metrics_match_hand_computed_confusion_matrix():
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 255, 255])
    preds = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2])
    m = SegmentationMetrics(4, ignore_index=255)
    m.update(preds[:4], target[:4])
    m.update(preds[4:], target[4:])
    r = m.compute(["a", "b", "c", "d"])
    cm = [[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert r["confusion_matrix"] == cm
    # IoU = TP / (TP + FP + FN): a 2/(2+1+1), b 1/(1+1+1), c 1/(1+1+1); d absent from labels and predictions
    iou = [2 / 4, 1 / 3, 1 / 3]
    assert r["iou"][:3] == pytest.approx(iou) and r["iou"][3] is None
    assert r["miou_macro"] == pytest.approx(np.mean(iou))  # macro over present classes, not micro
    assert r["pixel_accuracy"] == pytest.approx(4 / 7)  # the two ignored pixels count nowhere
    assert r["iou_by_class"]["b"] == pytest.approx(1 / 3) and r["labelled_pixels"] == 7


def _sparse_labels():
    lab = np.full((200, 260), 255, np.uint8)
    rng = np.random.default_rng(0)
    for k in range(40):  # small 'polygons' of 3 classes, some straddling block borders
        y, x = rng.integers(0, 190), rng.integers(0, 250)
        lab[y : y + 9, x : x + 9] = k % 3
    return lab


def test_split_is_spatially_disjoint_seeded_and_saved(tmp_path):
    lab = _sparse_labels()
    split = make_split([lab], ["scene"], num_classes=3, block=32, seed=4)
    assert split == make_split([lab], ["scene"], num_classes=3, block=32, seed=4)
    # blocks partition the scene and every part has labelled pixels of every class
    area = sum(b.height * b.width for _, b in (u for p in PARTS for u in split.boxes(p)))
    assert area == lab.size
    summary = split.summary([lab], 3)
    for p in PARTS:
        assert all(n > 0 for n in summary[p]["labelled_pixels"]), summary
    # a labelled region never spans two parts
    from scipy import ndimage

    part = np.zeros(lab.shape, int)
    for u in split.units:
        part[u.box.y0 : u.box.y1, u.box.x0 : u.box.x1] = u.part
    comp, n = ndimage.label(lab != 255, structure=np.ones((3, 3)))
    for c in range(1, n + 1):
        assert len(np.unique(part[comp == c])) == 1
    # training tiles see only train labels, over many draws; they may reach into held-out blocks for context
    train_lab = part_labels(split, [lab], "train")[0]
    held = split.boxes("val") + split.boxes("test")
    for _, b in held:
        assert (train_lab[b.y0 : b.y1, b.x0 : b.x1] == 255).all()
    assert (train_lab != 255).sum() == sum(summary["train"]["labelled_pixels"])
    tiles = TileSampler([train_lab], 48, 3).sample(2000, np.random.default_rng(0))
    assert len(set(tiles)) > 100
    for _, t in tiles:
        assert t.shape == (48, 48) and 0 <= t.y0 and t.y1 <= 200 and 0 <= t.x0 and t.x1 <= 260
        assert (train_lab[t.y0 : t.y1, t.x0 : t.x1] != 255).any()
    # JSON round trip
    assert Split.load(split.save(tmp_path / "split.json")) == split
    assert json.loads((tmp_path / "split.json").read_text())["block"] == 32


def test_split_by_file():
    labels = [np.full((8, 8), k % 3, np.uint8) for k in range(20)]
    split = make_split(labels, [f"t{k}" for k in range(20)], num_classes=3, block=None, seed=0)
    assert {u.box for u in split.units} == {Box(0, 0, 8, 8)}
    assert all(split.boxes(p) for p in PARTS)
    assert Split.from_dict(split.to_dict()) == split


def test_a_few_steps_lower_the_loss(tiny_data, tmp_path):
    result = train(_config(tiny_data, epochs=4, tiles_per_epoch=16), out_dir=tmp_path)
    first, last = np.mean(result.losses[:4]), np.mean(result.losses[-4:])
    assert last < 0.8 * first, result.losses
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert result.history[0]["lr"] == 0.01 and result.history[-1]["lr"] < 0.01  # poly schedule
    model, contract = load_checkpoint(result.best)
    assert contract.band_names == ("red", "green", "blue") and contract.tile_size == 32
    assert contract.classes.names == ("low", "mid", "high") and contract.scale == pytest.approx(1 / 255)
    prov = contract.provenance
    assert prov["metrics"]["test"]["miou_macro"] == result.test["miou_macro"]
    assert prov["split"]["block"] == 32 and prov["data"]["labels"] == tiny_data["labels"] and prov["seed"] == 1
    metrics = json.loads(result.metrics_file.read_text())
    assert metrics["test"]["confusion_matrix"] and metrics["best_epoch"] == result.best_epoch
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(Exception, match="already holds"):
        train(_config(tiny_data), out_dir=tmp_path)


class _Stop(Exception):
    pass


def test_resume_continues_exactly(tiny_data, tmp_path):
    cfg = _config(tiny_data, epochs=3, accumulate=2, class_weights=True)
    full = train(cfg, out_dir=tmp_path / "full")

    def stop_after_first(row):
        if row["epoch"] == 1:
            raise _Stop

    with pytest.raises(_Stop):
        train(cfg, out_dir=tmp_path / "cut", progress=stop_after_first)
    resumed = train(cfg, out_dir=tmp_path / "cut", resume=True)
    n = len(full.losses) // 3
    assert len(resumed.losses) == len(full.losses)
    np.testing.assert_allclose(resumed.losses[n], full.losses[n], rtol=0, atol=1e-6)  # the next step
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=0, atol=1e-6)
    a = torch.load(full.last, weights_only=True)["state_dict"]
    b = torch.load(resumed.last, weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert resumed.epochs_run == 3 and [h["epoch"] for h in resumed.history] == [1, 2, 3]
    with pytest.raises(Exception, match="different settings"):
        train(_config(tiny_data, epochs=3, lr=0.5), out_dir=tmp_path / "cut", resume=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_amp_trains_and_resumes(tiny_data, tmp_path):
    cfg = _config(tiny_data, epochs=2, device="cuda", amp=True)
    result = train(cfg, out_dir=tmp_path)
    assert result.device.startswith("cuda") and np.isfinite(result.losses).all()
    assert train(cfg, out_dir=tmp_path, resume=True).epochs_run == 2


def test_compare_writes_table_and_figure(tiny_data, tmp_path):
    from geoseg.train.compare import compare

    cfg = _config(tiny_data, epochs=1, compare=[ModelConfig(**TINY), ModelConfig(**TINY, output_stride=8)])
    res = compare(cfg, out_dir=tmp_path, figure_tiles=2)
    assert [r["model"] for r in res.rows] == ["tiny-none", "tiny-none-1"]
    assert res.table_csv.read_text().splitlines()[0].startswith("model,miou_macro,pixel_accuracy,iou_low")
    assert "| tiny-none |" in res.table_md.read_text()
    assert res.figure.read_bytes()[:4] == b"\x89PNG"
    splits = {json.dumps(json.loads((tmp_path / n / "split.json").read_text())) for n in res.runs}
    assert len(splits) == 1  # every model saw the same split


@pytest.mark.slow
def test_train_flow_publishes_table_and_curves(harness, tiny_data, tmp_path):
    from flows.train import train as train_flow

    cfg_dir = tmp_path / "train"
    cfg_dir.mkdir()
    path = cfg_dir / "tiny.yaml"
    path.write_text(yaml.safe_dump(_config(tiny_data, epochs=2, out_dir=str(tmp_path / "run")).model_dump(mode="json")))
    state = train_flow(str(path), return_state=True)
    assert state.is_completed()
    out = state.result()
    assert out["epochs_run"] == 2 and (tmp_path / "run" / "best.pt").exists()
    artifacts = flow_run_artifacts(state.state_details.flow_run_id)
    by_key = {}
    for a in artifacts:
        by_key.setdefault(a.key, []).append(a)
    table = max(by_key["train-metrics"], key=lambda a: a.created).data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [r["epoch"] for r in rows] == [1, 2] and set(rows[0]) == {"epoch", "loss", "val_miou", "pixel_acc", "lr"}
    md = by_key["train-curves"][0].data
    assert "data:image/png;base64," in md
    scores = by_key["train-scores"][0].data
    scores = json.loads(scores) if isinstance(scores, str) else scores
    assert [r["class"] for r in scores[:3]] == ["low", "mid", "high"]
    assert scores[-1]["test_iou"] == round(out["test"]["miou_macro"], 4)  # the whole-scene test score
    assert scores[0]["test_iou"] == round(out["test"]["iou"][0], 4)
    assert "data:image/png;base64," in by_key["train-confusion"][0].data
