"""Three-dimensional compressed-breast phantoms: outline, skin, nipple, fibroglandular tissue,
Cooper's-ligament-like sheets, pectoral muscle and lesions, as linear attenuation at 20 keV.

Coordinates. A view is built in its *canonical* orientation, a left breast: the chest wall on image
column 0, the nipple pointing to increasing columns; a right breast is the mirror image, flipped by
the caller at the very end. Positions are in mm: ``row`` down the image (along the chest wall),
``col`` from the chest wall towards the nipple, ``z`` the height above the detector surface
(the breast support, ``z = 0``) up to the compression paddle (``z = T``). Volumes are stored
``(z, row, col)``.

The model, in order (each step is a function below):

1. :func:`draw_breast` draws one breast (both views share it): compressed thickness, size, skin,
   density class and glandular fraction, a few "lobes" of dense tissue, lesions. Positions of lobes
   and lesions live in a *breast frame* normalised to the breast, so that the CC and the MLO views
   of one breast show them in agreeing places (same depth from the nipple).
2. :func:`view_geometry` gives the compressed outline for a view (a semi-ellipse with a gentle
   irregular border and a nipple; MLO: tilted, reaching the axilla at the top edge, with the
   pectoral muscle), its signed distance map and the mapping to the breast frame. The compressed
   edge is rounded: a half-cylinder of radius T/2 along the outline, the usual first-order model of
   a compressed breast's periphery.
3. :func:`build_phantom` fills the volume: fibroglandular tissue is a Gaussian random field with a
   power-law spectrum 1/f^beta plus a smooth anatomical prior (lobes, retroareolar concentration,
   subcutaneous and retromammary fat), thresholded at the quantile that gives the drawn glandular
   fraction. Burgess, Jacobson & Judy (Med Phys 28:419, 2001) measured beta of about 3 on
   mammograms; the field's exponent is set so that the projected tissue has that slope (see BETA).
   The field is generated on a fan-shaped grid that converges beyond the nipple and is stretched
   along the nipple axis, so the texture runs towards the nipple as ducts and trabeculae do.
   Cooper's ligaments are thin sheets on the zero set of a band-pass version of the same field,
   so they sit at the parenchyma-fat borders and cross the subcutaneous fat (Bakic et al., Med
   Phys 29:2131, 2002 model ligaments as compartment walls).
4. :func:`mass_volume` and :func:`calc_cluster` build the lesions on a finer grid (masses:
   circumscribed, lobulated or spiculated; microcalcification clusters: punctate or pleomorphic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import fft as sfft
from scipy import ndimage
from training.phantom.lesions import CalcSpec, MassSpec


# ---- materials: linear attenuation coefficients at 20 keV (the mean energy of a 28 kV W/Rh or
# Mo/Mo mammography spectrum after a breast), in 1/mm. One monoenergetic model: first order.
#   adipose 0.456 /cm, fibroglandular 0.802 /cm, infiltrating ductal carcinoma 0.844 /cm:
#     Johns & Yaffe, "X-ray characterisation of normal and neoplastic breast tissues",
#     Phys Med Biol 32:675-695 (1987), measured at 20 keV.
#   skin 0.837 /cm and skeletal muscle 0.862 /cm: ICRU Report 46 compositions and densities
#     (1.09, 1.05 g/cm3) times XCOM mass attenuation coefficients (Berger et al., NIST).
#   calcification 20.1 /cm: calcium hydroxyapatite Ca10(PO4)6(OH)2 (the mineral of most breast
#     calcifications: Fandos-Morera et al., Radiology 169:325, 1988) at 3.06 g/cm3, XCOM 6.56 cm2/g.
# (Adipose/glandular from Hammerstein et al., Radiology 130:485, 1979 compositions with XCOM give
# 0.51 and 0.78 /cm; we keep the measured values.)
MU_PER_MM: dict[str, float] = {
    "adipose": 0.0456,
    "glandular": 0.0802,
    "mass": 0.0844,
    "skin": 0.0837,
    "muscle": 0.0862,
    "calcification": 2.01,
}


ENERGY_KEV = 20.0


# ---- density: fibroglandular volume fraction of the breast inside the skin, per ACR BI-RADS class.
# Yaffe et al., "The myth of the 50-50 breast", Med Phys 36:5437 (2009): mean volumetric density
# 19.3%, 80% of women below 27%, 95% below 45%. BI-RADS class prevalence in US screening
# (Sprague et al., JNCI 106:dju255, 2014): about 10% A, 47% B, 36% C, 7% D. The class ranges
# below cut Yaffe's distribution at roughly those population quantiles.
DENSITY_CLASSES = ("A", "B", "C", "D")


GLANDULAR_FRACTION_RANGE: dict[str, tuple[float, float]] = {
    "A": (0.02, 0.06), "B": (0.06, 0.15), "C": (0.15, 0.30), "D": (0.30, 0.50)}


DENSITY_PREVALENCE: dict[str, float] = {"A": 0.10, "B": 0.47, "C": 0.36, "D": 0.07}


# ---- sizes. Compressed thickness: Yaffe et al. 2009 report 59 +/- 16 mm; we draw 55 +/- 10 mm
# within 30-70 mm. Skin 1.45 +/- 0.3 mm: Huang et al., Med Phys 35:1199 (2008), breast CT.
DETECTOR_MM = (204.8, 166.4)  # (rows, cols) field of view of a 2048 x 1664, 0.1 mm detector


THICKNESS_MM = (55.0, 10.0, 30.0, 70.0)  # mean, sd, min, max


SKIN_MM = (1.45, 0.3, 1.0, 2.2)


# Spectral exponent of the 3D Gaussian field. Thresholding flattens a power spectrum (a field
# with beta = 3 gives a projected tissue texture of slope about -2.6), so the field's exponent is
# calibrated so that the *projected binary tissue* -- what Burgess et al. measured on mammograms,
# beta about 3 -- has slope -3 (tests/test_phantom_physics.py: -2.98 +/- 0.21 over 12 phantoms).
BETA = 3.8


MLO_OBLIQUITY_DEG = 45.0  # angle of the MLO compression plane: the breast frame's rotation


LESION_KINDS = ("none", "mass", "calc")


MASS_SHAPES = ("circumscribed", "lobulated", "spiculated")


def _truncnorm(rng: np.random.Generator, mean: float, sd: float, lo: float, hi: float) -> float:
    return float(np.clip(rng.normal(mean, sd), lo, hi))


@dataclass
class BreastSpec:
    """Everything random about one breast; views of it are deterministic functions of this."""

    laterality: str
    density: str
    glandular_target: float
    thickness_mm: dict[str, float]         # per view
    depth_mm: dict[str, float]             # chest wall to nipple, per view
    half_width_mm: dict[str, tuple[float, float]]  # (upper, lower) semi-axis along the chest wall
    center_row_frac: dict[str, float]
    tilt_deg: dict[str, float]
    skin_mm: float
    nipple_radius_mm: float
    outline_harmonics: list[tuple[int, float, float]]  # (order, amplitude, phase)
    pectoral: tuple[float, float, float]   # MLO: (top width fraction, height fraction, exponent)
    lobes: list[tuple[float, float, float, float, float]]  # (xi, eta, zeta, sigma, amplitude)
    radial_stretch: float
    z_squeeze: float
    ligament_fraction: float
    texture_seed: int
    lesions: list[MassSpec | CalcSpec] = field(default_factory=list)

    def params(self) -> dict[str, Any]:
        """JSON-serialisable summary."""
        return {
            "laterality": self.laterality, "density": self.density,
            "glandular_target": round(self.glandular_target, 5),
            "thickness_mm": {k: round(v, 3) for k, v in self.thickness_mm.items()},
            "depth_mm": {k: round(v, 3) for k, v in self.depth_mm.items()},
            "half_width_mm": {k: [round(x, 3) for x in v] for k, v in self.half_width_mm.items()},
            "tilt_deg": {k: round(v, 3) for k, v in self.tilt_deg.items()},
            "skin_mm": round(self.skin_mm, 3), "nipple_radius_mm": round(self.nipple_radius_mm, 3),
            "beta": BETA, "radial_stretch": round(self.radial_stretch, 3),
            "z_squeeze": round(self.z_squeeze, 3), "ligament_fraction": round(self.ligament_fraction, 4),
            "n_lobes": len(self.lobes), "texture_seed": self.texture_seed,
        }


def draw_density(rng: np.random.Generator) -> str:
    """An ACR class with its screening prevalence."""
    return str(rng.choice(DENSITY_CLASSES, p=[DENSITY_PREVALENCE[c] for c in DENSITY_CLASSES]))


def draw_breast(rng: np.random.Generator, laterality: str, density: str,
                lesion_kinds: tuple[str, ...] = (), side_rng: np.random.Generator | None = None) -> BreastSpec:
    """One breast with the given density class and lesions (``"mass"``/``"calc"``). Its size comes
    from ``rng`` (share it between a patient's breasts: they are about the same size), with a few
    percent of asymmetry and everything else (tissue, lesions) from ``side_rng`` (default ``rng``)."""
    side = rng if side_rng is None else side_rng
    t_cc = _truncnorm(rng, *THICKNESS_MM)
    depth_cc = _truncnorm(rng, 30.0 + 1.3 * t_cc, 12.0, 65.0, 140.0)
    width = rng.uniform(0.7, 1.0)
    t_cc = float(np.clip(t_cc * side.uniform(0.97, 1.03), THICKNESS_MM[2], THICKNESS_MM[3]))
    depth_cc = float(depth_cc * side.uniform(0.96, 1.04))
    t_mlo = min(THICKNESS_MM[3] + 5.0, t_cc * side.uniform(1.0, 1.1))
    depth_mlo = min(150.0, depth_cc * side.uniform(1.0, 1.12))
    half_rows = DETECTOR_MM[0] / 2
    b_cc = min(half_rows * 0.88, depth_cc * width)
    rng = side
    half_width = {"CC": (b_cc * rng.uniform(0.95, 1.05), b_cc * rng.uniform(0.95, 1.05)),
                  "MLO": (DETECTOR_MM[0] * rng.uniform(0.47, 0.55), DETECTOR_MM[0] * rng.uniform(0.4, 0.47))}
    lo, hi = GLANDULAR_FRACTION_RANGE[density]
    # Dense tissue: one central lobe behind the nipple plus a few more, biased to the upper outer
    # quadrant (lateral eta < 0, superior zeta > 0) where most glandular tissue is.
    lobes = [(0.45, 0.0, 0.0, 0.5, 1.0)]
    for _ in range(int(rng.integers(2, 6))):
        lobes.append((rng.uniform(0.2, 0.8), rng.normal(-0.2, 0.35), rng.normal(0.15, 0.35),
                      rng.uniform(0.12, 0.3), rng.uniform(0.4, 1.0)))
    spec = BreastSpec(
        laterality=laterality, density=density, glandular_target=float(rng.uniform(lo, hi)),
        thickness_mm={"CC": t_cc, "MLO": t_mlo}, depth_mm={"CC": depth_cc, "MLO": depth_mlo},
        half_width_mm=half_width,
        center_row_frac={"CC": rng.uniform(0.46, 0.54), "MLO": rng.uniform(0.4, 0.48)},
        tilt_deg={"CC": rng.uniform(-5, 5), "MLO": rng.uniform(15, 30)},
        skin_mm=_truncnorm(rng, *SKIN_MM), nipple_radius_mm=rng.uniform(3.5, 6.0),
        outline_harmonics=[(k, rng.uniform(0.0, 0.05 / k), rng.uniform(0, 2 * math.pi)) for k in (2, 3, 4, 5)],
        pectoral=(rng.uniform(0.35, 0.65), rng.uniform(0.3, 0.55), rng.uniform(0.65, 0.95)),
        lobes=lobes, radial_stretch=rng.uniform(1.2, 1.5), z_squeeze=rng.uniform(1.5, 2.5),
        ligament_fraction=rng.uniform(0.012, 0.022), texture_seed=int(rng.integers(2**31)),
    )
    for kind in lesion_kinds:
        spec.lesions.append(_draw_lesion(rng, kind, spec, taken=spec.lesions))
    return spec


def _draw_lesion(rng: np.random.Generator, kind: str, spec: BreastSpec,
                 taken: list[MassSpec | CalcSpec]) -> MassSpec | CalcSpec:
    t_min = min(spec.thickness_mm.values())
    if kind == "mass":
        shape = str(rng.choice(MASS_SHAPES))
        size = rng.uniform(6.0, 20.0) if shape != "spiculated" else rng.uniform(6.0, 14.0)
        size = min(size, 0.45 * t_min)
        reach = size / 2 + 4.0
    elif kind == "calc":
        reach = 6.0
    else:
        raise ValueError(f"unknown lesion kind {kind!r}")
    # Centre in the breast frame: depth 30-75% of the nipple distance; across the breast within a
    # disc that keeps the lesion inside the skin whichever way the view compresses it.
    room = max(0.0, 1.0 - (reach + spec.skin_mm + 3.0) / (t_min / 2))
    # Two lesions of one breast sit apart in height so that a (CC) DBT shows them in different
    # slices: keep the candidate farthest from the others, stop once they are clear of each other.
    best, best_gap = None, -math.inf
    for _ in range(200):
        xi = rng.uniform(0.3, 0.75)
        radius = min(room, 0.6) * math.sqrt(rng.uniform())
        angle = rng.uniform(0, 2 * math.pi)
        candidate = (float(xi), radius * math.cos(angle), radius * math.sin(angle))
        gap = min((abs(candidate[2] - other.center[2]) * t_min / 2 - (reach + other.diameter_mm / 2 + 2.0)
                   for other in taken), default=0.0)
        if gap > best_gap:
            best, best_gap = candidate, gap
        if gap >= 0:
            break
    center = best
    seed = int(rng.integers(2**31))
    if kind == "mass":
        return MassSpec(shape=shape, diameter_mm=float(size), center=center, seed=seed)
    morphology = str(rng.choice(["punctate", "pleomorphic"]))
    n = int(rng.integers(5, 13) if morphology == "punctate" else rng.integers(10, 21))
    return CalcSpec(morphology=morphology, n=n, extent_mm=float(rng.uniform(5.0, 10.0)), center=center, seed=seed)


@dataclass
class ViewGeometry:
    """The compressed breast of one view on a coarse voxel grid aligned with the detector grid.

    A coarse voxel is ``k x k`` detector pixels in plane and ``dz`` mm high; coarse voxel ``(j, i)``
    covers rows ``[i*k, (i+1)*k)`` of the detector.
    """

    view: str
    thickness_mm: float
    pixel_mm: float          # detector pixel
    k: int                   # detector pixels per coarse voxel, in plane
    dz_mm: float
    rows: int                # detector rows and columns
    cols: int
    depth_mm: float
    center_row_mm: float
    half_width_mm: tuple[float, float]  # semi-axes along the chest wall, (upper, lower)
    tilt_deg: float
    skin_mm: float
    distance: np.ndarray     # (rc, cc) signed distance to the outline in mm, > 0 inside, at voxel centres
    nipple_mm: tuple[float, float]
    nipple_dir: tuple[float, float]
    pectoral: tuple[float, float, float] | None  # (top width mm, height mm, exponent), MLO

    @property
    def voxel_mm(self) -> float:
        return self.k * self.pixel_mm

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.nz, *self.distance.shape)

    @property
    def nz(self) -> int:
        return int(math.ceil(self.thickness_mm / self.dz_mm - 1e-9))

    def z_centers(self) -> np.ndarray:
        return ((np.arange(self.nz) + 0.5) * self.dz_mm).astype(np.float32)

    def row_centers(self) -> np.ndarray:
        return ((np.arange(self.distance.shape[0]) + 0.5) * self.voxel_mm).astype(np.float32)

    def col_centers(self) -> np.ndarray:
        return ((np.arange(self.distance.shape[1]) + 0.5) * self.voxel_mm).astype(np.float32)

    def breast_frame(self, rows_mm: np.ndarray, cols_mm: np.ndarray, z_mm: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(xi, eta, zeta) of view points: xi depends on the column only, (eta, zeta) on (z, row)."""
        xi = cols_mm / self.depth_mm
        offset = rows_mm[None, :] - self.center_row_mm
        v = offset / np.where(offset < 0, self.half_width_mm[0], self.half_width_mm[1])
        w = (z_mm[:, None] - self.thickness_mm / 2) / (self.thickness_mm / 2)
        if self.view == "CC":  # rows run lateral (top) to medial, z runs inferior to superior
            return xi, v + 0 * w, w + 0 * v
        psi = math.radians(MLO_OBLIQUITY_DEG)  # MLO: the compression plane is oblique
        return xi, v * math.sin(psi) + w * math.cos(psi), -v * math.cos(psi) + w * math.sin(psi)

    def breast_to_view(self, center: tuple[float, float, float]) -> tuple[float, float, float]:
        """(z, row, col) in mm of a breast-frame point."""
        xi, eta, zeta = center
        if self.view == "CC":
            v, w = eta, zeta
        else:
            psi = math.radians(MLO_OBLIQUITY_DEG)
            v, w = eta * math.sin(psi) - zeta * math.cos(psi), eta * math.cos(psi) + zeta * math.sin(psi)
        row = self.center_row_mm + v * (self.half_width_mm[0] if v < 0 else self.half_width_mm[1])
        return (self.thickness_mm / 2 * (1 + w), row, xi * self.depth_mm)

    def surface_distance(self, d: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Distance (mm) from a point inside to the breast surface: flat under the paddles, a half
        cylinder of radius T/2 along the outline (``d`` the in-plane distance to the outline)."""
        r = self.thickness_mm / 2
        return r - np.sqrt(np.maximum(r - d, 0) ** 2 + (z - r) ** 2)

    def pectoral_depth(self, rows_mm: np.ndarray, cols_mm: np.ndarray) -> np.ndarray:
        """How far (mm, along the row) points lie inside the pectoral muscle's in-plane region
        (MLO): a convex-bordered triangle in the top chest-wall corner; <= 0 outside."""
        if self.pectoral is None:
            return np.full((rows_mm.size, cols_mm.size), -1.0, np.float32)
        width, height, exponent = self.pectoral
        frac = np.clip(1 - rows_mm[:, None] / height, 0, None)
        return (width * frac**exponent - cols_mm[None, :]).astype(np.float32)

    def pectoral_mask(self, rows_mm: np.ndarray, cols_mm: np.ndarray) -> np.ndarray:
        return self.pectoral_depth(rows_mm, cols_mm) > 0


def detector_grid(shape: tuple[int, int] | None, kind: str) -> tuple[int, int, float]:
    """(rows, cols, pixel mm): the default detector, or ``shape`` with square pixels big enough for
    the standard field of view."""
    if shape is None:
        pixel = 0.1 if kind == "ffdm" else 0.2
        return int(round(DETECTOR_MM[0] / pixel)), int(round(DETECTOR_MM[1] / pixel)), pixel
    rows, cols = int(shape[0]), int(shape[1])
    return rows, cols, max(DETECTOR_MM[0] / rows, DETECTOR_MM[1] / cols)


def view_geometry(spec: BreastSpec, view: str, rows: int, cols: int, pixel_mm: float,
                  voxel_mm: float = 0.4, dz_mm: float = 1.0) -> ViewGeometry:
    """The outline of ``view`` on the coarse grid (voxel about ``voxel_mm``, a whole number of pixels)."""
    k = max(1, int(round(voxel_mm / pixel_mm)))
    h = k * pixel_mm
    rc, cc = -(-rows // k), -(-cols // k)
    rows_mm = (np.arange(rc) + 0.5) * h
    cols_mm = (np.arange(cc) + 0.5) * h
    height = rows * pixel_mm
    depth = min(spec.depth_mm[view], cols * pixel_mm - spec.nipple_radius_mm - 6.0)
    up, low = spec.half_width_mm[view]
    row_c = spec.center_row_frac[view] * height
    if view == "CC":
        up, low = min(up, row_c - 4.0), min(low, height - row_c - 4.0)
    tilt = math.radians(spec.tilt_deg[view])
    n_dir = (math.sin(tilt), math.cos(tilt))  # (row, col) unit vector to the nipple
    dr = rows_mm[:, None] - row_c
    dc = cols_mm[None, :]
    along = dr * n_dir[0] + dc * n_dir[1]
    across = dr * n_dir[1] - dc * n_dir[0]  # > 0 towards the bottom of the image
    semi = np.where(across < 0, up, low)
    angle = np.arctan2(across / semi, along / depth)
    limit = 1.0 + sum(a * np.cos(order * angle + ph) for order, a, ph in spec.outline_harmonics) \
        - sum(a * math.cos(ph) for order, a, ph in spec.outline_harmonics)  # apex stays at `depth`
    inside = np.hypot(along / depth, across / semi) < limit
    apex = (row_c + depth * n_dir[0], depth * n_dir[1])
    nipple = (apex[0] - 0.1 * spec.nipple_radius_mm * n_dir[0], apex[1] - 0.1 * spec.nipple_radius_mm * n_dir[1])
    inside |= np.hypot(rows_mm[:, None] - nipple[0], cols_mm[None, :] - nipple[1]) < spec.nipple_radius_mm
    pectoral = None
    if view == "MLO":
        top_width = float(np.max(cols_mm[inside[0]], initial=0.0))
        pectoral = (spec.pectoral[0] * max(top_width, 10.0), spec.pectoral[1] * height, spec.pectoral[2])
    geometry = ViewGeometry(
        view=view, thickness_mm=spec.thickness_mm[view], pixel_mm=pixel_mm, k=k, dz_mm=dz_mm,
        rows=rows, cols=cols, depth_mm=depth, center_row_mm=row_c, half_width_mm=(up, low),
        tilt_deg=spec.tilt_deg[view],
        skin_mm=spec.skin_mm, distance=np.zeros((rc, cc), np.float32), nipple_mm=nipple,
        nipple_dir=n_dir, pectoral=pectoral)
    if pectoral is not None:
        inside |= geometry.pectoral_mask(rows_mm, cols_mm)
    geometry.distance = _signed_distance(inside, h, pad=int(math.ceil((geometry.thickness_mm / 2 + 5) / h)))
    return geometry


def _signed_distance(inside: np.ndarray, h: float, pad: int) -> np.ndarray:
    """Signed distance (mm, > 0 inside) to the outline. The breast goes on beyond the chest-wall
    edge and beyond the top and bottom edges (the axilla in MLO), so those edges are padded by
    repetition and are not part of the outline; beyond the nipple side there is air."""
    padded = np.pad(inside, ((pad, pad), (pad, 0)), mode="edge")
    padded = np.pad(padded, ((0, 0), (0, pad)), mode="constant")
    inner = ndimage.distance_transform_edt(padded, sampling=h)
    outer = ndimage.distance_transform_edt(~padded, sampling=h)
    signed = np.where(padded, inner - h / 2, -(outer - h / 2))
    return signed[pad:-pad, pad:-pad].astype(np.float32)


def _frequency_grid(shape: tuple[int, ...], spacing: tuple[float, ...], stretch: tuple[float, ...]) -> np.ndarray:
    """|f| (cycles/mm) on the rfftn grid, each axis's frequency multiplied by its stretch (a
    stretch > 1 makes structures longer along that axis)."""
    axes = [sfft.fftfreq(n, d).astype(np.float32) * s for n, d, s in zip(shape[:-1], spacing[:-1], stretch[:-1])]
    axes.append(sfft.rfftfreq(shape[-1], spacing[-1]).astype(np.float32) * stretch[-1])
    f2 = np.zeros([len(a) for a in axes], np.float32)
    for i, a in enumerate(axes):
        f2 += (a**2).reshape([-1 if j == i else 1 for j in range(len(axes))])
    return np.sqrt(f2, out=f2)


def power_law_fields(shape: tuple[int, int, int], spacing: tuple[float, float, float],
                     rng: np.random.Generator, *, beta: float = BETA,
                     stretch: tuple[float, float, float] = (1.0, 1.0, 1.0), f_min: float = 1 / 40,
                     band: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """A zero-mean, unit-variance Gaussian random field with power spectrum ~ 1/|f|^beta (flat
    below ``f_min`` so the largest scales do not dominate), and optionally the band-pass part of
    the *same* noise around ``band`` cycles/mm (isotropic: sheets of every orientation).

    The complex white noise is drawn directly on the half spectrum, so each field costs one
    inverse FFT, on a grid padded to FFT-friendly sizes (the field is cropped back to ``shape``)."""
    wanted = shape
    shape = tuple(sfft.next_fast_len(n, real=True) for n in shape)
    half = (*shape[:-1], shape[-1] // 2 + 1)
    noise = rng.standard_normal((*half, 2), dtype=np.float32).view(np.complex64)[..., 0]
    f = _frequency_grid(shape, spacing, stretch)
    amplitude = np.maximum(f, np.float32(f_min)) ** np.float32(-beta / 2)
    amplitude.flat[0] = 0.0
    field_ = sfft.irfftn(noise * amplitude, s=shape, workers=-1)
    field_ /= field_[::2, ::3, ::3].std(dtype=np.float64)
    band_field = None
    if band is not None:
        iso = _frequency_grid(shape, spacing, (1.0, 1.0, 1.0))
        ring = np.exp(-0.5 * ((iso - np.float32(band)) / np.float32(0.4 * band)) ** 2).astype(np.float32)
        ring.flat[0] = 0.0
        band_field = sfft.irfftn(noise * ring, s=shape, workers=-1)
        band_field /= band_field[::2, ::3, ::3].std(dtype=np.float64)
    crop = tuple(slice(0, n) for n in wanted)
    return field_[crop].astype(np.float32), None if band_field is None else band_field[crop].astype(np.float32)


class FanWarp:
    """A perspective-like map that makes textures converge beyond the nipple: coarse column ``c`` is
    kept, a row at height ``r`` maps to ``v = (r - r0) * (R / (c0 - c))**0.6`` (with exponent 1,
    lines through the point ``(r0, c0)`` beyond the nipple would become parallel; 0.6 converges
    part of the way, which distorts the far corners less), so a field generated on the ``(v, c)``
    grid and sampled back runs towards the nipple and is finer behind it (the retroareolar ducts)."""

    def __init__(self, geometry: ViewGeometry, inside: np.ndarray, cols_mm: np.ndarray, rho0: float):
        h = geometry.voxel_mm
        rows_mm = geometry.row_centers()
        n0, n1 = geometry.nipple_dir
        r0 = geometry.nipple_mm[0] + rho0 * n0
        c0 = geometry.nipple_mm[1] + rho0 * n1
        reference = rho0 + geometry.depth_mm / 2
        scale = (reference / np.maximum(c0 - cols_mm, 1.0)) ** 0.6   # (cc,) partial convergence: less distortion
        v = (rows_mm[:, None] - r0) * scale[None, :] / h            # (rc, cc) in field rows
        lo = float(v[inside].min()) if inside.any() else 0.0
        hi = float(v[inside].max()) if inside.any() else 1.0
        self.n_v = int(math.ceil(hi - lo)) + 3
        v = np.clip(v - lo + 1.0, 0.0, self.n_v - 1.001)
        first = np.floor(v).astype(np.int64)
        self.weight = (v - first).astype(np.float32).ravel()
        cc = v.shape[1]
        self.index = (first * cc + np.arange(cc)[None, :]).ravel()
        self.cols = cc
        self.shape2d = v.shape

    def sample(self, field_: np.ndarray) -> np.ndarray:
        """(nz, n_v, cc) field on the fan grid -> (nz, rc, cc) on the view grid (linear in v)."""
        flat = field_.reshape(field_.shape[0], -1)
        out = np.take(flat, self.index, axis=1)
        out *= 1 - self.weight
        out += np.take(flat, self.index + self.cols, axis=1) * self.weight
        return out.reshape(field_.shape[0], *self.shape2d)


@dataclass
class Phantom:
    """One view's compressed breast as voxels: attenuation in excess of fat inside the skin
    (glandular tissue, ligaments and muscle; the fat and skin shell is analytic, see
    :meth:`shell_paths`) and the fibroglandular indicator."""

    spec: BreastSpec
    geometry: ViewGeometry
    excess: np.ndarray       # (nz, rc, c) float32, 1/mm: mu - mu_adipose inside the skin, 0 elsewhere
    glandular: np.ndarray    # (nz, rc, c) bool: fibroglandular tissue (parenchyma + ligaments)
    glandular_fraction: float  # of the volume inside the skin, muscle excluded
    # Both volumes stop at the last column the breast reaches (c <= the coarse grid's columns).

    def full_columns(self, coarse: np.ndarray) -> np.ndarray:
        """A (..., rc, c) map of the tissue columns padded with zeros to the whole coarse grid."""
        missing = self.geometry.distance.shape[1] - coarse.shape[-1]
        return np.pad(coarse, [(0, 0)] * (coarse.ndim - 1) + [(0, missing)]) if missing else coarse

    def excess_at(self, iz: np.ndarray, ir: np.ndarray, ic: np.ndarray) -> np.ndarray:
        """Excess attenuation at voxel indices (broadcast), 0 beyond the tissue columns."""
        iz = np.clip(iz, 0, self.excess.shape[0] - 1)
        ir = np.clip(ir, 0, self.excess.shape[1] - 1)
        n = self.excess.shape[2]
        return np.where(ic < n, self.excess[iz, ir, np.clip(ic, 0, n - 1)], np.float32(0))

    def background_mu(self, z: np.ndarray, row: np.ndarray, col: np.ndarray) -> np.ndarray:
        """Attenuation (1/mm) of the tissue inside the skin at points in mm (nearest voxel)."""
        g = self.geometry
        steps = ((z, g.dz_mm), (row, g.voxel_mm), (col, g.voxel_mm))
        index = [(np.asarray(v) / step).astype(np.int64) for v, step in steps]
        return MU_PER_MM["adipose"] + self.excess_at(*index)

    def shell_paths(self, distance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vertical path lengths (mm) through the whole breast and through its skin at in-plane
        signed distance ``distance`` (mm) from the outline: exact for the rounded-edge model."""
        r = self.geometry.thickness_mm / 2
        s = self.geometry.skin_mm
        gap2 = (r - np.clip(distance, 0, r)) ** 2
        half = np.where(distance > 0, np.sqrt(np.maximum(r * r - gap2, 0)), 0)
        half_inner = np.where(distance > s, np.sqrt(np.maximum((r - s) ** 2 - gap2, 0)), 0)
        return (2 * half).astype(np.float32), (2 * (half - half_inner)).astype(np.float32)


def build_phantom(spec: BreastSpec, geometry: ViewGeometry, rng: np.random.Generator) -> Phantom:
    """Fill the view's volume with fibroglandular tissue, ligaments and (MLO) pectoral muscle."""
    g = geometry
    # Only the columns the breast reaches are tissue (the rest of the detector sees air).
    cc = int(np.flatnonzero((g.distance > 0).any(axis=0)).max(initial=0)) + 2
    cc = min(cc, g.distance.shape[1])
    distance = g.distance[:, :cc]
    nz = g.nz
    h = g.voxel_mm
    z = g.z_centers()
    rows_mm, cols_mm = g.row_centers(), g.col_centers()[:cc]
    depth_to_surface = g.surface_distance(distance[None], z[:, None, None])  # (nz, rc, cc)
    interior = depth_to_surface >= g.skin_mm
    inside_2d = distance > 0
    muscle = None
    if g.pectoral is not None:  # a wedge: thin at its anterior border, the full thickness behind it
        # (at most 60% of the compressed thickness: fat and gland lie over and under it)
        half = np.minimum(3.0 * g.pectoral_depth(rows_mm, cols_mm), 0.3 * g.thickness_mm)
        muscle = (np.abs(z - g.thickness_mm / 2)[:, None, None] < half[None]) & (depth_to_surface >= g.skin_mm + 1.5)

    # Texture: a power-law field on the fan grid, stretched along the nipple axis and squeezed
    # in z (compression flattens the tissue), plus its band-pass part for the ligaments.
    warp = FanWarp(g, inside_2d, cols_mm, rho0=0.35 * g.depth_mm)
    fan_shape = (nz, warp.n_v, cc)
    raw, band = power_law_fields(fan_shape, (g.dz_mm, h, h), rng, beta=BETA,
                                 stretch=(1.0 / spec.z_squeeze, 1.0, spec.radial_stretch), band=1 / 22.0)
    texture = warp.sample(raw)
    del raw
    sheets_field = np.abs(warp.sample(band))
    del band

    score = texture
    score += np.float32(1.3) * _prior(spec, g, z, rows_mm, cols_mm, depth_to_surface)
    tissue = interior if muscle is None else interior & ~muscle
    n_tissue = max(int(tissue.sum()), 1)
    sample = tuple(slice(None, None, step) for step in (2, 3, 3))  # quantiles from a subsample
    target = spec.glandular_target
    lig_fraction = min(spec.ligament_fraction, 0.4 * target)
    lig_cut = np.quantile(sheets_field[sample][tissue[sample]], lig_fraction) if n_tissue > 1 else 0
    ligaments = (sheets_field < lig_cut) & tissue
    del sheets_field
    remaining = (target - ligaments.sum() / n_tissue) / max(1e-6, 1 - ligaments.sum() / n_tissue)
    candidates = score[sample][(tissue & ~ligaments)[sample]]
    cut = np.quantile(candidates, 1 - float(np.clip(remaining, 0, 1))) if candidates.size else np.inf
    glandular = ((score > cut) & tissue) | ligaments
    del score
    excess = glandular.astype(np.float32) * np.float32(MU_PER_MM["glandular"] - MU_PER_MM["adipose"])
    if muscle is not None:
        excess[muscle] = MU_PER_MM["muscle"] - MU_PER_MM["adipose"]
    fraction = float(glandular.sum() / n_tissue)
    return Phantom(spec=spec, geometry=g, excess=excess, glandular=glandular, glandular_fraction=fraction)


def _prior(spec: BreastSpec, g: ViewGeometry, z: np.ndarray, rows_mm: np.ndarray, cols_mm: np.ndarray,
           depth_to_surface: np.ndarray) -> np.ndarray:
    """Where dense tissue is likely (added to the unit-variance texture before thresholding):
    lobes in the breast frame, minus the subcutaneous fat under the skin and the retromammary
    fat in front of the chest wall."""
    xi, eta, zeta = g.breast_frame(rows_mm, cols_mm, z)  # (cc,), (nz, rc), (nz, rc)
    prior = np.zeros(depth_to_surface.shape, np.float32)
    for lx, le, lz, sigma, amplitude in spec.lobes:
        along = np.exp(-0.5 * ((xi - lx) / sigma) ** 2).astype(np.float32)
        across = (amplitude * np.exp(-0.5 * ((eta - le) ** 2 + (zeta - lz) ** 2) / sigma**2)).astype(np.float32)
        prior += across[:, :, None] * along[None, None, :]
    prior -= np.float32(2.0) * np.exp(-np.maximum(depth_to_surface - g.skin_mm, 0) / np.float32(4.0))
    prior -= np.float32(1.5) * np.exp(-cols_mm / np.float32(0.06 * g.depth_mm))[None, None, :]
    return prior


def lesion_center(spec: MassSpec | CalcSpec, phantom: Phantom, margin_mm: float) -> tuple[float, float, float]:
    """The lesion centre in view mm, pulled towards the breast centre until ``margin_mm`` of tissue
    surrounds it (the breast frame is approximate, the outline is not)."""
    g = phantom.geometry
    z, row, col = g.breast_to_view(spec.center)
    target = (g.thickness_mm / 2, g.center_row_mm, 0.5 * g.depth_mm)
    for step in np.linspace(0.0, 1.0, 21):
        p = [a + step * (b - a) for a, b in zip((z, row, col), target)]
        ir = int(np.clip(p[1] / g.voxel_mm, 0, g.distance.shape[0] - 1))
        ic = int(np.clip(p[2] / g.voxel_mm, 0, g.distance.shape[1] - 1))
        d = float(g.distance[ir, ic])
        inside = g.surface_distance(np.float32(d), np.float32(p[0])) - g.skin_mm
        in_muscle = g.pectoral is not None and bool(g.pectoral_mask(np.array([p[1]]), np.array([p[2]]))[0, 0])
        if inside >= margin_mm and not in_muscle:
            return (float(p[0]), float(p[1]), float(p[2]))
    return tuple(float(v) for v in target)  # type: ignore[return-value]
