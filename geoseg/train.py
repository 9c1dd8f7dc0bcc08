"""Train one segmentation network on a spatially held-out split, with checkpoints that carry their contract.

:func:`train` runs, per epoch: draw ``tiles_per_epoch`` tiles inside the train part (rounded up to
whole batches; seeded by ``(seed, epoch)``), augment them (seeded per tile), step the optimizer
(SGD with momentum 0.9, or AdamW) every ``accumulate`` batches, score the val part, and write
``last.pt`` (weights, optimizer, scheduler, AMP scaler, RNG states, history) and, when the val macro
mIoU improves, ``best.pt``.  The learning rate follows the poly schedule of the DeepLabV3 paper::

    lr(it) = lr * (1 - it / max_it) ** poly_power,   it = optimizer steps so far,
    max_it = epochs * ceil(batches_per_epoch / accumulate)

Training stops early after ``early_stopping`` epochs without a val mIoU gain.  Afterwards the best
weights are scored on the test part and ``metrics.json`` is written.  ``resume=True`` continues from
``last.pt``: on the CPU the continued run's losses equal an uninterrupted run's.  AMP (bf16, or fp16
with loss scaling) is used on CUDA only.  Normalisation (the contract's mean/std) is computed exactly
over the valid pixels of the train part only; batch norms train with momentum :data:`BN_MOMENTUM`.

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
import torch
from torch import nn

from geoseg.atomic import atomic_write, write_bytes, write_text
from geoseg.augment import Augment
from geoseg.checkpoint import FORMAT, VERSION, ModelContract, contract_for, load_checkpoint, save_checkpoint
from geoseg.config import TrainConfig
from geoseg.datasets import (
    LabelledData,
    TileDataset,
    band_moments,
    class_weights,
    default_scale,
    load_labelled,
)
from geoseg.errors import CheckpointError, ConfigError, OutputExistsError
from geoseg.metrics import SegmentationMetrics, curves_png
from geoseg.models import build_model
from geoseg.predict import Predictor, resolve_device
from geoseg.splits import Split, TileSampler, eval_tiles, make_split
from geoseg.tiling import Box

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
        test: metrics of the best weights on the test part (see :mod:`geoseg.metrics`), or None.
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
    """The labelled data of ``config.data`` (see :func:`geoseg.datasets.load_labelled`)."""
    d = config.data
    return load_labelled(d, label_value=getattr(d, "label_value", None), background=getattr(d, "background", None))


def make_data_split(config: TrainConfig, data: LabelledData) -> Split:
    """The split of ``data``: blocks of ``config.split_block`` px for scenes, whole files for tiles."""
    return make_split([im.labels for im in data.images], [im.name for im in data.images],
                      num_classes=data.num_classes, block=None if data.kind == "tiles" else config.split_block,
                      fractions=config.split, seed=config.seed, ignore_index=data.schema.ignore_index)


def evaluate(
    model: nn.Module,
    contract: ModelContract,
    data: LabelledData,
    boxes: Sequence[tuple[int, Box]],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
) -> dict[str, Any] | None:
    """Score ``model`` on the units ``boxes`` (see :func:`geoseg.splits.eval_tiles`); None when empty.

    The model is left in eval mode.
    """
    if not boxes:
        return None
    predictor = Predictor(model, contract, device=device, batch_size=batch_size)
    metrics = SegmentationMetrics(data.num_classes, data.schema.ignore_index)
    tiles = eval_tiles(boxes, contract.tile_size)
    for start in range(0, len(tiles), 4 * batch_size):
        chunk = tiles[start : start + 4 * batch_size]
        xs = []
        for i, tile, _ in chunk:
            x, valid = data.images[i].read(tile)
            xs.append(contract.normalise(x, valid))
        prob = predictor.predict_proba(np.stack(xs))
        for (i, tile, core), p in zip(chunk, prob, strict=True):
            pred = p[(slice(None), *core.relative_to(tile))].argmax(0)
            lab = data.images[i].labels[core.y0 : core.y1, core.x0 : core.x1]
            metrics.update(torch.from_numpy(pred), torch.from_numpy(lab.astype(np.int64)))
    return metrics.compute(data.schema.names)


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
    t_start = time.perf_counter()
    out = Path(out_dir if out_dir is not None else config.out_dir)
    last_path, best_path = out / "last.pt", out / "best.pt"
    state = None
    if resume and last_path.exists():
        state = _load_last(last_path, config)
    elif resume:
        log.warning("%s not found; starting a new run", last_path)
    elif last_path.exists() and not overwrite:
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
    sampler = TileSampler(split, labels, mc.tile_size, data.schema.ignore_index)
    train_boxes = split.boxes("train")
    scale = default_scale(data.images[0].dtype)
    if state is not None:
        contract = ModelContract.from_dict(state["contract"])
    else:
        mean, std = band_moments(data, train_boxes, scale=scale)
        contract = contract_for(mc, band_names=data.band_names, mean=mean, std=std, classes=data.schema, scale=scale)
    base_prov = {
        "data": data.sources, "seed": config.seed, "epochs": config.epochs, "tiles_per_epoch": config.tiles_per_epoch,
        "batch_size": config.batch_size, "optimizer": config.optimizer, "lr": config.lr,
        "split_block": split.block, "split": split.to_dict(), "split_summary": split.summary(labels, data.num_classes),
        "device": str(device), "torch": torch.__version__, "train_config": config.model_dump(mode="json"),
    }

    torch.manual_seed(config.seed)
    model = build_model(mc.arch, mc.backbone, len(data.band_names), data.num_classes, mc.output_stride,
                        mc.pretrained, band_names=data.band_names).to(device)
    _set_bn_momentum(model, BN_MOMENTUM)
    optimizer = _optimizer(config, model)
    tiles = math.ceil(config.tiles_per_epoch / config.batch_size) * config.batch_size
    batches = tiles // config.batch_size
    steps = math.ceil(batches / config.accumulate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _poly(config.epochs * steps, config.poly_power))
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)
    weight = None
    if config.class_weights:
        weight = torch.from_numpy(class_weights(data.class_counts(train_boxes))).to(device)
    loss_fn = nn.CrossEntropyLoss(weight=weight, ignore_index=data.schema.ignore_index)
    augment = Augment()

    history: list[dict[str, Any]] = []
    losses: list[float] = []
    best_miou, best_epoch, bad_epochs, start_epoch, stopped, before = -math.inf, 0, 0, 0, False, 0.0
    if state is not None:
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        history, losses = list(state["history"]), state["losses"].tolist()
        best_miou, best_epoch, bad_epochs = state["best_miou"], state["best_epoch"], state["bad_epochs"]
        start_epoch, stopped, before = state["epoch"], state["stopped_early"], state["seconds"]
        log.info("resuming %s at epoch %d of %d", out, start_epoch + 1, config.epochs)

    for epoch in range(start_epoch, config.epochs if not stopped else start_epoch):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        boxes = sampler.sample(tiles, np.random.default_rng([config.seed, epoch]))
        ds = TileDataset(data, boxes, mean=contract.mean, std=contract.std, scale=contract.scale,
                         augment=augment, seed=(config.seed, epoch))
        model.train()
        optimizer.zero_grad(set_to_none=True)
        epoch_losses = []
        for b in range(batches):
            items = [ds[i] for i in range(b * config.batch_size, (b + 1) * config.batch_size)]
            x = torch.stack([it[0] for it in items]).to(device)
            y = torch.stack([it[1] for it in items]).to(device)
            with torch.autocast("cuda", dtype=amp_dtype, enabled=amp):
                logits = model(x)
            if (y != data.schema.ignore_index).any():
                loss = loss_fn(logits.float(), y)
            else:  # every pixel ignored (e.g. zoomed out of the labels): no gradient, no NaN
                loss = logits.float().sum() * 0.0
            scaler.scale(loss / config.accumulate).backward()
            if (b + 1) % config.accumulate == 0 or b == batches - 1:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            epoch_losses.append(float(loss.detach()))
        losses += epoch_losses
        val = evaluate(model, contract, data, split.boxes("val"), device=device, batch_size=config.batch_size)
        miou = val["miou_macro"] if val and val["miou_macro"] is not None else None
        improved = miou is None or miou > best_miou
        if improved:
            best_miou, best_epoch, bad_epochs = (miou if miou is not None else best_miou), epoch + 1, 0
        else:
            bad_epochs += 1
        stopped = miou is not None and config.early_stopping is not None and bad_epochs >= config.early_stopping
        row = {"epoch": epoch + 1, "epochs": config.epochs, "loss": float(np.mean(epoch_losses)), "val_miou": miou,
               "val_pixel_accuracy": val["pixel_accuracy"] if val else None, "lr": lr,
               "seconds": time.perf_counter() - t0, "best": improved}
        history.append(row)
        if improved:
            prov = {**base_prov, "epoch": epoch + 1, "date": _now(), "metrics": {"val": val}}
            save_checkpoint(best_path, model, dataclasses.replace(contract, provenance=prov))
        _save_last(last_path, model, contract, {
            "epoch": epoch + 1, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "history": history, "losses": torch.tensor(losses, dtype=torch.float64), "best_miou": best_miou,
            "best_epoch": best_epoch, "bad_epochs": bad_epochs, "stopped_early": stopped,
            "seconds": before + time.perf_counter() - t_start, "split": split.to_dict(),
            "contract": contract.to_dict(), "config": json.dumps(_config_key(config)),
        })
        log.info("epoch %d/%d loss %.4f val mIoU %s", epoch + 1, config.epochs, row["loss"],
                 "n/a" if miou is None else f"{miou:.4f}")
        if progress is not None:
            progress(dict(row))
        if stopped:
            log.info("early stopping: no val mIoU gain in %d epochs", bad_epochs)
            break
    seconds = before + time.perf_counter() - t_start  # training time of every (resumed) part

    best_model, best_contract = load_checkpoint(best_path, device=device)
    test = evaluate(best_model, best_contract, data, split.boxes("test"), device=device, batch_size=config.batch_size)
    val = best_contract.provenance.get("metrics", {}).get("val")
    prov = {**best_contract.provenance, "epochs_run": len(history), "seconds": seconds,
            "metrics": {"val": val, "test": test}}
    save_checkpoint(best_path, best_model, dataclasses.replace(best_contract, provenance=prov))
    report = {
        "model": f"{mc.arch}/{mc.backbone}", "classes": list(data.schema.names), "test": test, "val": val,
        "best_epoch": best_epoch, "epochs_run": len(history), "stopped_early": stopped,
        "training_seconds": round(seconds, 1), "device": str(device), "torch_threads": torch.get_num_threads(),
        "data": data.sources, "split": split.to_dict(), "split_summary": base_prov["split_summary"],
        "history": history, "config": config.model_dump(mode="json"), "date": _now(),
    }
    metrics_file = out / "metrics.json"
    write_text(metrics_file, json.dumps(report, indent=1, allow_nan=False) + "\n")
    write_bytes(out / "curves.png", curves_png(history, title=f"{mc.arch}/{mc.backbone}"))
    return TrainResult(out, best_path, last_path, split_path, metrics_file, test, val, history, losses,
                       best_epoch, len(history), stopped, seconds, str(device))


def export_checkpoint(src: str | Path, dst: str | Path, *, half: bool = True) -> Path:
    """Copy a checkpoint's weights and contract to ``dst`` (float16 weights by default), for shipping."""
    model, contract = load_checkpoint(src)
    return save_checkpoint(dst, model, contract, half=half)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
