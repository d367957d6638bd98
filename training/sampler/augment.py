"""Pixels of a crop: area-averaged resampling from a lazy pyramid, a robust intensity window
from the tissue, flips and photometric augmentation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from training.errors import MammoInputError
from training.sampler.boxes import Box


@dataclass(frozen=True)
class AugmentConfig:
    """Per-crop augmentations that make sense for X-ray. Probabilities in [0, 1]."""

    hflip: float = 0.5                                   # DINOv2 RandomHorizontalFlip(p=0.5)
    vflip: float = 0.0                                   # not in DINOv2; off by default
    jitter: float = 0.8                                  # DINOv2 applies ColorJitter with p=0.8
    brightness: float = 0.4                              # factor U[1-b, 1+b] (DINOv2 brightness=0.4)
    contrast: float = 0.4                                # factor U[1-c, 1+c] about the crop mean (0.4)
    gamma: float = 0.5                                   # ours: vendors' display curves differ
    gamma_range: tuple[float, float] = (0.7, 1.4)        # log-uniform exponent
    blur: tuple[float, float, float] = (1.0, 0.1, 0.5)   # first global, other globals, locals (DINOv2)
    blur_sigma: tuple[float, float] = (0.1, 2.0)         # output pixels, kernel radius 4 (DINOv2's 9 taps)
    noise: float = 0.2                                   # ours: quantum noise differs between detectors
    noise_std: tuple[float, float] = (0.005, 0.03)       # in [0, 1] display units

    def __post_init__(self) -> None:
        probabilities = [self.hflip, self.vflip, self.jitter, self.gamma, self.noise, *self.blur]
        if len(self.blur) != 3 or not all(0 <= p <= 1 for p in probabilities):
            raise MammoInputError("augment: probabilities must be in [0, 1] (blur: three of them)")
        for name in ("gamma_range", "blur_sigma", "noise_std"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise MammoInputError(f"augment: {name} must be (low, high) with 0 <= low <= high")
        if not (0 <= self.brightness < 1 and 0 <= self.contrast < 1 and self.gamma_range[0] > 0):
            raise MammoInputError("augment: brightness and contrast must be in [0, 1), gamma_range above 0")


class Pyramid:
    """Block-mean (area) reductions of one image region, built lazily. Each crop is resampled
    bilinearly from the coarsest level still at least its output size, so downsampling by more than
    2x averages like an antialiased resize (DINOv2 resizes with PIL, which filters over the footprint)
    and the cost is in output pixels, not crop pixels."""

    def __init__(self, image: np.ndarray, region: Box):
        r0, c0, r1, c1 = region
        self.origin = (r0, c0)
        self.levels: list[np.ndarray] = [image[r0:r1, c0:c1]]

    def level(self, k: int) -> np.ndarray:
        while len(self.levels) <= k:
            prev = self.levels[-1]
            h, w = prev.shape[0] // 2, prev.shape[1] // 2
            rows = prev[0:2 * h:2, :2 * w].astype(np.float32)
            rows += prev[1:2 * h:2, :2 * w]
            half = rows[:, 0::2] + rows[:, 1::2]
            half *= 0.25
            self.levels.append(half)
        return self.levels[k]

    def resample(self, box: Box, size: int | tuple[int, int], lo: float, hi: float) -> np.ndarray:
        """The box (image pixels) as a size x size (or rows x cols) float32 crop, intensities mapped
        [lo, hi] -> [0, 1]."""
        r0, c0, r1, c1 = box
        height, width = r1 - r0, c1 - c0
        rows, cols = (size, size) if isinstance(size, int) else size
        base = self.levels[0].shape
        k = 0
        while (height >= rows * 2 ** (k + 1) and width >= cols * 2 ** (k + 1)
               and min(base) >= 2 ** (k + 2)):
            k += 1
        level = self.level(k)
        ys = _axis(r0 - self.origin[0], height, rows, k, level.shape[0])
        xs = _axis(c0 - self.origin[1], width, cols, k, level.shape[1])
        (y0, y1, wy), (x0, x1, wx) = ys, xs
        ya, yb, xa, xb = int(y0[0]), int(y1[-1]) + 1, int(x0[0]), int(x1[-1]) + 1
        window = level[ya:yb, xa:xb]
        wy = wy[:, None]
        rows = window[y0 - ya].astype(np.float32) * (1 - wy) + window[y1 - ya] * wy
        out = rows[:, x0 - xa] * (1 - wx) + rows[:, x1 - xa] * wx
        out -= lo
        out *= 1.0 / (hi - lo)
        return np.clip(out, 0.0, 1.0, out=out)


def _axis(start: int, length: int, size: int, k: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps along one axis: output pixel centres of a box mapped onto level k's pixel centres."""
    scale = 2.0 ** k
    pos = (start + (np.arange(size) + 0.5) * (length / size)) / scale - 0.5
    pos = np.clip(pos, 0, n - 1)
    i0 = np.minimum(pos.astype(np.intp), max(n - 2, 0))
    i1 = np.minimum(i0 + 1, n - 1)
    return i0, i1, (pos - i0).astype(np.float32)


def tissue_window(image: np.ndarray, tissue: np.ndarray, region: Box,
                     percentiles: tuple[float, float]) -> tuple[float, float]:
    """Robust [0, 1] window: percentiles of the tissue pixels of the region (a ~65k-pixel subsample)."""
    r0, c0, r1, c1 = region
    step = max(1, int(math.sqrt((r1 - r0) * (c1 - c0) / 65_536)))
    values = image[r0:r1:step, c0:c1:step]
    inside = values[tissue[r0:r1:step, c0:c1:step]]
    if inside.size < 100:  # no (or hardly any) tissue: the whole region decides
        inside = values.ravel()
    lo, hi = np.percentile(inside, percentiles)
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def flip_crop(array: np.ndarray, vflip: bool, hflip: bool) -> np.ndarray:
    if vflip:
        array = array[::-1]
    if hflip:
        array = array[:, ::-1]
    return array


def augment_pixels(x: np.ndarray, aug: AugmentConfig, blur_p: float, rng: np.random.Generator) -> np.ndarray:
    """Photometric augmentations on a [0, 1] crop; the result stays finite and in [0, 1]."""
    x = np.array(x, dtype=np.float32)  # own contiguous copy (the input may be a flipped view)
    if rng.random() < aug.jitter:
        x *= rng.uniform(1 - aug.brightness, 1 + aug.brightness)
        np.clip(x, 0.0, 1.0, out=x)
        mean = x.mean()
        x -= mean
        x *= rng.uniform(1 - aug.contrast, 1 + aug.contrast)
        x += mean
        np.clip(x, 0.0, 1.0, out=x)
    if rng.random() < aug.gamma:
        np.power(x, math.exp(rng.uniform(math.log(aug.gamma_range[0]), math.log(aug.gamma_range[1]))), out=x)
    if rng.random() < blur_p:
        x = ndimage.gaussian_filter(x, rng.uniform(*aug.blur_sigma), mode="reflect", radius=4)
    if rng.random() < aug.noise:
        x += rng.uniform(*aug.noise_std) * rng.standard_normal(x.shape, dtype=np.float32)
        np.clip(x, 0.0, 1.0, out=x)
    return x
