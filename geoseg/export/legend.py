"""The class legend a class map carries, for GIS software, and reading it back.

A class map COG ``<stem>_classes.tif`` travels with:

- in the ``.tif`` itself: the colour table and band tags ``CLASS_<id>=<name>`` (all that survives
  when only the ``.tif`` is copied: colours, names for geoseg, not a legend QGIS shows);
- ``<stem>_classes.tif.aux.xml`` (GDAL PAM): category names and a thematic raster attribute table
  (value, class, red, green, blue), read by GDAL, QGIS >= 3.30 and ArcGIS;
- ``<stem>_classes.qml``: a QGIS paletted style with exactly the model's classes, which QGIS loads
  by itself when it opens the ``.tif`` (otherwise it lists all 256 palette entries).

rasterio has no API for raster attribute tables or category names, so the PAM XML is written here in
GDAL's own format (``GDALRasterAttributeTable``: field types 0 integer / 2 string, usages 5 min-max,
2 name, 6-8 red-green-blue).
"""

from __future__ import annotations

import json
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import rasterio

from geoseg.config import ClassSchema, validate

#: Band tag prefix for class names in a class map (``CLASS_3=forest``).
TAG_PREFIX = "CLASS_"
#: Store attribute holding the class schema as JSON-able dict.
STORE_ATTR = "class_schema"

_RAT_FIELDS = (("Value", 0, 5), ("Class", 2, 2), ("Red", 0, 6), ("Green", 0, 7), ("Blue", 0, 8))


def band_tags(classes: ClassSchema) -> dict[str, str]:
    """The ``CLASS_<id>`` band tags of a class map."""
    return {f"{TAG_PREFIX}{c.id}": c.name for c in classes.classes}


def pam_xml(classes: ClassSchema) -> str:
    """GDAL PAM sidecar text: category names (index = class id) and a thematic attribute table."""
    names = [""] * (max(classes.ids) + 1)
    for c in classes.classes:
        names[c.id] = c.name
    cats = "".join(f"<Category>{escape(n)}</Category>" for n in names)
    fields = "".join(
        f'\n      <FieldDefn index="{i}"><Name>{n}</Name><Type>{t}</Type><Usage>{u}</Usage></FieldDefn>'
        for i, (n, t, u) in enumerate(_RAT_FIELDS)
    )
    rows = "".join(
        f'\n      <Row index="{i}">' + "".join(f"<F>{escape(str(v))}</F>" for v in (c.id, c.name, *c.rgb)) + "</Row>"
        for i, c in enumerate(classes.classes)
    )
    return (
        '<PAMDataset>\n  <PAMRasterBand band="1">\n'
        f"    <CategoryNames>{cats}</CategoryNames>\n"
        f'    <GDALRasterAttributeTable tableType="thematic">{fields}{rows}\n    </GDALRasterAttributeTable>\n'
        "  </PAMRasterBand>\n</PAMDataset>\n"
    )


def qgis_style(classes: ClassSchema, nodata: int) -> str:
    """A QGIS ``.qml`` paletted style: one legend entry per class, ``nodata`` transparent."""
    entries = "".join(
        f"\n        <paletteEntry value=\"{c.id}\" color=\"{c.color}\" alpha=\"255\" label={quoteattr(c.name)}/>"
        for c in classes.classes
    )
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        '<qgis version="3.22.0" styleCategories="Symbology">\n  <pipe>\n'
        '    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">\n'
        "      <rasterTransparency>\n        <singleValuePixelList>\n"
        f'          <pixelListEntry min="{nodata}" max="{nodata}" percentTransparent="100"/>\n'
        "        </singleValuePixelList>\n      </rasterTransparency>\n"
        f"      <colorPalette>{entries}\n      </colorPalette>\n"
        "    </rasterrenderer>\n"
        '    <brightnesscontrast brightness="0" contrast="0" gamma="1"/>\n'
        '    <rasterresampler maxOversampling="2"/>\n'
        "  </pipe>\n  <blendMode>0</blendMode>\n</qgis>\n"
    )


def style_path(class_map: Path) -> Path:
    """Where QGIS looks for a layer's default style: the data file's name with ``.qml``."""
    return class_map.with_suffix(".qml")


def classes_from_cog(path: Path) -> ClassSchema | None:
    """The class schema a class map GeoTIFF carries (``CLASS_<id>`` tags and colour table), if any."""
    with rasterio.open(path) as src:
        tags = src.tags(1)
        names = {int(k[len(TAG_PREFIX):]): v for k, v in tags.items()
                 if k.startswith(TAG_PREFIX) and k[len(TAG_PREFIX):].isdigit()}
        if len(names) < 2:
            return None
        try:
            colours = src.colormap(1)
        except ValueError:  # no colour table
            colours = {}
        nodata = src.nodata
    classes = [
        {"id": i, "name": n, "color": "#{:02x}{:02x}{:02x}".format(*colours.get(i, (128, 128, 128))[:3])}
        for i, n in sorted(names.items())
    ]
    ignore = int(nodata) if nodata is not None and float(nodata).is_integer() and 0 <= nodata <= 255 else 255
    return validate(ClassSchema, {"name": path.stem, "classes": classes, "ignore_index": ignore},
                    source=f"{path} class tags")


def classes_from_store(path: Path) -> ClassSchema | None:
    """The class schema a predict store records in its attributes (:data:`STORE_ATTR`), if any."""
    import zarr

    value = zarr.open_group(path, mode="r").attrs.get(STORE_ATTR)
    if value is None:
        return None
    return validate(ClassSchema, json.loads(value) if isinstance(value, str) else dict(value),
                    source=f"{path} {STORE_ATTR}")
