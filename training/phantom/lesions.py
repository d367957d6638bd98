"""Lesions of the phantom: mass and calcification specifications and their voxel models
(spiculated, lobulated and circumscribed masses; clustered microcalcifications)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class MassSpec:
    """A mass in the breast frame; its shape details come from ``seed``."""

    shape: str
    diameter_mm: float
    center: tuple[float, float, float]  # (xi, eta, zeta) in the breast frame
    seed: int

    @property
    def malignant(self) -> bool:
        return self.shape == "spiculated"

    @property
    def birads(self) -> int:
        return {"circumscribed": 3, "lobulated": 4, "spiculated": 5}[self.shape]


@dataclass
class CalcSpec:
    """A microcalcification cluster in the breast frame; specks come from ``seed``."""

    morphology: str  # "punctate" (round, uniform, clustered) | "pleomorphic" (varied, linear)
    n: int
    extent_mm: float
    center: tuple[float, float, float]
    seed: int
    shape: str = "cluster"

    @property
    def malignant(self) -> bool:
        return self.morphology == "pleomorphic"

    @property
    def birads(self) -> int:
        return 4 if self.morphology == "pleomorphic" else 3

    @property
    def diameter_mm(self) -> float:
        return self.extent_mm


@dataclass
class LesionVolume:
    """A lesion on its own fine grid: occupancy in [0, 1] of voxels of ``pitch`` mm, whose first
    voxel's corner is at ``origin`` (z, row, col) mm in view coordinates (canonical orientation)."""

    occupancy: np.ndarray
    origin: tuple[float, float, float]
    pitch: tuple[float, float]   # (z, in-plane)
    center: tuple[float, float, float]

    def centers(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        nz, nr, nc = self.occupancy.shape
        hz, h = self.pitch
        return (self.origin[0] + (np.arange(nz) + 0.5) * hz, self.origin[1] + (np.arange(nr) + 0.5) * h,
                self.origin[2] + (np.arange(nc) + 0.5) * h)


def mass_volume(spec: MassSpec, center: tuple[float, float, float], pitch: tuple[float, float]) -> LesionVolume:
    """A mass: an ellipsoid whose radius varies with direction (gentle for circumscribed, a few
    large lobes for lobulated, irregular for spiculated) plus, if spiculated, thin tapering
    spicules radiating from its surface."""
    rng = np.random.default_rng(spec.seed)
    r0 = spec.diameter_mm / 2
    axes = np.array([rng.uniform(0.75, 0.95), 1.0, rng.uniform(0.8, 1.0)])  # (z, row, col) scales
    n_bumps = {"circumscribed": 4, "lobulated": int(rng.integers(3, 7)), "spiculated": 9}[spec.shape]
    amplitude = {"circumscribed": (0.02, 0.06), "lobulated": (0.18, 0.35), "spiculated": (0.08, 0.2)}[spec.shape]
    width = {"circumscribed": 0.2, "lobulated": 0.55, "spiculated": 0.75}[spec.shape]  # cos of bump half-angle
    bumps = [(_unit(rng), rng.uniform(*amplitude)) for _ in range(n_bumps)]
    spicules = []
    if spec.shape == "spiculated":
        for _ in range(int(rng.integers(14, 30))):
            d = _unit(rng) * np.array([0.4, 1.0, 1.0])  # mostly across the compression plane
            d /= np.linalg.norm(d)
            spicules.append((d, r0 * rng.uniform(0.6, 1.8) + 2.0, rng.uniform(0.25, 0.45)))
    longest = max((length for _, length, _ in spicules), default=0.0)
    reach = r0 * (1 + max((a for _, a in bumps), default=0)) + longest + 1.0
    hz, h = pitch
    half = np.array([reach * axes[0], reach, reach])
    lo = np.floor((np.array(center) - half) / np.array([hz, h, h])).astype(int)
    hi = np.ceil((np.array(center) + half) / np.array([hz, h, h])).astype(int)
    origin = (lo[0] * hz, lo[1] * h, lo[2] * h)
    zc = origin[0] + (np.arange(hi[0] - lo[0]) + 0.5) * hz - center[0]
    rr = origin[1] + (np.arange(hi[1] - lo[1]) + 0.5) * h - center[1]
    cc = origin[2] + (np.arange(hi[2] - lo[2]) + 0.5) * h - center[2]
    Z = (zc / axes[0]).astype(np.float32)[:, None, None]
    R = (rr / axes[1]).astype(np.float32)[None, :, None]
    C = (cc / axes[2]).astype(np.float32)[None, None, :]
    radius = np.sqrt(Z * Z + R * R + C * C) + np.float32(1e-6)
    uz, ur, uc = Z / radius, R / radius, C / radius  # the direction of each voxel from the centre
    limit = np.ones_like(radius)
    for direction, a in bumps:
        bump = uz * np.float32(direction[0]) + ur * np.float32(direction[1]) + uc * np.float32(direction[2])
        bump -= np.float32(width)
        np.maximum(bump, 0, out=bump)
        limit += np.float32(a / (1 - width) ** 2) * bump * bump
    if spec.shape == "spiculated":  # a rough, irregular border
        limit += np.float32(0.05) * np.sin(np.float32(7.0) * uz + np.float32(1.3)) * np.cos(np.float32(6.0) * uc)
    occupancy = np.clip((limit * np.float32(r0) - radius) / np.float32(h) + 0.5, 0, 1).astype(np.float32)
    for direction, length, base in spicules:
        _add_spicule(occupancy, (zc, rr, cc), direction * r0 * 0.8, direction * (r0 * 0.8 + length), base, h)
    return LesionVolume(occupancy=occupancy, origin=origin, pitch=pitch, center=center)


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _add_spicule(occupancy: np.ndarray, coords: tuple[np.ndarray, np.ndarray, np.ndarray],
                 start: np.ndarray, end: np.ndarray, base_radius: float, h: float) -> None:
    """A thin cone from ``start`` (radius ``base_radius``) to ``end`` (radius 0.1 mm), in place."""
    box = []
    for axis, values in enumerate(coords):
        lo, hi = min(start[axis], end[axis]) - base_radius - h, max(start[axis], end[axis]) + base_radius + h
        box.append(slice(int(np.searchsorted(values, lo)), int(np.searchsorted(values, hi))))
    z, r, c = (values[s].astype(np.float32) for values, s in zip(coords, box))
    seg = (end - start).astype(np.float32)
    length2 = float(seg @ seg)
    dz, dr, dc = z[:, None, None] - start[0], r[None, :, None] - start[1], c[None, None, :] - start[2]
    t = np.clip((dz * seg[0] + dr * seg[1] + dc * seg[2]) / length2, 0, 1)
    dist = np.sqrt((dz - t * seg[0]) ** 2 + (dr - t * seg[1]) ** 2 + (dc - t * seg[2]) ** 2)
    radius = base_radius * (1 - t) + 0.1 * t
    part = np.clip((radius - dist) / h + 0.5, 0, 1)
    view = occupancy[tuple(box)]
    np.maximum(view, part, out=view)


@dataclass
class CalcCluster:
    """Microcalcifications as spheres: centres (n, 3) in view mm (z, row, col) and radii (n,)."""

    centers: np.ndarray
    radii: np.ndarray
    center: tuple[float, float, float]


def calc_cluster(spec: CalcSpec, center: tuple[float, float, float]) -> CalcCluster:
    """Punctate: round specks 0.2-0.36 mm across, scattered in a small ellipsoid. Pleomorphic:
    varied specks 0.16-0.5 mm along a curved, branching duct-like line (a linear or segmental
    distribution, the suspicious pattern)."""
    rng = np.random.default_rng(spec.seed)
    half = spec.extent_mm / 2
    if spec.morphology == "punctate":
        radii = rng.uniform(0.1, 0.18, spec.n)
        offsets = np.array([_in_ball(rng) for _ in range(spec.n)]) * np.array([0.6 * half, half, half])
    else:
        radii = rng.uniform(0.08, 0.25, spec.n)
        direction, bend = _unit(rng) * np.array([0.3, 1, 1]), _unit(rng) * np.array([0.3, 1, 1])
        t = rng.uniform(-1, 1, spec.n)
        offsets = (t[:, None] * direction * half + (t**2)[:, None] * bend * 0.3 * half
                   + rng.normal(0, 0.5, (spec.n, 3)) * np.array([0.5, 1, 1]))
    return CalcCluster(centers=np.asarray(center) + offsets, radii=radii, center=center)


def _in_ball(rng: np.random.Generator) -> np.ndarray:
    return _unit(rng) * rng.uniform() ** (1 / 3)
