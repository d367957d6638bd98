"""The display pipeline a mammography reader expects, after the modality LUT that :mod:`training.dicom.io`
already applied: VOI (a stored window, LINEAR / LINEAR_EXACT / SIGMOID, or a VOI LUT table), then
MONOCHROME1 inversion. Output is float32 in [0, 1], 1 = white.

pydicom does the VOI arithmetic (``apply_windowing``, ``apply_voi``); this module chooses which VOI
applies and where its parameters come from (top level, functional groups, per frame), and never
looks at pixel statistics to do so: without any stored window it falls back to the header's pixel
range and then to the bit depth, so nothing ever scans a lazy volume for its min/max.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_voi, apply_windowing

from training.dicom.metadata import ImageMeta, VoiLut, Window

_OUT_BITS = 16  # pydicom scales window output to [0, 2**bits - 1] of this mini dataset
N_LEVELS = 512  # samples of a non-linear VOI curve handed to a viewer as a colormap


def voi_names(meta: ImageMeta) -> list[str]:
    """Human names of the VOI choices, windows first then LUTs, as a viewer would list them."""
    names = [w.explanation or f"window {w.center:g}/{w.width:g} {w.function}" for w in meta.windows]
    names += [lut.explanation or f"VOI LUT {i + 1}" for i, lut in enumerate(meta.voi_luts)]
    if names:
        return names
    fallback = fallback_window(meta)
    return [f"fallback window {fallback.center:g}/{fallback.width:g}"]


def fallback_window(meta: ImageMeta) -> Window:
    """A window from header facts only: Smallest/Largest pixel value, else the stored bit depth."""
    if meta.pixel_range is not None:
        lo, hi = meta.pixel_range
    else:
        lo = meta.rescale_intercept
        hi = (2 ** meta.bits_stored - 1) * meta.rescale_slope + meta.rescale_intercept
    return Window(center=(lo + hi) / 2, width=max(hi - lo, 1), function="LINEAR_EXACT",
                  explanation="from header range")


def choose_voi(meta: ImageMeta, choice: int = 0, frame: int | None = None) -> Window | VoiLut:
    """The VOI to apply: `choice` indexes windows then LUTs; per-frame windows win for that frame."""
    windows = meta.windows
    if frame is not None and meta.frame_windows is not None and frame < len(meta.frame_windows):
        windows = meta.frame_windows[frame] or windows
    if choice < len(windows):
        return windows[choice]
    if choice - len(windows) < len(meta.voi_luts):
        return meta.voi_luts[choice - len(windows)]
    if windows:
        return windows[0]
    return meta.voi_luts[0] if meta.voi_luts else fallback_window(meta)


def apply_voi_to(values: np.ndarray, voi: Window | VoiLut) -> np.ndarray:
    """Modality values -> [0, 1] through one window or LUT, with pydicom's implementation."""
    mini = Dataset()
    mini.PhotometricInterpretation = "MONOCHROME2"
    mini.BitsStored, mini.PixelRepresentation = _OUT_BITS, 0
    values = np.asarray(values, dtype=np.float64)
    if isinstance(voi, Window):
        mini.WindowCenter, mini.WindowWidth = voi.center, voi.width
        mini.VOILUTFunction = voi.function
        return (apply_windowing(values, mini) / (2 ** _OUT_BITS - 1)).astype(np.float32)
    item = Dataset()
    # Always 16: pydicom indexes the table with an array of the descriptor's dtype, so an 8-bit
    # descriptor wraps every index above 255. The output is scaled by voi.bits below.
    item.LUTDescriptor = [len(voi.data) % 65536, voi.first_mapped, 16]
    item.LUTData = list(voi.data)
    mini.VOILUTSequence = [item]
    # LUT input must be integral: modality values index the table.
    out = apply_voi(np.rint(values).astype(np.int64), mini)
    return (out / (2 ** voi.bits - 1)).astype(np.float32)


def to_display(values: np.ndarray, meta: ImageMeta, frame: int | None = None, choice: int = 0) -> np.ndarray:
    """What a radiologist sees: VOI, then MONOCHROME1 inverted, float32 in [0, 1] (1 = white)."""
    shown = apply_voi_to(values, choose_voi(meta, choice, frame))
    return 1.0 - shown if meta.photometric == "MONOCHROME1" else shown


@dataclass
class ViewerDisplay:
    """How a viewer with linear contrast limits and a colormap reproduces :func:`to_display` exactly:
    the limits span the VOI's input range; `levels` (None for a straight ramp) is its curve."""

    contrast_limits: tuple[float, float]
    levels: np.ndarray | None
    inverted: bool


def viewer_display(meta: ImageMeta, choice: int = 0, frame: int | None = None) -> ViewerDisplay:
    voi = choose_voi(meta, choice, frame)
    inverted = meta.photometric == "MONOCHROME1"
    if isinstance(voi, VoiLut):
        lo, hi = voi.first_mapped, voi.first_mapped + len(voi.data) - 1
    elif voi.function == "SIGMOID":  # the logistic is within 0.03% of its limits at 2 widths out
        lo, hi = voi.center - 2 * voi.width, voi.center + 2 * voi.width
    elif voi.function == "LINEAR_EXACT":
        return ViewerDisplay((voi.center - voi.width / 2, voi.center + voi.width / 2), None, inverted)
    else:  # LINEAR (DICOM PS3.3 C.11.2.1.2.1): the ramp runs over c - 0.5 +- (w - 1) / 2
        half = max(voi.width - 1, 1e-6) / 2
        return ViewerDisplay((voi.center - 0.5 - half, voi.center - 0.5 + half), None, inverted)
    levels = apply_voi_to(np.linspace(lo, hi, N_LEVELS), voi)
    return ViewerDisplay((float(lo), float(hi)), levels, inverted)


def frames_share_display(meta: ImageMeta) -> bool:
    """False when a volume's frames carry different windows, so one set of contrast limits can't do."""
    return meta.frame_windows is None or all(fw == meta.frame_windows[0] for fw in meta.frame_windows)
