"""Labelled data: label encoding, vector rasterising, label-raster alignment, tile folders, tile tensors."""

import warnings

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from conftest import write_geotiff
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import from_origin
from shapely.geometry import box as shp_box

from geoseg.config import ClassSchema, DataConfig
from geoseg.errors import DatasetError
from geoseg.tiling import Box
from geoseg.train.augment import Augment
from geoseg.train.datasets import TileDataset, class_weights, load_labelled, pair_tiles
from geoseg.train.labels import align_label_raster, encode_labels, rasterize_labels

SCHEMA = ClassSchema(name="t", classes=[{"id": 1, "name": "a", "color": "#ff0000"},
                                        {"id": 2, "name": "b", "color": "#00ff00"},
                                        {"id": 5, "name": "c", "color": "#0000ff"}])
BINARY = ClassSchema(name="bin", classes=[{"id": 0, "name": "background", "color": "#000000"},
                                          {"id": 1, "name": "building", "color": "#ff0000"}])
X0, Y0 = 500000.0, 4600000.0  # the conftest grid: 10 m pixels from this top-left corner, EPSG:32633


def _schema_file(tmp_path, schema=SCHEMA):
    import yaml

    p = tmp_path / "classes.yaml"
    p.write_text(yaml.safe_dump(schema.model_dump(mode="json")))
    return p


@pytest.fixture
def scene10(tmp_path):
    """10x10 px, 2 bands, 10 m, EPSG:32633, nodata 0 in pixel (0, 0)."""
    data = np.full((2, 10, 10), 100, np.uint8)
    data[:, 0, 0] = 0
    return write_geotiff(tmp_path / "scene.tif", data, nodata=0)


def test_encode_maps_ids_to_channels_and_nodata_to_ignore():
    values = np.array([[1, 2, 5], [-9, 255, 1]])
    out = encode_labels(values, SCHEMA, nodata=-9)
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 1, 2], [255, 255, 0]]
    assert encode_labels(np.array([np.nan, 2.0]), SCHEMA).tolist() == [255, 1]


def test_values_outside_schema_raise_and_are_listed():
    with pytest.raises(DatasetError) as err:
        encode_labels(np.array([1, 3, 7, 3, 2]), SCHEMA, source="masks/x.tif")
    msg = str(err.value)
    assert "3, 7" in msg and "masks/x.tif" in msg and "[1, 2, 5]" in msg


def _square_gdf(crs="EPSG:32633", value=5, field="cls"):
    # x 20..50 m, y 30..60 m below the top: pixel centres inside are cols 2,3,4 and rows 3,4,5
    poly = shp_box(X0 + 20, Y0 - 60, X0 + 50, Y0 - 30)
    return gpd.GeoDataFrame({field: [value]}, geometry=[poly], crs="EPSG:32633").to_crs(crs)


@pytest.mark.parametrize("crs", ["EPSG:32633", "EPSG:4326"])
def test_vector_rasterising_matches_hand_computed_mask(tmp_path, scene10, crs):
    path = tmp_path / "labels.gpkg"
    _square_gdf(crs).to_file(path)
    out = rasterize_labels(path, scene10, SCHEMA, label_field="cls")
    expected = np.full((10, 10), 255, np.uint8)
    expected[3:6, 2:5] = 2  # class id 5 is channel 2
    np.testing.assert_array_equal(out, expected)


def test_vector_background_names_and_constant_value(tmp_path, scene10):
    path = tmp_path / "labels.geojson"
    _square_gdf(value="c", field="name").to_file(path)
    out = rasterize_labels(path, scene10, SCHEMA, label_field="name")  # class names work too
    assert (out == 2).sum() == 9
    out = rasterize_labels(path, scene10, BINARY, label_value=1, background=0)
    assert (out == 1).sum() == 9 and (out == 0).sum() == 91
    # a binary schema with a background class and no label field: every polygon is the other class
    out = rasterize_labels(path, scene10, BINARY, label_field="id", background=0)
    assert (out == 1).sum() == 9


def test_vector_values_outside_schema_raise(tmp_path, scene10):
    path = tmp_path / "labels.gpkg"
    _square_gdf(value=9).to_file(path)
    with pytest.raises(DatasetError, match="9"):
        rasterize_labels(path, scene10, SCHEMA, label_field="cls")
    with pytest.raises(DatasetError, match="no field 'nope'"):
        rasterize_labels(path, scene10, SCHEMA, label_field="nope")


def test_label_raster_on_another_grid_is_aligned_nearest(tmp_path, scene10):
    rng = np.random.default_rng(0)
    ids = rng.choice([1, 2, 5], size=(10, 10)).astype(np.int16)
    ids[9, 9] = -1
    fine = np.kron(ids, np.ones((2, 2), np.int16))  # 5 m pixels, same extent
    path = write_geotiff(tmp_path / "lab5m.tif", fine, nodata=-1, transform=from_origin(X0, Y0, 5.0, 5.0))
    out = align_label_raster(path, scene10, SCHEMA)
    expected = encode_labels(ids, SCHEMA, nodata=-1)
    np.testing.assert_array_equal(out, expected)
    assert out[9, 9] == 255


def test_scene_nodata_pixels_are_ignored(tmp_path, scene10):
    labels = write_geotiff(tmp_path / "lab.tif", np.full((10, 10), 2, np.uint8))
    cfg = DataConfig(kind="scene_raster", images=str(scene10), labels=str(labels), classes=str(_schema_file(tmp_path)))
    data = load_labelled(cfg)
    lab = data.images[0].labels
    assert lab[0, 0] == 255 and (lab == 1).sum() == 99
    assert data.band_names == ("band_1", "band_2") and data.class_counts().tolist() == [0, 99, 0]


def _tile_folder(tmp_path, n=3, mask_ext=".png"):
    imgs, msks = tmp_path / "images", tmp_path / "masks"
    imgs.mkdir()
    msks.mkdir()
    for k in range(n):
        write_geotiff(imgs / f"t{k}.tif", np.full((3, 8, 8), 10 * k + 1, np.uint8))
        mask = np.full((8, 8), [1, 2, 5][k % 3], np.uint8)
        mask[0] = 255
        with warnings.catch_warnings():  # PNG masks carry no georeferencing, on purpose
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(msks / f"t{k}{mask_ext}", "w", driver="PNG" if mask_ext == ".png" else "GTiff",
                               width=8, height=8, count=1, dtype="uint8") as dst:
                dst.write(mask, 1)
    return imgs, msks


def test_tile_folder_pairs_images_and_masks(tmp_path):
    imgs, msks = _tile_folder(tmp_path)
    pairs = pair_tiles(imgs, msks)
    assert [(a.name, b.name) for a, b in pairs] == [("t0.tif", "t0.png"), ("t1.tif", "t1.png"), ("t2.tif", "t2.png")]
    cfg = DataConfig(kind="tiles", images=str(imgs), labels=str(msks), classes=str(_schema_file(tmp_path)))
    data = load_labelled(cfg)
    assert [im.name for im in data.images] == ["t0", "t1", "t2"]
    for k, im in enumerate(data.images):
        assert (im.labels[0] == 255).all() and (im.labels[1:] == k).all()
        x, valid = im.read(Box(0, 0, 8, 8))
        assert x.shape == (3, 8, 8) and valid.all() and (x == 10 * k + 1).all()
    (msks / "t1.png").unlink()
    with pytest.raises(DatasetError, match="t1"):
        pair_tiles(imgs, msks)


def test_tile_dataset_normalises_and_augments_deterministically(tmp_path):
    imgs, msks = _tile_folder(tmp_path, n=1, mask_ext=".tif")
    data = load_labelled(DataConfig(kind="tiles", images=str(imgs), labels=str(msks),
                                    classes=str(_schema_file(tmp_path))))
    boxes = [(0, Box(0, 0, 8, 8)), (0, Box(-2, -2, 6, 6))]
    ds = TileDataset(data, boxes, mean=[1.0] * 3, std=[2.0] * 3)
    x, y = ds[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.allclose(x, torch.zeros_like(x)) and (y[1:] == 0).all() and (y[0] == 255).all()
    x1, y1 = ds[1]  # reaches past the tile: mirrored image is invalid (0) and its labels ignored
    assert (y1[:2] == 255).all() and (y1[:, :2] == 255).all() and (x1[:, :2] == 0).all()
    aug = TileDataset(data, boxes, mean=[1.0] * 3, std=[2.0] * 3, augment=Augment(), seed=(3, 1))
    a, b = aug[0], aug[0]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].shape == (3, 8, 8)
    assert set(a[1].unique().tolist()) <= {0, 255}


def test_augment_keeps_pixels_and_labels_together():
    x = torch.arange(16.0).reshape(1, 4, 4).repeat(2, 1, 1)
    y = torch.arange(16).reshape(4, 4)
    aug = Augment(scale=None, brightness=0.0, contrast=0.0)
    for seed in range(8):
        xa, ya = aug(x, y, np.random.default_rng(seed), 255)
        assert torch.equal(xa[0].long(), ya) and torch.equal(xa[1].long(), ya)
    xz, yz = Augment(flips=False, rotate90=False, scale=(0.5, 0.5), brightness=0, contrast=0)(
        torch.ones(1, 8, 8), torch.zeros(8, 8, dtype=torch.long), np.random.default_rng(0), 255)
    assert (yz == 0).sum() == 16 and (yz == 255).sum() == 48 and xz.sum() == 16


def test_class_weights_inverse_frequency():
    w = class_weights(np.array([100, 300, 0, 600]))
    np.testing.assert_allclose(w[[0, 1, 3]] / w[3], [6, 2, 1])
    assert w[2] == 0 and w[[0, 1, 3]].mean() == pytest.approx(1)
