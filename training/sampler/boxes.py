"""Box geometry of the sampler: tissue bounding boxes, random resized boxes inside a region,
and the share of tissue under a box or a patch grid. Boxes are ``(row0, col0, row1, col1)``, half-open,
in full-resolution image pixels."""

from __future__ import annotations

import math

import numpy as np



Box = tuple[int, int, int, int]  # row0, col0, row1, col1: half-open, full-resolution image pixels


_GEOMETRY_DRAWS = 100  # torchvision tries 10 before its centred fallback; see the module docstring


def random_resized_box(region: Box, scale: tuple[float, float], aspect: tuple[float, float],
                       rng: np.random.Generator) -> Box:
    """torchvision's RandomResizedCrop box: area a ``scale`` fraction of the region, width/height
    log-uniform in ``aspect``, position uniform; after 100 misfits, a centred crop with clamped aspect."""
    r0, c0, r1, c1 = region
    height, width = r1 - r0, c1 - c0
    area = height * width
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    for _ in range(_GEOMETRY_DRAWS):
        target = area * rng.uniform(scale[0], scale[1])
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = r0 + int(rng.integers(0, height - h + 1))
            left = c0 + int(rng.integers(0, width - w + 1))
            return top, left, top + h, left + w
    ratio = width / height
    if ratio < aspect[0]:
        w, h = width, max(1, int(round(width / aspect[0])))
    elif ratio > aspect[1]:
        w, h = max(1, int(round(height * aspect[1]))), height
    else:
        w, h = width, height
    top, left = r0 + (height - h) // 2, c0 + (width - w) // 2
    return top, left, top + h, left + w


def tissue_box(tissue: np.ndarray) -> Box | None:
    rows = np.flatnonzero(tissue.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(tissue.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def union_box(boxes: list[Box]) -> Box:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def grow_box(box: Box, min_side: int, shape: tuple[int, ...]) -> Box:
    """Grow a box about its centre (staying inside the image) to ``min_side`` a side, so that a speck
    of tissue does not make every crop an upsampled blur of a few pixels."""
    out = []
    for lo, hi, size in ((box[0], box[2], shape[0]), (box[1], box[3], shape[1])):
        side = min(max(hi - lo, min_side), size)
        start = min(max((lo + hi - side) // 2, 0), size - side)
        out.append((start, start + side))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def box_tissue_fraction(tissue: np.ndarray, box: Box) -> float:
    r0, c0, r1, c1 = box
    return np.count_nonzero(tissue[r0:r1, c0:c1]) / max((r1 - r0) * (c1 - c0), 1)


def centroid_box(tissues: list[np.ndarray], region: Box, scale: float) -> Box:
    """A square at ``scale`` of the region centred on the tissue centroid (from every 4th pixel)."""
    step = 4
    points = np.argwhere(np.logical_or.reduce([t[::step, ::step] for t in tissues]))
    if points.size == 0:  # tissue thinner than the stride: any tissue pixel will do
        points = np.argwhere(np.logical_or.reduce(tissues))[:1]
        step = 1
    centre = points.mean(axis=0) * step
    r0, c0, r1, c1 = region
    side = max(1, min(int(round(math.sqrt(scale * (r1 - r0) * (c1 - c0)))), r1 - r0, c1 - c0))
    top = int(min(max(round(centre[0] - side / 2), r0), r1 - side))
    left = int(min(max(round(centre[1] - side / 2), c0), c1 - side))
    return top, left, top + side, left + side


def patch_tissue_fractions(tissue: np.ndarray, box: Box, grid: int) -> np.ndarray:
    """Exact tissue fraction of each of grid x grid patches of the box (edges rounded to pixels)."""
    r0, c0, r1, c1 = box
    height, width = r1 - r0, c1 - c0
    sub = tissue[r0:r1, c0:c1]
    if height < grid or width < grid:  # smaller than the grid: each patch takes its centre pixel
        rows = ((np.arange(grid) + 0.5) * height / grid).astype(np.intp)
        cols = ((np.arange(grid) + 0.5) * width / grid).astype(np.intp)
        return sub[np.ix_(rows, cols)].astype(np.float32)
    row_edges = np.arange(grid) * height // grid
    col_edges = np.arange(grid) * width // grid
    # Along rows first: reducing contiguous memory is ~10x faster than reducing across rows first.
    row_sums = np.uint16 if width < 2 ** 16 else np.int64  # a row segment counts at most `width`
    counts = np.add.reduceat(sub.view(np.uint8), col_edges, axis=1, dtype=row_sums)
    counts = np.add.reduceat(counts, row_edges, axis=0, dtype=np.int64)
    sizes = np.outer(np.diff(np.append(row_edges, height)), np.diff(np.append(col_edges, width)))
    return (counts / sizes).astype(np.float32)
