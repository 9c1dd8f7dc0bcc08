"""Labelled training data: tile folders, a scene with a label raster, or a scene with vector labels.

Every source is read into :class:`LabelledImage` values: the image stays on disk (read by window with
:func:`geoseg.raster.read_window`), the labels are held in memory as *channel indices* (one byte per
pixel, :mod:`geoseg.train.labels`): class ``schema.classes[k].id`` becomes ``k``, and ``schema.ignore_index``
(255) marks pixels that are not trained on or scored — label nodata, unlabelled pixels and scene-nodata
pixels.

Sources (``DataConfig.kind``):

- ``tiles``: a folder of image tiles and a folder of masks, paired by file stem
  (``images/x.tif`` ↔ ``masks/x.tif`` or ``masks/x.png``).
- ``scene_raster``: a scene plus a label raster; a label raster on another grid or CRS is aligned to
  the scene's grid with nearest resampling (:func:`rasterio.warp.reproject`).
- ``scene_vector``: a scene plus polygons (GeoPackage, Shapefile, GeoJSON) with a class attribute,
  reprojected to the scene CRS and burnt onto the scene grid (:func:`rasterio.features.rasterize`,
  ``all_touched=False``: a pixel is labelled when its centre lies inside a polygon).  Pixels outside
  every polygon are unlabelled (ignored), unless a *background* class is given: then they take it.

:class:`TileDataset` turns boxes on those images into normalised, augmented (:mod:`geoseg.train.augment`)
``(x, y)`` tensors.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning

from geoseg.config import ClassSchema, DataConfig, SceneLabels, load_config
from geoseg.errors import DatasetError
from geoseg.raster import gdal_env, open_scene, read_window, resolve_bands
from geoseg.tiling import Box
from geoseg.train.augment import Augment
from geoseg.train.labels import background_id, encode_labels, read_labels

log = logging.getLogger(__name__)

#: File endings read as tiles (image or mask) in a tile folder.
TILE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
#: A band name GDAL gives a band without description.
_UNNAMED = re.compile(r"band_\d+")

@dataclass(eq=False)
class LabelledImage:
    """One labelled raster (a whole scene or one tile file).

    Attributes:
        name: a short name (file stem) used in splits and reports.
        path: the image file; read by window, never held in memory.
        labels: ``(H, W)`` uint8 channel indices, ``ignore_index`` where unlabelled or invalid.
        band_names: the image's bands in order.
        dtype: the image's pixel type.
        bands: 1-based scene bands read, in the model's order (None: all).
    """

    name: str
    path: Path
    labels: np.ndarray
    band_names: tuple[str, ...]
    dtype: str
    bands: tuple[int, ...] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.labels.shape  # type: ignore[return-value]

    def read(self, box: Box) -> tuple[np.ndarray, np.ndarray]:
        """``(data, valid)`` of ``box``: (bands, h, w) float32 and (h, w) bool (see ``read_window``)."""
        with warnings.catch_warnings(), gdal_env():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(self.path) as src:
                return read_window(src, box, bands=self.bands)


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
        if config.kind == "scenes":
            specs = list(config.scenes)
            sources["scenes"] = [spec.model_dump(mode="json") for spec in specs]
        else:
            specs = [SceneLabels(image=config.images, labels=config.labels, label_field=config.label_field)]
            if config.kind == "scene_vector":
                sources["label_field"] = config.label_field if label_value is None else f"= {label_value}"
        bg = background if background is not None else background_id(schema)
        if bg is not None and config.kind != "scene_raster":
            sources["background"] = str(bg)
        images = [_load_scene(spec, schema, label_value=label_value, background=bg) for spec in specs]
        band_names = _shared_band_names(images)
    n = sum(int((im.labels != schema.ignore_index).sum()) for im in images)
    if n == 0:
        where = [f"{s.labels} on {s.image}" for s in config.scenes] or [f"{config.labels} on {config.images}"]
        raise DatasetError(f"no labelled pixel of the classes {list(schema.names)} in {'; '.join(where)}")
    log.info("%d labelled images, %d labelled pixels, classes %s", len(images), n, list(schema.names))
    return LabelledData(config.kind, images, schema, band_names, sources)


def _load_scene(spec: SceneLabels, schema: ClassSchema, *, label_value: int | None, background: int | None
                ) -> LabelledImage:
    """One labelled scene: its labels on its grid, invalid pixels (in any chosen band) ignored."""
    scene = open_scene(spec.image)
    bands = resolve_bands(scene, spec.bands)
    labels = read_labels(spec.labels, scene.path, schema, label_field=spec.label_field, label_value=label_value,
                         background=background)
    with gdal_env(), rasterio.open(scene.opens) as src:
        valid = np.all(src.read_masks(list(bands)) > 0, axis=0)
    labels[~valid] = schema.ignore_index
    names = tuple(scene.band_names[b - 1] for b in bands)
    return LabelledImage(scene.stem, scene.path, labels, names, scene.dtype, bands)


def _shared_band_names(images: Sequence[LabelledImage]) -> tuple[str, ...]:
    """The band names every scene shares; a scene without band descriptions takes the others' by position.

    Raises:
        DatasetError: the scenes have different band counts, or differently named bands.
    """
    named = [im for im in images if not all(_UNNAMED.fullmatch(n) for n in im.band_names)] or images[:1]
    first = named[0]
    for im in images:
        if len(im.band_names) != len(first.band_names):
            raise DatasetError(f"{im.path} gives {len(im.band_names)} bands but {first.path} gives "
                               f"{len(first.band_names)}; pick the same bands with 'bands:' for every scene")
    for im in named:
        if im.band_names != first.band_names:
            raise DatasetError(f"{im.path} has bands {list(im.band_names)} but {first.path} has "
                               f"{list(first.band_names)}; order them alike with 'bands:'")
    return first.band_names


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


class TileDataset(torch.utils.data.Dataset):
    """Normalised (and optionally augmented) training tiles at fixed boxes.

    Item ``i`` is ``(x, y)``: ``x`` (C, T, T) float32 ``(value * scale - mean) / std`` with invalid
    pixels 0, ``y`` (T, T) int64 channel indices with ``ignore_index`` where unlabelled or invalid.
    Augmentation of item ``i`` draws from ``numpy.random.default_rng([*seed, i])``, so an item is the
    same whichever order, process or resumed run asks for it.

    Args:
        data: the labelled images.
        boxes: ``(image index, Box)`` pairs, all of one square size.
        mean: per-band mean (after ``scale``), or one such row per image.
        std: per-band standard deviation (after ``scale``), or one such row per image.
        scale: factor from stored values to the units of ``mean``/``std``.
        augment: augmentations, or ``None``.
        seed: integers seeding the per-item augmentation (e.g. ``(run seed, epoch)``).
    """

    def __init__(self, data: LabelledData, boxes: Sequence[tuple[int, Box]], *, mean: Sequence[float],
                 std: Sequence[float], scale: float = 1.0, augment: Augment | None = None,
                 seed: Sequence[int] = (0,)) -> None:
        self.data = data
        self.boxes = list(boxes)
        rows = len(data.images)
        self.mean = np.broadcast_to(np.asarray(mean, np.float32), (rows, len(data.band_names)))[..., None, None]
        self.std = np.broadcast_to(np.asarray(std, np.float32), (rows, len(data.band_names)))[..., None, None]
        self.scale = np.float32(scale)
        self.augment = augment
        self.seed = tuple(int(s) for s in seed)

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx, box = self.boxes[i]
        image = self.data.images[idx]
        x, valid = image.read(box)
        x = (x * self.scale - self.mean[idx]) / self.std[idx]
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
