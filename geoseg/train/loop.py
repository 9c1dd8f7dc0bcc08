"""Train one segmentation network on a spatially held-out split, with checkpoints that carry their contract.

:func:`train` runs in named steps: :func:`_start` (check the run folder, load the scenes and the
split, build or restore the state), then per epoch :func:`_epoch` and :func:`_checkpoint`, then
:func:`_finish`.  An epoch draws ``tiles_per_epoch`` tiles around labelled train pixels (rounded up
to whole batches; seeded by ``(seed, epoch)``; a ``class_balance`` share of them for a uniformly
drawn class), trains on the train part's labels only, augments the tiles (seeded per tile: flips,
rotations, zoom, brightness/contrast, per-band jitter), steps the optimizer (SGD with momentum 0.9,
or AdamW) every ``accumulate`` batches on the ``loss`` (:mod:`geoseg.train.losses`), and scores the
val part on whole scenes through the predict path's tiling (:mod:`geoseg.train.scoring`).  Then
``last.pt`` (weights, optimizer, scheduler, AMP scaler, RNG states, history) is written and, when
the val macro mIoU improves, ``best.pt``.  The learning rate follows the poly schedule of the
DeepLabV3 paper::

    lr(it) = lr * (1 - it / max_it) ** poly_power,   it = optimizer steps so far,
    max_it = epochs * ceil(batches_per_epoch / accumulate)

Training stops early after ``early_stopping`` epochs without a val mIoU gain.  Afterwards the best
weights are scored on the test part and ``metrics.json`` is written.  ``resume=True`` continues from
``last.pt``: on the CPU the continued run's losses equal an uninterrupted run's.  AMP (bf16, or fp16
with loss scaling) is used on CUDA only.  Normalisation: the contract's mean/std are computed
exactly over the valid pixels of the train part; with ``normalisation: scene`` each scene is
normalised with its own sampled statistics instead, in training and at predict time alike
(:meth:`geoseg.checkpoint.ModelContract.for_scene`).  Batch norms train with momentum :data:`BN_MOMENTUM`.

Files in the run folder: ``split.json``, ``best.pt``, ``last.pt``, ``metrics.json``, ``curves.png``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.warp
import torch
from torch import nn

from geoseg.atomic import atomic_write, write_bytes, write_text
from geoseg.checkpoint import FORMAT, VERSION, ModelContract, contract_for, load_checkpoint, save_checkpoint
from geoseg.config import TrainConfig
from geoseg.errors import CheckpointError, ConfigError, OutputExistsError
from geoseg.models import build_model
from geoseg.predict import Predictor, resolve_device
from geoseg.raster import open_scene
from geoseg.train.augment import Augment
from geoseg.train.datasets import (
    LabelledData,
    TileDataset,
    band_moments,
    class_weights,
    default_scale,
    load_labelled,
)
from geoseg.train.losses import make_loss
from geoseg.train.metrics import curves_png
from geoseg.train.scoring import score_parts
from geoseg.train.splits import Split, TileSampler, make_split, part_labels

log = logging.getLogger(__name__)

#: Batch-norm momentum while training.  torchvision's MobileNetV3 uses 0.01 (tuned for long ImageNet
#: runs): after a few hundred steps its running statistics still lean on their initial values and the
#: eval-mode network predicts one class.  0.1 (PyTorch's default) lets them keep up with short runs.
BN_MOMENTUM = 0.1

#: Called after every epoch with that epoch's row of the history (see :func:`train`).
Progress = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        out_dir: the run folder.
        best: ``best.pt``, the weights with the best val macro mIoU (float32, full contract).
        last: ``last.pt``, the latest weights plus the state to resume from.
        split: ``split.json``.
        metrics_file: ``metrics.json``: test and val metrics of the best weights, history, split.
        test: metrics of the best weights on the test part (see :mod:`geoseg.train.metrics`), or None.
        val: metrics of the best weights on the val part, or None.
        history: one row per epoch: epoch, loss, val_miou, val_pixel_accuracy, lr, seconds, best.
        losses: the training loss of every batch, in order.
        best_epoch: the epoch (1-based) of ``best.pt``.
        epochs_run: epochs trained, resumed ones included.
        stopped_early: whether early stopping ended the run.
        seconds: training time, resumed parts included.
        device: the device trained on.
    """

    out_dir: Path
    best: Path
    last: Path
    split: Path
    metrics_file: Path
    test: dict[str, Any] | None
    val: dict[str, Any] | None
    history: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    best_epoch: int = 0
    epochs_run: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    device: str = "cpu"


def load_training_data(config: TrainConfig) -> LabelledData:
    """The labelled data of ``config.data`` (see :func:`geoseg.train.datasets.load_labelled`)."""
    d = config.data
    return load_labelled(d, label_value=getattr(d, "label_value", None), background=getattr(d, "background", None))


def make_data_split(config: TrainConfig, data: LabelledData) -> Split:
    """The split of ``data``: blocks of ``config.split_block`` px for scenes, whole files for tiles.

    Several scenes are split on one lattice on the ground (:func:`scene_places`), so a place that two
    scenes show is in the same part in both.
    """
    tiles = data.kind == "tiles"
    return make_split([im.labels for im in data.images], [im.name for im in data.images],
                      num_classes=data.num_classes, block=None if tiles else config.split_block,
                      fractions=config.split, seed=config.seed, ignore_index=data.schema.ignore_index,
                      places=None if tiles or len(data.images) < 2 else scene_places(data))


def scene_places(data: LabelledData) -> list[tuple[float, float]] | None:
    """Per scene, its top-left corner in pixels of the first scene; None when pixel sizes differ."""
    with rasterio.open(data.images[0].path) as ref:
        crs, inverse, size = ref.crs, ~ref.transform, abs(ref.transform.a)
    places = []
    for im in data.images:
        with rasterio.open(im.path) as src:
            if abs(abs(src.transform.a) - size) > 0.01 * size:
                log.warning("scenes of different pixel sizes: each is split on its own block lattice")
                return None
            xs, ys = rasterio.warp.transform(src.crs, crs, [src.transform.c], [src.transform.f])
        col, row = inverse @ (xs[0], ys[0])
        places.append((row, col))
    return places


def image_contracts(contract: ModelContract, data: LabelledData) -> list[ModelContract]:
    """Per image, the contract that normalises it (:meth:`ModelContract.for_scene`, as predict will)."""
    if contract.normalisation == "fixed":
        return [contract] * len(data.images)
    if data.kind == "tiles":
        raise ConfigError("normalisation 'scene' needs scenes (kind scene_raster, scene_vector or scenes), not tiles")
    return [contract.for_scene(open_scene(im.path), im.bands or range(1, len(im.band_names) + 1))
            for im in data.images]


def score(model: nn.Module, contracts: Sequence[ModelContract], data: LabelledData, split: Split, part: str,
          device: torch.device, batch_size: int) -> dict[str, Any] | None:
    """Whole-image metrics of ``part`` (:mod:`geoseg.train.scoring`); None without labels. Leaves eval mode on.

    ``contracts``: per image, the contract that normalises it (see :func:`image_contracts`).
    """
    predictor = Predictor(model, contracts[0], device=device, batch_size=batch_size)
    return score_parts(predictor, data, split, [part], contracts)[part]


def _poly(max_it: int, power: float) -> Callable[[int], float]:
    return lambda it: max(0.0, 1.0 - it / max_it) ** power


def _set_bn_momentum(model: nn.Module, momentum: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def _config_key(config: TrainConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the interrupted one."""
    d = config.model_dump(mode="json")
    for k in ("out_dir", "device", "early_stopping", "compare"):
        d.pop(k, None)
    return d


def _atomic_save(obj: Any, path: Path) -> None:
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def _save_last(path: Path, model: nn.Module, contract: ModelContract, state: dict[str, Any]) -> None:
    """A geoseg checkpoint (readable by ``load_checkpoint``) plus a ``train_state`` entry to resume from."""
    _atomic_save({
        "format": FORMAT, "version": VERSION, "contract": contract.to_dict(), "weights_dtype": "float32",
        "state_dict": {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()},
        "train_state": state,
    }, path)


def _load_last(path: Path, config: TrainConfig) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated or foreign file
        raise CheckpointError(f"{path}: cannot resume, not a readable checkpoint ({err})") from None
    state = obj.get("train_state") if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: has no training state to resume from (was it written by geoseg train?)")
    old, new = json.loads(state["config"]), _config_key(config)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise ConfigError(f"{path}: cannot resume with different settings ({', '.join(diff)}); use the "
                          "interrupted run's config, or train into a new out_dir")
    state["state_dict"] = obj["state_dict"]
    return state


@dataclass
class _Run:
    """Everything one training run holds between its steps (see :func:`train`)."""

    config: TrainConfig
    out: Path
    device: torch.device
    amp: bool
    amp_dtype: torch.dtype
    data: LabelledData
    train_data: LabelledData
    split: Split
    split_path: Path
    sampler: TileSampler
    contract: ModelContract
    scaling: list[ModelContract]
    provenance: dict[str, Any]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    augment: Augment
    batches: int
    t_start: float
    history: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    best_miou: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    start_epoch: int = 0
    stopped: bool = False
    before: float = 0.0

    @property
    def last_path(self) -> Path:
        return self.out / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out / "best.pt"

    def seconds(self) -> float:
        """Training time of every (resumed) part so far."""
        return self.before + time.perf_counter() - self.t_start


def train(
    config: TrainConfig,
    *,
    out_dir: str | Path | None = None,
    progress: Progress | None = None,
    resume: bool = False,
    overwrite: bool = False,
    split: Split | None = None,
) -> TrainResult:
    """Train ``config.model`` on ``config.data``; see the module docstring for the loop and files.

    Args:
        config: the training settings.
        out_dir: run folder (default ``config.out_dir``).
        progress: called after each epoch (after ``last.pt`` is written) with the epoch's row:
            ``epoch``, ``epochs``, ``loss`` (mean over the epoch's batches), ``val_miou`` (macro),
            ``val_pixel_accuracy``, ``lr`` (at the epoch's start), ``seconds``, ``best``.  An
            exception it raises stops training; ``resume=True`` continues later.
        resume: continue from ``out_dir/last.pt`` (the settings must match).
        overwrite: start afresh even if ``out_dir`` holds another run's ``last.pt``.
        split: use this split instead of drawing one (e.g. to compare models on the same split).

    Raises:
        OutputExistsError: ``out_dir`` holds a run and neither ``resume`` nor ``overwrite`` was given.
        DatasetError: the data or labels are invalid, or no training tile fits.
        ConfigError: invalid settings, or settings that differ from the run being resumed.
    """
    run = _start(config, Path(out_dir if out_dir is not None else config.out_dir), resume, overwrite, split)
    for epoch in range(run.start_epoch, config.epochs if not run.stopped else run.start_epoch):
        row = _epoch(run, epoch)
        _checkpoint(run, epoch, row)
        log.info("epoch %d/%d loss %.4f val mIoU %s", epoch + 1, config.epochs, row["loss"],
                 "n/a" if row["val_miou"] is None else f"{row['val_miou']:.4f}")
        if progress is not None:
            progress({k: v for k, v in row.items() if k != "val"})
        if run.stopped:
            log.info("early stopping: no val mIoU gain in %d epochs", run.bad_epochs)
            break
    return _finish(run)


def _start(config: TrainConfig, out: Path, resume: bool, overwrite: bool, split: Split | None) -> _Run:
    """Check the run folder and settings, load the data and split, build (or restore) the training state."""
    t_start = time.perf_counter()
    state = None
    if resume and (out / "last.pt").exists():
        state = _load_last(out / "last.pt", config)
    elif resume:
        log.warning("%s not found; starting a new run", out / "last.pt")
    elif (out / "last.pt").exists() and not overwrite:
        raise OutputExistsError(f"{out} already holds a training run (last.pt); resume it, pass overwrite, "
                                "or choose another out_dir")
    mc = config.model
    if mc.arch == "deeplabv3" and config.batch_size < 2:
        raise ConfigError("deeplabv3 needs batch_size >= 2 to train (its ASPP pooling branch batch-normalises "
                          "one value per tile)")
    device = resolve_device(config.device)
    amp = config.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16

    data = load_training_data(config)
    if state is not None:
        split = Split.from_dict(state["split"])
    elif split is None:
        split = make_data_split(config, data)
    out.mkdir(parents=True, exist_ok=True)
    split_path = split.save(out / "split.json")
    labels = [im.labels for im in data.images]
    train_labels = part_labels(split, labels, "train", data.schema.ignore_index)
    train_data = dataclasses.replace(data, images=[dataclasses.replace(im, labels=lab)
                                                   for im, lab in zip(data.images, train_labels, strict=True)])
    sampler = TileSampler(train_labels, mc.tile_size, data.num_classes, config.class_balance)
    train_boxes = split.boxes("train")
    scale = default_scale(data.images[0].dtype)
    if state is not None:
        contract = ModelContract.from_dict(state["contract"])
    else:
        mean, std = band_moments(data, train_boxes, scale=scale)
        contract = contract_for(mc, band_names=data.band_names, mean=mean, std=std, classes=data.schema, scale=scale,
                                normalisation=config.normalisation)
    provenance = {
        "data": data.sources, "seed": config.seed, "epochs": config.epochs, "tiles_per_epoch": config.tiles_per_epoch,
        "batch_size": config.batch_size, "optimizer": config.optimizer, "lr": config.lr,
        "split_block": split.block, "split": split.to_dict(), "split_summary": split.summary(labels, data.num_classes),
        "device": str(device), "torch": torch.__version__, "train_config": config.model_dump(mode="json"),
    }

    torch.manual_seed(config.seed)
    model = build_model(mc.arch, mc.backbone, len(data.band_names), data.num_classes, mc.output_stride,
                        mc.pretrained, band_names=data.band_names, upsample=mc.upsample).to(device)
    _set_bn_momentum(model, BN_MOMENTUM)
    optimizer = _optimizer(config, model)
    batches = math.ceil(config.tiles_per_epoch / config.batch_size)
    steps = math.ceil(batches / config.accumulate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _poly(config.epochs * steps, config.poly_power))
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)
    weight = None
    if config.class_weights:
        weight = torch.from_numpy(class_weights(data.class_counts(train_boxes))).to(device)
    run = _Run(config, out, device, amp, amp_dtype, data, train_data, split, split_path, sampler, contract,
               image_contracts(contract, data), provenance, model, optimizer, scheduler, scaler,
               make_loss(config.loss, weight=weight, ignore_index=data.schema.ignore_index),
               Augment(band_jitter=config.band_jitter), batches, t_start)
    if state is not None:
        _restore(run, state)
    return run


def _restore(run: _Run, state: dict[str, Any]) -> None:
    """Continue from ``last.pt``'s state: weights, optimizer, schedule, RNG, history, counters."""
    run.model.load_state_dict(state["state_dict"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if run.device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], run.device)
    run.history, run.losses = list(state["history"]), state["losses"].tolist()
    run.best_miou, run.best_epoch, run.bad_epochs = state["best_miou"], state["best_epoch"], state["bad_epochs"]
    run.start_epoch, run.stopped, run.before = state["epoch"], state["stopped_early"], state["seconds"]
    log.info("resuming %s at epoch %d of %d", run.out, run.start_epoch + 1, run.config.epochs)


def _epoch(run: _Run, epoch: int) -> dict[str, Any]:
    """Train one epoch and score the val part; returns the epoch's history row (plus ``val``)."""
    config, ignore = run.config, run.data.schema.ignore_index
    t0 = time.perf_counter()
    lr = run.optimizer.param_groups[0]["lr"]
    boxes = run.sampler.sample(run.batches * config.batch_size, np.random.default_rng([config.seed, epoch]))
    ds = TileDataset(run.train_data, boxes, mean=[c.mean for c in run.scaling], std=[c.std for c in run.scaling],
                     scale=run.contract.scale, augment=run.augment, seed=(config.seed, epoch))
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    epoch_losses = []
    for b in range(run.batches):
        items = [ds[i] for i in range(b * config.batch_size, (b + 1) * config.batch_size)]
        x = torch.stack([it[0] for it in items]).to(run.device)
        y = torch.stack([it[1] for it in items]).to(run.device)
        with torch.autocast("cuda", dtype=run.amp_dtype, enabled=run.amp):
            logits = run.model(x)
        if (y != ignore).any():
            loss = run.loss_fn(logits.float(), y)
        else:  # every pixel ignored (e.g. zoomed out of the labels): no gradient, no NaN
            loss = logits.float().sum() * 0.0
        run.scaler.scale(loss / config.accumulate).backward()
        if (b + 1) % config.accumulate == 0 or b == run.batches - 1:
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.optimizer.zero_grad(set_to_none=True)
            run.scheduler.step()
        epoch_losses.append(float(loss.detach()))
    run.losses += epoch_losses
    val = score(run.model, run.scaling, run.data, run.split, "val", run.device, config.batch_size)
    miou = val["miou_macro"] if val and val["miou_macro"] is not None else None
    improved = miou is None or miou > run.best_miou
    if improved:
        run.best_miou, run.best_epoch, run.bad_epochs = (miou if miou is not None else run.best_miou), epoch + 1, 0
    else:
        run.bad_epochs += 1
    run.stopped = miou is not None and config.early_stopping is not None and run.bad_epochs >= config.early_stopping
    row = {"epoch": epoch + 1, "epochs": config.epochs, "loss": float(np.mean(epoch_losses)), "val_miou": miou,
           "val_pixel_accuracy": val["pixel_accuracy"] if val else None, "lr": lr,
           "seconds": time.perf_counter() - t0, "best": improved}
    run.history.append(row)
    return {**row, "val": val}


def _checkpoint(run: _Run, epoch: int, row: dict[str, Any]) -> None:
    """Write ``best.pt`` when the epoch improved val mIoU, and always ``last.pt`` (the state to resume)."""
    if row["best"]:
        prov = {**run.provenance, "epoch": epoch + 1, "date": _now(), "metrics": {"val": row["val"]}}
        save_checkpoint(run.best_path, run.model, dataclasses.replace(run.contract, provenance=prov))
    _save_last(run.last_path, run.model, run.contract, {
        "epoch": epoch + 1, "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None,
        "history": run.history, "losses": torch.tensor(run.losses, dtype=torch.float64), "best_miou": run.best_miou,
        "best_epoch": run.best_epoch, "bad_epochs": run.bad_epochs, "stopped_early": run.stopped,
        "seconds": run.seconds(), "split": run.split.to_dict(), "contract": run.contract.to_dict(),
        "config": json.dumps(_config_key(run.config)),
    })


def _finish(run: _Run) -> TrainResult:
    """Score the best weights on the test part; write them back with their scores, ``metrics.json`` and curves."""
    seconds = run.seconds()
    config, mc = run.config, run.config.model
    best_model, best_contract = load_checkpoint(run.best_path, device=run.device)
    test = score(best_model, run.scaling, run.data, run.split, "test", run.device, config.batch_size)
    val = best_contract.provenance.get("metrics", {}).get("val")
    prov = {**best_contract.provenance, "epochs_run": len(run.history), "seconds": seconds,
            "metrics": {"val": val, "test": test}}
    save_checkpoint(run.best_path, best_model, dataclasses.replace(best_contract, provenance=prov))
    report = {
        "model": f"{mc.arch}/{mc.backbone}", "classes": list(run.data.schema.names), "test": test, "val": val,
        "best_epoch": run.best_epoch, "epochs_run": len(run.history), "stopped_early": run.stopped,
        "training_seconds": round(seconds, 1), "device": str(run.device), "torch_threads": torch.get_num_threads(),
        "data": run.data.sources, "split": run.split.to_dict(), "split_summary": run.provenance["split_summary"],
        "history": run.history, "config": config.model_dump(mode="json"), "date": _now(),
    }
    metrics_file = run.out / "metrics.json"
    write_text(metrics_file, json.dumps(report, indent=1, allow_nan=False) + "\n")
    write_bytes(run.out / "curves.png", curves_png(run.history, title=f"{mc.arch}/{mc.backbone}"))
    return TrainResult(run.out, run.best_path, run.last_path, run.split_path, metrics_file, test, val, run.history,
                       run.losses, run.best_epoch, len(run.history), run.stopped, seconds, str(run.device))


def export_checkpoint(src: str | Path, dst: str | Path, *, half: bool = True) -> Path:
    """Copy a checkpoint's weights and contract to ``dst`` (float16 weights by default), for shipping."""
    model, contract = load_checkpoint(src)
    return save_checkpoint(dst, model, contract, half=half)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
