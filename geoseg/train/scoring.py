"""Whole-scene scores of a model in memory, through the predict path's own tiling and blending.

Training scores its val and test parts the way a user's map is made: the whole labelled image is
predicted with the predict job's tile grid, context margin and blending
(:func:`geoseg.stitch.stitch_blocks` over :func:`geoseg.tiling.plan_blocks`), then only the pixels of
the part are scored.  ``geoseg evaluate`` runs the same tiling and blending through the full predict
job (files on disk) instead of in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from geoseg.checkpoint import ModelContract
from geoseg.predict import Predictor
from geoseg.stitch import CLASS_NODATA, stitch_blocks
from geoseg.tiling import Box, TileGrid, align_block_size, plan_blocks
from geoseg.train.datasets import LabelledData, LabelledImage
from geoseg.train.metrics import SegmentationMetrics
from geoseg.train.splits import Split, part_labels

#: Block side used to predict an image in memory: blocks without a pixel to score are skipped (the
#: blended map does not depend on the blocking).
BLOCK_SIZE = 256


def predict_image(predictor: Predictor, image: LabelledImage, contract: ModelContract, *, ignore_index: int = 255,
                  where: np.ndarray | None = None) -> np.ndarray:
    """Channel index of every pixel of ``image`` (``ignore_index`` where it has no data), as predict maps it.

    ``contract`` normalises the image (the predictor's, or its :meth:`~ModelContract.for_scene`).
    ``where``: (H, W) bool; only blocks holding a True pixel are predicted (the rest stay ``ignore_index``).
    """
    tile = contract.tile_size
    margin = contract.margin(tile)
    grid = TileGrid(*image.shape, tile, margin)
    out = np.full(image.shape, ignore_index, np.uint8)
    channels = tuple(range(len(contract.classes.classes)))
    blocks = plan_blocks(grid, align_block_size(BLOCK_SIZE, grid))
    wanted = [b.key for b in blocks
              if where is None or where[b.core.y0 : b.core.y1, b.core.x0 : b.core.x1].any()]

    def read(box: Box) -> tuple[torch.Tensor, np.ndarray]:
        data, valid = image.read(box)
        return contract.normalise(torch.from_numpy(data), torch.from_numpy(valid), inplace=True), valid

    results = stitch_blocks(blocks, read, predictor.proba, margin=margin, class_ids=channels,
                            batch_size=predictor.batch_size, device=predictor.device, wanted=wanted)
    for block in blocks:
        if block.key in results:
            c, core = block.core, results[block.key].class_id
            core[core == CLASS_NODATA] = ignore_index
            out[c.y0 : c.y1, c.x0 : c.x1] = core
    return out


def score_parts(
    predictor: Predictor, data: LabelledData, split: Split, parts: Sequence[str],
    contracts: Sequence[ModelContract] | None = None,
) -> dict[str, dict[str, Any] | None]:
    """Metrics of each part in ``parts`` (None for a part without labelled pixels), each image predicted once.

    ``contracts``: per image, the contract that normalises it (default: the predictor's for all).
    """
    ignore = data.schema.ignore_index
    labels = [im.labels for im in data.images]
    wanted = {p: part_labels(split, labels, p, ignore) for p in parts}
    metrics = {p: SegmentationMetrics(data.num_classes, ignore) for p in parts}
    scored: set[str] = set()
    for i, image in enumerate(data.images):
        needed = np.logical_or.reduce([wanted[p][i] != ignore for p in parts])
        if not needed.any():
            continue
        contract = contracts[i] if contracts is not None else predictor.contract
        pred = predict_image(predictor, image, contract, ignore_index=ignore, where=needed)
        for p in parts:
            target = wanted[p][i].copy()
            target[pred == ignore] = ignore  # the image has no data there: nothing to score
            if (target != ignore).any():
                metrics[p].update(torch.from_numpy(np.where(pred == ignore, 0, pred).astype(np.int64)),
                                  torch.from_numpy(target))
                scored.add(p)
    return {p: metrics[p].compute(data.schema.names) if p in scored else None for p in parts}
