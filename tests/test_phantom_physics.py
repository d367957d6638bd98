"""Physics and ground truth of the breast phantom simulator (training.phantom).

Small images throughout (0.4-0.8 mm pixels) so the file runs in well under a minute; the physics
does not change with the pixel size, only the detail."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from training.errors import MammoInputError
from training.phantom import SimulatedImage, anatomy, simulate_dbt, simulate_exam, simulate_ffdm

SMALL = (256, 208)   # 0.8 mm pixels, the full 204.8 x 166.4 mm field of view
MEDIUM = (512, 416)  # 0.4 mm


def _stream(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


def _phantom(seed: int, density: str, shape=MEDIUM, view: str = "CC") -> anatomy.Phantom:
    spec = anatomy.draw_breast(_stream(seed, 1), "L", density)
    rows, cols, pixel = anatomy.detector_grid(shape, "ffdm")
    geometry = anatomy.view_geometry(spec, view, rows, cols, pixel, 0.4, 1.0)
    return anatomy.build_phantom(spec, geometry, _stream(seed, 2))


def _psd_slope(image: np.ndarray, pixel_mm: float, band: tuple[float, float]) -> float:
    """Slope of the log-log radially averaged power spectrum (Hann-windowed, mean removed),
    fitted over log-spaced frequency bins in ``band`` (cycles/mm)."""
    n = image.shape[0]
    window = np.outer(np.hanning(n), np.hanning(n))
    power = np.abs(np.fft.fft2((image - image.mean()) * window)) ** 2
    f = np.fft.fftfreq(n, pixel_mm)
    radius = np.hypot(f[:, None], f[None, :]).ravel()
    edges = np.geomspace(*band, 12)
    centres, means = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        ring = (radius >= lo) & (radius < hi)
        if ring.any():
            centres.append(np.sqrt(lo * hi))
            means.append(power.ravel()[ring].mean())
    return float(np.polyfit(np.log(centres), np.log(means), 1)[0])


def _central_roi(phantom: anatomy.Phantom, values: np.ndarray, size: int = 128) -> np.ndarray:
    g = phantom.geometry
    row = int(g.center_row_mm / g.voxel_mm)
    col = max(int(0.45 * g.depth_mm / g.voxel_mm) - size // 2, 0)
    return values[row - size // 2:row + size // 2, col:col + size]


# ------------------------------------------------------------------------------------------------
# determinism

def test_same_seed_same_arrays_and_different_seed_different_image():
    a = simulate_ffdm(3, shape=SMALL, lesion="mass")
    b = simulate_ffdm(3, shape=SMALL, lesion="mass")
    c = simulate_ffdm(4, shape=SMALL, lesion="mass")
    for name in ("pixels", "breast_mask", "glandular_mask", "lesion_labels"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.params == b.params and a.lesions == b.lesions
    assert not np.array_equal(a.pixels, c.pixels)
    assert a.params != c.params


def test_dbt_is_deterministic():
    a = simulate_dbt(5, shape=SMALL, lesion="calc")
    b = simulate_dbt(5, shape=SMALL, lesion="calc")
    assert np.array_equal(a.pixels, b.pixels) and np.array_equal(a.lesion_labels, b.lesion_labels)


# ------------------------------------------------------------------------------------------------
# texture: power-law spectrum

def test_fibroglandular_texture_has_a_power_law_spectrum_of_slope_about_minus_3():
    """Fit: the projected fibroglandular thickness (sum of the binary tissue along z: the
    noise-free texture a mammogram shows, which is what Burgess et al. measured beta on), in a
    central 51 mm square, over 0.05-0.5 cycles/mm (above the lobes' scale, below the 0.4 mm
    voxels' Nyquist)."""
    slopes = []
    for seed in range(1, 7):
        phantom = _phantom(seed, "BCD"[seed % 3])
        thickness = phantom.glandular.sum(axis=0).astype(float)
        slopes.append(_psd_slope(_central_roi(phantom, thickness), phantom.geometry.voxel_mm, (0.05, 0.5)))
    assert all(-3.6 < s < -2.4 for s in slopes), slopes
    assert abs(np.mean(slopes) + 3.0) < 0.25, slopes


def test_gaussian_field_projection_has_the_requested_exponent():
    """The generator itself: the projection of a 3D 1/f^beta field has a 2D spectrum 1/f^beta
    (projection-slice theorem), for both the exponent the phantom uses and 3."""
    for beta in (3.0, anatomy.BETA):
        field, _ = anatomy.power_law_fields((32, 256, 256), (1.0, 0.4, 0.4), _stream(7), beta=beta, f_min=1e-3)
        slope = _psd_slope(field.sum(axis=0), 0.4, (0.05, 1.0))
        assert abs(slope + beta) < 0.25, (beta, slope)


# ------------------------------------------------------------------------------------------------
# density

def test_density_class_orders_the_glandular_fraction_and_the_image_brightness():
    fractions, brightness = [], []
    for density in anatomy.DENSITY_CLASSES:
        image = simulate_ffdm(11, shape=SMALL, density=density, lesion="none")
        lo, hi = anatomy.GLANDULAR_FRACTION_RANGE[density]
        assert lo - 0.01 <= image.glandular_fraction <= hi + 0.01, (density, image.glandular_fraction)
        assert image.density == density
        fractions.append(image.glandular_fraction)
        brightness.append(float(image.pixels[image.breast_mask].mean()))
    assert fractions == sorted(fractions) and len(set(fractions)) == 4, fractions
    assert brightness == sorted(brightness), brightness  # denser breasts look whiter


def test_density_is_drawn_from_the_seed_when_not_given():
    drawn = {simulate_ffdm(seed, shape=(128, 104), lesion="none").density for seed in range(12)}
    assert len(drawn) >= 2 and drawn <= set(anatomy.DENSITY_CLASSES)


# ------------------------------------------------------------------------------------------------
# masks and pixels agree

def _check_2d_truth(image: SimulatedImage) -> None:
    air, breast = image.pixels[~image.breast_mask], image.pixels[image.breast_mask]
    assert air.size and breast.size
    assert np.percentile(air, 99) == 0  # air is black
    assert (breast == 0).mean() < 0.01 and np.percentile(breast, 5) > 0.05 * 4095  # tissue is not
    assert not (image.glandular_mask & ~image.breast_mask).any()
    assert not ((image.lesion_labels > 0) & ~image.breast_mask).any()
    dense, fatty = image.pixels[image.glandular_mask], image.pixels[image.breast_mask & ~image.glandular_mask]
    assert np.median(dense) > np.median(fatty)


def test_ffdm_masks_align_with_pixels_and_boxes_hold_their_lesions():
    image = simulate_ffdm(21, shape=(1024, 832), lesion="mass+calc", density="B")  # 0.2 mm: specks resolved
    _check_2d_truth(image)
    assert [lesion.kind for lesion in image.lesions] == ["mass", "calc"]
    for lesion in image.lesions:
        r0, c0, r1, c1 = lesion.box
        inside = image.lesion_labels[r0:r1, c0:c1] == lesion.label
        assert inside.sum() == (image.lesion_labels == lesion.label).sum() > 0
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()  # tight
        assert lesion.slice_range is None and lesion.center_slice is None
    mass = image.lesions[0]
    footprint = image.lesion_labels == mass.label
    ring = ndimage.binary_dilation(footprint, iterations=8) & ~ndimage.binary_dilation(footprint, iterations=3)
    assert image.pixels[footprint].mean() > image.pixels[ring & image.breast_mask].mean()  # a mass is brighter
    # Calcifications: bright specks where their labels are.
    calc = image.lesion_labels == image.lesions[1].label
    assert _speck_cnr(image.pixels, calc, image.breast_mask, image.spacing_mm[0]) > 3


def test_dbt_masks_per_slice_and_slice_ranges_match_the_label_volume():
    image = simulate_dbt(22, shape=SMALL, lesion="mass+calc", density="B")
    n_slices, rows, cols = image.pixels.shape
    assert image.breast_mask.shape == image.lesion_labels.shape == image.glandular_mask.shape == image.pixels.shape
    thickness = image.params["thickness_mm"]
    assert n_slices == int(np.ceil(thickness / image.spacing_mm[0] - 1e-9))
    # The cross-section is largest at mid-height and shrinks towards the paddles (rounded edge).
    areas = image.breast_mask.sum(axis=(1, 2))
    middle = n_slices // 2
    assert areas[middle] == areas.max() and areas[0] < 0.7 * areas.max() and areas[-1] < 0.7 * areas.max()
    assert np.percentile(image.pixels[middle][~image.breast_mask.any(axis=0)], 99) == 0
    for lesion in image.lesions:
        present = np.flatnonzero((image.lesion_labels == lesion.label).any(axis=(1, 2)))
        assert lesion.slice_range == (present[0], present[-1])
        assert lesion.slice_range[0] <= lesion.center_slice <= lesion.slice_range[1]
        r0, c0, r1, c1 = lesion.box
        labelled = (image.lesion_labels == lesion.label).any(axis=0)
        assert labelled[r0:r1, c0:c1].sum() == labelled.sum()
    mass, calc = image.lesions
    assert not (set(range(mass.slice_range[0], mass.slice_range[1] + 1)) >= {calc.center_slice}
                and set(range(calc.slice_range[0], calc.slice_range[1] + 1)) >= {mass.center_slice})


# ------------------------------------------------------------------------------------------------
# DBT: in focus in its own slice, blurred away from it

def _edge_cnr(volume: np.ndarray, footprint: np.ndarray, breast: np.ndarray, pixel: float) -> float:
    """Contrast-to-noise of the lesion border: gradient magnitude on a 1 mm band around the
    lesion's in-focus outline against the gradient in a 3-8 mm annulus of background."""
    band = ndimage.binary_dilation(footprint, iterations=max(1, round(1 / pixel))) & \
        ~ndimage.binary_erosion(footprint, iterations=max(1, round(1 / pixel)))
    annulus = ndimage.binary_dilation(footprint, iterations=round(8 / pixel)) & \
        ~ndimage.binary_dilation(footprint, iterations=round(3 / pixel)) & breast
    gradient = ndimage.gaussian_gradient_magnitude(volume.astype(float), 0.3 / pixel)
    return float((gradient[band].mean() - gradient[annulus].mean()) / gradient[annulus].std())


def _speck_cnr(volume: np.ndarray, specks: np.ndarray, breast: np.ndarray, pixel: float) -> float:
    """Contrast-to-noise of calcification specks after removing the background (1 mm high-pass)."""
    detail = volume.astype(float) - ndimage.gaussian_filter(volume.astype(float), 1.0 / pixel)
    annulus = ndimage.binary_dilation(specks, iterations=round(8 / pixel)) & \
        ~ndimage.binary_dilation(specks, iterations=round(3 / pixel)) & breast
    return float((detail[specks].mean() - detail[annulus].mean()) / detail[annulus].std())


def test_dbt_lesion_is_sharp_in_focus_and_blurs_away_from_its_slice():
    image = simulate_dbt(0, shape=MEDIUM, lesion="mass+calc", density="A")
    pixel, slice_mm = image.spacing_mm[1], image.spacing_mm[0]
    n_slices = image.pixels.shape[0]
    profiles = {}
    for lesion, metric in zip(image.lesions, (_edge_cnr, _speck_cnr)):
        centre = lesion.center_slice
        footprint = image.lesion_labels[centre] == lesion.label
        by_distance = []
        for distance_mm in (0, 3, 6, 10):
            values = [metric(image.pixels[s], footprint, image.breast_mask[s], pixel)
                      for s in {centre - round(distance_mm / slice_mm), centre + round(distance_mm / slice_mm)}
                      if 0 <= s < n_slices]
            by_distance.append(float(np.mean(values)))
        profiles[lesion.kind] = by_distance
        assert by_distance[0] > 1.5, (lesion.kind, by_distance)  # visible in focus
        assert all(a > b for a, b in zip(by_distance, by_distance[1:])), (lesion.kind, by_distance)  # monotone
    # With a 15 degree arc, out-of-plane blur grows by 2 tan(7.5 deg) = 0.26 mm per mm of depth:
    # sub-millimetre specks fade within a few mm, a centimetre mass's edges only slowly.
    assert profiles["mass"][3] < 0.9 * profiles["mass"][0], profiles
    assert profiles["calc"][2] < 0.5 * profiles["calc"][0], profiles


def test_reconstruction_choices_and_geometry_are_recorded():
    for recon in ("saa", "fbp"):
        image = simulate_dbt(8, shape=(192, 156), lesion="none", recon=recon, n_projections=9, arc_deg=25.0,
                             slice_mm=2.0)
        assert image.params["acquisition"]["recon"] == recon
        assert image.params["acquisition"]["n_projections"] == 9
        assert image.spacing_mm[0] == 2.0 and image.kind == "dbt"
        assert image.pixels.max() <= 4095 and image.bits_stored == 12


# ------------------------------------------------------------------------------------------------
# orientation, shapes, exams

@pytest.mark.parametrize("laterality, side", [("L", "left"), ("R", "right")])
def test_chest_wall_is_on_the_side_the_laterality_says(laterality, side):
    for view in ("CC", "MLO"):
        image = simulate_ffdm(31, view=view, laterality=laterality, shape=SMALL, lesion="none")
        assert image.chest_wall == side and image.laterality == laterality and image.view == view
        assert image.pixels.shape == SMALL and image.pixels.dtype == np.uint16
        assert image.spacing_mm == (0.8, 0.8)
        edge = 0 if side == "left" else -1
        other = -1 if side == "left" else 0
        assert image.breast_mask[:, edge].mean() > 0.3  # the breast touches the chest-wall edge
        assert not image.breast_mask[:, other].any()   # and never the opposite edge


def test_default_shapes_follow_the_contract():
    image = simulate_ffdm(1, lesion="none")
    assert image.pixels.shape == (2048, 1664) and image.spacing_mm == (0.1, 0.1)
    assert 0 < image.window[1] <= 4096


def test_mlo_shows_the_pectoral_muscle_at_the_top_of_the_chest_wall_edge():
    image = simulate_ffdm(12, view="MLO", laterality="L", shape=SMALL, lesion="none", density="A")
    muscle = image.pixels[:10, :6]  # top of the chest-wall edge
    assert image.breast_mask[0].any()  # the axilla reaches the top edge
    assert np.median(muscle) > np.percentile(image.pixels[image.breast_mask], 90)


def test_exam_has_four_views_one_phantom_per_breast_and_the_lesion_in_one_breast():
    exam = simulate_exam(41, shape=SMALL, lesion="mass")
    assert [(im.view, im.laterality) for im in exam] == [("CC", "R"), ("CC", "L"), ("MLO", "R"), ("MLO", "L")]
    assert len({im.density for im in exam}) == 1
    with_lesion = [im for im in exam if im.lesions]
    assert len(with_lesion) == 2 and with_lesion[0].laterality == with_lesion[1].laterality
    for im in exam:
        assert im.params["breast"]["laterality"] == im.laterality
        assert (im.lesion_labels > 0).any() == bool(im.lesions)
    by_side = {side: [im for im in exam if im.laterality == side] for side in "LR"}
    for views in by_side.values():  # CC and MLO of one breast share the phantom
        assert views[0].params["breast"] == views[1].params["breast"]
    cc, mlo = sorted(with_lesion, key=lambda im: im.view)
    # The lesion lies at a similar distance from the chest wall in both views.
    depth = [im.params["lesions"][0]["center_zrc_mm"][2] / im.params["breast"]["depth_mm"][im.view] for im in (cc, mlo)]
    assert abs(depth[0] - depth[1]) < 0.15, depth


@pytest.mark.parametrize("kwargs", [
    dict(view="ML"), dict(laterality="B"), dict(density="E"), dict(lesion="cyst"), dict(shape=(10, 10)),
    dict(shape="big"), dict(lesion="mass+cyst"),
])
def test_bad_arguments_raise_one_clear_error(kwargs):
    with pytest.raises(MammoInputError):
        simulate_ffdm(1, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(recon="art"), dict(n_projections=1), dict(arc_deg=0), dict(slice_mm=0.0)])
def test_bad_dbt_arguments_raise_one_clear_error(kwargs):
    with pytest.raises(MammoInputError):
        simulate_dbt(1, shape=SMALL, **kwargs)
