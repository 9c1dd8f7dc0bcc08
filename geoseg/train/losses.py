"""Training losses for heavily imbalanced land-cover labels.

- ``ce``: cross-entropy over the labelled pixels (optionally class-weighted).
- ``ce_dice``: cross-entropy plus the soft Dice loss ``1 - mean_k 2|P_k ∩ Y_k| / (|P_k| + |Y_k|)``
  over the classes present in the batch's labels.  Dice weighs each present class equally, whatever
  its pixel count, so a rare class (a few hundred pixels of sediment) counts as much as forest —
  without the unstable gradients of inverse-frequency weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

LossName = Literal["ce", "ce_dice"]
#: Smoothing term of the soft Dice ratio (pixels).
DICE_SMOOTH = 1.0


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``1 -`` mean soft Dice over the classes present in ``target``; ignored pixels count nowhere."""
    keep = target != ignore_index
    prob = logits.float().softmax(1) * keep[:, None]
    onehot = F.one_hot(torch.where(keep, target, 0), logits.shape[1]).permute(0, 3, 1, 2) * keep[:, None]
    inter = (prob * onehot).sum((0, 2, 3))
    size = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    present = onehot.sum((0, 2, 3)) > 0
    dice = (2 * inter + DICE_SMOOTH) / (size + DICE_SMOOTH)
    return 1 - dice[present].mean()


def make_loss(name: LossName, *, weight: torch.Tensor | None = None, ignore_index: int = 255
              ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss ``name`` as ``loss(logits (N, K, H, W), target (N, H, W))``."""
    ce = nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index)
    if name == "ce":
        return ce
    return lambda logits, target: ce(logits, target) + soft_dice_loss(logits, target, ignore_index)
