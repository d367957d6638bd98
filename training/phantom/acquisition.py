"""X-ray acquisition of a phantom: FFDM and DBT projections, noise, processing, DBT reconstruction.

Physics (first order, monoenergetic at 20 keV, see :mod:`.anatomy` for the attenuation values):

* **Line integrals.** The fat-and-skin shell of the compressed breast is analytic at detector
  resolution (sharp skin line); glandular tissue, ligaments and muscle come from the coarse voxel
  grid, summed along the ray and upsampled; lesions come from their own fine grid (masses) or are
  analytic spheres (calcifications), added as attenuation in excess of the tissue they displace.
* **Beer-Lambert** ``N = N0 exp(-integral mu dl)``, with an automatic exposure control that gives
  the dense centre of the breast a fixed number of quanta (2.5e5 per mm2, about 45 uGy at the
  detector, in the range of clinical systems), plus **scatter** as a broad blur of the primary
  behind the breast (scatter-to-primary ratio 0.15, an anti-scatter grid's order of magnitude:
  Boone et al., Med Phys 27:1818, 2000 report 0.3-0.6 without a grid for 2-8 cm).
* **Detector**: a direct-conversion (a-Se) panel: Gaussian presampling blur of 0.5 pixel, **Poisson
  quantum noise** (normal approximation above 50 quanta) and Gaussian **electronic noise**.
* **FFDM For Presentation**: ``-log`` of the flat-fielded signal; thickness equalisation of the
  periphery from the thickness at each pixel's distance to the skin line (Byng et al., Radiology
  203:564, 1997); unsharp-mask detail enhancement with mild dynamic-range compression; one fixed
  LUT on the glandular-equivalent fraction of the path to 12 bits: dense tissue bright, air black.
  DBT projections get the same equalisation before reconstruction.
* **DBT**: a stationary detector and a source sweeping ``arc_deg`` in the plane of the chest wall
  (default 15 projections over +/-7.5 degrees, as one widely used clinical system); each
  projection receives 1/N of the FFDM dose. Geometry is **parallel beam**: the layer at height z
  shifts by ``z tan(theta)`` along the detector rows (the tube-travel direction), i.e. the cone-beam
  magnification (at most 1.1 for 65 mm at 650 mm source-detector distance) is neglected. Forward
  projection and reconstruction use the same shear operator, applied exactly in the Fourier
  domain along the rows (a shift is a phase ramp), which makes both a batch of small matrix
  products per row frequency.
* **Reconstruction** into slices of ``slice_mm`` (slice 0 nearest the detector): shift-and-add
  (SAA, Niklason et al., Radiology 205:399, 1997), a DBT filtered back-projection with a ramp,
  a DC plateau and a Hann window (Mertelmeier et al., Proc SPIE 6142, 2006), or SART (Andersen &
  Kak, Ultrason Imaging 6:81, 1984; for DBT: Zhang et al., Med Phys 33:3781, 2006) with one
  projection per subset and positivity after each iteration.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import fft as sfft
from scipy import ndimage
from threadpoolctl import threadpool_limits

from training.phantom.anatomy import MU_PER_MM, Phantom
from training.phantom.lesions import CalcCluster, LesionVolume

BITS_STORED = 12


@dataclass(frozen=True)
class Acquisition:
    """Every acquisition and processing parameter (recorded in ``SimulatedImage.params``)."""

    kvp: float = 28.0                  # nominal; the model is monoenergetic at 20 keV
    quanta_per_mm2: float = 2.5e5      # AEC target behind the dense centre of the breast (FFDM)
    electronic_noise: float = 3.0      # quanta per 0.1 mm pixel (rms)
    detector_blur_px: float = 0.5      # Gaussian sigma of the presampling blur
    scatter_to_primary: float = 0.15
    scatter_sigma_mm: float = 12.0
    equalisation: float = 1.0          # fraction of the peripheral thickness fall-off compensated
    detail_gain: float = 0.7           # unsharp mask: l + gain * (l - blur(l, detail_sigma))
    detail_sigma_mm: float = 1.5
    compression: float = 0.15          # dynamic-range compression: l - c * (blur(l, 10 mm) - mean)
    # DBT
    n_projections: int = 15
    arc_deg: float = 15.0
    slice_mm: float = 1.0
    recon: str = "sart"
    sart_iterations: int = 2
    sart_relaxation: float = 0.25
    dbt_dose_factor: float = 1.0       # total DBT dose relative to one FFDM view

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# helpers

@contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """The reconstruction multiplies hundreds of tiny matrices (one per row frequency): threading
    each product costs far more than it saves, and on a busy machine OpenBLAS's thread hand-off
    makes it 10-100x slower. So BLAS runs on one thread inside."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def upsample(coarse: np.ndarray, k: int, rows: int, cols: int) -> np.ndarray:
    """A coarse map (a sample per k x k detector pixels, over its last two axes) linearly
    interpolated to the detector grid, cropped to (rows, cols). Separable, with the coarse sample
    at the centre of its k x k block (what ``ndimage.zoom(..., grid_mode=True)`` does, 3x faster)."""
    out = np.asarray(coarse, dtype=np.float32)
    if k == 1:
        return np.ascontiguousarray(out[..., :rows, :cols])
    for axis, n_out in ((-2, rows), (-1, cols)):
        x = (np.arange(n_out) + 0.5) / k - 0.5
        first = np.floor(x).astype(np.intp)
        weight = (x - first).astype(np.float32)
        n = out.shape[axis]
        lo = np.take(out, np.clip(first, 0, n - 1), axis=axis)
        hi = np.take(out, np.clip(first + 1, 0, n - 1), axis=axis)
        hi -= lo
        hi *= weight if axis == -1 else weight[:, None]
        out = lo + hi
    return out


def _repeat(coarse: np.ndarray, k: int, rows: int, cols: int) -> np.ndarray:
    """Nearest-neighbour upsampling (for masks)."""
    return np.repeat(np.repeat(coarse, k, axis=-2), k, axis=-1)[..., :rows, :cols]


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks (edge blocks padded by repetition)."""
    if factor == 1:
        return image.astype(np.float32)
    rows, cols = image.shape
    a = np.pad(image, ((0, -rows % factor), (0, -cols % factor)), mode="edge")
    return a.reshape(a.shape[0] // factor, factor, a.shape[1] // factor, factor).mean(axis=(1, 3), dtype=np.float32)


def _counts(rng: np.random.Generator, mean: np.ndarray) -> np.ndarray:
    """Poisson counts; the normal approximation above 50 quanta (indistinguishable there, 5x faster)."""
    out = mean + np.sqrt(mean) * rng.standard_normal(mean.shape, dtype=np.float32)
    low = mean < 50
    if low.any():
        out[low] = rng.poisson(mean[low])
    return out


def _smooth(image: np.ndarray, sigma_px: float, weight: np.ndarray | None = None) -> np.ndarray:
    """Gaussian blur; with ``weight``, a normalised convolution (the blur of the weighted image over
    the blur of the weight), so air does not bleed into tissue."""
    if weight is None:
        return ndimage.gaussian_filter(image, sigma_px, mode="nearest")
    blurred = ndimage.gaussian_filter(image * weight, sigma_px, mode="nearest")
    return blurred / np.maximum(ndimage.gaussian_filter(weight, sigma_px, mode="nearest"), 1e-3)


def _expose(line_integral: np.ndarray, breast: np.ndarray, centre: np.ndarray, rng: np.random.Generator,
            acq: Acquisition, pixel_mm: float, quanta_per_mm2: float, aec_level: float | None = None
            ) -> tuple[np.ndarray, float]:
    """Detected signal, flat-fielded and log-transformed: an estimate of the line integral.
    Returns it and the AEC attenuation level used (so DBT projections share one exposure)."""
    if aec_level is None:
        central = line_integral[centre] if centre.any() else line_integral[breast]
        aec_level = float(np.median(central)) if central.size else 0.0
    q = quanta_per_mm2 * pixel_mm**2
    n0 = q * math.exp(aec_level)
    primary = n0 * np.exp(-line_integral)
    factor = max(1, int(acq.scatter_sigma_mm / 3 / pixel_mm))  # a broad blur: on a coarse grid
    scatter = _smooth(_block_mean(primary * breast, factor), acq.scatter_sigma_mm / (factor * pixel_mm))
    rows, cols = primary.shape
    expected = primary + np.float32(acq.scatter_to_primary) * upsample(scatter, factor, rows, cols)
    expected = ndimage.gaussian_filter(expected, acq.detector_blur_px, mode="nearest")
    counts = _counts(rng, expected)
    counts += np.float32(acq.electronic_noise * pixel_mm / 0.1) * rng.standard_normal(counts.shape, dtype=np.float32)
    log_signal = np.float32(math.log(n0)) - np.log(np.maximum(counts, 0.5))
    return log_signal.astype(np.float32), aec_level


def _lut(glandular_equivalent: np.ndarray, region: np.ndarray, fat_level: float = 0.2, white: float = 0.6
         ) -> tuple[np.ndarray, tuple[float, float]]:
    """Map to 12-bit stored values with one fixed LUT on the glandular-equivalent fraction (of the
    path for FFDM, of the voxel for DBT: 0 = all fat, 1 = all glandular; the system knows the
    compressed thickness), so that fatty breasts look dark grey and dense ones white: fat at
    ``fat_level`` of the scale, ``white`` glandular fraction and above (calcifications, muscle)
    white, air black. Returns the stored values and a (centre, width) window covering the values
    in ``region`` (the breast away from the skin line)."""
    top = 2**BITS_STORED - 1
    scaled = glandular_equivalent * np.float32((1 - fat_level) / white * top)
    scaled += np.float32(fat_level * top + 0.5)
    np.clip(scaled, 0, top, out=scaled)
    stored = scaled.astype(np.uint16)  # + 0.5 then truncation: rounding
    values = stored[region]
    if values.size > 400_000:  # percentiles from a fixed subsample: same result, much faster
        values = values[:: values.size // 400_000]
    a, b = (np.percentile(values, [0.5, 99.5]) if values.size else (0, top))
    a, b = max(a - 0.05 * (b - a), 0.0), min(b + 0.05 * (b - a), top)
    return stored, (float((a + b) / 2), float(max(b - a, 16)))


# ------------------------------------------------------------------------------------------------
# lesions on the detector

def mass_excess(lesion: LesionVolume, phantom: Phantom) -> np.ndarray:
    """Attenuation the mass adds over the tissue it displaces (1/mm), inside the skin only."""
    z, r, c = lesion.centers()
    g = phantom.geometry
    iz = (z / g.dz_mm).astype(np.int64)[:, None, None]
    ir = np.clip((r / g.voxel_mm).astype(np.int64), 0, g.distance.shape[0] - 1)[None, :, None]
    ic = np.clip((c / g.voxel_mm).astype(np.int64), 0, g.distance.shape[1] - 1)[None, None, :]
    background = MU_PER_MM["adipose"] + phantom.excess_at(iz, ir, ic)
    d = g.distance[ir[0], ic[0]][None]
    inside = g.surface_distance(d, z.astype(np.float32)[:, None, None]) >= g.skin_mm
    return (lesion.occupancy * (MU_PER_MM["mass"] - background) * inside).astype(np.float32)


def _paste(target: np.ndarray, patch: np.ndarray, row0: int, col0: int, op: str = "add",
           value: int = 0) -> None:
    """Add ``patch`` into ``target`` at (row0, col0), clipped to the target (op "add"), or write
    ``value`` where the boolean ``patch`` is set (op "label")."""
    rows, cols = target.shape[-2:]
    r0, c0 = max(row0, 0), max(col0, 0)
    r1, c1 = min(row0 + patch.shape[-2], rows), min(col0 + patch.shape[-1], cols)
    if r1 <= r0 or c1 <= c0:
        return
    part = patch[..., r0 - row0:r1 - row0, c0 - col0:c1 - col0]
    if op == "add":
        target[..., r0:r1, c0:c1] += part
    else:
        target[..., r0:r1, c0:c1][part] = value


def _sphere_paths(cluster: CalcCluster, pixel_mm: float, shift_mm: np.ndarray | None = None,
                  supersample: int = 4) -> list[tuple[np.ndarray, int, int]]:
    """Path length (mm) through each calcification sphere, pixel-averaged, as small patches
    (patch, row0, col0). ``shift_mm`` moves each speck along the rows (DBT projection)."""
    patches = []
    offsets = (np.arange(supersample) + 0.5) / supersample
    for i, ((z, row, col), radius) in enumerate(zip(cluster.centers, cluster.radii)):
        row = row + (0.0 if shift_mm is None else float(shift_mm[i]))
        r0, c0 = int(math.floor((row - radius) / pixel_mm)), int(math.floor((col - radius) / pixel_mm))
        r1, c1 = int(math.floor((row + radius) / pixel_mm)) + 1, int(math.floor((col + radius) / pixel_mm)) + 1
        rr = ((np.arange(r0, r1)[:, None] + offsets[None, :]) * pixel_mm - row).reshape(-1)
        cc = ((np.arange(c0, c1)[:, None] + offsets[None, :]) * pixel_mm - col).reshape(-1)
        chord = 2 * np.sqrt(np.maximum(radius**2 - rr[:, None] ** 2 - cc[None, :] ** 2, 0))
        patch = chord.reshape(r1 - r0, supersample, c1 - c0, supersample).mean(axis=(1, 3))
        if not patch.any():  # a speck smaller than the sampling: keep its volume in its pixel
            patch[(patch.shape[0] - 1) // 2, (patch.shape[1] - 1) // 2] = 4 / 3 * math.pi * radius**3 / pixel_mm**2
        patches.append((patch.astype(np.float32), r0, c0))
    return patches


# ------------------------------------------------------------------------------------------------
# FFDM

@dataclass
class Projection2D:
    """An FFDM acquisition in canonical orientation (chest wall on column 0)."""

    pixels: np.ndarray
    window: tuple[float, float]
    breast_mask: np.ndarray
    glandular_mask: np.ndarray
    lesion_labels: np.ndarray


def acquire_ffdm(phantom: Phantom, masses: list[tuple[int, LesionVolume]], calcs: list[tuple[int, CalcCluster]],
                 rng: np.random.Generator, acq: Acquisition) -> Projection2D:
    """Line integrals -> exposure -> For Presentation processing."""
    g = phantom.geometry
    rows, cols, p = g.rows, g.cols, g.pixel_mm
    distance = upsample(g.distance, g.k, rows, cols)
    total, skin = phantom.shell_paths(distance)
    line = MU_PER_MM["adipose"] * (total - skin) + MU_PER_MM["skin"] * skin
    line += upsample(phantom.full_columns(phantom.excess.sum(axis=0) * np.float32(g.dz_mm)), g.k, rows, cols)
    labels = np.zeros((rows, cols), np.uint8)
    for label, lesion in masses:
        hz, h = lesion.pitch
        m = int(round(h / p))
        path = mass_excess(lesion, phantom).sum(axis=0) * np.float32(hz)
        foot = lesion.occupancy.sum(axis=0) * hz >= 0.1
        row0, col0 = int(round(lesion.origin[1] / p)), int(round(lesion.origin[2] / p))
        _paste(line, upsample(path, m, path.shape[0] * m, path.shape[1] * m), row0, col0)
        _paste(labels, _repeat(foot, m, foot.shape[0] * m, foot.shape[1] * m), row0, col0, "label", label)
    for label, cluster in calcs:
        excess = MU_PER_MM["calcification"] - phantom.background_mu(*cluster.centers.T)
        for (patch, r0, c0), mu in zip(_sphere_paths(cluster, p), excess):
            _paste(line, patch * np.float32(mu), r0, c0)
            _paste(labels, patch > 0, r0, c0, "label", label)
    breast = distance > 0
    labels[~breast] = 0
    centre = distance > g.thickness_mm / 2
    log_signal, _ = _expose(line, breast, centre, rng, acq, p, acq.quanta_per_mm2)
    processed = _present_ffdm(log_signal, breast, total, g.thickness_mm, p, acq)
    fat = MU_PER_MM["adipose"] * (g.thickness_mm - 2 * g.skin_mm) + MU_PER_MM["skin"] * 2 * g.skin_mm
    gland = (processed - fat) / ((MU_PER_MM["glandular"] - MU_PER_MM["adipose"]) * g.thickness_mm)
    pixels, window = _lut(gland, breast & (distance > 5.0))
    # Dense area: rays at least 20% fibroglandular (decided per coarse voxel column).
    coarse_total, _ = phantom.shell_paths(g.distance)
    coarse_path = phantom.full_columns(phantom.glandular.sum(axis=0)) * g.dz_mm
    coarse_glandular = coarse_path >= 0.2 * np.maximum(coarse_total, 1e-3)
    glandular = breast & _repeat(coarse_glandular, g.k, rows, cols)
    return Projection2D(pixels=pixels, window=window, breast_mask=breast, glandular_mask=glandular,
                        lesion_labels=labels)


def _present_ffdm(log_signal: np.ndarray, breast: np.ndarray, total: np.ndarray, thickness: float,
                  pixel_mm: float, acq: Acquisition) -> np.ndarray:
    """For Presentation processing of the log image (before the LUT). The smooth parts are
    computed on a 0.4 mm grid and interpolated back."""
    image = log_signal + _equalisation(total, thickness, acq) * breast
    # Detail enhancement (unsharp mask) and dynamic-range compression, blurs taken inside the breast.
    f = max(1, int(round(0.4 / pixel_mm)))
    h = f * pixel_mm
    rows, cols = log_signal.shape
    weight = _block_mean(breast, f)
    small = _block_mean(image, f)
    fine = _smooth(small, acq.detail_sigma_mm / h, weight)
    coarse = _smooth(small, 10.0 / h, weight)
    inside = weight > 0.99
    mean = float(small[inside].mean()) if inside.any() else 0.0
    image *= np.float32(1 + acq.detail_gain)
    image -= upsample(acq.detail_gain * fine + acq.compression * (coarse - mean), f, rows, cols) * breast
    return image


def _equalisation(total: np.ndarray, thickness: float, acq: Acquisition) -> np.ndarray:
    """Thickness equalisation (Byng et al., Radiology 203:564, 1997): towards the skin line the
    compressed breast thins out and the log signal falls; add back the fat that the missing
    thickness would hold, from the thickness at each pixel's distance to the skin line (the
    rounded-edge model; a system gets the same from the segmented skin line and the paddle height)."""
    return (acq.equalisation * MU_PER_MM["adipose"] * np.clip(thickness - total, 0, None)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# DBT

def _phase(n: int, shifts: np.ndarray) -> np.ndarray:
    """exp(-2 pi i f s) for the rfft frequencies f of length n and shifts s (samples): (n_f, *shifts.shape)."""
    f = sfft.rfftfreq(n).astype(np.float64)
    return np.exp(-2j * np.pi * f.reshape(-1, *([1] * shifts.ndim)) * shifts[None]).astype(np.complex64)


def shear_project(volume: np.ndarray, heights_mm: np.ndarray, pitch_mm: float, tans: np.ndarray,
                  pad: int) -> np.ndarray:
    """Parallel-beam projections ``sum_z volume[z](row - z tan(theta) / pitch)`` for each angle:
    (n_angles, rows + 2 pad, cols); output row ``pad + r`` is input row ``r`` unshifted."""
    nz, nr, nc = volume.shape
    n = sfft.next_fast_len(nr + 2 * pad, real=True)
    spectrum = np.ascontiguousarray(sfft.rfft(volume, n=n, axis=1, workers=-1).transpose(1, 0, 2))  # (nf, nz, nc)
    shifts = np.outer(tans, heights_mm) / pitch_mm                                # (na, nz)
    with _single_threaded_blas():
        projected = np.matmul(_phase(n, shifts), spectrum)                         # (nf, na, nc)
    out = sfft.irfft(projected, n=n, axis=0, workers=-1).transpose(1, 0, 2)
    return np.take(out, np.arange(-pad, nr + pad) % n, axis=1).astype(np.float32)


def _shift_rows(images: np.ndarray, shifts_px: np.ndarray) -> np.ndarray:
    """Images (k, rows, cols) each shifted along the rows by each shift (exact sub-pixel shift in
    the Fourier domain): (n_shifts, k, rows, cols). The rows must carry enough zero padding."""
    k, rows, cols = images.shape
    n = sfft.next_fast_len(rows + int(np.abs(shifts_px).max()) + 1, real=True)
    spectrum = sfft.rfft(images, n=n, axis=1, workers=-1)                   # (k, nf, cols)
    phase = _phase(n, shifts_px).T                                           # (na, nf)
    out = sfft.irfft(phase[:, None, :, None] * spectrum[None], n=n, axis=2, workers=-1)
    return out[:, :, :rows].astype(np.float32)


@dataclass
class Tomosynthesis:
    """A DBT acquisition and reconstruction in canonical orientation (slice 0 at the detector)."""

    pixels: np.ndarray
    window: tuple[float, float]
    breast_mask: np.ndarray
    glandular_mask: np.ndarray
    lesion_labels: np.ndarray
    slice_mm: float
    angles_deg: np.ndarray


def acquire_dbt(phantom: Phantom, masses: list[tuple[int, LesionVolume]], calcs: list[tuple[int, CalcCluster]],
                rng: np.random.Generator, acq: Acquisition) -> Tomosynthesis:
    """Projections over the arc -> exposure (each 1/N of the dose) -> reconstruction -> 12 bits."""
    g = phantom.geometry
    rows, cols, p, k = g.rows, g.cols, g.pixel_mm, g.k
    angles = np.linspace(-acq.arc_deg / 2, acq.arc_deg / 2, acq.n_projections) if acq.n_projections > 1 else np.zeros(1)
    tans, coss = np.tan(np.radians(angles)), np.cos(np.radians(angles))
    pad_coarse = int(math.ceil(g.thickness_mm * np.abs(tans).max() / g.voxel_mm)) + 2
    pad = pad_coarse * k
    n_rows = rows + 2 * pad

    # Tissue inside the skin: sheared sums of the coarse voxels, upsampled to the detector.
    coarse = shear_project(phantom.excess, g.z_centers(), g.voxel_mm, tans, pad_coarse) * np.float32(g.dz_mm)
    line = upsample(phantom.full_columns(coarse), k, n_rows, cols)
    del coarse
    # The fat-and-skin shell is symmetric about mid-height, so at a small angle its projection
    # is the vertical one shifted by (T/2) tan(theta).
    distance = upsample(g.distance, k, rows, cols)
    total, skin = phantom.shell_paths(distance)
    shell = np.zeros((2, n_rows, cols), np.float32)
    shell[0, pad:pad + rows] = MU_PER_MM["adipose"] * (total - skin) + MU_PER_MM["skin"] * skin
    shell[1, pad:pad + rows] = total
    shell = _shift_rows(shell, g.thickness_mm / 2 * tans / p)
    line += shell[:, 0]
    # Thickness equalisation of each projection, as for FFDM, where the sheared breast lies.
    equalise = np.where(shell[:, 1] > 0.05, _equalisation(shell[:, 1], g.thickness_mm, acq), 0)
    del shell
    for _, lesion in masses:
        hz, h = lesion.pitch
        m = int(round(h / p))
        z, _, _ = lesion.centers()
        lpad = int(math.ceil(z.max() * np.abs(tans).max() / h)) + 2
        sheared = shear_project(mass_excess(lesion, phantom), z, h, tans, lpad) * np.float32(hz)
        sheared = upsample(sheared, m, sheared.shape[1] * m, sheared.shape[2] * m)
        _paste(line, sheared, pad + int(round(lesion.origin[1] / p)) - lpad * m, int(round(lesion.origin[2] / p)))
    for _, cluster in calcs:
        excess = MU_PER_MM["calcification"] - phantom.background_mu(*cluster.centers.T)
        for a, t in enumerate(tans):
            for (patch, r0, c0), mu in zip(_sphere_paths(cluster, p, cluster.centers[:, 0] * t), excess):
                _paste(line[a], patch * np.float32(mu), pad + r0, c0)
    line /= coss[:, None, None].astype(np.float32)  # oblique rays cross more tissue

    breast_2d = np.zeros((n_rows, cols), bool)
    breast_2d[pad:pad + rows] = distance > 0
    centre = np.zeros_like(breast_2d)
    centre[pad:pad + rows] = distance > g.thickness_mm / 2
    per_view = acq.quanta_per_mm2 * acq.dbt_dose_factor / len(angles)
    aec = None
    log_signal = np.empty_like(line)
    for a in range(len(angles)):
        log_signal[a], aec = _expose(line[a], breast_2d, centre, rng, acq, p, per_view, aec)
    log_signal += equalise / coss[:, None, None].astype(np.float32)
    del line, equalise

    n_slices = int(math.ceil(g.thickness_mm / acq.slice_mm - 1e-9))
    heights = (np.arange(n_slices) + 0.5) * acq.slice_mm
    volume = reconstruct(log_signal, tans, heights, acq.slice_mm, p, acq.recon,
                         acq.sart_iterations, acq.sart_relaxation)[:, pad:pad + rows]
    del log_signal

    # Ground truth per slice: the breast's cross-section at the slice centre, glandular voxels
    # filling at least half the slice, lesion voxels present in the slice.
    half_thickness = total / 2
    breast = np.abs(heights[:, None, None] - g.thickness_mm / 2) < half_thickness[None]
    layer_slice = np.minimum((g.z_centers() / acq.slice_mm).astype(np.int64), n_slices - 1)
    gland_coarse = phantom.full_columns(np.stack([
        phantom.glandular[layer_slice == s].mean(axis=0) >= 0.5 if (layer_slice == s).any()
        else np.zeros(phantom.glandular.shape[1:], bool) for s in range(n_slices)]))
    glandular = _repeat(gland_coarse, k, rows, cols) & breast
    labels = np.zeros((n_slices, rows, cols), np.uint8)
    for label, lesion in masses:
        hz, h = lesion.pitch
        m = int(round(h / p))
        z, _, _ = lesion.centers()
        slab = np.minimum((z / acq.slice_mm).astype(np.int64), n_slices - 1)
        row0, col0 = int(round(lesion.origin[1] / p)), int(round(lesion.origin[2] / p))
        for s in np.unique(slab):
            present = lesion.occupancy[slab == s].max(axis=0) >= 0.5
            fine = _repeat(present, m, present.shape[0] * m, present.shape[1] * m)
            _paste(labels[s], fine, row0, col0, "label", label)
    for label, cluster in calcs:
        for (patch, r0, c0), (z, _, _), radius in zip(_sphere_paths(cluster, p), cluster.centers, cluster.radii):
            first = int(np.clip((z - radius) // acq.slice_mm, 0, n_slices - 1))
            last = int(np.clip((z + radius) // acq.slice_mm, 0, n_slices - 1))
            for s in range(first, last + 1):
                _paste(labels[s], patch > 0, r0, c0, "label", label)
    labels[~breast] = 0
    gland = (volume - MU_PER_MM["adipose"]) / (MU_PER_MM["glandular"] - MU_PER_MM["adipose"])
    region = breast & (distance > 5.0)[None]
    pixels, window = _lut(gland, region, fat_level=0.3, white=1.2)  # slices: a wider range than FFDM
    return Tomosynthesis(pixels=pixels, window=window, breast_mask=breast, glandular_mask=glandular,
                         lesion_labels=labels, slice_mm=acq.slice_mm, angles_deg=angles)


def reconstruct(log_signal: np.ndarray, tans: np.ndarray, heights_mm: np.ndarray, slice_mm: float,
                pixel_mm: float, method: str = "sart", iterations: int = 2, relaxation: float = 0.25,
                block: int = 128) -> np.ndarray:
    """Slices (attenuation, 1/mm) at ``heights_mm`` from log projections (n_angles, rows, cols).

    The system is separable by detector column (the shear runs along the rows) and, along the
    rows, diagonal in the Fourier domain: for each row frequency f the projections are
    ``P = a E(f) X`` with ``E[angle, slice] = exp(-2 pi i f z tan(theta))`` and ``a`` the path per
    slice. So every method is a small matrix per frequency:

    * SAA: ``X = E^H P`` (scaled), the exact shift-and-add;
    * FBP: the same after a ramp-with-plateau, Hann-windowed filter along the rows;
    * SART: one sweep of per-projection SART updates (in the ordered, spread-out sequence) is the
      affine map ``X -> M X + N P``, composed once per frequency from the 15 rank-one updates; each
      iteration applies it and then enforces positivity in the image domain.
    Columns are processed in blocks to bound memory."""
    with _single_threaded_blas():
        return _reconstruct(log_signal, tans, heights_mm, slice_mm, pixel_mm, method, iterations, relaxation, block)


def _reconstruct(log_signal: np.ndarray, tans: np.ndarray, heights_mm: np.ndarray, slice_mm: float,
                 pixel_mm: float, method: str, iterations: int, relaxation: float, block: int) -> np.ndarray:
    n_angles, n_rows, n_cols = log_signal.shape
    n_slices = len(heights_mm)
    coss = np.cos(np.arctan(tans))
    n = sfft.next_fast_len(n_rows + int(math.ceil(heights_mm.max() * np.abs(tans).max() / pixel_mm)) + 1, real=True)
    phases = _phase(n, np.outer(tans, heights_mm) / pixel_mm)            # (nf, na, ns)
    if method not in ("saa", "fbp", "sart"):
        raise ValueError(f"unknown reconstruction {method!r}")
    height = n_slices * slice_mm
    solve = np.ascontiguousarray(phases.conj().transpose(0, 2, 1)) * (coss / (n_angles * height)).astype(np.float32)
    if method == "fbp":
        f = sfft.rfftfreq(n)
        ramp = (0.05 + 0.95 * f / 0.5) * 0.5 * (1 + np.cos(np.pi * f / 0.5))  # DC plateau + ramp, Hann window
        solve *= (ramp / ramp[0]).astype(np.float32)[:, None, None]
    # A Tukey apodisation along the rows (flat to 0.25 cycles/pixel, cosine to 0 at Nyquist): the
    # detector blur leaves little signal there but all the noise, which SART would fit.
    f = sfft.rfftfreq(n)
    taper = np.where(f < 0.25, 1.0, 0.5 * (1 + np.cos(np.pi * (f - 0.25) / 0.25))).astype(np.float32)
    sweep = data = None
    if method == "sart":  # starts from the shift-and-add volume (it carries the depth-averaged
        # low frequencies that limited-angle data cannot place; starting from zero, positivity
        # would fill them column by column, in stripes)
        data, sweep = _sart_sweep(phases, (slice_mm / coss).astype(np.float32), relaxation)
    out = np.empty((n_slices, n_rows, n_cols), np.float32)
    for c0 in range(0, n_cols, block):
        cols = slice(c0, min(c0 + block, n_cols))
        spectrum = np.ascontiguousarray(sfft.rfft(log_signal[:, :, cols], n=n, axis=1, workers=-1).transpose(1, 0, 2))
        volume_f = np.matmul(solve, spectrum)                            # (nf, ns, b)
        if sweep is not None:
            data_term = np.matmul(data, spectrum)
            for i in range(iterations):
                if i:  # positivity between sweeps (the shift-and-add start is positive already)
                    volume = np.maximum(sfft.irfft(volume_f, n=n, axis=0, workers=-1), 0)
                    volume_f = sfft.rfft(volume, n=n, axis=0, workers=-1).astype(np.complex64)
                volume_f = np.matmul(sweep, volume_f)
                volume_f += data_term
        if method != "fbp":  # (the FBP filter has its own window)
            volume_f *= taper[:, None, None]
        volume = sfft.irfft(volume_f, n=n, axis=0, workers=-1)[:n_rows]
        if sweep is not None:
            np.maximum(volume, 0, out=volume)
        out[:, :, cols] = volume.transpose(1, 0, 2)
    return out


def _sart_sweep(phases: np.ndarray, path: np.ndarray, relaxation: float) -> tuple[np.ndarray, np.ndarray]:
    """(N, M) with one SART sweep ``X -> M X + N P`` per row frequency. The update for projection
    ``a`` (Andersen & Kak: residual over the ray length, back-projected over the number of rays
    through a voxel, here 1 per projection) is
    ``X += relaxation / (path_a * n_slices) * conj(e_a) (P_a - path_a e_a^T X)``."""
    n_freq, n_angles, n_slices = phases.shape
    m = np.broadcast_to(np.eye(n_slices, dtype=np.complex64), (n_freq, n_slices, n_slices)).copy()
    nn = np.zeros((n_freq, n_slices, n_angles), np.complex64)
    step = np.float32(relaxation / n_slices)
    for a in _spread_order(n_angles):
        e = phases[:, a, :]
        back = e.conj()[:, :, None]
        m -= step * back * np.matmul(e[:, None, :], m)
        nn -= step * back * np.matmul(e[:, None, :], nn)
        nn[:, :, a] += (step / path[a]) * back[:, :, 0]
    return nn, m


def _spread_order(n: int) -> list[int]:
    """Projection order for SART that keeps consecutive angles far apart (faster convergence)."""
    step = max(1, int(round(n / 2 + 0.5)))
    while math.gcd(step, n) != 1:
        step += 1
    return [(i * step) % n for i in range(n)]
