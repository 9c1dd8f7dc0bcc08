"""Validated settings: pydantic models loaded from YAML files under ``configs/``.

Each kind of file has one model: ``configs/models`` → :class:`ModelConfig`, ``configs/predict`` →
:class:`PredictConfig`, ``configs/train`` → :class:`TrainConfig`, ``configs/classes`` →
:class:`ClassSchema`. :func:`load_config` turns any validation failure into a :class:`ConfigError`
that names the file, the key and the allowed values.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from geoseg.errors import ConfigError

Arch = Literal["deeplabv3", "fcn", "unet", "tiny"]
Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large", "none"]
Device = Literal["auto", "cpu", "cuda"]

#: Which backbones each architecture accepts.
BACKBONES: dict[str, tuple[str, ...]] = {
    "deeplabv3": ("resnet50", "resnet101", "mobilenet_v3_large"),
    "fcn": ("resnet50", "resnet101"),
    "unet": ("resnet18", "resnet34", "resnet50", "resnet101"),
    "tiny": ("none",),  # a small plain CNN: the stand-in for fast CPU tests and memory benchmarks
}

_HEX = re.compile(r"^#[0-9a-fA-F]{6}$")


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Settings):
    """Which network to build and at which tile size."""

    arch: Arch = "deeplabv3"
    backbone: Backbone = "resnet50"
    output_stride: Literal[8, 16, 32] = Field(
        16, description="DeepLabV3/FCN: 8 or 16; U-Net: the stride of its deepest stage (32 = five stages)"
    )
    tile_size: int = Field(640, ge=32, le=4096, description="model tile side in pixels, a multiple of 32")
    upsample: int = Field(1, ge=1, le=4, description="the network runs on each tile enlarged this many times")
    pretrained: bool = False

    @field_validator("tile_size")
    @classmethod
    def _multiple_of_32(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"tile_size must be a multiple of 32 (e.g. 320, 640, 1024), got {v}")
        return v

    @model_validator(mode="after")
    def _backbone_fits_arch(self) -> ModelConfig:
        allowed = BACKBONES[self.arch]
        if self.backbone not in allowed:
            raise ValueError(f"backbone {self.backbone!r} is not available for {self.arch}; use one of {allowed}")
        if self.output_stride == 32 and self.arch in ("deeplabv3", "fcn"):
            raise ValueError(f"output_stride 32 is for unet only; {self.arch} takes 8 or 16")
        return self


class ClassDef(_Settings):
    """One land-cover class: its id in the class raster, name and display colour."""

    id: int = Field(ge=0, le=254)
    name: str = Field(min_length=1)
    color: str = Field(description="'#rrggbb'")

    @field_validator("color")
    @classmethod
    def _hex_colour(cls, v: str) -> str:
        if not _HEX.match(v):
            raise ValueError(f"color must look like '#1a2b3c', got {v!r}")
        return v.lower()

    @property
    def rgb(self) -> tuple[int, int, int]:
        """The colour as an (r, g, b) tuple of 0-255 ints."""
        return tuple(int(self.color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


class ClassSchema(_Settings):
    """The classes a model predicts, in output-channel order."""

    name: str
    classes: tuple[ClassDef, ...] = Field(min_length=2)
    ignore_index: int = Field(255, ge=0, le=255, description="label value that is not trained on")

    @model_validator(mode="after")
    def _unique(self) -> ClassSchema:
        ids = [c.id for c in self.classes]
        names = [c.name for c in self.classes]
        if len(set(ids)) != len(ids) or len(set(names)) != len(names):
            raise ValueError(f"class ids and names must be unique, got ids {ids} and names {names}")
        if self.ignore_index in ids:
            raise ValueError(f"ignore_index {self.ignore_index} is also a class id")
        return self

    @property
    def ids(self) -> tuple[int, ...]:
        """Class ids in output-channel order."""
        return tuple(c.id for c in self.classes)

    @property
    def names(self) -> tuple[str, ...]:
        """Class names in output-channel order."""
        return tuple(c.name for c in self.classes)


#: Predict settings that never change an output byte: where the work runs (design decision 4).
#: Every other setting shapes the outputs (``batch_size`` too: it changes the last bits of float
#: probabilities on the CPU).
RUNTIME_ONLY = frozenset({"workers", "scheduler", "cluster"})
#: Predict settings that shape only the polygons, not the rasters a run's store holds.
POLYGONS_ONLY = frozenset({"vectorize", "vector_format", "min_area", "simplify"})


class BatchCluster(_Settings):
    """A cluster of batch-scheduler jobs (SLURM or PBS through dask-jobqueue), one Dask worker per job.

    The scheduler runs in the ``geoseg predict`` process; each job runs ``dask worker`` with the
    settings below (see ``geoseg.cluster.jobqueue_cluster`` and the README's SLURM recipe).
    """

    kind: Literal["slurm", "pbs"]
    jobs: int = Field(1, ge=1, description="worker jobs to submit")
    cores: int = Field(4, ge=1, description="CPU cores per job")
    memory: str = Field("16GB", description="memory per job, e.g. 32GB")
    walltime: str = Field("01:00:00", description="wall-time limit per job, HH:MM:SS")
    queue: str | None = Field(None, description="partition (SLURM) or queue (PBS)")
    account: str | None = Field(None, description="account to charge")
    gpus: int = Field(0, ge=0, description="GPUs per job (SLURM --gres=gpu:N); its worker offers the GPU resource")
    directives: tuple[str, ...] = Field((), description="extra #SBATCH/#PBS options, e.g. --constraint=a100")
    prologue: tuple[str, ...] = Field((), description="shell lines run before the worker, e.g. module load")
    interface: str | None = Field(None, description="network interface the scheduler and workers listen on, e.g. ib0")


class PredictConfig(_Settings):
    """How to run inference over a scene."""

    tile_size: int | None = Field(None, ge=32, le=4096, description="None: the checkpoint's tile size")
    margin: int | None = Field(
        None, ge=0, description="context margin in px, at most a quarter tile (None: geoseg.tiling.context_margin)"
    )
    block_size: int = Field(2048, ge=64, description="block core side; rounded down to the tile stride")
    batch_size: int = Field(8, ge=1)
    scales: tuple[float, ...] = Field((1.0,), min_length=1)
    flip: bool = False
    device: Device = "auto"
    workers: int | None = Field(
        None, ge=1, description="local Dask worker processes; None: one per GPU, else one per CPU core"
    )
    threads: int = Field(
        1, ge=1, description="torch CPU threads per worker, fixed so any worker count gives the same bytes"
    )
    scheduler: str | None = Field(None, description="address of an existing Dask scheduler, e.g. tcp://host:8786")
    cluster: BatchCluster | None = Field(None, description="submit the workers as SLURM/PBS jobs (dask-jobqueue)")
    bands: tuple[int | str, ...] | None = Field(
        None, min_length=1,
        description="scene bands in the model's order, 1-based indexes or descriptions (None: match by name or count)",
    )
    probabilities: bool = Field(False, description="also store per-class probabilities in the Zarr store")
    vectorize: bool = True
    vector_format: Literal["gpkg", "shp", "parquet"] = "gpkg"
    min_area: float | None = Field(None, ge=0, description="minimum mapping unit in m² (None: keep every region)")
    simplify: float | None = Field(None, ge=0, description="simplification tolerance in metres")

    def output_settings(self, *, rasters_only: bool = False) -> dict[str, Any]:
        """The settings that shape the outputs, JSON-ready: all but :data:`RUNTIME_ONLY`.

        ``rasters_only`` leaves out :data:`POLYGONS_ONLY` too: what shapes the store (its fingerprint).
        The batch's scene keys and the store's fingerprint both come from here.
        """
        return self.model_dump(mode="json", exclude=set(RUNTIME_ONLY | (POLYGONS_ONLY if rasters_only else set())))

    @field_validator("scales")
    @classmethod
    def _positive_scales(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(s <= 0 or s > 4 for s in v):
            raise ValueError(f"scales must lie in (0, 4], got {v}")
        return v

    @field_validator("tile_size")
    @classmethod
    def _tile_multiple_of_32(cls, v: int | None) -> int | None:
        if v is not None and v % 32:
            raise ValueError(f"tile_size must be a multiple of 32 (e.g. 320, 640, 1024), got {v}")
        return v


class SceneLabels(_Settings):
    """One labelled scene of a training set (``DataConfig.kind: scenes``)."""

    image: str = Field(description="the scene GeoTIFF")
    labels: str = Field(description="label raster (.tif, .vrt, ...) or vector file (GeoPackage, Shapefile, GeoJSON)")
    bands: tuple[int | str, ...] | None = Field(None, description="scene bands in the model's order (1-based or names)")
    label_field: str = Field("id", description="attribute holding the class id (vector labels)")


class DataConfig(_Settings):
    """Where the labelled training data lives and how it is laid out."""

    kind: Literal["tiles", "scene_raster", "scene_vector", "scenes"]
    images: str | None = Field(None, description="folder of image tiles (tiles) or the scene GeoTIFF")
    labels: str | None = Field(None, description="folder of mask tiles, label raster, or vector file")
    label_field: str = Field("id", description="attribute holding the class id (scene_vector)")
    scenes: tuple[SceneLabels, ...] = Field((), description="the labelled scenes (kind: scenes)")
    classes: str = Field(description="path of a class schema YAML under configs/classes/")

    @model_validator(mode="after")
    def _one_layout(self) -> DataConfig:
        if self.kind == "scenes":
            if not self.scenes or self.images or self.labels:
                raise ValueError("kind 'scenes' lists its (image, labels, bands) under 'scenes:' and has no "
                                 "'images'/'labels' of its own")
        elif self.scenes or not (self.images and self.labels):
            raise ValueError(f"kind {self.kind!r} needs 'images' and 'labels' (and no 'scenes'; use kind "
                             "'scenes' for several scenes)")
        return self


class TrainConfig(_Settings):
    """How to train one model (or, with ``compare``, several) on one split."""

    data: DataConfig
    model: ModelConfig = ModelConfig()
    compare: tuple[ModelConfig, ...] = ()
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(8, ge=1)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    poly_power: float = Field(0.9, gt=0)
    accumulate: int = Field(1, ge=1, description="gradient accumulation steps")
    amp: bool = True
    class_weights: bool = False
    class_balance: float = Field(0.0, ge=0, le=1, description="share of tiles drawn around a uniformly chosen class")
    loss: Literal["ce", "ce_dice"] = "ce"
    normalisation: Literal["fixed", "scene"] = Field(
        "fixed", description="fixed: the train part's band statistics; scene: each scene's own sampled ones")
    band_jitter: float = Field(0.0, ge=0, lt=1, description="per-band gain and offset jitter (normalised units)")
    early_stopping: int | None = Field(10, ge=1, description="epochs without val mIoU gain before stopping")
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_block: int = Field(64, ge=8, description="side of the spatial blocks a scene is split by")
    tiles_per_epoch: int = Field(256, ge=1)
    seed: int = 0
    device: Device = "auto"
    out_dir: str = "runs/train"

    @field_validator("model", mode="before")
    @classmethod
    def _model_file(cls, v: Any) -> Any:
        """A model may be named by its file under ``configs/models/``."""
        return load_config(v, ModelConfig).model_dump() if isinstance(v, str) else v

    @field_validator("compare", mode="before")
    @classmethod
    def _compare_files(cls, v: Any) -> Any:
        return [cls._model_file(m) for m in v] if isinstance(v, list | tuple) else v

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if abs(sum(v) - 1) > 1e-6 or min(v) < 0:
            raise ValueError(f"split fractions (train, val, test) must be >= 0 and sum to 1, got {v}")
        return v


#: Folder under configs/ → the model that validates its files.
KINDS: dict[str, type[_Settings]] = {
    "models": ModelConfig,
    "predict": PredictConfig,
    "train": TrainConfig,
    "classes": ClassSchema,
}

S = TypeVar("S", bound=_Settings)


def _allowed(model: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    """Describe the keys allowed at ``loc`` (the parent of an unknown key)."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        inner = [a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        elif inner:
            model = inner[0]
        elif isinstance(part, int):
            continue
        else:
            return ""
    return ", ".join(model.model_fields)


def _format(path: str, model: type[BaseModel], err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = f"unknown key; allowed keys: {_allowed(model, e['loc'])}"
        lines.append(f"{path}: {key}: {msg}")
    return "\n".join(lines)


def validate(model: type[S], data: dict[str, Any], *, source: str = "<settings>") -> S:
    """Validate ``data`` against ``model``, raising :class:`ConfigError` that names ``source``."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format(source, model, err)) from None


def load_config(path: str | Path, model: type[S] | None = None) -> S:
    """Load and validate one YAML settings file.

    Args:
        path: the YAML file.
        model: the settings model; when omitted it is chosen from the folder name
            (``models``, ``predict``, ``train`` or ``classes``).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: settings file not found")
    if model is None:
        kind = path.parent.name
        if kind not in KINDS:
            raise ConfigError(f"{path}: cannot tell the kind of settings; put it under configs/{{{','.join(KINDS)}}}/")
        model = KINDS[kind]  # type: ignore[assignment]
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return validate(model, data, source=str(path))  # type: ignore[arg-type]


def settings_with_overrides(
    model: type[S], config: str | Path | dict[str, Any] | None = None, **overrides: Any
) -> S:
    """Settings from a YAML path, a dict or the defaults, with the non-None ``overrides`` applied."""
    if isinstance(config, str | Path):
        base = load_config(config, model).model_dump()
    else:
        base = dict(config or {})
    base.update({k: v for k, v in overrides.items() if v is not None})
    return validate(model, base, source=str(config or "command-line options"))
