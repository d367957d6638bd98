"""Breast-tissue segmentation of mammograms and tomosynthesis (DBT) slices.

Which pixels are breast, as opposed to air, burned-in film labels and markers, collimator or
film-edge strips and scanner noise. All the judgement happens on a thumbnail of about 512 pixels
on its long side; the full-resolution image is read once (to average it down) and written once
(the mask), so a 4000 x 3000 image takes about 25 ms of one core.

1. **Block mean** by an integer factor ``f`` (noise averages out over f*f pixels).
2. **Robust scale**: MONOCHROME1 is negated first so tissue is always bright; the 0.5 and 99.5
   percentiles map to 0 and 1, so bit depth, offset and a few hot pixels do not matter.
3. **Cut just above the air**: air is the darkest histogram peak (not the tallest: a fatty breast
   can outnumber the air); the cut is 12% of the way from it to the median of everything clearly
   brighter (fat, gland and pectoral muscle alike). A cut at Otsu's threshold, or between the
   tallest peak and the muscle, slices through the dark fatty periphery. If the air's pixel noise
   (from neighbour differences) reaches within 3 sigma of the cut, the thumbnail is smoothed first.
4. **Edge strips**: film edges and collimator shutters are bright bands along the image edges.
   Foreground reaching in from any edge less than 2% of the long side is a line, not a breast
   (which reaches far in wherever it touches an edge); lines near the top, bottom and nipple-side
   edges that are mostly foreground on their nipple-side half are strips (a breast meets the top
   and bottom near the chest wall only). Both are cleared, which also cuts the bridges such strips
   make between the breast and the labels.
5. **The breast**: an opening (5 x 5) cuts thin bridges (label glow, speckle); the largest
   component touching the chest-wall edge is kept (labels and markers are not connected to it),
   a closing smooths its outline and its holes are filled.
6. **Upsample** by repetition (``np.repeat``); area, fraction and box come from the thumbnail,
   each of its pixels counting for its block, exactly as if counted on the full mask.

The chest wall is on the side (left or right edge) with more foreground along it, unless the caller
knows better (``chest_wall``; :func:`tissue_of` reads PatientOrientation).

A constant image has no tissue: the result is an empty mask (fraction 0, bbox None), not an error,
so that one blank DBT slice does not stop a volume. What is not an image (not 2D, empty, not
numeric, NaN or infinite values) raises :class:`MammoInputError`.

DBT: :func:`segment_volume` segments each slice on its own by default (what each slice shows: the
breast's cross-section narrows towards the paddles and a slice may hold less of it), decoding one
slice at a time and using one chest-wall side for the whole volume. ``shared=True`` segments the
mean of the slices' thumbnails once and repeats that mask over the slices as a read-only broadcast
view (no memory per slice): the breast's footprint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage as ndi

from training.errors import MammoInputError

if TYPE_CHECKING:  # io pulls in pydicom; tissue needs only the type
    from training.dicom.image import MammoImage

TARGET_SIDE = 512  # thumbnail long side: 8x8 blocks for a 4000 x 3000 image
N_BINS = 256
PEAK_SHARE = 0.05  # a histogram peak this high (share of the tallest) is a population, not noise
LOW_PCT, HIGH_PCT = 0.5, 99.5  # robust intensity scale
AIR_TO_TISSUE = 0.08  # the cut, as a fraction of the way from the air peak to the tissue median
NOISE_SIGMAS = 3.0  # a cut fewer noise sigmas above the air peak than this means a noisy image...
NOISY_BLUR = 1.0  # ...which is smoothed (Gaussian sigma, thumbnail pixels) before thresholding
EDGE_RUN = 0.02  # foreground reaching in from an edge less than this fraction of the long side is a line
STRIP_DEPTH = 0.05  # full-length strips are looked for within this fraction of the image side
STRIP_FILL = 0.6  # a line this full (on its nipple-side half) is a film/collimator strip
SMOOTH_RADIUS = 2  # thumbnail pixels: opening/closing radius
CHEST_BAND = 1 / 6  # width of the left/right bands compared to find the chest wall


@dataclass
class TissueResult:
    """A breast-tissue mask on the input's grid and its statistics.

    For a volume (``segment_volume``) ``mask`` is 3D, ``fraction`` is over the whole volume,
    ``area_cm2`` is the mean tissue area per slice, ``bbox`` is the in-plane box of the union of the
    slices' masks and ``slice_fractions`` lists each slice's fraction.
    """

    mask: np.ndarray  # bool, same grid as the input
    fraction: float  # mask.mean()
    area_cm2: float | None  # from spacing_mm; None without spacing
    bbox: tuple[int, int, int, int] | None  # [row0, col0, row1, col1) in image pixels; None if empty
    chest_wall: str  # "left" | "right": image side the chest wall is on
    downsample: int  # block factor the work was done at
    slice_fractions: list[float] | None = field(default=None)  # volumes only
    shared: bool = False  # volumes: one mask repeated over every slice

    def to_json(self) -> dict[str, Any]:
        """The statistics (everything but the mask), JSON-serialisable."""
        out: dict[str, Any] = {
            "shape": list(self.mask.shape), "fraction": self.fraction, "area_cm2": self.area_cm2,
            "bbox": list(self.bbox) if self.bbox is not None else None,
            "chest_wall": self.chest_wall, "downsample": self.downsample,
        }
        if self.slice_fractions is not None:
            out["slice_fractions"] = self.slice_fractions
            out["shared"] = self.shared
        return out


# --- public API ----------------------------------------------------------------------------------

def segment_tissue(image: np.ndarray, *, spacing_mm: tuple[float, float] | None = None,
                   photometric: str = "MONOCHROME2", view: str | None = None,
                   chest_wall: str | None = None) -> TissueResult:
    """Breast-tissue mask of one 2D image of modality values (any numeric dtype).

    `photometric` MONOCHROME1 means tissue is dark; `chest_wall` ("left"/"right") skips detecting
    it; `view` is accepted for callers that have it (the method does not depend on it).
    """
    del view  # same method for CC and MLO; pectoral muscle is breast tissue here
    image = _check_image(image, ndim=2)
    factor = _factor(image.shape)
    thumb = _signed(block_mean(image, factor), photometric)
    low_mask, side = segment_thumbnail(thumb, chest_wall)
    full = FullMask(low_mask, factor, image.shape)
    area = None
    if spacing_mm is not None:
        area = full.count * float(spacing_mm[-2]) * float(spacing_mm[-1]) / 100.0  # mm2 -> cm2
    return TissueResult(mask=full.mask(), fraction=full.count / full.size, area_cm2=area, bbox=full.bbox(),
                        chest_wall=side, downsample=factor)


def segment_volume(volume: Any, *, spacing_mm: tuple[float, ...] | None = None,
                   photometric: str = "MONOCHROME2", view: str | None = None,
                   shared: bool = False, chest_wall: str | None = None) -> TissueResult:
    """Tissue mask of a (slices, rows, cols) volume, numpy or dask, decoding one slice at a time.

    Per slice by default; ``shared=True`` gives one mask (from the mean of the slices' thumbnails)
    for every slice, as a read-only broadcast view. Either way the chest-wall side is decided once,
    from the mean thumbnail, so that all slices agree. `spacing_mm` may be (slice, row, col) or
    (row, col); only the in-plane pair is used.
    """
    del view
    if getattr(volume, "ndim", None) != 3 or 0 in volume.shape:
        raise MammoInputError(f"a volume must be 3D (slices, rows, cols) and non-empty; "
                              f"got shape {getattr(volume, 'shape', None)}")
    plane = tuple(volume.shape[1:])
    factor = _factor(plane)
    thumbs = []
    for index in range(volume.shape[0]):
        thumbs.append(_signed(block_mean(_check_image(_slice(volume, index), ndim=2), factor), photometric))
    mean_thumb = np.mean(thumbs, axis=0)
    if chest_wall is None:
        chest_wall = segment_thumbnail(mean_thumb, None)[1]
    n = volume.shape[0]
    lows = [segment_thumbnail(t, chest_wall)[0] for t in ([mean_thumb] if shared else thumbs)]
    fulls = [FullMask(low, factor, plane) for low in lows]
    if shared:
        mask = np.broadcast_to(fulls[0].mask(), volume.shape)  # read-only view: no memory per slice
        fulls = fulls * n
    else:
        mask = np.empty(volume.shape, dtype=bool)
        for index, full in enumerate(fulls):
            mask[index] = full.mask()
    fractions = [full.count / full.size for full in fulls]
    area = None
    if spacing_mm is not None:
        mean_count = float(np.mean([full.count for full in fulls]))
        area = mean_count * float(spacing_mm[-2]) * float(spacing_mm[-1]) / 100.0
    union = FullMask(np.logical_or.reduce(lows), factor, plane)
    return TissueResult(mask=mask, fraction=float(np.mean(fractions)), area_cm2=area, bbox=union.bbox(),
                        chest_wall=chest_wall, downsample=factor, slice_fractions=fractions, shared=shared)


def tissue_of(image: "MammoImage", index: int | None = None, *, shared: bool = False,
              pixels: np.ndarray | None = None) -> TissueResult:
    """Tissue of a :class:`~training.dicom.image.MammoImage`: the 2D image, frame `index` of a DBT, or
    (index None) the whole DBT volume. Photometric, spacing and view come from its header; the
    chest-wall side from PatientOrientation when the header has it. ``pixels``: that frame, already
    decoded by the caller (it is not decoded again)."""
    meta = image.meta
    spacing = tuple(meta.spacing_mm[-2:]) if meta.spacing_mm else None
    side = _side_from_orientation(meta.patient_orientation)
    if meta.is_volume and index is None:
        return segment_volume(image.data, spacing_mm=spacing, photometric=meta.photometric,
                              view=meta.view, shared=shared, chest_wall=side)
    index = image.frame_index(index)
    values = image.frame(index) if pixels is None else pixels
    return segment_tissue(values, spacing_mm=spacing, photometric=meta.photometric, view=meta.view,
                          chest_wall=side)


def frame_and_tissue(image: "MammoImage", frame: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame ``frame`` of a MammoImage decoded once, MONOCHROME1 inverted (tissue bright, as the
    sampler and the encoder want it), and its tissue mask (:func:`tissue_of`, per slice for DBT)."""
    values = image.frame(frame)
    mask = tissue_of(image, frame if image.data.ndim == 3 else None, pixels=values).mask
    if image.meta.photometric == "MONOCHROME1":
        values = np.negative(values, dtype=np.float32)
    return values, np.asarray(mask)


# --- steps -----------------------------------------------------------------------------------------

def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each factor x factor block (float32); the last partial row/column of blocks is dropped.

    Rows are summed by one reduction over the block axis, columns by adding strided slices, both
    in an integer accumulator: 6x faster than ``reshape(...).mean()`` over both block axes, which
    converts every pixel to float64 and reduces over short inner axes."""
    if factor == 1:
        return image.astype(np.float32)
    rows, cols = image.shape[0] // factor, image.shape[1] // factor
    acc = _accumulator(image.dtype)
    row_sums = np.add.reduce(image[:rows * factor].reshape(rows, factor, -1), axis=1, dtype=acc)
    total = row_sums[:, 0:cols * factor:factor].copy()
    for offset in range(1, factor):
        total += row_sums[:, offset:cols * factor:factor]
    return (total / np.float32(factor * factor)).astype(np.float32)


def segment_thumbnail(thumb: np.ndarray, chest_wall: str | None) -> tuple[np.ndarray, str]:
    """Tissue mask of a thumbnail whose tissue is bright, and the chest-wall side used."""
    lo, hi = np.percentile(thumb, [LOW_PCT, HIGH_PCT])
    if not hi > lo:  # no contrast: nothing looks like tissue
        empty = np.zeros(thumb.shape, dtype=bool)
        return empty, chest_wall or "left"
    scaled = np.clip((thumb - lo) / (hi - lo), 0.0, 1.0)
    cut, air = tissue_threshold(scaled)
    if NOISE_SIGMAS * noise_sigma(scaled) > cut - air:  # the cut would fall in the air's noise
        scaled = ndi.gaussian_filter(scaled, NOISY_BLUR)
        cut, air = tissue_threshold(scaled)
    foreground = scaled > cut
    side = chest_wall or chest_wall_of(foreground)
    _clear_edge_strips(foreground, side)
    opened = _opening(foreground)
    breast = _chest_wall_component(opened, side)
    if not breast.any():
        return breast, side
    breast = _closing(breast)
    return _fill_holes(breast), side


def tissue_threshold(scaled: np.ndarray) -> tuple[float, float]:
    """The air/tissue cut on a [0, 1] image, and the air level (see the module docstring).

    Air is the darkest population: the lowest histogram peak of any size (not the tallest: a
    fatty breast can outnumber the air). Tissue is the median of everything clearly above the
    air peak (fat, glandular tissue and pectoral muscle alike, so a bright muscle does not pull
    the cut into the fat)."""
    hist, edges = np.histogram(scaled, bins=N_BINS, range=(0.0, 1.0))
    centers = (edges[:-1] + edges[1:]) / 2
    smooth = ndi.gaussian_filter1d(hist.astype(np.float64), 1.0, mode="constant")
    peaks = np.flatnonzero((smooth >= np.maximum(np.roll(smooth, 1), np.roll(smooth, -1)))
                           & (smooth >= PEAK_SHARE * smooth.max()))
    air_bin = int(peaks[0])
    below_half = np.flatnonzero(smooth[air_bin:] < smooth[air_bin] / 2)
    half_width = int(below_half[0]) if below_half.size else 1
    above = np.arange(N_BINS) > air_bin + 2 * half_width
    if not hist[above].any():
        return 1.0, float(centers[air_bin])
    air, tissue = float(centers[air_bin]), _hist_median(hist[above], centers[above])
    return air + AIR_TO_TISSUE * (tissue - air), air


def noise_sigma(scaled: np.ndarray) -> float:
    """Pixel noise from neighbour differences (robust: edges are a small share of all pairs)."""
    diff = np.diff(scaled[::2], axis=1)
    return float(1.4826 * np.median(np.abs(diff)) / np.sqrt(2))


def chest_wall_of(foreground: np.ndarray) -> str:
    """The side (left/right) with more foreground in a band along it: the chest wall spans the
    image height there, labels and markers only a little of it."""
    band = max(int(foreground.shape[1] * CHEST_BAND), 1)
    return "left" if foreground[:, :band].mean() >= foreground[:, -band:].mean() else "right"


# --- helpers -----------------------------------------------------------------------------------------

def _check_image(image: Any, ndim: int) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != ndim or image.size == 0:
        raise MammoInputError(f"expected a non-empty {ndim}D image; got shape {image.shape}")
    if image.dtype == bool:
        image = image.view(np.uint8)
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise MammoInputError(f"expected a numeric grey-scale image; got dtype {image.dtype}")
    return image


def _slice(volume: Any, index: int) -> np.ndarray:
    """One slice, decoded now (a dask volume computes just that chunk)."""
    plane = volume[index]
    return np.asarray(plane.compute() if hasattr(plane, "compute") else plane)


def _factor(shape: tuple[int, ...]) -> int:
    return max(1, min(int(round(max(shape) / TARGET_SIDE)), min(shape)))


def _accumulator(dtype: np.dtype) -> type:
    if np.issubdtype(dtype, np.integer) and dtype.itemsize <= 2:
        return np.uint32 if np.issubdtype(dtype, np.unsignedinteger) else np.int32
    return np.float64


def _signed(thumb: np.ndarray, photometric: str) -> np.ndarray:
    """Tissue bright: MONOCHROME1 negated (the scale step makes the offset irrelevant)."""
    if str(photometric).strip().upper() == "MONOCHROME1":
        thumb = -thumb
    if not np.isfinite(thumb).all():
        raise MammoInputError("the image holds NaN or infinite values; it is not a mammogram")
    return thumb


def _hist_median(counts: np.ndarray, centers: np.ndarray) -> float:
    cumulative = np.cumsum(counts)
    return float(centers[np.searchsorted(cumulative, cumulative[-1] / 2)])


def _opening(mask: np.ndarray) -> np.ndarray:
    """Binary opening by a (2r+1)-pixel square, as min then max filters: separable, so 3x faster
    than ndi.binary_opening with a disk; 'reflect' borders leave the image edges uneroded."""
    size = 2 * SMOOTH_RADIUS + 1
    return ndi.maximum_filter(ndi.minimum_filter(mask.view(np.uint8), size), size).view(bool)


def _closing(mask: np.ndarray) -> np.ndarray:
    size = 2 * SMOOTH_RADIUS + 1
    return ndi.minimum_filter(ndi.maximum_filter(mask.view(np.uint8), size), size).view(bool)


def _clear_edge_strips(foreground: np.ndarray, side: str) -> None:
    """Clear film-edge and collimator strips along the image edges (in place).

    Two kinds: thin lines along any edge (foreground reaching in from the edge less than EDGE_RUN
    of the long side, where a breast reaches far in), and wider full-length strips along the top,
    bottom and nipple-side edges (lines that are mostly foreground on their nipple-side half,
    which a breast never is: it meets the top and bottom near the chest wall only)."""
    rows, cols = foreground.shape
    shortest = max(int(round(EDGE_RUN * max(rows, cols))), 2)
    for edge in (foreground, foreground[::-1], foreground.T, foreground.T[::-1]):  # top, bottom, left, right
        band = edge[:shortest]
        run = np.where(band.all(axis=0), shortest, np.argmin(band, axis=0))
        band[np.arange(band.shape[0])[:, None] < np.where(run < shortest, run, 0)] = False
    nipple_half = foreground[:, cols // 2:] if side == "left" else foreground[:, :cols - cols // 2]
    nipple_edge = foreground[:, ::-1] if side == "left" else foreground
    row_depth, col_depth = max(round(rows * STRIP_DEPTH), 1), max(round(cols * STRIP_DEPTH), 1)
    for lines, fill in ((foreground, nipple_half[:row_depth].mean(axis=1)),
                        (foreground[::-1], nipple_half[::-1][:row_depth].mean(axis=1)),
                        (nipple_edge.T, nipple_edge[:, :col_depth].mean(axis=0))):
        full = np.nonzero(fill >= STRIP_FILL)[0]
        if full.size:  # clear up to one line past the deepest full one (its blurred rim)
            lines[:min(int(full[-1]) + 2, fill.size)] = False


def _chest_wall_component(foreground: np.ndarray, side: str) -> np.ndarray:
    """The largest connected component touching the chest-wall edge (else the largest of all)."""
    labels, n = ndi.label(foreground)
    if n == 0:
        return foreground
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    edge = labels[:, 0] if side == "left" else labels[:, -1]
    touching = np.unique(edge[edge > 0])
    candidates = touching if touching.size else np.arange(1, n + 1)
    best = candidates[np.argmax(sizes[candidates])]
    return labels == best


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background regions that do not reach the image border become tissue (a lookup over one
    labelling: 3x faster than ndi.binary_fill_holes' iterative propagation)."""
    labels, n = ndi.label(~mask)
    hole = np.ones(n + 1, dtype=bool)
    hole[0] = False
    hole[labels[[0, -1]].ravel()] = False
    hole[labels[:, [0, -1]].ravel()] = False
    return mask | hole[labels]


@dataclass
class FullMask:
    """A thumbnail mask and the full grid it stands for: statistics come from the thumbnail
    (each thumbnail pixel counts for its block's full-resolution pixels), exactly as if counted on
    the upsampled mask, which is only built when asked for."""

    low: np.ndarray
    factor: int
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        self.row_repeats = _repeats(self.low.shape[0], self.factor, self.shape[0])
        self.col_repeats = _repeats(self.low.shape[1], self.factor, self.shape[1])
        self.size = int(self.shape[0]) * int(self.shape[1])
        self.count = int(self.row_repeats @ self.low.astype(np.int64) @ self.col_repeats)

    def mask(self) -> np.ndarray:
        """Nearest-neighbour upsample by repetition (np.repeat: the cheapest way to the full grid)."""
        if self.factor == 1:
            return self.low.copy()
        return np.repeat(np.repeat(self.low, self.row_repeats, axis=0), self.col_repeats, axis=1)

    def bbox(self) -> tuple[int, int, int, int] | None:
        rows, cols = np.flatnonzero(self.low.any(axis=1)), np.flatnonzero(self.low.any(axis=0))
        if rows.size == 0:
            return None
        row_edges = np.concatenate(([0], np.cumsum(self.row_repeats)))
        col_edges = np.concatenate(([0], np.cumsum(self.col_repeats)))
        return (int(row_edges[rows[0]]), int(col_edges[cols[0]]),
                int(row_edges[rows[-1] + 1]), int(col_edges[cols[-1] + 1]))


def _repeats(n_low: int, factor: int, n_full: int) -> np.ndarray:
    """Full-resolution rows (or columns) per thumbnail row: the last block absorbs the remainder
    that block_mean dropped."""
    repeats = np.full(n_low, factor, dtype=np.int64)
    repeats[-1] += n_full - n_low * factor
    return repeats


def _side_from_orientation(orientation: list[str]) -> str | None:
    """PatientOrientation's first value is the direction of increasing column: A (towards the
    nipple) puts the chest wall on the left, P on the right (as training.dicom.hanging reads it)."""
    if len(orientation) == 2 and orientation[0][:1] in ("A", "P"):
        return "left" if orientation[0].startswith("A") else "right"
    return None
