"""MammoDINO's multi-crop sampler: DINOv2's global and local crops and iBOT's masked patches, kept on
breast tissue; with a naive variant (plain DINOv2) behind the same interface for ablations.

Method (tissue-aware variant)
-----------------------------
* Region. Crops are drawn inside the bounding box of the tissue mask (grown, inside the image, to at
  least ``global_size`` pixels a side), so that scales are fractions of the breast rather than of the
  detector: the breast is 19-34% of the image on the CBIS-DDSM films, where no crop of 0.32 of the
  image could be half tissue. ``region="image"`` draws over the whole image instead; the naive
  variant always does.
* Crops. Each crop follows torchvision's ``RandomResizedCrop`` rule as DINOv2 uses it: area a
  fraction of the region drawn uniformly from ``global_scale``/``local_scale``, aspect (width/height)
  log-uniform in ``aspect`` (3/4..4/3), position uniform, redrawn until it fits the region, then a
  centred crop of the region with its aspect clamped. torchvision gives up after 10 draws; a breast's
  box is tall (2.5:1 to 3.2:1 on the CBIS-DDSM views), where 10 draws miss for 24-74% of the global
  crops and that one fixed centred crop would keep coming back, so we allow 100 draws: the same
  distribution, conditioned on fitting. A candidate is kept when its tissue fraction
  (exact count of mask pixels in the box, at full resolution) is at least ``min_tissue``; for a DBT
  pair the lower of the two slices' fractions must pass.
* Fallback. After ``max_tries`` rejected candidates (never an infinite loop) the crop is the best of
  those candidates and of one extra box: a square at the smallest scale of the range centred on the
  tissue centroid. It is flagged ``fallback=True`` and counted in the QA record (``fallbacks``); its
  recorded tissue fraction may be under the threshold.
* No tissue at all: the tissue-aware sampler raises :class:`NoTissueError` (a
  :class:`MammoInputError`), so a training loop can skip the image and the CLI exits 2; use the naive
  sampler for such images.
* iBOT masks. ``floor(n_global * mask_probability)`` global crops (plus one more with the remaining
  probability) get a block mask, as DINOv2 masks half of the global crops of a batch; the ratios of
  the masked crops of one sample are stratified over ``mask_ratio`` like DINOv2's collate does. Blocks
  follow DINOv2's block masking: rectangles of 4 patches up to half the grid, aspect log-uniform in
  0.3..1/0.3, added until the target count is reached or 10 draws in a row add nothing. Tissue-aware:
  only patches whose tissue fraction is at least ``patch_min_tissue`` may be masked, and the target is
  that ratio of those eligible patches; naive: every patch is eligible.
* Intensities. Values are mapped to [0, 1] by robust percentiles (``intensity_percentiles``, 0.5 and
  99.5) of the tissue pixels of the image (of the whole image when the mask is empty), so the same
  rule works for data with and without stored windows (CBIS-DDSM has none). Callers pass MONOCHROME2
  values (tissue bright): :func:`sample_images` inverts MONOCHROME1. The crops stay single-channel
  float32 in [0, 1]; the model's own normalisation belongs to the training loop.
* Augmentations (X-ray only): flips, brightness/contrast with DINOv2's ColorJitter magnitudes,
  gamma, Gaussian blur with DINOv2's per-crop probabilities (1.0 / 0.1 / 0.5), Gaussian noise. No
  hue, saturation, grayscale or solarisation: they have no meaning on a single-channel X-ray.
* Resizing. Each crop is resampled bilinearly from a lazily built block-mean pyramid level at most
  twice its output size, so downsampling averages like an antialiased resize and costs only the
  output pixels.
* DBT. :meth:`MultiCropSampler.sample_pair` draws slices i and i +/- ``dbt_offset`` from the seed;
  both get the same boxes, flips and masks (so patches correspond for the adjacent-slice loss) and
  one intensity window, while photometric augmentations are drawn per slice.
* Determinism. One seed spawns independent streams (pair choice, boxes, masks, augmentations) with
  ``np.random.SeedSequence``: the same seed gives the same record and pixels, and changing an
  augmentation setting does not move the boxes or masks.

Defaults are DINOv2's (facebookresearch/dinov2, ``dinov2/configs/ssl_default_config.yaml``: global
crops 224 px at scale 0.32-1.0, 8 local crops 96 px at 0.05-0.32; iBOT ``mask_ratio_min_max``
0.1-0.5, ``mask_sample_probability`` 0.5; ``dinov2/data/masking.py``: blocks of at least 4 patches,
aspect 0.3-3.3, at most half the grid; ``dinov2/data/augmentations.py``: flip 0.5, ColorJitter 0.4/0.4
with p 0.8, blur 1.0/0.1/0.5 with sigma 0.1-2.0 and a 9-tap kernel). Patch size 14 as ViT-S/14.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from training.errors import MammoInputError
from training.sampler.boxes import Box, centroid_box, box_tissue_fraction, grow_box, patch_tissue_fractions, tissue_box, union_box, random_resized_box
from training.sampler.masking import block_mask
from training.sampler.augment import AugmentConfig, Pyramid, augment_pixels, flip_crop, tissue_window


class NoTissueError(MammoInputError):
    """The tissue mask is empty, so the tissue-aware sampler has nothing to sample; skip the image or
    use the naive sampler."""


@dataclass(frozen=True)
class SamplerConfig:
    """Everything the sampler does, as data (``to_dict``/``from_dict`` round-trip through JSON)."""

    global_size: int = 224
    local_size: int = 96
    n_global: int = 2
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    aspect: tuple[float, float] = (3 / 4, 4 / 3)         # torchvision RandomResizedCrop ratio
    min_tissue: float = 0.5                              # a crop's tissue fraction must reach this
    local_min_tissue: float | None = None                # the same for local crops (None: min_tissue)
    max_tries: int = 20                                  # candidates per crop before the fallback
    region: str = "tissue"                               # "tissue" (bounding box) or "image"
    global_region: str | None = None                     # where global crops lie (None: region)
    patch_size: int = 14
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    patch_min_tissue: float = 0.5                        # a patch may be masked only above this
    min_block: int = 4                                   # DINOv2 min_num_patches
    max_block_fraction: float = 0.5                      # DINOv2 max_num_patches = half the grid
    block_aspect: tuple[float, float] = (0.3, 1 / 0.3)
    dbt_offset: int = 1                                  # k: slices i and i +/- k
    intensity_percentiles: tuple[float, float] = (0.5, 99.5)
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)  # None: no augmentation

    def __post_init__(self) -> None:
        problems = []
        for name in ("global_size", "local_size", "patch_size", "max_tries", "dbt_offset"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer")
        for name in ("n_global", "n_local", "min_block"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                problems.append(f"{name} must be a non-negative integer")
        if isinstance(self.global_size, int) and isinstance(self.patch_size, int) and self.patch_size > 0 \
                and self.global_size % self.patch_size:
            problems.append(f"global_size {self.global_size} must be a multiple of patch_size {self.patch_size}")
        for name in ("global_scale", "local_scale", "mask_ratio"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi <= 1 or (name != "mask_ratio" and lo == 0):
                problems.append(f"{name} must be (low, high) with 0 < low <= high <= 1")
        for name in ("aspect", "block_aspect"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                problems.append(f"{name} must be (low, high) with 0 < low <= high")
        for name in ("min_tissue", "patch_min_tissue", "mask_probability", "max_block_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1]")
        if self.local_min_tissue is not None and not 0 <= self.local_min_tissue <= 1:
            problems.append("local_min_tissue must be in [0, 1] (or null: min_tissue)")
        if self.region not in ("tissue", "image"):
            problems.append(f"region must be 'tissue' or 'image', not {self.region!r}")
        if self.global_region not in (None, "tissue", "image"):
            problems.append(f"global_region must be 'tissue', 'image' or null, not {self.global_region!r}")
        lo, hi = self.intensity_percentiles
        if not 0 <= lo < hi <= 100:
            problems.append("intensity_percentiles must be (low, high) with 0 <= low < high <= 100")
        if problems:
            raise MammoInputError("sampler config: " + "; ".join(problems))

    @property
    def grid(self) -> int:
        """Patches per side of a global crop."""
        return self.global_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        return _lists(asdict(self))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SamplerConfig":
        """Build from JSON data; unknown keys are a user mistake, listed in the error."""
        values = dict(values)
        augment = values.pop("augment", AugmentConfig())
        try:
            if isinstance(augment, dict):
                augment = AugmentConfig(**_tuples(_known(AugmentConfig, augment, "augment")))
            elif augment is not None and not isinstance(augment, AugmentConfig):
                raise MammoInputError("sampler config: augment must be an object of settings or null")
            return cls(**_tuples(_known(cls, values, "sampler config")), augment=augment)
        except (TypeError, ValueError) as exc:  # a value of the wrong type or length
            if isinstance(exc, MammoInputError):
                raise
            raise MammoInputError(f"sampler config: a setting has the wrong type or length ({exc})") from None


def _known(cls: type, values: dict[str, Any], what: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise MammoInputError(f"{what}: unknown keys {unknown}; known: {sorted(names)}")
    return values


def _tuples(values: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_lists(v) for v in value]
    return value


@dataclass
class Crop:
    """One view. ``pixels``, ``patch_tissue`` and ``patch_mask`` are as the model sees them (after
    flips); ``box`` is in image pixels and :meth:`mask_on_box` gives the mask in image orientation."""

    kind: str                          # "global" | "local"
    box: Box
    tissue_fraction: float             # share of mask pixels in the box (this slice)
    fallback: bool                     # True when no candidate reached the threshold
    slice_index: int | None            # DBT slice; None for a 2D image
    pixels: np.ndarray                 # float32 (size, size) in [0, 1]
    hflip: bool = False
    vflip: bool = False
    patch_tissue: np.ndarray | None = None  # float32 (grid, grid) tissue fraction, masked global crops only
    patch_mask: np.ndarray | None = None    # bool (grid, grid), global crops only (all False: unmasked)
    mask_ratio: float | None = None         # the ratio drawn for a masked crop

    @property
    def masked(self) -> bool:
        return self.patch_mask is not None and bool(self.patch_mask.any())

    def mask_on_box(self) -> np.ndarray | None:
        """The patch mask in image orientation: row 0 at the box's top, column 0 at its left."""
        if self.patch_mask is None:
            return None
        return flip_crop(self.patch_mask, self.vflip, self.hflip)


@dataclass
class Sample:
    """The crops of one draw and its QA record. A DBT pair holds the crops of slice ``pair[0]`` then
    those of slice ``pair[1]``, with the same boxes, flips and masks."""

    crops: list[Crop]
    seed: int
    tissue_aware: bool
    config: SamplerConfig
    image_shape: tuple[int, int]
    region: Box
    intensity_range: tuple[float, float]
    pair: tuple[int, int] | None = None

    @property
    def fallbacks(self) -> int:
        return sum(c.fallback for c in self.crops)

    def views(self, slice_index: int | None = None) -> dict[str, np.ndarray]:
        """Arrays for a training step: ``global`` (n_global, S, S), ``local`` (n_local, s, s) float32 and
        ``masks`` (n_global, grid, grid) bool. For a pair, ``slice_index`` picks the slice (default: first)."""
        if slice_index is None and self.pair is not None:
            slice_index = self.pair[0]
        crops = [c for c in self.crops if c.slice_index == slice_index]
        if not crops:
            raise ValueError(f"no crops for slice {slice_index} in this sample (slices: {self.pair})")
        cfg = self.config

        def stack(arrays: list[np.ndarray], empty: tuple[int, ...], dtype: type) -> np.ndarray:
            return np.stack(arrays) if arrays else np.zeros((0, *empty), dtype)

        glob = [c for c in crops if c.kind == "global"]
        return {
            "global": stack([c.pixels for c in glob], (cfg.global_size,) * 2, np.float32),
            "local": stack([c.pixels for c in crops if c.kind == "local"], (cfg.local_size,) * 2, np.float32),
            "masks": stack([c.patch_mask for c in glob], (cfg.grid,) * 2, bool),
        }

    def record(self) -> dict[str, Any]:
        """The QA record, JSON-serialisable: boxes in full-resolution image pixels, masks in image
        orientation over their box (rows x cols of patches, 1 = masked)."""
        region_area = max((self.region[2] - self.region[0]) * (self.region[3] - self.region[1]), 1)
        crops = []
        for c in self.crops:
            height, width = c.box[2] - c.box[0], c.box[3] - c.box[1]
            on_box = c.mask_on_box()
            crops.append({
                "kind": c.kind,
                "box": [int(v) for v in c.box],
                "tissue_fraction": round(float(c.tissue_fraction), 4),
                "fallback": bool(c.fallback),
                "slice_index": c.slice_index,
                "scale": round(height * width / region_area, 4),
                "aspect": round(width / max(height, 1), 4),
                "hflip": bool(c.hflip),
                "vflip": bool(c.vflip),
                "masked": c.masked,
                "mask_ratio": None if c.mask_ratio is None else round(float(c.mask_ratio), 4),
                "masked_patches": int(c.patch_mask.sum()) if c.patch_mask is not None else 0,
                "mask_grid": on_box.astype(int).tolist() if c.masked else None,
            })
        return {
            "sampler": "tissue-aware" if self.tissue_aware else "naive",
            "seed": self.seed,
            "threshold": self.config.min_tissue if self.tissue_aware else None,
            "patch_threshold": self.config.patch_min_tissue if self.tissue_aware else None,
            "slices": list(self.pair) if self.pair is not None else None,
            "image_shape": list(self.image_shape),
            "region": list(self.region),
            "patch_size": self.config.patch_size,
            "grid": [self.config.grid, self.config.grid],
            "intensity_range": [float(v) for v in self.intensity_range],
            "fallbacks": self.fallbacks,
            "crops": crops,
        }


class MultiCropSampler:
    """DINOv2 multi-crop + iBOT block masks; ``tissue_aware=False`` is plain DINOv2 (for ablations)."""

    def __init__(self, config: SamplerConfig | None = None, tissue_aware: bool = True):
        self.config = config or SamplerConfig()
        self.tissue_aware = tissue_aware

    def sample(self, image: np.ndarray, tissue: np.ndarray, seed: int) -> Sample:
        """One sample from a 2D image (MONOCHROME2 values, any real dtype) and its bool tissue mask."""
        return self._sample([image], [tissue], seed, None)

    def choose_pair(self, n_slices: int, seed: int, anchor: int | None = None) -> tuple[int, int]:
        """Slices (i, j), |i - j| = dbt_offset, drawn from the seed: every such pair equally likely and
        either order; with ``anchor``, i = anchor and j on a side that exists."""
        k = self.config.dbt_offset
        if n_slices <= k:
            raise MammoInputError(f"a volume of {n_slices} slices has no slice pair {k} apart (dbt_offset)")
        rng = _streams(seed)[0]
        if anchor is None:
            low = int(rng.integers(0, n_slices - k))
            return (low, low + k) if rng.random() < 0.5 else (low + k, low)
        if not 0 <= anchor < n_slices:
            raise MammoInputError(f"slice {anchor} is outside the volume (0..{n_slices - 1})")
        sides = [j for j in (anchor - k, anchor + k) if 0 <= j < n_slices]
        return anchor, sides[int(rng.integers(0, len(sides)))]

    def sample_pair(self, volume: Any, tissue: Any, seed: int, anchor: int | None = None) -> Sample:
        """Slices i and i +/- k of a (slices, rows, cols) volume (numpy, memmap or dask: only the two
        slices are read) with the same crop boxes, flips and masks, for the adjacent-slice loss.
        ``tissue`` is a (slices, rows, cols) mask or one (rows, cols) mask shared by all slices."""
        shape = getattr(volume, "shape", ())
        if len(shape) != 3:
            raise MammoInputError(f"a DBT volume must be (slices, rows, cols), got shape {tuple(shape)}")
        i, j = self.choose_pair(shape[0], seed, anchor)
        masks = (tissue, tissue) if np.ndim(tissue) == 2 else (tissue[i], tissue[j])
        return self.sample_slices((volume[i], volume[j]), masks, (i, j), seed)

    def sample_slices(self, images: Sequence[np.ndarray], tissues: Sequence[np.ndarray],
                      pair: tuple[int, int], seed: int) -> Sample:
        """A pair sample from two already-read slices (what :meth:`sample_pair` does after indexing)."""
        if len(images) != 2 or len(tissues) != 2:
            raise MammoInputError("a slice pair needs exactly two slices and two tissue masks")
        return self._sample(list(images), list(tissues), seed, (int(pair[0]), int(pair[1])))

    # -- internals --

    def _sample(self, images: list[Any], tissues: list[Any], seed: int, pair: tuple[int, int] | None) -> Sample:
        cfg = self.config
        images, tissues = _check_inputs(images, tissues)
        seed = _check_seed(seed)
        _, box_rng, mask_rng, aug_rng = _streams(seed)
        shape = images[0].shape
        region = self._region(tissues, shape, pair)
        # one intensity window for both slices of a pair, so that they stay comparable
        lo, hi = tissue_window(images[0], tissues[0], region, cfg.intensity_percentiles)
        # Global crops over the whole image (air, film labels and all) while locals stay on tissue: the
        # student must then match air-free local views from views full of air, and learns to ignore it.
        wide = self.tissue_aware and cfg.global_region == "image"
        global_region = (0, 0, int(shape[0]), int(shape[1])) if wide else region

        # Geometry (boxes with the rejection rule, flips), shared by the slices of a pair.
        local_min = cfg.min_tissue if cfg.local_min_tissue is None else cfg.local_min_tissue
        specs = [("global", cfg.global_size, cfg.global_scale, cfg.min_tissue, global_region)] * cfg.n_global \
            + [("local", cfg.local_size, cfg.local_scale, local_min, region)] * cfg.n_local
        geometry = []
        for kind, size, scale, min_tissue, where in specs:
            box, fractions, fallback = self._choose_box(where, scale, tissues, box_rng, min_tissue)
            aug = cfg.augment
            vflip = bool(aug is not None and aug_rng.random() < aug.vflip)
            hflip = bool(aug is not None and aug_rng.random() < aug.hflip)
            geometry.append((kind, size, box, fractions, fallback, vflip, hflip))
        masks, patch_tissue, ratios = self._masks([g[2] for g in geometry[:cfg.n_global]], tissues, mask_rng)

        # Pixels: one pyramid per slice; photometric augmentations drawn per slice.
        crops: list[Crop] = []
        for s, (image, slice_index) in enumerate(zip(images, list(pair) if pair else [None])):
            pyramid = Pyramid(image, global_region if wide else region)
            for n, (kind, size, box, fractions, fallback, vflip, hflip) in enumerate(geometry):
                pixels = flip_crop(pyramid.resample(box, size, lo, hi), vflip, hflip)
                if cfg.augment is not None:
                    blur_p = cfg.augment.blur[0 if n == 0 else 1 if kind == "global" else 2]
                    pixels = augment_pixels(pixels, cfg.augment, blur_p, aug_rng)
                crop = Crop(kind, box, fractions[s], fallback, slice_index, np.ascontiguousarray(pixels),
                            hflip=hflip, vflip=vflip)
                if kind == "global":  # masks and tissue grids follow the pixels through the flips
                    crop.patch_mask = np.ascontiguousarray(flip_crop(masks[n], vflip, hflip))
                    if patch_tissue[n] is not None:
                        crop.patch_tissue = np.ascontiguousarray(flip_crop(patch_tissue[n][s], vflip, hflip))
                    crop.mask_ratio = ratios[n]
                crops.append(crop)
        return Sample(crops, seed, self.tissue_aware, cfg, (int(shape[0]), int(shape[1])), region,
                      (float(lo), float(hi)), pair)

    def _region(self, tissues: list[np.ndarray], shape: tuple[int, ...], pair: tuple[int, int] | None) -> Box:
        """Where crops may lie: the (grown) tissue bounding box, or the whole image."""
        boxes = [b for b in (tissue_box(t) for t in tissues) if b is not None]
        if self.tissue_aware and not boxes:
            where = f"slices {pair}" if pair is not None else "the image"
            raise NoTissueError(f"no breast tissue in the mask of {where}: the tissue-aware sampler needs "
                                "some (skip this image, or use the naive sampler)")
        if self.tissue_aware and self.config.region == "tissue":
            return grow_box(union_box(boxes), self.config.global_size, shape)
        return 0, 0, shape[0], shape[1]

    def _masks(self, boxes: list[Box], tissues: list[np.ndarray], rng: np.random.Generator
               ) -> tuple[list[np.ndarray], list[list[np.ndarray] | None], list[float | None]]:
        """iBOT block masks of the global crops in image orientation, with the per-slice patch tissue
        grids and ratios of the masked ones (None for the others)."""
        cfg = self.config
        n = len(boxes)
        masks = [np.zeros((cfg.grid, cfg.grid), bool) for _ in range(n)]
        patch_tissue: list[list[np.ndarray] | None] = [None] * n
        ratios: list[float | None] = [None] * n
        expected = n * cfg.mask_probability
        n_masked = min(n, int(expected) + int(rng.random() < expected - int(expected)))
        edges = np.linspace(cfg.mask_ratio[0], cfg.mask_ratio[1], n_masked + 1)
        for rank, index in enumerate(rng.permutation(n)[:n_masked]):
            ratios[index] = float(rng.uniform(edges[rank], edges[rank + 1]))  # stratified, as DINOv2's collate
            patch_tissue[index] = [patch_tissue_fractions(t, boxes[index], cfg.grid) for t in tissues]
            if self.tissue_aware:  # both slices of a pair must pass
                eligible = np.minimum.reduce(patch_tissue[index]) >= cfg.patch_min_tissue
            else:
                eligible = np.ones((cfg.grid, cfg.grid), bool)
            masks[index] = block_mask(eligible, int(round(ratios[index] * eligible.sum())), rng,
                                      min_block=cfg.min_block, max_block=cfg.max_block_fraction * cfg.grid ** 2,
                                      aspect=cfg.block_aspect)
        return masks, patch_tissue, ratios

    def _choose_box(self, region: Box, scale: tuple[float, float], tissues: list[np.ndarray],
                    rng: np.random.Generator, min_tissue: float) -> tuple[Box, list[float], bool]:
        """Bounded rejection sampling of one crop box whose tissue fraction reaches ``min_tissue``;
        returns (box, per-slice fractions, fallback)."""
        cfg = self.config
        if not self.tissue_aware:
            box = random_resized_box(region, scale, cfg.aspect, rng)
            return box, [box_tissue_fraction(t, box) for t in tissues], False
        best: tuple[float, Box, list[float]] | None = None
        for _ in range(cfg.max_tries):
            box = random_resized_box(region, scale, cfg.aspect, rng)
            fractions = [box_tissue_fraction(t, box) for t in tissues]
            if min(fractions) >= min_tissue:
                return box, fractions, False
            if best is None or min(fractions) > best[0]:
                best = (min(fractions), box, fractions)
        box = centroid_box(tissues, region, scale[0])
        fractions = [box_tissue_fraction(t, box) for t in tissues]
        if best is None or min(fractions) > best[0]:
            best = (min(fractions), box, fractions)
        return best[1], best[2], True


def _streams(seed: int) -> list[np.random.Generator]:
    """Independent generators for the pair choice, boxes, masks and augmentations of one seed."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)]


def _check_seed(seed: Any) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise MammoInputError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_inputs(images: list[Any], tissues: list[Any]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    out_images, out_tissues = [], []
    for image, tissue in zip(images, tissues):
        image, tissue = np.asarray(image), np.asarray(tissue)
        if image.ndim != 2 or image.shape[0] < 1 or image.shape[1] < 1:
            raise MammoInputError(f"the sampler takes a 2D image, got shape {image.shape}")
        if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
            raise MammoInputError(f"the sampler takes a real-valued image, got dtype {image.dtype}")
        if tissue.shape != image.shape:
            raise MammoInputError(f"tissue mask shape {tissue.shape} differs from image shape {image.shape}")
        if tissue.dtype != bool:
            tissue = tissue != 0
        if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image[::16, ::16]).all():
            image = np.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0)
        out_images.append(image)
        out_tissues.append(tissue)
    if len({i.shape for i in out_images}) > 1:
        raise MammoInputError("the slices of a pair must have the same shape")
    return out_images, out_tissues


def sample_images(mammo_image: Any, seeds: Iterable[int], naive: bool = False,
                  config: SamplerConfig | None = None, frame: int | None = None) -> list[Sample]:
    """Samples of a :class:`training.dicom.image.MammoImage`, one per seed, with the tissue mask of
    :func:`training.tissue.tissue_of`, decoding only the frames needed, each once. A DBT volume gives
    slice pairs drawn from each seed (``frame`` anchors them at one slice); MONOCHROME1 is inverted
    first so that tissue is bright."""
    from training.tissue import frame_and_tissue

    read = functools.cache(lambda index: frame_and_tissue(mammo_image, index))  # each frame decoded once
    return sample_frames(read, mammo_image.data.shape, seeds, naive, config, frame)


def sample_image(mammo_image: Any, seed: int, naive: bool = False, config: SamplerConfig | None = None,
                 frame: int | None = None) -> Sample:
    """One sample of a MammoImage (see :func:`sample_images`)."""
    return sample_images(mammo_image, [seed], naive, config, frame)[0]


def sample_frames(read: Callable[[int], tuple[np.ndarray, np.ndarray]], shape: Sequence[int], seeds: Iterable[int],
                  naive: bool = False, config: SamplerConfig | None = None, frame: int | None = None) -> list[Sample]:
    """:func:`sample_images` of an image given by its ``shape`` ((rows, cols), or (slices, rows, cols) for
    DBT) and ``read(index) -> (values with tissue bright, tissue mask)`` of its frames: for callers that
    hold the frames and masks already (the napari Sampler QA widget, with its cached tissue masks)."""
    from training.dicom.image import frame_index

    sampler = MultiCropSampler(config, tissue_aware=not naive)
    shape = tuple(shape)
    anchor = None if frame is None else frame_index(frame, shape[0] if len(shape) == 3 else 1)
    samples = []
    for seed in seeds:
        if len(shape) == 2:
            samples.append(sampler.sample(*read(0), seed))
        else:
            i, j = sampler.choose_pair(shape[0], _check_seed(seed), anchor)
            (vi, ti), (vj, tj) = read(i), read(j)
            samples.append(sampler.sample_slices((vi, vj), (ti, tj), (i, j), seed))
    return samples
