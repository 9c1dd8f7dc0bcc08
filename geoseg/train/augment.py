"""Random augmentations of one training tile and its labels, drawn from a seeded numpy Generator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


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
        band_jitter: then, per band, multiply by ``U(1 - j, 1 + j)`` and add ``U(-j, j)`` (normalised
            units): scenes of other dates and sensors shift bands unequally.
    """

    flips: bool = True
    rotate90: bool = True
    scale: tuple[float, float] | None = (0.75, 1.25)
    brightness: float = 0.1
    contrast: float = 0.1
    band_jitter: float = 0.0

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
        x = x * c + b
        if self.band_jitter:
            j = self.band_jitter
            gain = torch.from_numpy(rng.uniform(1 - j, 1 + j, x.shape[0]).astype(np.float32))[:, None, None]
            shift = torch.from_numpy(rng.uniform(-j, j, x.shape[0]).astype(np.float32))[:, None, None]
            x = x * gain + shift
        return x.contiguous(), y.contiguous()


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
