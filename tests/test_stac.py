"""A STAC Item as a scene: band assets matched by common name, mixed resolutions on the finest grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import NC_SCENE
from processes import cli, run
from servers import http_files

from geoseg.config import PredictConfig
from geoseg.errors import InvalidSceneError
from geoseg.pipeline import predict_raster
from geoseg.raster import open_scene, read_window
from geoseg.tiling import Box

COMMON = ("blue", "green", "red", "nir", "swir16", "swir22")
CFG = PredictConfig(block_size=256, vectorize=True, workers=1)


def write_band(path: Path, data: np.ndarray, src: rasterio.DatasetReader, factor: int = 1) -> None:
    """One band as a tiled GeoTIFF on the scene's grid, or on a grid ``factor`` times coarser."""
    profile = dict(driver="GTiff", width=data.shape[1], height=data.shape[0], count=1, dtype=data.dtype.name,
                   crs=src.crs, transform=src.transform * src.transform.scale(factor), tiled=True, blockxsize=128,
                   blockysize=128, compress="deflate", nodata=src.nodata)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)


def make_item(folder: Path, *, coarse: tuple[str, ...] = (), item_id: str = "LE07_nc_2000") -> Path:
    """The NC sample as a STAC Item of six single-band assets (relative hrefs); ``coarse`` bands at 2x pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    assets = {}
    with rasterio.open(NC_SCENE) as src:
        for i, common in enumerate(COMMON, start=1):
            data = src.read(i)
            factor = 2 if common in coarse else 1
            write_band(folder / f"B{i}.tif", data[::factor, ::factor], src, factor)
            assets[f"B{i}"] = {"href": f"./B{i}.tif", "type": "image/tiff; application=geotiff", "roles": ["data"],
                               "eo:bands": [{"name": f"B{i}", "common_name": common}]}
        bounds = list(src.bounds)
    assets["thumbnail"] = {"href": "./thumb.png", "type": "image/png", "roles": ["thumbnail"]}
    item = {"type": "Feature", "stac_version": "1.0.0", "id": item_id,
            "stac_extensions": ["https://stac-extensions.github.io/eo/v1.1.0/schema.json"],
            "geometry": None, "bbox": bounds, "properties": {"datetime": "2000-01-01T00:00:00Z"},
            "links": [], "assets": assets}
    path = folder / "item.json"
    path.write_text(json.dumps(item))
    return path


def test_an_item_predicts_as_the_multiband_file_does(tiny_checkpoint, tmp_path):
    item = make_item(tmp_path / "item")
    info = open_scene(item)
    assert info.stem == "LE07_nc_2000" and info.band_names == ("blue", "green", "red", "nir", "swir1", "swir2")
    with http_files(tmp_path / "item") as (base, served):
        predict_raster(f"{base}/item.json", tiny_checkpoint, tmp_path / "via_item", config=CFG)
    predict_raster(NC_SCENE, tiny_checkpoint, tmp_path / "via_file", config=CFG)
    for name in ("classes.tif", "confidence.tif"):
        got = (tmp_path / "via_item" / f"LE07_nc_2000_{name}").read_bytes()
        assert got == (tmp_path / "via_file" / f"{NC_SCENE.stem}_{name}").read_bytes()
    assert served.bytes_of("B1.tif") > 0 and served.whole_gets("B1.tif") == 0  # windows only
    summary = json.loads((tmp_path / "via_item" / "summary.json").read_text())
    assert summary["scene"]["path"] == f"{base}/item.json"


def test_coarser_bands_are_read_onto_the_finest_grid_nearest(tmp_path):
    item = make_item(tmp_path / "item", coarse=("swir16", "swir22"))
    info, reference = open_scene(item), open_scene(NC_SCENE)
    assert (info.shape, info.transform, info.crs) == (reference.shape, reference.transform, reference.crs)
    with rasterio.open(info.opens) as src:
        data, valid = read_window(src, Box(0, 0, *info.shape), dtype=None)
    with rasterio.open(NC_SCENE) as src:
        original = src.read()
    np.testing.assert_array_equal(data[:4], original[:4])
    for b in (4, 5):  # each 2x2 block of fine pixels holds its coarse pixel
        coarse = original[b, ::2, ::2]
        np.testing.assert_array_equal(data[b], np.repeat(np.repeat(coarse, 2, 0), 2, 1)[: info.height, : info.width])
    np.testing.assert_array_equal(valid, (data != 0).all(axis=0))  # each band's nodata (0) carried over


def test_items_that_cannot_be_a_scene_fail_in_one_line(tiny_checkpoint, tmp_path):
    collection = tmp_path / "collection.json"
    collection.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with pytest.raises(InvalidSceneError, match="an ItemCollection"):
        open_scene(collection)
    item = make_item(tmp_path / "item")
    doc = json.loads(item.read_text())
    for asset in doc["assets"].values():
        asset.pop("eo:bands", None)
    bare = tmp_path / "item" / "bare.json"
    bare.write_text(json.dumps(doc))
    finished = run(cli("predict", bare, "-c", tiny_checkpoint, "-o", tmp_path / "out"), timeout=120)
    assert finished.returncode == 2
    assert finished.stderr.strip().splitlines() == [
        f"error: {bare}: no asset lists its bands (eo:bands or bands). Describe the band assets, or pass the raster "
        "itself."]
    assert not (tmp_path / "out").exists()
    with rasterio.open(item.parent / "B2.tif", "r+") as band:
        band.crs = "EPSG:32617"
    with pytest.raises(InvalidSceneError, match="2 different CRSs"):
        open_scene(item)


def test_an_item_collection_is_a_batch_inbox_of_its_items(tiny_checkpoint, tmp_path):
    from geoseg.inbox import take_inventory

    item = make_item(tmp_path / "item")
    doc = json.loads(item.read_text())
    doc["links"] = [{"rel": "self", "href": "./item/item.json"}]
    collection = tmp_path / "collection.json"
    collection.write_text(json.dumps({"type": "FeatureCollection", "features": [doc]}))
    [scene] = take_inventory(str(collection), tiny_checkpoint, tmp_path / "out", CFG)[0]
    assert (scene.scene, scene.status) == (str(item), "todo")
    assert Path(scene.out_dir).parent == tmp_path / "out"
    doc["links"] = []
    collection.write_text(json.dumps({"type": "FeatureCollection", "features": [doc]}))
    with pytest.raises(InvalidSceneError, match="has no 'self' link"):
        take_inventory(str(collection), tiny_checkpoint, tmp_path / "out", CFG)
