"""iBOT patch masking confined to eligible (tissue) patches: DINOv2-style block masking."""

from __future__ import annotations

import math

import numpy as np



_BLOCK_DRAWS = 10     # DINOv2's block masking gives up after 10 draws that add nothing


def block_mask(eligible: np.ndarray, target: int, rng: np.random.Generator, min_block: int = 4,
               max_block: float | None = None, aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> np.ndarray:
    """iBOT block masking as DINOv2 describes it, restricted to ``eligible`` patches: rectangles of
    ``min_block``..min(remaining, ``max_block``) patches with log-uniform aspect, placed uniformly,
    each adding the eligible patches it covers that are not masked yet (at most the remaining count),
    until ``target`` patches are masked or 10 draws in a row add nothing (so it may stop short)."""
    grid_h, grid_w = eligible.shape
    mask = np.zeros_like(eligible, dtype=bool)
    target = min(int(target), int(eligible.sum()))
    max_block = grid_h * grid_w if max_block is None else max_block
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    count = 0
    while count < target:
        remaining = min(target - count, max_block)
        for _ in range(_BLOCK_DRAWS):
            area = min_block + (remaining - min_block) * rng.random()  # DINOv2 allows remaining < min
            ratio = math.exp(rng.uniform(log_lo, log_hi))
            h = int(round(math.sqrt(area * ratio)))
            w = int(round(math.sqrt(area / ratio)))
            if not (0 < h < grid_h and 0 < w < grid_w):
                continue
            top = int(rng.integers(0, grid_h - h + 1))
            left = int(rng.integers(0, grid_w - w + 1))
            window = mask[top:top + h, left:left + w]
            new = eligible[top:top + h, left:left + w] & ~window
            added = int(new.sum())
            if 0 < added <= remaining:
                window |= new
                count += added
                break
        else:
            break
    return mask
