"""The training recipe's parts: class-balanced tiles, the Dice loss, several scenes on one ground
split, per-scene normalisation, and whole-scene scoring through the predict path."""

import numpy as np
import pytest
import rasterio
import torch
import yaml
from conftest import NC_SCENE, make_tiny_checkpoint, random_scene, write_geotiff
from rasterio.transform import from_origin

from geoseg.checkpoint import load_checkpoint
from geoseg.config import PredictConfig, TrainConfig
from geoseg.pipeline import predict_raster
from geoseg.predict import Predictor
from geoseg.train import load_training_data, make_data_split
from geoseg.train.datasets import LabelledImage
from geoseg.train.losses import soft_dice_loss
from geoseg.train.scoring import predict_image
from geoseg.train.splits import TileSampler

CLASSES = "configs/classes/nc_landcover.yaml"


def test_balanced_sampling_shows_a_rare_class_as_often_as_a_common_one():
    lab = np.zeros((300, 300), np.uint8)
    lab[140:150, 140:150] = 1  # 100 px of 90,000
    def share(balance):
        tiles = TileSampler([lab], 32, 2, balance).sample(2000, np.random.default_rng(0))
        return np.mean([(lab[t.y0 : t.y1, t.x0 : t.x1] == 1).any() for _, t in tiles])
    assert share(0.0) < 0.05  # by frequency: tiles near the patch only by chance
    assert 0.45 < share(1.0) < 0.7  # a class drawn uniformly: the rare one in about half the tiles


def test_soft_dice_is_zero_when_right_and_ignores_unlabelled_pixels():
    target = torch.tensor([[[0, 1], [2, 255]]])
    right = torch.nn.functional.one_hot(torch.tensor([[[0, 1], [2, 2]]]), 3).permute(0, 3, 1, 2).float() * 50
    assert soft_dice_loss(right, target, 255) == pytest.approx(0.0, abs=1e-3)
    wrong = right.roll(1, dims=1)
    assert soft_dice_loss(wrong, target, 255) > 0.6  # (0 + 1) / (2 + 1) per class with DICE_SMOOTH 1
    other = right.clone()
    other[0, :, 1, 1] = torch.tensor([50.0, 0, 0])  # changing an ignored pixel changes nothing
    assert soft_dice_loss(other, target, 255) == pytest.approx(float(soft_dice_loss(right, target, 255)))


@pytest.fixture(scope="module")
def two_views(tmp_path_factory):
    """One place seen twice: a named 3-band scene and a 4-band crop of it (no band names) shifted by
    (10, 7) px, with dense labels of 3 classes on each grid."""
    d = tmp_path_factory.mktemp("views")
    img = random_scene((3, 160, 200), "uint8", seed=7)
    ids = (np.digitize(img[0], np.percentile(img[0], [33, 66])) + 1).astype(np.uint8)
    t = from_origin(500000.0, 4600000.0, 10.0, 10.0)
    a = write_geotiff(d / "a.tif", img, transform=t, band_names=["red", "green", "blue"])
    la = write_geotiff(d / "la.tif", ids, transform=t, nodata=0)
    crop = (slice(10, 150), slice(7, 190))
    extra = np.concatenate([img[:, crop[0], crop[1]], img[:1, crop[0], crop[1]]])  # a 4th band to leave out
    tb = from_origin(500000.0 + 70, 4600000.0 - 100, 10.0, 10.0)
    b = write_geotiff(d / "b.tif", extra, transform=tb)
    lb = write_geotiff(d / "lb.tif", ids[crop], transform=tb, nodata=0)
    classes = d / "classes.yaml"
    classes.write_text(yaml.safe_dump({"name": "t", "classes": [
        {"id": k, "name": n, "color": "#102030"} for k, n in ((1, "low"), (2, "mid"), (3, "high"))]}))
    return TrainConfig.model_validate({
        "data": {"kind": "scenes", "classes": str(classes), "scenes": [
            {"image": str(a), "labels": str(la)}, {"image": str(b), "labels": str(lb), "bands": [1, 2, 3]}]},
        "split_block": 32, "seed": 3})


def test_several_scenes_share_one_split_on_the_ground(two_views):
    data = load_training_data(two_views)
    assert data.band_names == ("red", "green", "blue") and data.images[1].bands == (1, 2, 3)
    split = make_data_split(two_views, data)
    assert split.offsets == ((0, 0), (22, 25))  # b's block edges fall on a's: (32 - 10, 32 - 7)
    parts = []
    for i, im in enumerate(data.images):
        p = np.full(im.shape, -1)
        for u in split.units:
            if u.image == i:
                p[u.box.y0 : u.box.y1, u.box.x0 : u.box.x1] = u.part
        parts.append(p)
    assert (parts[1] == parts[0][10:150, 7:190]).all()  # every place is in the same part in both scenes
    assert len(np.unique(parts[1])) == 3


def test_bad_multi_scene_configs_are_refused(two_views):
    with pytest.raises(ValueError, match="kind 'scenes'"):
        TrainConfig.model_validate({"data": {"kind": "scenes", "classes": CLASSES}})
    data = two_views.data.model_dump()
    data["scenes"][1]["bands"] = [1, 2]
    with pytest.raises(Exception, match="same bands"):
        load_training_data(two_views.model_copy(update={"data": type(two_views.data).model_validate(data)}))


def test_scene_normalisation_maps_a_brighter_scene_the_same(tmp_path):
    """A 'scene' contract normalises each scene with its own statistics: the same land at another
    gain and offset (another season, another sensor) gives the same map; a 'fixed' one does not."""
    with rasterio.open(NC_SCENE) as src:
        bands, profile = src.read().astype(np.float32), src.profile
    valid = bands.all(axis=0)
    bright = np.where(valid, bands * 1.8 + 20, 0).astype(np.float32)
    profile.update(dtype="float32")
    with rasterio.open(tmp_path / "bright.tif", "w", **profile) as dst:
        dst.write(bright)
    with rasterio.open(tmp_path / "plain.tif", "w", **profile) as dst:
        dst.write(bands)
    maps = {}
    for norm in ("scene", "fixed"):
        ckpt = make_tiny_checkpoint(tmp_path / f"{norm}.pt", tmp_path / "plain.tif", normalisation=norm)
        for name in ("plain", "bright"):
            out = predict_raster(tmp_path / f"{name}.tif", ckpt, tmp_path / f"{norm}-{name}",
                                 config=PredictConfig(vectorize=False))
            with rasterio.open(out.outputs["class_map"]) as src:
                maps[norm, name] = src.read(1)
    assert np.mean(maps["scene", "plain"] == maps["scene", "bright"]) > 0.995
    assert np.mean(maps["fixed", "plain"] == maps["fixed", "bright"]) < 0.95


def test_training_scores_are_the_predicted_map(tiny_checkpoint, tmp_path):
    """Whole-scene scoring in memory gives exactly the class map `geoseg predict` writes."""
    model, contract = load_checkpoint(tiny_checkpoint)
    with rasterio.open(NC_SCENE) as src:
        shape = src.shape
    image = LabelledImage("nc", NC_SCENE, np.zeros(shape, np.uint8), contract.band_names, "uint8")
    pred = predict_image(Predictor(model, contract), image, contract)
    out = predict_raster(NC_SCENE, tiny_checkpoint, tmp_path, config=PredictConfig(vectorize=False))
    with rasterio.open(out.outputs["class_map"]) as src:
        written = src.read(1)
    ids = np.array(contract.classes.ids + (255,) * (256 - len(contract.classes.ids)), np.uint8)
    np.testing.assert_array_equal(ids[pred], written)


def test_scoring_predicts_only_blocks_with_pixels_to_score(tiny_checkpoint):
    model, contract = load_checkpoint(tiny_checkpoint)
    with rasterio.open(NC_SCENE) as src:
        shape = src.shape
    image = LabelledImage("nc", NC_SCENE, np.zeros(shape, np.uint8), contract.band_names, "uint8")
    predictor = Predictor(model, contract)
    where = np.zeros(shape, bool)
    where[200:210, 240:250] = True  # land in the middle of the scene
    part, whole = predict_image(predictor, image, contract, where=where), predict_image(predictor, image, contract)
    predicted = part != 255
    assert predicted[where].all() and predicted.mean() < 0.5
    np.testing.assert_array_equal(part[predicted], whole[predicted])  # the blocking does not change the map


def test_an_upsampled_network_maps_at_the_input_size_and_survives_its_checkpoint(tmp_path):
    from geoseg.checkpoint import contract_for, save_checkpoint
    from geoseg.config import ModelConfig, load_config
    from geoseg.models import Upsampled, build_model

    mc = ModelConfig(arch="deeplabv3", backbone="mobilenet_v3_large", output_stride=8, tile_size=64, upsample=2)
    torch.manual_seed(0)
    model = build_model(mc.arch, mc.backbone, 4, 8, mc.output_stride, upsample=mc.upsample).eval()
    assert isinstance(model, Upsampled) and model.factor == 2
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 8, 64, 64)
    contract = contract_for(mc, band_names=["b", "g", "r", "n"], mean=[0.0] * 4, std=[1.0] * 4,
                            classes=load_config("configs/classes/nlcd8.yaml"))
    back, loaded = load_checkpoint(save_checkpoint(tmp_path / "u.pt", model, contract))
    assert loaded.upsample == 2
    with torch.no_grad():
        torch.testing.assert_close(back(x), out)
