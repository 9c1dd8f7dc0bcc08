"""A STAC Item as a scene: its band assets stacked into one GDAL VRT on the finest asset's grid.

Every asset that describes its bands (``eo:bands`` in STAC 1.0, ``bands`` in 1.1) becomes one VRT band
per band it holds, named by the band's common name (translated to geoseg's names: ``swir16`` is
``swir1``, ``swir22`` is ``swir2``), else by its name, else by the asset key; the model's bands are
then matched by name as for any scene.  The VRT's grid is the *reference asset*'s: the one with the
finest pixels (the first of those, in the item's order).  Coarser assets are read onto it with
nearest-neighbour resampling (each coarse pixel covers the fine pixels inside it: no value is
invented), which GDAL does on the fly for every window, so nothing is downloaded whole.  All assets
must share one CRS.

The VRT is an XML string that travels to the workers inside the job and that GDAL opens as it is;
its sources are the assets' URLs in GDAL's terms (``/vsis3/``, ``/vsicurl/``, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import pystac
import rasterio
from affine import Affine

from geoseg.errors import InvalidSceneError
from geoseg.location import gdal_path, is_url, read_bytes, redact

#: STAC common band names → geoseg's band names (what the shipped models call them).
COMMON_NAMES = {"swir16": "swir1", "swir22": "swir2", "nir08": "nir"}
#: GDAL's names of numpy's data types, as VRTs spell them.
_GDAL_TYPES = {"uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32",
               "int32": "Int32", "float32": "Float32", "float64": "Float64"}


def is_stac(location: str | Path) -> bool:
    """Whether ``location`` names a JSON document (a STAC Item, by geoseg's convention ``*.json``)."""
    return str(location).split("?", 1)[0].lower().endswith(".json")


@dataclass(frozen=True)
class ItemScene:
    """A STAC Item resolved to what GDAL opens: the VRT, the item id (names the outputs), the band names."""

    vrt: str
    id: str
    bands: tuple[str, ...]


@dataclass(frozen=True)
class _Band:
    name: str
    href: str
    index: int  # 1-based band of the asset's file


def _document(location: str | Path) -> dict:
    try:
        return json.loads(read_bytes(location) if is_url(location) else Path(location).read_bytes())
    except ValueError as err:
        raise InvalidSceneError(f"{redact(str(location))}: not JSON ({err}). "
                                "Pass a STAC Item (.json) or a raster.") from None


def is_item_collection(location: str | Path) -> bool:
    """Whether the JSON document at ``location`` is a STAC ItemCollection (a FeatureCollection of Items)."""
    return is_stac(location) and _document(location).get("type") == "FeatureCollection"


def collection_items(location: str | Path) -> list[str]:
    """Where each Item of the ItemCollection at ``location`` lives: its ``self`` link, made absolute.

    Raises:
        InvalidSceneError: an Item has no ``self`` link (geoseg reads every scene from where it lives).
    """
    doc = _document(location)
    out = []
    for i, feature in enumerate(doc.get("features", [])):
        href = next((link["href"] for link in feature.get("links", []) if link.get("rel") == "self"), None)
        if href is None:
            raise InvalidSceneError(f"{redact(str(location))}: item {feature.get('id', i)!r} has no 'self' link. "
                                    "Give each Item a self link to its JSON, or list the Items' URLs.")
        if is_url(location):
            href = urljoin(str(location), href)
        elif not is_url(href) and not Path(href).is_absolute():
            href = str(Path(location).resolve().parent / href)
        out.append(href)
    return out


def read_item(location: str | Path) -> pystac.Item:
    """The STAC Item at ``location`` (a path or URL), its relative asset hrefs resolved against it.

    Raises:
        InvalidSceneError: the JSON is not a STAC Item (e.g. an ItemCollection, or not STAC at all).
    """
    where = redact(str(location))
    doc = _document(location)
    if doc.get("type") != "Feature" or "stac_version" not in doc:
        kind = "an ItemCollection" if doc.get("type") == "FeatureCollection" else "not a STAC Item"
        raise InvalidSceneError(f"{where}: {kind}. Pass one STAC Item per scene.")
    item = pystac.Item.from_dict(doc, preserve_dict=False)
    item.set_self_href(str(location) if is_url(location) else str(Path(location).resolve()))
    return item


def _bands(item: pystac.Item) -> list[_Band]:
    out = []
    for key, asset in item.assets.items():
        described = asset.extra_fields.get("eo:bands") or asset.extra_fields.get("bands") or []
        href = asset.get_absolute_href() or asset.href
        for i, band in enumerate(described, start=1):
            common = band.get("common_name") or band.get("eo:common_name")
            fallback = key if len(described) == 1 else f"{key}_{i}"
            name = COMMON_NAMES.get(common, common) or band.get("name") or fallback
            out.append(_Band(name, href, i))
    return out


def item_scene(location: str | Path) -> ItemScene:
    """Resolve the STAC Item at ``location`` into one VRT of its band assets (see the module docstring).

    Raises:
        InvalidSceneError: not a STAC Item, no asset describes its bands, or the assets' CRSs differ.
    """
    item = read_item(location)
    where = redact(str(location))
    bands = _bands(item)
    if not bands:
        raise InvalidSceneError(f"{where}: no asset lists its bands (eo:bands or bands). "
                                "Describe the band assets, or pass the raster itself.")
    grids = {}
    for href in dict.fromkeys(b.href for b in bands):
        with rasterio.open(gdal_path(href)) as src:
            grids[href] = (src.crs, src.transform, src.width, src.height, src.dtypes[0], src.nodata)
    crss = {crs.to_wkt() for crs, *_ in grids.values()}
    if len(crss) > 1:
        raise InvalidSceneError(f"{where}: its band assets lie in {len(crss)} different CRSs. "
                                "Warp them to one first (gdalwarp -t_srs).")
    reference = min(grids, key=lambda h: abs(grids[h][1].a))
    crs, ref, width, height, _, _ = grids[reference]
    dtype = np.result_type(*(g[4] for g in grids.values())).name
    body = "".join(_vrt_band(i, band, grids[band.href], ref, dtype) for i, band in enumerate(bands, start=1))
    vrt = (f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>{escape(crs.to_wkt())}</SRS>'
           f"<GeoTransform>{ref.c!r}, {ref.a!r}, {ref.b!r}, {ref.f!r}, {ref.d!r}, {ref.e!r}</GeoTransform>"
           f"{body}</VRTDataset>")
    return ItemScene(vrt, item.id, tuple(b.name for b in bands))


def _vrt_band(i: int, band: _Band, grid: tuple, ref: Affine, dtype: str) -> str:
    """One VRT band: the asset's band placed on the reference grid (nearest-neighbour)."""
    _, t, w, h, _, nodata = grid
    x0, y0 = (t.c - ref.c) / ref.a, (t.f - ref.f) / ref.e
    xs, ys = w * t.a / ref.a, h * t.e / ref.e
    nd = f"<NoDataValue>{nodata!r}</NoDataValue>" if nodata is not None else ""
    return (f'<VRTRasterBand dataType="{_GDAL_TYPES[dtype]}" band="{i}"><Description>{escape(band.name)}</Description>'
            f"{nd}<SimpleSource resampling=\"nearest\">"
            f'<SourceFilename relativeToVRT="0">{escape(gdal_path(band.href))}</SourceFilename>'
            f"<SourceBand>{band.index}</SourceBand>"
            f'<SrcRect xOff="0" yOff="0" xSize={quoteattr(str(w))} ySize={quoteattr(str(h))}/>'
            f'<DstRect xOff="{x0!r}" yOff="{y0!r}" xSize="{xs!r}" ySize="{ys!r}"/>'
            f"{f'<NODATA>{nodata!r}</NODATA>' if nodata is not None else ''}</SimpleSource></VRTRasterBand>")
