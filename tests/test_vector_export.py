"""Streaming polygon writers: GeoPackage, Shapefile and GeoParquet, atomic and refusing to overwrite."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely
from conftest import write_geotiff
from pyproj import CRS

from geoseg.errors import GeosegError, OutputExistsError, VectorExportError
from geoseg.vector import vectorize
from geoseg.vector.attributes import FIELDS
from geoseg.vector.writer import VectorWriter, infer_driver

FORMATS = ["o.gpkg", "o.shp", "o.parquet"]


def batch(start: int, n: int, crs: str = "EPSG:32633") -> gpd.GeoDataFrame:
    ids = np.arange(start, start + n)
    geoms = [shapely.box(i * 10.0, 0.0, i * 10.0 + 10.0, 10.0 + i) for i in ids]
    return gpd.GeoDataFrame(
        {
            "class_id": (ids % 5).astype("int32"),
            "class_name": [f"clåss {i % 5}" for i in ids],
            "area_m2": [g.area for g in geoms],
            "perim_m": [g.length for g in geoms],
        },
        geometry=geoms,
        crs=crs,
    )


def read(path) -> gpd.GeoDataFrame:
    return gpd.read_parquet(path) if path.suffix == ".parquet" else gpd.read_file(path)


def canon(geoms) -> list[bytes]:
    return sorted(shapely.to_wkb(shapely.normalize(np.asarray(list(geoms), dtype=object))).tolist())


@pytest.mark.parametrize("name", FORMATS)
def test_batches_read_back_with_crs_and_fields(tmp_path, name):
    path = tmp_path / name
    parts = [batch(0, 3), batch(3, 4), batch(7, 1)]
    with VectorWriter(path, crs="EPSG:32633") as w:
        for b in parts:
            w.write(b)
        assert not path.exists()  # only the temporary file exists until the end
    assert w.features == 8
    got = read(path)
    want = gpd.GeoDataFrame(pd_concat(parts), crs="EPSG:32633")
    assert got.crs == CRS.from_epsg(32633)
    assert canon(got.geometry) == canon(want.geometry)
    assert list(got.columns) == ["class_id", "class_name", "area_m2", "perim_m", "geometry"]
    assert sorted(got.class_name) == sorted(want.class_name)
    assert np.allclose(sorted(got.perim_m), sorted(want.perim_m))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected_files(name))


def pd_concat(parts):
    import pandas as pd

    return pd.concat(parts, ignore_index=True)


def expected_files(name: str) -> list[str]:
    if name.endswith(".shp"):
        return [f"o{ext}" for ext in (".shp", ".shx", ".dbf", ".prj", ".cpg", ".qix")]
    return [name]


def test_arrow_batches_and_geoparquet_metadata(tmp_path):
    path = tmp_path / "o.parquet"
    b = batch(0, 5)
    table = pa.table(
        {"class_id": pa.array(b.class_id), "geometry": pa.array(shapely.to_wkb(b.geometry.values))}
    )
    with VectorWriter(path, crs="EPSG:4326", fields={"class_id": "int32"}) as w:
        w.write(table)
        w.write(table.slice(0, 2))
    geo = json.loads(pq.read_schema(path).metadata[b"geo"])
    assert geo["primary_column"] == "geometry"
    assert geo["columns"]["geometry"]["encoding"] == "WKB"
    assert geo["columns"]["geometry"]["geometry_types"] == ["Polygon"]
    assert CRS.from_json_dict(geo["columns"]["geometry"]["crs"]) == CRS.from_epsg(4326)
    got = gpd.read_parquet(path)
    assert len(got) == 7 and got.crs == CRS.from_epsg(4326)
    # WKB gets no min/max statistics (copies of a huge polygon's bytes); the attributes do
    columns = pq.ParquetFile(path).metadata.row_group(0)
    stats = {columns.column(i).path_in_schema: columns.column(i).is_stats_set for i in range(columns.num_columns)}
    assert stats == {"class_id": True, "geometry": False}


@pytest.mark.parametrize("name", FORMATS)
def test_failure_inside_the_block_leaves_nothing(tmp_path, name):
    with pytest.raises(RuntimeError, match="boom"), VectorWriter(tmp_path / name, crs="EPSG:32633") as w:
        w.write(batch(0, 3))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", FORMATS)
def test_existing_output_refused_then_replaced(tmp_path, name):
    path = tmp_path / name
    with VectorWriter(path, crs="EPSG:32633") as w:
        w.write(batch(0, 2))
    stale = tmp_path / "o.sbn"  # an ArcGIS index the new file does not have
    if name.endswith(".shp"):
        stale.write_bytes(b"old index")
    with pytest.raises(OutputExistsError, match="overwrite") as info:
        VectorWriter(path, crs="EPSG:32633")
    assert isinstance(info.value, GeosegError) and isinstance(info.value, FileExistsError)
    with VectorWriter(path, crs="EPSG:32633", overwrite=True) as w:
        w.write(batch(10, 5))
    assert len(read(path)) == 5
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected_files(name))
    if name.endswith(".shp"):  # the spatial index is the new file's: 5 features in one QIX tree
        assert (tmp_path / "o.qix").read_bytes()[:3] == b"SQT"


@pytest.mark.parametrize("name", ["o.gpkg", "o.shp"])
def test_gdal_failure_while_streaming_is_reported(tmp_path, monkeypatch, name):
    import pyogrio

    def failing(reader, *args, **kwargs):
        next(iter(reader))  # takes the first batch, then the "disk" fails
        raise pyogrio.errors.DataSourceError("No space left on device")

    monkeypatch.setattr(pyogrio, "write_arrow", failing)
    with pytest.raises(VectorExportError, match="No space left"):
        with VectorWriter(tmp_path / name, crs="EPSG:32633") as w:
            for i in range(50):
                w.write(batch(i, 1))
    assert list(tmp_path.iterdir()) == []


def test_shapefile_over_the_size_limit_is_refused(tmp_path):
    path = tmp_path / "big.shp"
    with pytest.raises(VectorExportError, match="GeoPackage") as info:
        with VectorWriter(path, crs="EPSG:32633", max_shapefile_bytes=4000) as w:
            for i in range(100):
                w.write(batch(i * 5, 5))
    assert "GeoParquet" in str(info.value) and "big.shp" in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", FORMATS)
def test_empty_output_has_its_fields(tmp_path, name):
    path = tmp_path / name
    with VectorWriter(path, crs="EPSG:32633", fields={"class_id": "int32", "class_name": "string"}):
        pass
    got = read(path)
    assert len(got) == 0 and {"class_id", "class_name"} <= set(got.columns)


def test_format_from_suffix_and_bad_batches(tmp_path):
    assert infer_driver("a.gpkg") == "GPKG"
    assert infer_driver("a.SHP") == "ESRI Shapefile"
    assert infer_driver("a.parquet") == infer_driver("a.geoparquet") == "Parquet"
    assert infer_driver("no_suffix") == "GPKG"
    assert infer_driver("a.dat", "Parquet") == "Parquet"
    with pytest.raises(VectorExportError, match=r"\.gpkg"):
        infer_driver("a.csv")
    with pytest.raises(VectorExportError, match="unknown vector format"):
        infer_driver("a.gpkg", "KML")
    with VectorWriter(tmp_path / "no_suffix", crs="EPSG:32633") as w:
        assert w.path.name == "no_suffix.gpkg"
        w.write(batch(0, 1))
        with pytest.raises(VectorExportError, match="lacks the fields"):
            w.write(batch(0, 1).drop(columns="area_m2"))
    with pytest.raises(VectorExportError, match="10 characters"):
        with VectorWriter(tmp_path / "x.shp", crs="EPSG:32633") as w:
            w.write(batch(0, 1).assign(long_name_one=1, long_name_two=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_suffix.gpkg"]


def test_vectorize_writes_the_same_features_in_every_format(tmp_path):
    rng = np.random.default_rng(2)
    c = (rng.random((23, 31)) * 3).astype(np.uint8)
    c[:4, :4] = 255
    conf = rng.random(c.shape).astype(np.float32)
    src = write_geotiff(tmp_path / "c.tif", c)
    cpath = write_geotiff(tmp_path / "conf.tif", conf)
    frames = []
    for name in FORMATS:
        summary = vectorize(src, tmp_path / name, confidence=cpath, block_size=8, workers=1)
        got = read(summary.path)
        assert got.crs == CRS.from_epsg(32633) and len(got) == summary.polygons
        assert list(got.columns) == [*FIELDS, "geometry"]
        got["key"] = canon_each(got.geometry)
        frames.append(got.sort_values("key").reset_index(drop=True))
    for other in frames[1:]:
        assert list(other.key) == list(frames[0].key)
        for col in ("class_id", "area_m2", "perim_m", "mean_conf"):
            assert np.allclose(other[col], frames[0][col])
        assert list(other.class_name) == list(frames[0].class_name)


def canon_each(geoms) -> list[bytes]:
    return shapely.to_wkb(shapely.normalize(np.asarray(list(geoms), dtype=object))).tolist()
