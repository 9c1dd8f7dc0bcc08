"""Labelled training data: tile folders, a scene with a label raster, or a scene with vector labels.

Every source is read into :class:`LabelledImage` values: the image stays on disk (read by window with
:func:`geoseg.raster.read_window`), the labels are held in memory as *channel indices* (one byte per
pixel): class ``schema.classes[k].id`` becomes ``k``, and ``schema.ignore_index`` (255) marks pixels
that are not trained on or scored — label nodata, unlabelled pixels and scene-nodata pixels.

Sources (``DataConfig.kind``):

- ``tiles``: a folder of image tiles and a folder of masks, paired by file stem
  (``images/x.tif`` ↔ ``masks/x.tif`` or ``masks/x.png``).
- ``scene_raster``: a scene plus a label raster; a label raster on another grid or CRS is aligned to
  the scene's grid with nearest resampling (:func:`rasterio.warp.reproject`).
- ``scene_vector``: a scene plus polygons (GeoPackage, Shapefile, GeoJSON) with a class attribute,
  reprojected to the scene CRS and burnt onto the scene grid (:func:`rasterio.features.rasterize`,
  ``all_touched=False``: a pixel is labelled when its centre lies inside a polygon).  Pixels outside
  every polygon are unlabelled (ignored), unless a *background* class is given: then they take it.

:class:`TileDataset` turns boxes on those images into normalised, augmented ``(x, y)`` tensors.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from rasterio.errors import NotGeoreferencedWarning

from geoseg.config import ClassSchema, DataConfig, load_config
from geoseg.errors import DatasetError
from geoseg.raster import gdal_env, open_scene, read_window
from geoseg.tiling import Box

log = logging.getLogger(__name__)

#: File endings read as tiles (image or mask) in a tile folder.
TILE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")

#: Class name that, when present in a schema, labels the pixels outside every polygon (scene_vector).
BACKGROUND = "background"


@dataclass(eq=False)
class LabelledImage:
    """One labelled raster (a whole scene or one tile file).

    Attributes:
        name: a short name (file stem) used in splits and reports.
        path: the image file; read by window, never held in memory.
        labels: ``(H, W)`` uint8 channel indices, ``ignore_index`` where unlabelled or invalid.
        band_names: the image's bands in order.
        dtype: the image's pixel type.
    """

    name: str
    path: Path
    labels: np.ndarray
    band_names: tuple[str, ...]
    dtype: str

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.labels.shape  # type: ignore[return-value]

    def read(self, box: Box) -> tuple[np.ndarray, np.ndarray]:
        """``(data, valid)`` of ``box``: (bands, h, w) float32 and (h, w) bool (see ``read_window``)."""
        with warnings.catch_warnings(), gdal_env():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(self.path) as src:
                return read_window(src, box)


@dataclass(eq=False)
class LabelledData:
    """Every labelled image of one training source, with its class schema.

    Attributes:
        kind: ``tiles``, ``scene_raster`` or ``scene_vector``.
        images: the labelled images.
        schema: the classes, in output-channel order.
        band_names: the bands every image shares.
        sources: the input paths, for provenance.
    """

    kind: str
    images: list[LabelledImage]
    schema: ClassSchema
    band_names: tuple[str, ...]
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of classes (output channels)."""
        return len(self.schema.classes)

    def class_counts(self, boxes: Sequence[tuple[int, Box]] | None = None) -> np.ndarray:
        """Labelled pixels per class (int64, length K), over ``(image, box)`` pairs or everything."""
        k = self.num_classes
        total = np.zeros(k, np.int64)
        pairs = boxes if boxes is not None else [(i, Box(0, 0, *im.shape)) for i, im in enumerate(self.images)]
        for i, box in pairs:
            lab = self.images[i].labels[box.y0 : box.y1, box.x0 : box.x1]
            total += np.bincount(lab[lab < k].ravel(), minlength=k)[:k]
        return total


def encode_labels(
    values: np.ndarray, schema: ClassSchema, *, nodata: float | None = None, source: str = "labels"
) -> np.ndarray:
    """Map class ids to channel indices ``0..K-1`` (uint8); nodata, NaN and the ignore index → ignore.

    Args:
        values: label values (class ids) of any numeric dtype.
        schema: the class schema; ``schema.ids[k]`` becomes ``k``.
        nodata: a value meaning 'no label'.
        source: names the labels in error messages.

    Raises:
        DatasetError: some values are not class ids of the schema (the message lists them).
    """
    values = np.asarray(values)
    ignore = schema.ignore_index
    missing = values == ignore
    if values.dtype.kind == "f":
        missing |= ~np.isfinite(values)
    if nodata is not None and not (isinstance(nodata, float) and np.isnan(nodata)):
        missing |= values == nodata
    present = np.unique(values[~missing])
    unknown = [v for v in present.tolist() if v not in schema.ids]
    if unknown:
        shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in unknown[:20])
        more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
        raise DatasetError(
            f"{source}: label values {shown}{more} are not classes of schema {schema.name!r} "
            f"(ids {list(schema.ids)}). Add them to the class schema, or mark them as nodata."
        )
    lut = np.full(256, ignore, np.uint8)
    for k, cid in enumerate(schema.ids):
        lut[cid] = k
    out = np.full(values.shape, ignore, np.uint8)
    out[~missing] = lut[values[~missing].astype(np.int64)]
    return out


def background_id(schema: ClassSchema) -> int | None:
    """The id of the class named ``background``, if the schema has one (see :data:`BACKGROUND`)."""
    return next((c.id for c in schema.classes if c.name.lower() == BACKGROUND), None)


def rasterize_labels(
    path: str | Path,
    scene_path: str | Path,
    schema: ClassSchema,
    *,
    label_field: str | None = "id",
    label_value: int | None = None,
    background: int | None = None,
) -> np.ndarray:
    """Burn vector labels onto a scene's grid, as channel indices.

    Polygons are reprojected to the scene CRS and rasterised with ``all_touched=False`` (a pixel
    takes a polygon's class when its centre lies inside; where polygons overlap the later one wins).

    Args:
        path: GeoPackage, Shapefile, GeoJSON, ... readable by geopandas.
        scene_path: the scene whose grid (CRS, transform, shape) the labels are burnt onto.
        schema: class schema; the field holds class ids (numbers) or class names (text).
        label_field: attribute holding the class; ignored when ``label_value`` is given.  When the
            file lacks it, the schema has two classes and ``background`` is one of them, every
            polygon takes the other class (footprints: building vs background).
        label_value: burn this class id for every polygon (e.g. building footprints).
        background: class id for pixels outside every polygon; ``None`` leaves them unlabelled.

    Returns:
        ``(H, W)`` uint8 channel indices, ``schema.ignore_index`` where unlabelled.

    Raises:
        DatasetError: unreadable file, no CRS, missing field, or values that are not classes.
    """
    import geopandas as gpd
    from rasterio.features import rasterize

    path = Path(path)
    scene = open_scene(scene_path)
    if not path.exists():
        raise DatasetError(f"{path}: no such vector file. Check the path (relative paths start at {Path.cwd()}).")
    try:
        gdf = gpd.read_file(path)
    except Exception as err:  # noqa: BLE001 - any reader failure means the file is unusable
        raise DatasetError(f"{path}: not a vector file geopandas can read ({err})") from None
    if gdf.crs is None:
        raise DatasetError(f"{path}: has no CRS; set it (e.g. ogr2ogr -a_srs EPSG:XXXX) so it can be "
                           f"reprojected to the scene CRS {scene.crs}.")
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
    if label_value is None and label_field not in gdf.columns and background is not None and len(schema.ids) == 2:
        label_value = next(i for i in schema.ids if i != background)
        log.info("%s has no field %r: every polygon is class %d, the rest background %d", path, label_field,
                 label_value, background)
    if label_value is not None:
        values = np.full(len(gdf), label_value, np.int64)
    else:
        if label_field not in gdf.columns:
            fields = [c for c in gdf.columns if c != gdf.geometry.name]
            raise DatasetError(f"{path}: has no field {label_field!r}; fields are {fields}. Set label_field.")
        values = _field_to_ids(gdf[label_field].to_numpy(), schema, f"{path} field {label_field!r}")
        keep = np.isfinite(values.astype(np.float64))  # polygons without a class are left unlabelled
        gdf, values = gdf[keep], values[keep].astype(np.int64)
    if background is not None and background not in schema.ids:
        raise DatasetError(f"background class id {background} is not in schema {schema.name!r} {list(schema.ids)}")
    encode_labels(values, schema, source=f"{path} field {label_field!r}")  # lists unknown ids
    gdf = gdf.to_crs(scene.crs.to_wkt())
    fill = -1 if background is None else background
    shapes = [(geom, int(v)) for geom, v in zip(gdf.geometry, values, strict=True)]
    burnt = rasterize(shapes, out_shape=scene.shape, transform=scene.transform, fill=fill, all_touched=False,
                      dtype="int32") if shapes else np.full(scene.shape, fill, np.int32)
    return encode_labels(burnt, schema, nodata=-1, source=str(path))


def _field_to_ids(values: np.ndarray, schema: ClassSchema, source: str) -> np.ndarray:
    """Class ids (float64, NaN where missing) from a column of ids (numbers) or class names (text)."""
    if values.dtype.kind in "iufb":
        ids = values.astype(np.float64)
        if not np.all(np.isnan(ids) | (ids == np.round(ids))):
            raise DatasetError(f"{source}: holds non-integer values; class ids must be integers")
        return ids
    names = {c.name: c.id for c in schema.classes}
    missing = [v is None or (isinstance(v, float) and np.isnan(v)) for v in values]
    unknown = sorted({str(v) for v, m in zip(values, missing, strict=True) if not m} - set(names))
    if unknown:
        raise DatasetError(f"{source}: values {unknown} are not class names of schema {schema.name!r} "
                           f"({list(names)}); use a field of class ids or names")
    return np.array([np.nan if m else names[str(v)] for v, m in zip(values, missing, strict=True)], np.float64)


def align_label_raster(path: str | Path, scene_path: str | Path, schema: ClassSchema) -> np.ndarray:
    """Read a label raster onto a scene's grid (nearest resampling when CRS or grid differ).

    A label raster without CRS or geotransform is taken to be on the scene's grid when it has the
    scene's shape (a warning is logged).

    Returns:
        ``(H, W)`` uint8 channel indices, ``schema.ignore_index`` where nodata or outside the labels.
    """
    from rasterio.warp import Resampling, reproject

    path = Path(path)
    scene = open_scene(scene_path)
    if not path.exists():
        raise DatasetError(f"{path}: no such label raster. Check the path (relative paths start at {Path.cwd()}).")
    with warnings.catch_warnings(), gdal_env():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            band, nodata = src.read(1), src.nodata
            same_grid = src.crs == scene.crs and src.transform == scene.transform and src.shape == scene.shape
            if src.crs is None and src.shape == scene.shape:
                log.warning("%s has no CRS; taking it to be on the grid of %s", path, scene.path)
                same_grid = True
            elif src.crs is None:
                raise DatasetError(f"{path}: has no CRS and its shape {src.shape} differs from the scene's "
                                   f"{scene.shape}; georeference it")
            if not same_grid:
                aligned = np.full(scene.shape, np.nan, np.float64)
                reproject(band.astype(np.float64), aligned, src_transform=src.transform, src_crs=src.crs,
                          src_nodata=nodata, dst_transform=scene.transform, dst_crs=scene.crs,
                          dst_nodata=np.nan, resampling=Resampling.nearest)
                band = aligned
    return encode_labels(band, schema, nodata=nodata, source=str(path))


def pair_tiles(images: str | Path, masks: str | Path) -> list[tuple[Path, Path]]:
    """Pair image and mask tiles by file stem, sorted by stem.

    Raises:
        DatasetError: a folder is missing or empty, a stem appears twice, or a tile has no partner.
    """
    def index(folder: Path, what: str) -> dict[str, Path]:
        if not folder.is_dir():
            raise DatasetError(f"{folder}: the {what} folder does not exist")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in TILE_SUFFIXES)
        if not files:
            raise DatasetError(f"{folder}: no {what} tiles ({', '.join(TILE_SUFFIXES)})")
        out: dict[str, Path] = {}
        for p in files:
            if p.stem in out:
                raise DatasetError(f"{folder}: two {what} tiles share the stem {p.stem!r} ({out[p.stem].name}, "
                                   f"{p.name}); keep one")
            out[p.stem] = p
        return out

    imgs, msks = index(Path(images), "image"), index(Path(masks), "mask")
    lonely = sorted(set(imgs) ^ set(msks))
    if lonely:
        shown = ", ".join(lonely[:10]) + (f" and {len(lonely) - 10} more" if len(lonely) > 10 else "")
        raise DatasetError(f"tiles without a partner in {images} / {masks}: {shown}; every image tile needs "
                           "a mask with the same stem")
    return [(imgs[s], msks[s]) for s in sorted(imgs)]


def _image_header(path: Path) -> tuple[tuple[str, ...], str, tuple[int, int], np.ndarray]:
    """Band names, dtype, shape and validity mask of an image tile (PNG/JPEG need no CRS)."""
    with warnings.catch_warnings(), gdal_env():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            src = rasterio.open(path)
        except rasterio.errors.RasterioIOError as err:
            raise DatasetError(f"{path}: not a raster GDAL can read ({err})") from None
        with src:
            names = tuple(d or f"band_{i + 1}" for i, d in enumerate(src.descriptions))
            valid = np.all(src.read_masks() > 0, axis=0)
            return names, src.dtypes[0], src.shape, valid


def _read_mask(path: Path, shape: tuple[int, int], schema: ClassSchema) -> np.ndarray:
    with warnings.catch_warnings(), gdal_env():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            if src.shape != shape:
                raise DatasetError(f"{path}: mask is {src.shape[0]}x{src.shape[1]} px but its image is "
                                   f"{shape[0]}x{shape[1]}")
            return encode_labels(src.read(1), schema, nodata=src.nodata, source=str(path))


def load_labelled(
    config: DataConfig, *, label_value: int | None = None, background: int | None = None
) -> LabelledData:
    """Read the labelled data a :class:`~geoseg.config.DataConfig` points at.

    Args:
        config: where the data lives and how it is laid out.
        label_value: ``scene_vector`` only: burn this class id for every polygon.
        background: ``scene_vector`` only: class id for pixels outside polygons; when ``None`` and
            the schema has a class named ``background``, that class is used.

    Raises:
        DatasetError: missing files, labels that are not classes, mismatched bands or shapes.
        SceneNotFoundError, InvalidSceneError: the scene is missing or unusable.
        ConfigError: the class schema is invalid.
    """
    schema: ClassSchema = load_config(config.classes, ClassSchema)
    sources = {"kind": config.kind, "images": config.images, "labels": config.labels, "classes": config.classes}
    if config.kind == "tiles":
        images = []
        for img, msk in pair_tiles(config.images, config.labels):
            names, dtype, shape, valid = _image_header(img)
            labels = _read_mask(msk, shape, schema)
            labels[~valid] = schema.ignore_index
            images.append(LabelledImage(img.stem, img, labels, names, dtype))
        counts = {im.band_names for im in images}
        if len({len(n) for n in counts}) > 1:
            raise DatasetError(f"{config.images}: image tiles have different band counts "
                               f"{sorted({len(n) for n in counts})}")
        band_names = images[0].band_names
    else:
        scene = open_scene(config.images)
        if config.kind == "scene_raster":
            labels = align_label_raster(config.labels, scene.path, schema)
        else:
            bg = background if background is not None else background_id(schema)
            if bg is not None:
                sources["background"] = str(bg)
            labels = rasterize_labels(config.labels, scene.path, schema, label_field=config.label_field,
                                      label_value=label_value, background=bg)
            sources["label_field"] = config.label_field if label_value is None else f"= {label_value}"
        with rasterio.open(scene.path) as src:
            valid = np.all(src.read_masks() > 0, axis=0)
        labels[~valid] = schema.ignore_index
        band_names = scene.band_names
        images = [LabelledImage(scene.path.stem, scene.path, labels, band_names, scene.dtype)]
    n = sum(int((im.labels != schema.ignore_index).sum()) for im in images)
    if n == 0:
        raise DatasetError(f"{config.labels}: no labelled pixel on the images {config.images}")
    log.info("%d labelled images, %d labelled pixels, classes %s", len(images), n, list(schema.names))
    return LabelledData(config.kind, images, schema, band_names, sources)


def default_scale(dtype: str) -> float:
    """Factor from stored values to normalisation units: 1/255 for 8-bit images, else 1."""
    return 1 / 255 if dtype in ("uint8", "int8") else 1.0


def band_moments(data: LabelledData, boxes: Sequence[tuple[int, Box]], *, scale: float = 1.0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-band mean and standard deviation of the valid pixels in ``boxes`` (after ``scale``).

    Raises:
        DatasetError: no valid pixel in the boxes.
    """
    c = len(data.band_names)
    total, total_sq, n = np.zeros(c), np.zeros(c), 0
    for i, box in boxes:
        x, valid = data.images[i].read(box)
        px = x[:, valid].astype(np.float64) * scale
        total += px.sum(axis=1)
        total_sq += (px**2).sum(axis=1)
        n += px.shape[1]
    if n == 0:
        raise DatasetError("no valid image pixel in the training part; check the scene's nodata and the split")
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean**2, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def class_weights(counts: np.ndarray) -> np.ndarray:
    """Inverse-frequency class weights ``N / (K' * n_c)``, for the ``K'`` classes with pixels; 0 for the rest.

    Weights of the present classes average to 1.
    """
    counts = np.asarray(counts, np.float64)
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return (w / w[present].mean()).astype(np.float32)


@dataclass(frozen=True)
class Augment:
    """Random tile augmentations on tensors, drawn from a seeded numpy Generator.

    Attributes:
        flips: mirror left-right and up-down, each with probability 1/2.
        rotate90: rotate by a random multiple of 90 degrees.
        scale: zoom range ``(lo, hi)``: resize by ``s``, then crop (s > 1) or pad (s < 1) back to the
            tile size (image bilinear, labels nearest; padding is 0 and ignored); ``None``: off.
        brightness: add ``b ~ U(-brightness, brightness)`` (normalised units).
        contrast: multiply by ``c ~ U(1 - contrast, 1 + contrast)``.
    """

    flips: bool = True
    rotate90: bool = True
    scale: tuple[float, float] | None = (0.75, 1.25)
    brightness: float = 0.1
    contrast: float = 0.1

    def __call__(self, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, ignore_index: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment one tile ``x`` (C, T, T) float and its labels ``y`` (T, T) int64."""
        if self.flips and rng.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        if self.flips and rng.random() < 0.5:
            x, y = x.flip(-2), y.flip(-2)
        if self.rotate90:
            k = int(rng.integers(4))
            x, y = torch.rot90(x, k, (-2, -1)), torch.rot90(y, k, (-2, -1))
        if self.scale is not None:
            x, y = _zoom(x, y, float(rng.uniform(*self.scale)), rng, ignore_index)
        c = float(rng.uniform(1 - self.contrast, 1 + self.contrast))
        b = float(rng.uniform(-self.brightness, self.brightness))
        return (x * c + b).contiguous(), y.contiguous()


def _zoom(x: torch.Tensor, y: torch.Tensor, s: float, rng: np.random.Generator, ignore: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    t = x.shape[-1]
    n = max(1, round(t * s))
    if n == t:
        return x, y
    xs = F.interpolate(x[None], size=(n, n), mode="bilinear", align_corners=False)[0]
    ys = F.interpolate(y[None, None].float(), size=(n, n), mode="nearest")[0, 0].long()
    if n > t:
        oy, ox = (int(v) for v in rng.integers(0, n - t + 1, size=2))
        return xs[:, oy : oy + t, ox : ox + t], ys[oy : oy + t, ox : ox + t]
    oy, ox = (int(v) for v in rng.integers(0, t - n + 1, size=2))
    xo = x.new_zeros(x.shape)
    yo = y.new_full(y.shape, ignore)
    xo[:, oy : oy + n, ox : ox + n] = xs
    yo[oy : oy + n, ox : ox + n] = ys
    return xo, yo


class TileDataset(torch.utils.data.Dataset):
    """Normalised (and optionally augmented) training tiles at fixed boxes.

    Item ``i`` is ``(x, y)``: ``x`` (C, T, T) float32 ``(value * scale - mean) / std`` with invalid
    pixels 0, ``y`` (T, T) int64 channel indices with ``ignore_index`` where unlabelled or invalid.
    Augmentation of item ``i`` draws from ``numpy.random.default_rng([*seed, i])``, so an item is the
    same whichever order, process or resumed run asks for it.

    Args:
        data: the labelled images.
        boxes: ``(image index, Box)`` pairs, all of one square size.
        mean: per-band mean (after ``scale``).
        std: per-band standard deviation (after ``scale``).
        scale: factor from stored values to the units of ``mean``/``std``.
        augment: augmentations, or ``None``.
        seed: integers seeding the per-item augmentation (e.g. ``(run seed, epoch)``).
    """

    def __init__(self, data: LabelledData, boxes: Sequence[tuple[int, Box]], *, mean: Sequence[float],
                 std: Sequence[float], scale: float = 1.0, augment: Augment | None = None,
                 seed: Sequence[int] = (0,)) -> None:
        self.data = data
        self.boxes = list(boxes)
        self.mean = np.asarray(mean, np.float32)[:, None, None]
        self.std = np.asarray(std, np.float32)[:, None, None]
        self.scale = np.float32(scale)
        self.augment = augment
        self.seed = tuple(int(s) for s in seed)

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx, box = self.boxes[i]
        image = self.data.images[idx]
        x, valid = image.read(box)
        x = (x * self.scale - self.mean) / self.std
        x[:, ~valid] = 0.0
        ignore = self.data.schema.ignore_index
        y = np.full(box.shape, ignore, np.int64)
        inside = box.intersection(Box(0, 0, *image.shape))
        if inside is not None:
            y[inside.relative_to(box)] = image.labels[inside.y0 : inside.y1, inside.x0 : inside.x1]
        y[~valid] = ignore
        xt, yt = torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(y)
        if self.augment is not None:
            xt, yt = self.augment(xt, yt, np.random.default_rng([*self.seed, i]), ignore)
        return xt, yt
