"""Checkpoints that carry their contract: one file with the weights and everything needed to use them.

A checkpoint is a single ``torch.save`` file holding only plain types and tensors::

    {"format": "geoseg-checkpoint", "version": 1,
     "contract": ModelContract.to_dict(),          # arch, bands, normalisation, classes, provenance
     "state_dict": {name: tensor},                   # float32, or float16 when saved with half=True
     "weights_dtype": "float32" | "float16"}

It is read with ``torch.load(weights_only=True)``: a file that holds pickled code (a whole
``nn.Module``, any class instance) is refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from geoseg.atomic import atomic_write
from geoseg.config import BACKBONES, ClassSchema, ModelConfig, validate
from geoseg.errors import CheckpointError, ConfigError
from geoseg.location import fetch, is_url
from geoseg.models import build_model, receptive_field, required_stride
from geoseg.raster import SceneInfo, band_stats, check_bands
from geoseg.tiling import context_margin

#: A numpy array or a torch tensor (``ModelContract.normalise`` returns the kind it is given).
Array = TypeVar("Array", np.ndarray, torch.Tensor)

FORMAT = "geoseg-checkpoint"
VERSION = 1
#: How a contract normalises scenes (see :attr:`ModelContract.normalisation`).
NORMALISATIONS = ("fixed", "scene")
_REQUIRED = ("arch", "backbone", "output_stride", "tile_size", "band_names", "mean", "std", "classes")


@dataclass(frozen=True)
class ModelContract:
    """What a trained network expects and predicts; travels inside its checkpoint.

    Attributes:
        arch: ``deeplabv3``, ``fcn``, ``unet`` or ``tiny``.
        backbone: one of ``geoseg.config.BACKBONES[arch]``.
        output_stride: the DeepLabV3/FCN output stride (8 or 16), or the U-Net depth as a stride
            (8, 16 or 32), the network was built with.
        tile_size: the tile side the network was trained at, in pixels.
        band_names: the input bands, in the network's channel order.
        mean: per-band mean, applied after ``scale``.
        std: per-band standard deviation, applied after ``scale``.
        classes: class ids, names and colours in output-channel order, and the ignore index.
        scale: factor from stored pixel values to the units of ``mean``/``std`` (e.g. 1/255 for uint8).
        receptive_field: receptive field in pixels, ``None`` when larger than any tile; ``"auto"``
            (the default) takes :func:`geoseg.models.receptive_field` of ``arch``.
        upsample: the network runs on tiles enlarged this many times (:class:`geoseg.models.Upsampled`).
        normalisation: ``fixed``: every scene is normalised with ``mean``/``std`` (the train part's);
            ``scene``: each scene with its own band statistics, sampled when it is predicted
            (:meth:`for_scene`; ``mean``/``std`` then record the train part's, for reference).
        provenance: JSON-able facts about training: data, epochs, metrics, date, ...
    """

    arch: str
    backbone: str
    output_stride: int
    tile_size: int
    band_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: ClassSchema
    scale: float = 1.0
    receptive_field: int | None | str = "auto"
    upsample: int = 1
    normalisation: str = "fixed"
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.arch not in BACKBONES or self.backbone not in BACKBONES[self.arch]:
            raise ConfigError(
                f"unknown arch/backbone {self.arch}/{self.backbone}; valid: "
                + "; ".join(f"{a}: {', '.join(b)}" for a, b in BACKBONES.items())
            )
        put("band_names", tuple(str(b) for b in self.band_names))
        put("mean", tuple(float(m) for m in np.ravel(self.mean)))
        put("std", tuple(float(s) for s in np.ravel(self.std)))
        put("output_stride", int(self.output_stride))
        put("tile_size", int(self.tile_size))
        put("scale", float(self.scale))
        put("upsample", int(self.upsample))
        n = len(self.band_names)
        if n == 0 or len(self.mean) != n or len(self.std) != n:
            raise ConfigError(
                f"contract needs one mean and one std per band: {n} bands, {len(self.mean)} means, "
                f"{len(self.std)} stds"
            )
        if len(set(self.band_names)) != n:
            raise ConfigError(f"band names must be unique, got {list(self.band_names)}")
        if not all(np.isfinite(s) and s > 0 for s in self.std) or not all(np.isfinite(self.mean)):
            raise ConfigError(f"std must be finite and > 0, mean finite; got {self.mean}, {self.std}")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"scale must be finite and > 0, got {self.scale}")
        if self.normalisation not in NORMALISATIONS:
            raise ConfigError(f"normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}")
        if self.tile_size < 1:
            raise ConfigError(f"tile_size must be positive, got {self.tile_size}")
        if not isinstance(self.classes, ClassSchema):
            put("classes", validate(ClassSchema, dict(self.classes), source="contract classes"))
        if self.receptive_field == "auto":
            put("receptive_field", receptive_field(self.arch))
        elif self.receptive_field is not None:
            put("receptive_field", int(self.receptive_field))
        try:
            put("provenance", json.loads(json.dumps(dict(self.provenance), allow_nan=False)))
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"provenance must hold only JSON values (str, number, bool, None, list, dict): {err}"
            ) from None

    def for_scene(self, scene: SceneInfo, bands: Sequence[int]) -> ModelContract:
        """The contract to normalise ``scene`` (its ``bands``, in model order) with.

        ``fixed``: this contract.  ``scene``: a copy whose ``mean``/``std`` are the scene's own band
        statistics, from a seeded sample of windows (:func:`geoseg.raster.band_stats`).
        """
        if self.normalisation == "fixed":
            return self
        mean, std = band_stats(scene, bands=bands)
        return replace(self, mean=tuple(mean * self.scale), std=tuple(std * self.scale))

    @property
    def in_channels(self) -> int:
        """Number of input bands."""
        return len(self.band_names)

    @property
    def num_classes(self) -> int:
        """Number of output classes."""
        return len(self.classes.classes)

    @property
    def required_stride(self) -> int:
        """The multiple tiles are padded to before the forward (:func:`geoseg.models.required_stride`)."""
        return required_stride(self.arch, self.output_stride)

    def margin(self, tile: int, chosen: int | None = None) -> int:
        """The context margin at ``tile`` px: ``chosen`` (checked), else :func:`geoseg.tiling.context_margin`.

        Raises:
            ConfigError: ``chosen`` passes a quarter tile, or is off the model's feature grid (not a
                multiple of half its output stride, so tile origins would fall between feature pixels).
        """
        stride = self.required_stride
        if chosen is None:
            return context_margin(tile, stride, self.receptive_field)
        step = max(stride // 2, 1)
        if chosen > tile // 4 or chosen % step:
            valid = ", ".join(str(m) for m in range(0, tile // 4 + 1, step))
            raise ConfigError(f"margin {chosen} px does not fit tile {tile} px of this model: use one of {valid}")
        return chosen

    def normalise(self, data: Array, valid: Array, *, inplace: bool = False) -> Array:
        """Per band ``(data * scale - mean) / std`` in float32, with invalid pixels set to 0.

        Numpy arrays give a numpy array; tensors give a tensor on their device (the predict job
        normalises a block on the GPU, after copying its bands there in the scene's small data type).
        Both run the same float32 operations, so they give the same values.

        Args:
            data: ``(C, H, W)`` pixel values in the network's band order.
            valid: ``(H, W)`` bool, False where the pixel is nodata (same kind as ``data``).
            inplace: reuse ``data``'s memory when it is float32 (a block then holds one copy of its bands).

        Returns:
            ``(C, H, W)`` float32.
        """
        if isinstance(data, np.ndarray):
            return self.normalise(torch.from_numpy(data), torch.from_numpy(np.asarray(valid)), inplace=inplace).numpy()
        if data.ndim != 3 or data.shape[0] != self.in_channels:
            raise ValueError(f"expected ({self.in_channels}, H, W) data for bands {list(self.band_names)}, "
                             f"got shape {tuple(data.shape)}")
        if valid.shape != data.shape[1:]:
            raise ValueError(f"valid mask shape {tuple(valid.shape)} does not match data {tuple(data.shape[1:])}")
        mean = torch.tensor(self.mean, dtype=torch.float32, device=data.device)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32, device=data.device)[:, None, None]
        out = data.to(torch.float32, copy=not inplace)
        out.mul_(torch.tensor(self.scale, dtype=torch.float32)).sub_(mean).div_(std)
        out[:, ~valid.to(out.device)] = 0.0
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (lists, not tuples)."""
        d = {
            "arch": self.arch, "backbone": self.backbone, "output_stride": self.output_stride,
            "tile_size": self.tile_size, "band_names": list(self.band_names), "mean": list(self.mean),
            "std": list(self.std), "scale": self.scale, "classes": self.classes.model_dump(mode="json"),
            "receptive_field": self.receptive_field, "upsample": self.upsample, "normalisation": self.normalisation,
            "provenance": self.provenance,
        }
        return json.loads(json.dumps(d))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelContract:
        """Inverse of :meth:`to_dict`.

        Raises:
            ConfigError: a required key is missing or a value is invalid.
        """
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"contract lacks {', '.join(missing)}")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"contract has unknown keys {', '.join(unknown)}")
        try:
            return cls(**d)
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:
            raise ConfigError(f"invalid contract: {err}") from None


def local_checkpoint(location: str | Path) -> Path:
    """The checkpoint as a local file: a path as it is, a URL fetched once into the cache.

    See :func:`geoseg.location.fetch` for the cache.

    Raises:
        SceneNotFoundError: no object at the URL; StorageError: access denied or no store there.
    """
    return fetch(location) if is_url(location) else Path(location)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(
    path: str | Path, model: nn.Module, contract: ModelContract, *, half: bool = False
) -> Path:
    """Write ``model``'s weights and ``contract`` to one file, atomically (temp name + rename).

    Args:
        path: the checkpoint file to write (replaced if it exists; parent folders are created).
        model: the network; its state dict is copied to the CPU.
        contract: what the network expects and predicts.
        half: store floating-point weights as float16 (half the size; loaded back as float32).

    Returns:
        The path written.
    """
    if not isinstance(contract, ModelContract):
        raise TypeError(f"contract must be a ModelContract, got {type(contract).__name__}")
    path = Path(path)
    state = {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu")
        if half and t.is_floating_point():
            t = t.to(torch.float16)
        state[_strip_wrappers(name)] = t.contiguous().clone()
    payload = {
        "format": FORMAT, "version": VERSION, "contract": contract.to_dict(), "state_dict": state,
        "weights_dtype": "float16" if half else "float32",
    }
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)
    return path


def _strip_wrappers(name: str) -> str:
    """Drop prefixes added by ``torch.compile`` (``_orig_mod.``) and DDP (``module.``)."""
    for prefix in ("_orig_mod.", "module."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


def _read(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file. Check the path (relative paths start at "
                              f"{Path.cwd()}).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Weights only load failed" in text or "Unsupported global" in text:
            what = re.search(r"GLOBAL ([\w.]+)", text)
            raise CheckpointError(
                f"{path}: holds pickled code ({what.group(1) if what else 'a Python object'}) and will "
                "not be unpickled, since loading it could run arbitrary code. If you trust the file, "
                "re-save it as a geoseg checkpoint: obj = torch.load(path, weights_only=False); build the "
                "model, then geoseg.save_checkpoint(new_path, model, contract) with its ModelContract."
            ) from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({err}).") from None
    except Exception as err:  # noqa: BLE001 - truncated, empty, not a zip, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err}). "
                              "Is it truncated or another kind of file?") from None


def load_checkpoint(
    path: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelContract]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the checkpoint file, or its URL (fetched once per machine, see :func:`local_checkpoint`).
        device: ``cpu``, ``cuda``, ``auto`` or a ``torch.device`` to put the model on.

    Returns:
        ``(model, contract)``; the model is float32, on ``device``, in eval mode.

    Raises:
        CheckpointError: the file is missing, unreadable, holds pickled code, is not a geoseg
            checkpoint, or its contract or weights are inconsistent.  The message names the file.
    """
    from geoseg.predict import resolve_device

    path = local_checkpoint(path)
    obj = _read(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        hint = ""
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            hint = (" It looks like a bare state dict: re-save it with "
                    "geoseg.save_checkpoint(path, model, contract).")
        raise CheckpointError(f"{path}: not a geoseg checkpoint (no format={FORMAT!r} entry).{hint}")
    version = obj.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {version!r} is newer than this geoseg reads ({VERSION}); "
            "upgrade geoseg."
        )
    if not isinstance(obj.get("contract"), dict) or not isinstance(obj.get("state_dict"), dict):
        raise CheckpointError(f"{path}: checkpoint lacks its 'contract' or 'state_dict' entry.")
    try:
        contract = ModelContract.from_dict(obj["contract"])
    except ConfigError as err:
        raise CheckpointError(f"{path}: bad contract: {err}") from None
    model = build_model(contract.arch, contract.backbone, contract.in_channels, contract.num_classes,
                        output_stride=contract.output_stride, upsample=contract.upsample)
    state = {k: v.float() if v.is_floating_point() else v for k, v in obj["state_dict"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: weights do not fit {contract.arch}/{contract.backbone} with {contract.in_channels} "
            f"bands and {contract.num_classes} classes as its contract says: {str(err).splitlines()[0]}"
        ) from None
    return model.to(resolve_device(device)).eval(), contract


def check_scene(contract: ModelContract, scene: SceneInfo) -> tuple[int, ...]:
    """Check, before any compute, that ``scene`` has the bands the model expects.

    Returns:
        The scene's 1-based band indexes in the model's band order.

    Raises:
        BandMismatchError: names or count do not match (the message names the scene and the fix).
    """
    return check_bands(scene, contract.band_names)


def contract_for(
    config: ModelConfig,
    *,
    band_names: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    classes: ClassSchema,
    scale: float = 1.0,
    normalisation: str = "fixed",
    provenance: Mapping[str, Any] | None = None,
) -> ModelContract:
    """Make a contract from a :class:`geoseg.config.ModelConfig` plus the data facts."""
    return ModelContract(
        arch=config.arch, backbone=config.backbone, output_stride=config.output_stride,
        tile_size=config.tile_size, band_names=tuple(band_names), mean=tuple(mean), std=tuple(std),
        classes=classes, scale=scale, upsample=config.upsample, normalisation=normalisation,
        provenance=dict(provenance or {}),
    )
