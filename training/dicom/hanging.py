"""The mammography hanging protocol: RCC | LCC over RMLO | LMLO, chest walls facing each other.

Pure layout arithmetic on :class:`~training.dicom.image.MammoImage` objects; the napari reader and the
headless renderer both place images with it. The right breast hangs on the viewer's left with its
chest wall on its right edge, the left breast mirrors that, so the two chest walls meet in the middle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.dicom.display import to_display
from training.dicom.image import MammoImage

CC_FAMILY = ("CC", "XCCL", "XCCM", "FB")
MLO_FAMILY = ("MLO", "ML", "LM", "LMO", "SIO", "ISO", "AT")
GAP_FRACTION = 0.04  # gap between images, as a fraction of the widest image


@dataclass
class Placement:
    """Where and how one image hangs: grid cell, mirror flag, and world transform (array order)."""

    image: MammoImage
    row: int
    col: int
    flip: bool
    chest_wall: str  # side of the stored image the chest wall is on: "left" or "right"
    chest_wall_source: str
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    units: str

    @property
    def name(self) -> str:
        meta = self.image.meta
        return f"{meta.laterality or '?'}{meta.view or '?'}"


def chest_wall_side(image: MammoImage) -> tuple[str, str]:
    """Which side of the stored image the chest wall is on, and how we know.

    PatientOrientation's first value is the direction of increasing column index: A (anterior,
    towards the nipple) puts the chest wall on the left, P on the right. Without it, look at the
    image: the chest wall is the edge where tissue runs from top to bottom (one decoded frame,
    strongly subsampled; burned-in labels are too small to tip the balance).
    """
    orientation = image.meta.patient_orientation
    if orientation and orientation[0][:1] in ("A", "P") and len(orientation) == 2:
        return ("left" if orientation[0].startswith("A") else "right"), "PatientOrientation"
    frame = image.data[image.data.shape[0] // 2] if image.meta.is_volume else image.data
    thumb = to_display(np.asarray(frame[::8, ::8]), image.meta)
    band = max(thumb.shape[1] // 6, 1)
    # Median over rows: tissue covers the whole chest-wall edge, labels and markers only a little.
    left, right = np.median(thumb[:, :band].mean(axis=1)), np.median(thumb[:, -band:].mean(axis=1))
    return ("left" if left >= right else "right"), "image content"


def _row_of(view: str | None) -> int:
    if view in CC_FAMILY:
        return 0
    if view in MLO_FAMILY:
        return 1
    return 2


def hanging_protocol(images: list[MammoImage]) -> list[Placement]:
    """Place an exam's images: rows CC then MLO (then others), columns R | L, chest walls inward."""
    with_spacing = all(im.meta.spacing_mm for im in images)
    units = "mm" if with_spacing else "pixel"
    cells: dict[tuple[int, int], MammoImage] = {}
    for im in images:
        row, col = _row_of(im.meta.view), 0 if im.meta.laterality == "R" else 1
        while (row, col) in cells:  # a second image of the same view (another exam) hangs below
            row += 3
        cells[(row, col)] = im

    def plane_scale(im: MammoImage) -> tuple[float, float]:
        return tuple(im.meta.spacing_mm[-2:]) if with_spacing else (1.0, 1.0)  # type: ignore[index]

    sizes = {key: np.multiply(im.data.shape[-2:], plane_scale(im))
             for key, im in cells.items()}
    gap = GAP_FRACTION * max(size[1] for size in sizes.values())
    row_heights: dict[int, float] = {}
    for (row, _), size in sizes.items():
        row_heights[row] = max(row_heights.get(row, 0.0), float(size[0]))
    row_top, y = {}, 0.0
    for row in sorted(row_heights):
        row_top[row], y = y, y + row_heights[row] + gap

    placements = []
    for (row, col), im in sorted(cells.items()):
        side, source = chest_wall_side(im)
        want = "right" if col == 0 else "left"  # right breast on the viewer's left, chest wall inward
        flip = im.meta.laterality in ("L", "R") and side != want
        height, width = sizes[(row, col)]
        x = -gap / 2 - width if col == 0 else gap / 2
        scale = plane_scale(im)
        translate: tuple[float, ...] = (row_top[row], x)
        if im.meta.is_volume:
            dz = im.meta.spacing_mm[0] if with_spacing else 1.0  # type: ignore[index]
            scale, translate = (dz, *scale), (0.0, *translate)
        placements.append(Placement(im, row, col, bool(flip), side, source,
                                    tuple(float(s) for s in scale), tuple(float(t) for t in translate), units))
    return placements
