"""Blocked vectorisation against whole-raster references: rasterio.features.shapes, an in-memory sieve."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from conftest import write_geotiff
from pyproj import Geod
from rasterio.features import shapes
from rasterio.transform import from_origin
from scipy import ndimage
from scipy.ndimage import zoom

from geoseg.config import ClassDef, ClassSchema
from geoseg.errors import (
    ConfigError,
    GeosegError,
    InvalidSceneError,
    OutputExistsError,
    SceneNotFoundError,
    VectorExportError,
)
from geoseg.vector import vectorize

UTM = from_origin(500000.0, 4600000.0, 10.0, 10.0)  # write_geotiff's default transform
WHOLE = 4096  # a block size larger than every test map


def blob_map(h: int = 53, w: int = 71, *, classes: int = 4, seed: int = 0, nodata: bool = True) -> np.ndarray:
    """Seeded blobs of a few classes with speckle, odd size, optional nodata patches (255)."""
    rng = np.random.default_rng(seed)
    field = zoom(rng.standard_normal((h // 6 + 2, w // 6 + 2)), 6, order=1)[:h, :w]
    field = field + 0.35 * rng.standard_normal((h, w))
    c = np.digitize(field, np.quantile(field, np.linspace(0, 1, classes + 1)[1:-1])).astype(np.uint8)
    if nodata:
        c[5:9, 10:20] = 255
        c[h - 13 :, w - 11 :] = 255
        c[20, 30] = 255
    return c


def reference(c: np.ndarray, transform=UTM, nodata: int = 255) -> list[tuple[shapely.Polygon, int]]:
    """Whole-raster rasterio.features.shapes with 4-connectivity: the answer vectorize must give."""
    return [
        (shapely.geometry.shape(g), int(v))
        for g, v in shapes(c, mask=c != nodata, connectivity=4, transform=transform)
    ]


def canon(geoms) -> list[bytes]:
    return sorted(shapely.to_wkb(shapely.normalize(np.asarray(list(geoms), dtype=object))).tolist())


def reference_sieve(c: np.ndarray, min_pixels: float, nodata: int = 255, rounds: int = 16) -> np.ndarray:
    """The documented sieve, on the whole array at once (slow and simple)."""
    c = c.copy()
    valid = c != nodata
    for _ in range(rounds):
        labels = np.zeros(c.shape, np.int64)
        cls = [-1]
        for k in np.unique(c[valid]):
            lab, n = ndimage.label(valid & (c == k))
            labels[lab > 0] = lab[lab > 0] + len(cls) - 1
            cls += [int(k)] * n
        cls = np.array(cls)
        size = np.bincount(labels.ravel(), minlength=len(cls))
        small = size < min_pixels
        p = np.concatenate(
            [labels[:, :-1].ravel(), labels[:-1].ravel(), labels[:, 1:].ravel(), labels[1:].ravel()]
        )
        q = np.concatenate(
            [labels[:, 1:].ravel(), labels[1:].ravel(), labels[:, :-1].ravel(), labels[:-1].ravel()]
        )
        m = (p > 0) & (q > 0) & (p != q) & small[p] & ~small[q]
        if not m.any():
            break
        score: dict[int, dict[int, int]] = {}
        for a, k in zip(p[m].tolist(), cls[q[m]].tolist(), strict=True):
            score.setdefault(a, {}).setdefault(k, 0)
            score[a][k] += 1
        new = cls.copy()
        for a, s in score.items():
            new[a] = min(s, key=lambda k, s=s: (-s[k], k))
        c = np.where(valid, new[labels], c).astype(c.dtype)
    return c


@pytest.fixture
def blobs(tmp_path):
    c = blob_map()
    return c, write_geotiff(tmp_path / "blobs.tif", c)


@pytest.mark.parametrize("block_size", [7, 16, 64, WHOLE])
def test_polygons_equal_whole_raster_shapes(tmp_path, blobs, block_size):
    c, path = blobs
    ref = reference(c)
    out = tmp_path / "out.gpkg"
    summary = vectorize(path, out, block_size=block_size, workers=1)
    got = gpd.read_file(out)
    assert len(got) == len(ref) == summary.polygons
    assert canon(got.geometry) == canon(g for g, _ in ref)  # the very same polygons
    assert got.is_valid.all()
    assert got.crs.to_epsg() == 32633
    for k in np.unique(c[c != 255]):
        mine = shapely.union_all(got.geometry[got.class_id == k].values)
        theirs = shapely.union_all([g for g, v in ref if v == k])
        assert mine.symmetric_difference(theirs).area <= 1e-9 * theirs.area
        pixels = int((c == k).sum())
        assert summary.pixels[int(k)] == pixels
        assert got.area_m2[got.class_id == k].sum() == pytest.approx(pixels * 100.0, rel=1e-6)
        assert summary.area_m2[int(k)] == pytest.approx(pixels * 100.0, rel=1e-6)
    assert (got.class_name == got.class_id.astype(str)).all()
    assert np.allclose(got.perim_m, got.length) and np.allclose(got.area_m2, got.area)


def test_worker_processes_give_the_same_polygons(tmp_path, blobs):
    _, path = blobs
    a = vectorize(path, tmp_path / "one.gpkg", block_size=16, workers=1)
    b = vectorize(path, tmp_path / "two.gpkg", block_size=16, workers=2)
    assert a.polygons == b.polygons and a.pixels == b.pixels
    assert canon(gpd.read_file(a.path).geometry) == canon(gpd.read_file(b.path).geometry)


def test_region_spanning_four_blocks_is_one_polygon(tmp_path):
    c = np.ones((40, 40), np.uint8)
    c[10:30, 10:30] = 2  # centred on the corner where four 20-px blocks meet
    c[18:22, 18:22] = 3  # a hole across all four blocks too
    got = gpd.read_file(
        vectorize(write_geotiff(tmp_path / "c.tif", c), tmp_path / "o.gpkg", block_size=20, workers=1).path
    )
    assert sorted(got.class_id) == [1, 2, 3]
    square = got[got.class_id == 2].geometry.iloc[0]
    assert square.geom_type == "Polygon" and len(square.interiors) == 1
    assert square.area == pytest.approx((400 - 16) * 100.0)
    assert shapely.get_num_coordinates(square) == 10  # corners only: nothing left of the block borders


@pytest.mark.parametrize("min_area", [500.0, 2000.0])
def test_sieve_equals_in_memory_reference_for_every_block_size(tmp_path, blobs, min_area):
    c, path = blobs
    expected = canon(g for g, _ in reference(reference_sieve(c, min_area / 100.0)))
    for block_size in (7, 16, 64, WHOLE):
        summary = vectorize(
            path, tmp_path / f"s{block_size}.gpkg", block_size=block_size, min_area=min_area, workers=1
        )
        got = gpd.read_file(summary.path)
        assert canon(got.geometry) == expected, f"block_size {block_size}"
        assert sum(summary.pixels.values()) == int((c != 255).sum())  # pixels move, none is lost
    assert summary.sieve_rounds >= 1


def test_sieve_semantics(tmp_path):
    c = np.full((30, 40), 1, np.uint8)
    c[:, 20:] = 2
    c[0:3, 37:40] = 255
    expected = c.copy()
    c[5, 5] = 3  # a speckle inside class 1 -> 1
    c[12:15, 19:22] = 4  # 9 px straddling 1|2: 5 pixel edges with class 1, 7 with class 2 -> 2
    expected[12:15, 19:22] = 2
    c[25:27, 28:30] = 5  # a cluster of small regions (5 and 6) inside class 2: round 1 merges 5 (it
    c[25:27, 30] = 6  # touches 2) and 6 (it touches 2 too) -> 2
    c[3, 39] = 7  # small, next to nodata and class 2 only (nodata does not count) -> 2
    c[10:12, 0:2] = 8  # small, in a corner of class 1 -> 1
    path = write_geotiff(tmp_path / "c.tif", c)
    got = gpd.read_file(vectorize(path, tmp_path / "o.gpkg", min_area=1000.0, block_size=8, workers=1).path)
    assert canon(got.geometry) == canon(g for g, _ in reference(expected))
    assert sorted(got.class_id) == [1, 2]


def test_sieve_leaves_small_regions_with_no_large_neighbour(tmp_path):
    c = np.full((12, 12), 255, np.uint8)
    c[4:6, 4:6] = 1  # a 2x2 checkerboard of small regions, ringed by nodata: nothing to merge into
    c[4, 5] = c[5, 4] = 2
    path = write_geotiff(tmp_path / "c.tif", c)
    summary = vectorize(path, tmp_path / "o.gpkg", min_area=1000.0, workers=1)
    assert summary.polygons == 4 and summary.sieve_rounds == 0


def test_zarr_store_input_with_its_confidence(tmp_path, blobs):
    xr = pytest.importorskip("xarray")
    pytest.importorskip("rioxarray")
    c, tif = blobs
    h, w = c.shape
    conf = np.random.default_rng(5).random((h, w)).astype(np.float32)
    ds = xr.Dataset(
        {"class_id": (("y", "x"), c), "confidence": (("y", "x"), conf)},
        coords={"y": 4600000.0 - (np.arange(h) + 0.5) * 10.0, "x": 500000.0 + (np.arange(w) + 0.5) * 10.0},
    )
    ds["class_id"].attrs["nodata"] = 255
    ds = ds.rio.write_crs("EPSG:32633").rio.write_transform(UTM).chunk({"y": 16, "x": 16})
    store = tmp_path / "pred.zarr"
    ds.to_zarr(store, mode="w", consolidated=False)
    summary = vectorize(store, tmp_path / "z.gpkg", confidence=store, block_size=16, workers=1)
    got = gpd.read_file(summary.path)
    assert got.crs.to_epsg() == 32633
    assert canon(got.geometry) == canon(g for g, _ in reference(c))
    check_mean_conf(got, c, conf)


def test_mean_confidence_from_geotiff(tmp_path, blobs):
    c, path = blobs
    conf = np.random.default_rng(7).random(c.shape).astype(np.float32)
    conf[30, 3] = np.nan  # not counted
    cpath = write_geotiff(tmp_path / "conf.tif", conf)
    got = gpd.read_file(vectorize(path, tmp_path / "o.gpkg", confidence=cpath, block_size=16, workers=1).path)
    check_mean_conf(got, c, conf)


def check_mean_conf(got: gpd.GeoDataFrame, c: np.ndarray, conf: np.ndarray) -> None:
    labels = np.zeros(c.shape, np.int64)
    n = 0
    for k in np.unique(c[c != 255]):
        lab, m = ndimage.label(c == k)
        labels[lab > 0] = lab[lab > 0] + n
        n += m
    for geom, mean in zip(got.geometry, got.mean_conf, strict=True):
        p = shapely.point_on_surface(geom)
        row, col = rasterio.transform.rowcol(UTM, p.x, p.y)
        region = (labels == labels[row, col]) & np.isfinite(conf)
        assert mean == pytest.approx(float(conf[region].astype(np.float64).mean()), rel=1e-9)


def test_geographic_areas_are_geodesic(tmp_path):
    c = np.ones((20, 30), np.uint8)
    c[10, 10] = 2
    t = from_origin(5.0, 45.0, 0.001, 0.001)
    path = write_geotiff(tmp_path / "wgs.tif", c, crs="EPSG:4326", transform=t)
    summary = vectorize(path, tmp_path / "g.gpkg", block_size=8, workers=1)
    got = gpd.read_file(summary.path)
    geod = Geod(ellps="WGS84")
    x0, y0 = rasterio.transform.xy(t, 10, 10, offset="ul")
    x1, y1 = rasterio.transform.xy(t, 11, 11, offset="ul")
    cell_area, cell_perim = geod.polygon_area_perimeter([x0, x1, x1, x0], [y0, y0, y1, y1])
    pixel = got[got.class_id == 2].iloc[0]
    assert pixel.area_m2 == pytest.approx(abs(cell_area), rel=1e-9)
    assert pixel.perim_m == pytest.approx(cell_perim, rel=1e-9)
    assert 8000 < pixel.area_m2 < 9000  # ~111 m x 79 m at 45° N, not square degrees
    rest = got[got.class_id == 1].iloc[0]
    box = shapely.Polygon(
        shapely.box(5.0, 45.0 - 0.02, 5.03, 45.0).exterior.coords,
        [shapely.box(x0, y1, x1, y0).exterior.coords],
    )
    area, shell_perim = geod.geometry_area_perimeter(shapely.orient_polygons(box))
    assert rest.area_m2 == pytest.approx(abs(area), rel=1e-9)
    assert rest.perim_m == pytest.approx(shell_perim + cell_perim, rel=1e-9)  # the hole's edge counts too


def test_geographic_sieve_is_block_invariant(tmp_path):
    c = blob_map(37, 45, seed=3)
    path = write_geotiff(
        tmp_path / "wgs.tif", c, crs="EPSG:4326", transform=from_origin(5.0, 60.0, 0.0005, 0.0005)
    )
    results = [
        canon(
            gpd.read_file(
                vectorize(path, tmp_path / f"g{b}.gpkg", min_area=8000.0, block_size=b, workers=1).path
            ).geometry
        )
        for b in (7, 16, WHOLE)
    ]
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("block_size", [16, WHOLE])
def test_simplify_keeps_the_coverage(tmp_path, block_size):
    c = blob_map(nodata=False)
    path = write_geotiff(tmp_path / "c.tif", c)
    exact = gpd.read_file(vectorize(path, tmp_path / "e.gpkg", block_size=block_size, workers=1).path)
    got = gpd.read_file(
        vectorize(path, tmp_path / "s.gpkg", simplify=25.0, block_size=block_size, workers=1).path
    )
    assert len(got) == len(exact)
    assert got.is_valid.all()
    assert (
        shapely.get_num_coordinates(got.geometry.values).sum()
        < shapely.get_num_coordinates(exact.geometry.values).sum()
    )
    total = c.size * 100.0
    union = shapely.union_all(got.geometry.values)
    assert union.area == pytest.approx(total, rel=1e-9)  # no gaps ...
    assert got.area.sum() == pytest.approx(total, rel=1e-9)  # ... and no overlaps
    assert union.equals(shapely.box(*rasterio.transform.array_bounds(*c.shape, UTM)))


def test_class_names_from_schema_and_other_dtypes(tmp_path, blobs):
    c, _ = blobs
    schema = ClassSchema(
        name="t", classes=[ClassDef(id=k, name=f"class{k}", color="#000000") for k in range(4)]
    )
    for dtype in ("uint8", "uint32", "int16"):
        path = write_geotiff(tmp_path / f"{dtype}.tif", c.astype(dtype))
        got = gpd.read_file(
            vectorize(path, tmp_path / f"{dtype}.gpkg", classes=schema, block_size=16, workers=1).path
        )
        assert canon(got.geometry) == canon(g for g, _ in reference(c))
        assert (got.class_name == "class" + got.class_id.astype(str)).all()


def test_raster_nodata_value_and_all_nodata(tmp_path):
    c = blob_map(nodata=False)
    c[:10] = 0
    got = gpd.read_file(
        vectorize(
            write_geotiff(tmp_path / "n.tif", c, nodata=0), tmp_path / "n.gpkg", block_size=16, workers=1
        ).path
    )
    assert canon(got.geometry) == canon(g for g, _ in reference(c, nodata=0))
    empty = np.full((9, 11), 255, np.uint8)
    summary = vectorize(write_geotiff(tmp_path / "e.tif", empty), tmp_path / "e.gpkg", workers=1)
    got = gpd.read_file(summary.path)
    assert summary.polygons == 0 and len(got) == 0
    assert {"class_id", "class_name", "area_m2", "perim_m"} <= set(got.columns)


def test_progress_reports_every_block(tmp_path, blobs):
    _, path = blobs
    calls = []
    vectorize(path, tmp_path / "p.gpkg", block_size=16, workers=1, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (20, 20) and [d for d, _ in calls] == list(range(1, 21))


def test_bad_inputs_raise_clear_errors_and_leave_nothing(tmp_path, blobs):
    c, path = blobs
    out = tmp_path / "out" / "o.gpkg"
    out.parent.mkdir()

    def check(exc, match, src, **kw):
        with pytest.raises(exc, match=match) as info:
            vectorize(src, out, workers=1, **kw)
        assert isinstance(info.value, GeosegError)
        assert list(out.parent.iterdir()) == []

    check(SceneNotFoundError, "no such file", tmp_path / "missing.tif")
    floats = write_geotiff(tmp_path / "f.tif", c.astype(np.float32))
    check(InvalidSceneError, "integer", floats)
    check(InvalidSceneError, "one band", write_geotiff(tmp_path / "m.tif", np.stack([c, c])))
    (tmp_path / "junk.tif").write_text("not a raster")
    check(InvalidSceneError, "not a raster", tmp_path / "junk.tif")
    check(
        InvalidSceneError, "grid", path, confidence=write_geotiff(tmp_path / "small.tif", c[:10].astype("f4"))
    )
    check(ConfigError, "min_area", path, min_area=-1.0)
    check(ConfigError, "block_size", path, block_size=0)
    with pytest.raises(VectorExportError, match=".gpkg"):
        vectorize(path, tmp_path / "o.csv", workers=1)
    (tmp_path / "zarr_like.zarr").mkdir()
    check(InvalidSceneError, "Zarr", tmp_path / "zarr_like.zarr")


def test_existing_output_is_kept_unless_overwrite(tmp_path, blobs):
    _, path = blobs
    out = tmp_path / "o.gpkg"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="overwrite"):
        vectorize(path, out, workers=1)
    assert out.read_bytes() == b"precious"
    vectorize(path, out, workers=1, overwrite=True)
    assert len(gpd.read_file(out)) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blobs.tif", "o.gpkg"]


def test_failure_mid_run_leaves_no_output(tmp_path, blobs, monkeypatch):
    import geoseg.vector.vectorise as module
    from geoseg.vector.writer import VectorWriter

    _, path = blobs
    calls = {"n": 0}
    real = VectorWriter.write

    def flaky(self, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real(self, batch)

    monkeypatch.setattr(VectorWriter, "write", flaky)
    monkeypatch.setattr(module, "_BATCH", 1)  # some batches are written before the failure
    with pytest.raises(OSError, match="disk full"):
        vectorize(path, tmp_path / "o.gpkg", block_size=16, workers=1)
    assert calls["n"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blobs.tif"]


def test_region_touching_itself_inside_a_block(tmp_path):
    c = np.zeros((6, 8), np.uint8)
    # class 1 leaves the left 4-px block at (1, 3) and comes back at (3, 3); inside that block its two
    # pieces touch diagonally at vertex (3, 2), where the whole region touches itself round a hole
    for row, col in [(1, 3), (1, 4), (2, 4), (3, 4), (3, 3), (3, 2), (2, 2)]:
        c[row, col] = 1
    path = write_geotiff(tmp_path / "c.tif", c)
    expected = canon(g for g, _ in reference(c))
    for block_size in (4, WHOLE):
        got = gpd.read_file(vectorize(path, tmp_path / f"o{block_size}.gpkg", block_size=block_size, workers=1).path)
        assert canon(got.geometry) == expected
        assert got.is_valid.all()
    ring = got[got.class_id == 1].geometry.iloc[0]
    assert len(ring.interiors) == 1 and ring.area == pytest.approx(7 * 100.0)


def random_maps(seed: int, count: int):
    """Small maps full of regions touching at corners: speckle, blobs, nodata."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = (int(v) for v in rng.integers(1, 30, 2))
        if i % 2:
            c = rng.integers(0, int(rng.integers(1, 4)), (h, w)).astype(np.uint8)
        else:
            c = blob_map(h, w, classes=3, seed=i, nodata=False)
        if i % 3 == 0:
            c[rng.random((h, w)) < 0.15] = 255
        yield c


def test_traced_polygons_equal_gdal_polygons():
    from affine import Affine

    from geoseg.vector.regions import label_regions
    from geoseg.vector.trace import trace_regions

    for c in random_maps(1, 150):
        regions = label_regions(c, c != 255)
        polys, _ = trace_regions(regions, x0=3, y0=5)
        geoms = polys.geometries()
        ref = [g for g, _ in reference(c, Affine.translation(3, 5))]
        assert canon(geoms) == canon(ref)
        assert shapely.is_valid(geoms).all()
        assert (polys.areas() == regions.pixels[1:]).all()
        assert np.allclose(polys.perimeters(), shapely.length(geoms))
        back = shapely.from_wkb(np.asarray(polys.to_wkb(UTM).to_pylist(), dtype=object))
        assert shapely.equals_exact(back, shapely.transform(geoms, lambda xy: xy * [10, -10] + [500000, 4600000])).all()


def test_merged_pieces_equal_whole_regions(tmp_path):
    from geoseg.tiling import Box
    from geoseg.vector.borders import PieceStore, encode_pieces
    from geoseg.vector.merge import merge_regions
    from geoseg.vector.regions import label_regions
    from geoseg.vector.trace import trace_regions

    for i, c in enumerate(random_maps(2, 150)):
        h, w = c.shape
        b = i % 7 + 1
        whole = label_regions(c, c != 255)
        expected, _ = trace_regions(whole)
        store = PieceStore(tmp_path)
        places, region = [], []
        for box in (Box(y, x, min(y + b, h), min(x + b, w)) for y in range(0, h, b) for x in range(0, w, b)):
            part = c[box.y0 : box.y1, box.x0 : box.x1]
            regions = label_regions(part, part != 255)
            polys, touching = trace_regions(regions, x0=box.x0, y0=box.y0)
            places += store.put(*encode_pieces(polys, np.flatnonzero(touching)))
            at = np.zeros(regions.n + 1, np.int64)  # each piece's region in the whole map
            at[regions.labels.ravel()] = whole.labels[box.y0 : box.y1, box.x0 : box.x1].ravel()
            region.append(at[1:] - 1)
        region = np.concatenate(region)
        order = np.argsort(region, kind="stable")
        pieces, cuts = store.get([places[k] for k in order])
        store.close()
        got = merge_regions(pieces, region[order], cuts=cuts, block_size=b, height=h, width=w)
        assert [shapely.normalize(g).wkb for g in got.geometries()] == [
            shapely.normalize(g).wkb for g in expected.geometries()
        ], f"map {i}, block size {b}"


def test_long_rings_are_handled_in_chunks(tmp_path, blobs, monkeypatch):
    import geoseg.vector.polygons

    c, path = blobs
    whole = gpd.read_file(vectorize(path, tmp_path / "a.gpkg", block_size=16, workers=1).path)
    monkeypatch.setattr(geoseg.vector.polygons, "CHUNK", 5)
    got = gpd.read_file(vectorize(path, tmp_path / "b.gpkg", block_size=16, workers=1).path)
    assert canon(got.geometry) == canon(whole.geometry)
    assert np.allclose(np.sort(got.area_m2), np.sort(whole.area_m2))
    assert np.allclose(np.sort(got.perim_m), np.sort(whole.perim_m))
