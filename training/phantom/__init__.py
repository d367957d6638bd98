"""Breast phantom simulator: FFDM and DBT images of 3D compressed-breast phantoms, with ground truth.

A first-order physical model (see :mod:`.anatomy` and :mod:`.acquisition` for the physics and the
literature behind every number): a 3D breast with skin, nipple, power-law fibroglandular texture,
Cooper's-ligament-like sheets, pectoral muscle (MLO) and lesions, imaged at 20 keV with quantum
and electronic noise, detector blur and scatter, processed For Presentation (FFDM) or
reconstructed from a limited-angle sweep (DBT).

Conventions (as a real detector stores the image):

* ``pixels`` are 12-bit MONOCHROME2 For Presentation values: air black, fat dark grey, dense tissue
  and calcifications bright.
* Left breasts have the chest wall on the LEFT image edge (nipple pointing right), right breasts on
  the RIGHT edge; ``chest_wall`` says which. CC images have the lateral side at the top, MLO images
  the axilla and pectoral muscle at the top.
* DBT arrays are ``(slice, row, col)``; **slice 0 is the slice nearest the detector** (the breast
  support) and slice ``i`` covers heights ``[i, i + 1) * slice_mm`` above it. The X-ray source sweeps
  along the image rows (the chest-wall direction), so out-of-plane blur smears along the rows.
* Same arguments, same arrays: every random draw comes from ``numpy.random.SeedSequence`` streams
  derived from ``seed`` (patient: density and which breast has the lesion; breast: anatomy and
  lesions; view: texture; acquisition: noise), never from global state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from training.errors import MammoInputError
from training.phantom import anatomy
from training.phantom.acquisition import Acquisition, acquire_dbt, acquire_ffdm
from training.phantom.lesions import CalcSpec, MassSpec, calc_cluster, mass_volume

__all__ = ["LesionTruth", "SimulatedImage", "simulate_ffdm", "simulate_dbt", "simulate_exam"]

PHANTOM_VERSION = 1
VIEWS = ("CC", "MLO")
LATERALITIES = ("L", "R")
LESION_CHOICES = ("none", "mass", "calc", "any")
RECONSTRUCTIONS = ("sart", "saa", "fbp")
ANY_LESION = {"none": 0.4, "mass": 0.35, "calc": 0.25}  # what lesion="any" draws
# Phantom voxels: in-plane about 0.4 mm (a whole number of detector pixels); 1 mm high for FFDM,
# half a slice (at most 0.5 mm) for DBT so that slices see the tissue's depth.
VOXEL_MM = 0.4
FFDM_DZ_MM = 1.0
# Lesions on their own finer grid: in-plane pitch a whole number of pixels near 0.2 mm.
LESION_PITCH_MM = 0.2
LESION_DZ_MM = 0.4


@dataclass
class LesionTruth:
    """Ground truth of one lesion in one image."""

    kind: str            # "mass" | "calc"
    shape: str           # mass: "circumscribed" | "lobulated" | "spiculated"; calc: "cluster"
    label: int           # value of this lesion in SimulatedImage.lesion_labels (1, 2, ...)
    box: tuple[int, int, int, int]   # [row0, col0, row1, col1) in image pixels (half-open)
    slice_range: tuple[int, int] | None  # DBT: [first, last] slices holding the lesion (inclusive); None for FFDM
    center_slice: int | None         # DBT: slice of the lesion centre (the in-focus slice)
    malignant: bool      # proxy: spiculated mass or pleomorphic calcification cluster
    birads: int          # BI-RADS-like category 1..5 (1 = no lesion in the image)
    size_mm: float


@dataclass
class SimulatedImage:
    """One simulated image (FFDM) or volume (DBT) with its ground truth."""

    kind: str
    pixels: np.ndarray
    bits_stored: int
    spacing_mm: tuple[float, ...]
    view: str
    laterality: str
    window: tuple[float, float]
    breast_mask: np.ndarray
    glandular_mask: np.ndarray
    lesion_labels: np.ndarray
    lesions: list[LesionTruth]
    density: str
    glandular_fraction: float
    chest_wall: str
    seed: int
    params: dict = field(default_factory=dict)

    @property
    def birads(self) -> int:
        """The image's category: its most suspicious lesion, 1 without one."""
        return max((lesion.birads for lesion in self.lesions), default=1)


# ------------------------------------------------------------------------------------------------
# public API

def simulate_ffdm(seed: int, *, view: str = "CC", laterality: str = "L", density: str | None = None,
                  lesion: str = "any", shape: tuple[int, int] | None = None) -> SimulatedImage:
    """One FFDM view (For Presentation) of the breast ``laterality`` of virtual patient ``seed``.

    ``lesion``: "none", "mass", "calc", "any" (drawn from the seed, including none) or "mass+calc".
    ``shape``: (rows, cols); default 2048 x 1664 at 0.1 mm; other shapes keep the field of view
    (square pixels of max(204.8 / rows, 166.4 / cols) mm)."""
    seed, view, laterality, density, kinds, shape = _check(seed, view, laterality, density, lesion, shape)
    density, kinds, _ = _patient(seed, density, kinds)
    return _simulate("ffdm", seed, view, laterality, density, kinds, shape, Acquisition())


def simulate_dbt(seed: int, *, view: str = "CC", laterality: str = "L", density: str | None = None,
                 lesion: str = "any", shape: tuple[int, int] | None = None, n_projections: int = 15,
                 arc_deg: float = 15.0, slice_mm: float = 1.0, recon: str = "sart") -> SimulatedImage:
    """One DBT volume: ``n_projections`` over ``arc_deg`` degrees, reconstructed (``recon``: "sart",
    "saa" shift-and-add, or "fbp") into slices of ``slice_mm``; slice 0 nearest the detector.
    Default in-plane pixel 0.2 mm (1024 x 832)."""
    seed, view, laterality, density, kinds, shape = _check(seed, view, laterality, density, lesion, shape)
    acq = _dbt_acquisition(n_projections, arc_deg, slice_mm, recon)
    density, kinds, _ = _patient(seed, density, kinds)
    return _simulate("dbt", seed, view, laterality, density, kinds, shape, acq)


def simulate_exam(seed: int, *, kind: str = "ffdm", density: str | None = None, lesion: str = "any",
                  shape: tuple[int, int] | None = None) -> list[SimulatedImage]:
    """A four-view exam RCC, LCC, RMLO, LMLO of virtual patient ``seed``: one phantom per breast
    (CC and MLO of one breast share its anatomy, density and lesion position), the lesion, if any,
    in one breast only (drawn from the seed)."""
    if kind not in ("ffdm", "dbt"):
        raise MammoInputError(f"exam kind {kind!r} is not one of ffdm, dbt")
    seed, _, _, density, kinds, shape = _check(seed, "CC", "L", density, lesion, shape)
    density, kinds, side = _patient(seed, density, kinds)
    acq = Acquisition() if kind == "ffdm" else _dbt_acquisition(15, 15.0, 1.0, "sart")
    return [_simulate(kind, seed, view, lat, density, kinds if lat == side else (), shape, acq)
            for view, lat in (("CC", "R"), ("CC", "L"), ("MLO", "R"), ("MLO", "L"))]


# ------------------------------------------------------------------------------------------------
# argument checks and random streams

def _check(seed: Any, view: Any, laterality: Any, density: Any, lesion: Any, shape: Any
           ) -> tuple[int, str, str, str | None, tuple[str, ...] | None, tuple[int, int] | None]:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise MammoInputError(f"seed must be a non-negative integer, not {seed!r}")
    if view not in VIEWS:
        raise MammoInputError(f"view {view!r} is not one of {', '.join(VIEWS)}")
    if laterality not in LATERALITIES:
        raise MammoInputError(f"laterality {laterality!r} is not one of {', '.join(LATERALITIES)}")
    if density is not None and density not in anatomy.DENSITY_CLASSES:
        raise MammoInputError(f"density {density!r} is not one of A, B, C, D (or None to draw it)")
    if not isinstance(lesion, str):
        raise MammoInputError(f"lesion {lesion!r} is not one of {', '.join(LESION_CHOICES)}")
    if lesion in ("any",):
        kinds = None
    elif lesion == "none":
        kinds = ()
    else:
        kinds = tuple(lesion.split("+"))
        if not kinds or any(k not in ("mass", "calc") for k in kinds):
            raise MammoInputError(f"lesion {lesion!r} is not one of {', '.join(LESION_CHOICES)} (or 'mass+calc')")
    if shape is not None:
        try:
            rows, cols = (int(v) for v in shape)
        except (TypeError, ValueError):
            raise MammoInputError(f"shape {shape!r} is not (rows, cols)") from None
        if rows < 64 or cols < 64 or rows > 8192 or cols > 8192:
            raise MammoInputError(f"shape {shape!r} must be between 64 and 8192 pixels on each side")
        shape = (rows, cols)
    return int(seed), view, laterality, density, kinds, shape


def _dbt_acquisition(n_projections: Any, arc_deg: Any, slice_mm: Any, recon: Any) -> Acquisition:
    if isinstance(n_projections, bool) or not isinstance(n_projections, (int, np.integer)) \
            or not 2 <= n_projections <= 100:
        raise MammoInputError(f"n_projections must be an integer from 2 to 100, not {n_projections!r}")
    if not isinstance(arc_deg, (int, float)) or not 0 < arc_deg <= 60:
        raise MammoInputError(f"arc_deg must be in (0, 60] degrees, not {arc_deg!r}")
    if not isinstance(slice_mm, (int, float)) or not 0.25 <= slice_mm <= 10:
        raise MammoInputError(f"slice_mm must be between 0.25 and 10 mm, not {slice_mm!r}")
    if recon not in RECONSTRUCTIONS:
        raise MammoInputError(f"recon {recon!r} is not one of {', '.join(RECONSTRUCTIONS)}")
    return Acquisition(n_projections=int(n_projections), arc_deg=float(arc_deg), slice_mm=float(slice_mm), recon=recon)


def _patient(seed: int, density: str | None, kinds: tuple[str, ...] | None
             ) -> tuple[str, tuple[str, ...], str]:
    """Density class, lesion kinds and the breast with the lesion (in an exam) of the patient,
    drawn when not given; the same draws happen either way, so giving one does not change the others."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    drawn_density = anatomy.draw_density(rng)
    drawn_kind = str(rng.choice(list(ANY_LESION), p=list(ANY_LESION.values())))
    side = str(rng.choice(LATERALITIES))
    if kinds is None:
        kinds = () if drawn_kind == "none" else (drawn_kind,)
    return density or drawn_density, kinds, side


def _stream(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


def breast_spec(seed: int, laterality: str, density: str, kinds: tuple[str, ...] = ()) -> anatomy.BreastSpec:
    """The breast ``laterality`` of patient ``seed``: its size from the patient's stream (both
    breasts about the same size), its tissue and lesions from its own."""
    side = LATERALITIES.index(laterality)
    return anatomy.draw_breast(_stream(seed, 1), laterality, density, kinds, side_rng=_stream(seed, 1, side))


# ------------------------------------------------------------------------------------------------
# one image

def _simulate(kind: str, seed: int, view: str, laterality: str, density: str, kinds: tuple[str, ...],
              shape: tuple[int, int] | None, acq: Acquisition) -> SimulatedImage:
    side, v, modality = LATERALITIES.index(laterality), VIEWS.index(view), ("ffdm", "dbt").index(kind)
    spec = breast_spec(seed, laterality, density, kinds)
    rows, cols, pixel = anatomy.detector_grid(shape, kind)
    dz = FFDM_DZ_MM if kind == "ffdm" else min(0.5, acq.slice_mm / 2)
    geometry = anatomy.view_geometry(spec, view, rows, cols, pixel, VOXEL_MM, dz)
    phantom = anatomy.build_phantom(spec, geometry, _stream(seed, 2, side, v, modality))
    m = max(1, int(round(LESION_PITCH_MM / pixel)))
    pitch = (min(LESION_DZ_MM, dz), m * pixel)
    masses, calcs, truths = [], [], []
    for label, lesion in enumerate(spec.lesions, start=1):
        margin = lesion.diameter_mm / 2 + 1.0
        center = anatomy.lesion_center(lesion, phantom, margin)
        if isinstance(lesion, MassSpec):
            masses.append((label, mass_volume(lesion, center, pitch)))
        else:
            calcs.append((label, calc_cluster(lesion, center)))
        truths.append((label, lesion, center))
    noise = _stream(seed, 3, side, v, modality)
    if kind == "ffdm":
        image = acquire_ffdm(phantom, masses, calcs, noise, acq)
        spacing: tuple[float, ...] = (pixel, pixel)
    else:
        image = acquire_dbt(phantom, masses, calcs, noise, acq)
        spacing = (acq.slice_mm, pixel, pixel)
    arrays = [image.pixels, image.breast_mask, image.glandular_mask, image.lesion_labels]
    if laterality == "R":  # the mirror image: chest wall on the right edge
        arrays = [np.ascontiguousarray(a[..., ::-1]) for a in arrays]
    pixels, breast, glandular, labels = arrays
    lesions = [_truth(kind, label, lesion, center, labels, acq.slice_mm) for label, lesion, center in truths]
    params = {
        "phantom_version": PHANTOM_VERSION, "kind": kind, "view": view, "laterality": laterality,
        "thickness_mm": round(geometry.thickness_mm, 3), "kvp": acq.kvp, "energy_kev": anatomy.ENERGY_KEV,
        "pixel_mm": pixel, "voxel_mm": round(geometry.voxel_mm, 6), "voxel_z_mm": dz,
        "mu_per_mm": dict(anatomy.MU_PER_MM), "breast": spec.params(),
        "acquisition": _acquisition_params(kind, acq),
        "lesions": [_lesion_params(lesion, center) for _, lesion, center in truths],
    }
    return SimulatedImage(
        kind=kind, pixels=pixels, bits_stored=12, spacing_mm=spacing, view=view, laterality=laterality,
        window=image.window, breast_mask=breast, glandular_mask=glandular, lesion_labels=labels,
        lesions=[t for t in lesions if t is not None], density=density,
        glandular_fraction=round(phantom.glandular_fraction, 6), chest_wall="left" if laterality == "L" else "right",
        seed=seed, params=params)


def _acquisition_params(kind: str, acq: Acquisition) -> dict[str, Any]:
    params = acq.as_dict()
    if kind == "ffdm":
        for key in ("n_projections", "arc_deg", "slice_mm", "recon", "sart_iterations", "sart_relaxation",
                    "dbt_dose_factor"):
            params.pop(key)
    else:
        for key in ("equalisation", "detail_gain", "detail_sigma_mm", "compression"):
            params.pop(key)
        params["geometry"] = "parallel beam, source sweep along the rows, stationary detector"
    return params


def _lesion_params(lesion: MassSpec | CalcSpec, center: tuple[float, float, float]) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "mass" if isinstance(lesion, MassSpec) else "calc", "shape": lesion.shape,
                           "center_zrc_mm": [round(v, 3) for v in center], "size_mm": round(lesion.diameter_mm, 3),
                           "seed": lesion.seed}
    if isinstance(lesion, CalcSpec):
        out.update(morphology=lesion.morphology, n_specks=lesion.n)
    return out


def _truth(kind: str, label: int, lesion: MassSpec | CalcSpec, center: tuple[float, float, float],
           labels: np.ndarray, slice_mm: float) -> LesionTruth | None:
    present = labels == label
    footprint = present.any(axis=0) if kind == "dbt" else present
    if not footprint.any():  # cannot happen for a lesion placed inside the breast; be safe
        return None
    rows = np.flatnonzero(footprint.any(axis=1))
    cols = np.flatnonzero(footprint.any(axis=0))
    slice_range = center_slice = None
    if kind == "dbt":
        slices = np.flatnonzero(present.any(axis=(1, 2)))
        slice_range = (int(slices[0]), int(slices[-1]))
        center_slice = int(np.clip(math.floor(center[0] / slice_mm), slice_range[0], slice_range[1]))
    return LesionTruth(
        kind="mass" if isinstance(lesion, MassSpec) else "calc", shape=lesion.shape, label=label,
        box=(int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1), slice_range=slice_range,
        center_slice=center_slice, malignant=lesion.malignant, birads=lesion.birads,
        size_mm=round(float(lesion.diameter_mm), 3))
