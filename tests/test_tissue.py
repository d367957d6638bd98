"""Breast-tissue segmentation: real CBIS-DDSM film (burned-in labels, film edges), phantoms with
ground truth, MONOCHROME1, noise, dense breasts touching the edges, volumes, bad input, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import dask
import dask.array as da
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from dicom_factory import write_enhanced_dbt, write_ffdm
from training.cli import main
from training.errors import MammoInputError
from training.dicom.io import open_file, open_image
from training.phantom.film import CBIS_LABEL_BOXES, label_pixels
from training.tissue import TissueResult, segment_tissue, segment_volume, tissue_of


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / np.logical_or(a, b).sum())


def synthetic_breast(shape=(480, 384), *, side="left", seed=0, dense=False, touch=False,
                     noise=15.0, air=300.0) -> tuple[np.ndarray, np.ndarray]:
    """A 12-bit MONOCHROME2 mammogram-like image and its true breast mask: a half-ellipse on the
    chest-wall edge whose brightness rises from the skin line inwards (projected thickness of a
    compressed breast), fibroglandular texture, quantum-like noise. `touch` makes the breast run
    off the top and bottom edges, as a large breast does on a small detector."""
    rows, cols = shape
    rng = np.random.default_rng(seed)
    r = np.arange(rows)[:, None] - rows / 2
    c = np.arange(cols)[None, :]
    depth = c if side == "left" else cols - 1 - c
    rho = np.hypot(r / (rows * (0.62 if touch else 0.42)), depth / (cols * 0.62))
    truth = rho < 1
    thickness = np.sqrt(np.clip(1 - rho ** 2, 0, None))
    texture = ndi.gaussian_filter(rng.standard_normal(shape), 6)
    texture /= texture.std()
    glandular = np.clip((0.75 if dense else 0.3) + 0.25 * texture, 0, 1)
    tissue = 700 + 1800 * thickness ** 0.5 * (0.4 + 0.6 * glandular)
    pixels = np.where(truth, air + tissue, air) + rng.normal(0, noise, shape)
    return np.clip(pixels, 0, 4095).astype(np.uint16), truth


# --- real film: CBIS-DDSM -------------------------------------------------------------------------

def test_no_burned_in_label_inside_the_mask_on_any_real_cbis_view(cbis_cases):
    seen = 0
    for case in cbis_cases:
        for view, path in case.items():
            image = open_image(path)
            pixels = image.frame(0)
            result = tissue_of(image)
            glyphs = label_pixels(pixels, CBIS_LABEL_BOXES[(path.parent.name, view)])
            where = f"{path.parent.name}/{view}"
            assert glyphs.sum() > 2000, f"{where}: the label boxes miss the labels"
            assert not (result.mask & glyphs).any(), f"{where}: {(result.mask & glyphs).sum()} label pixels"
            # The breast itself is there: chest wall on the laterality's side, and the bright
            # tissue in the chest-wall half (away from the film edges) is inside the mask.
            assert result.chest_wall == ("right" if view.startswith("r") else "left"), where
            assert 0.12 < result.fraction < 0.5, where
            rows, cols = pixels.shape
            half = np.s_[rows // 10:rows - rows // 10, cols // 2:cols - cols // 20] if view.startswith("r") \
                else np.s_[rows // 10:rows - rows // 10, cols // 20:cols // 2]
            core = pixels[half] > np.percentile(pixels[half], 60)
            assert result.mask[half][core].mean() > 0.99, where
            seen += 1
    assert seen == 8


def test_monochrome1_gives_the_same_mask_on_a_real_view(cbis_cases):
    pixels = open_image(cbis_cases[1]["lmlo"]).frame(0)
    plain = segment_tissue(pixels)
    inverted = segment_tissue(65535 - pixels, photometric="MONOCHROME1")
    assert np.array_equal(plain.mask, inverted.mask)
    assert inverted.chest_wall == plain.chest_wall == "left"


# --- phantoms with ground truth ------------------------------------------------------------------

def test_iou_against_phantom_ground_truth():
    from training.phantom import simulate_ffdm

    scores = {}
    for d, density in enumerate("ABCD"):
        for v, view in enumerate(("CC", "MLO")):
            for laterality in ("L", "R"):
                sim = simulate_ffdm(100 * d + 10 * v + (laterality == "R"), view=view, laterality=laterality,
                                    density=density, lesion="any", shape=(256, 208))
                result = segment_tissue(sim.pixels, spacing_mm=sim.spacing_mm, view=view)
                scores[(density, view, laterality)] = iou(result.mask, sim.breast_mask)
                assert result.chest_wall == sim.chest_wall
    values = np.array(list(scores.values()))
    assert np.median(values) >= 0.97, scores
    assert values.min() >= 0.9, scores
    for density in "ABCD":
        assert np.median([v for k, v in scores.items() if k[0] == density]) >= 0.95, (density, scores)


# --- synthetic cases -----------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["left", "right"])
def test_dense_breast_touching_three_edges(side):
    pixels, truth = synthetic_breast(side=side, dense=True, touch=True)
    assert truth[0].any() and truth[-1].any()  # it really runs off the top and bottom
    result = segment_tissue(pixels)
    assert result.chest_wall == side
    assert iou(result.mask, truth) > 0.97


def test_a_fatty_breast_larger_than_the_air_with_a_bright_muscle():
    # Fat outnumbers air, and a bright pectoral muscle dominates the upper histogram: neither the
    # tallest histogram peak nor Otsu's split is the air/tissue boundary here.
    _, truth = synthetic_breast(shape=(480, 384), side="right", touch=True)
    rows, cols = np.mgrid[:480, :384]
    muscle = truth & (cols > 264 + rows // 2) & (rows < 240)  # a triangle on the chest wall, at the top
    image = np.where(truth, 560.0, 300.0)  # flat, dim fat on air
    image[muscle] = 3500
    image += np.random.default_rng(1).normal(0, 15, image.shape)
    assert (truth & ~muscle).sum() > (~truth).sum() and muscle.mean() > 0.03  # more fat than air
    assert iou(segment_tissue(image).mask, truth) > 0.97


def test_noise_does_not_move_the_outline():
    clean, truth = synthetic_breast(noise=5.0)
    reference = segment_tissue(clean).mask
    assert iou(reference, truth) > 0.97
    for sigma in (150.0, 1000.0):  # per pixel, up to the tissue contrast at the skin line
        noisy, _ = synthetic_breast(noise=sigma, seed=0)
        assert iou(segment_tissue(noisy).mask, truth) > 0.97, sigma
    # Hot and dead pixels (a bad detector row element, dust) do not matter either.
    rng = np.random.default_rng(3)
    spiky = clean.copy()
    spiky.flat[rng.choice(spiky.size, spiky.size // 200, replace=False)] = 4095
    spiky.flat[rng.choice(spiky.size, spiky.size // 200, replace=False)] = 0
    assert iou(segment_tissue(spiky).mask, reference) > 0.99


def test_labels_markers_and_edge_strips_are_left_out():
    pixels, truth = synthetic_breast(shape=(640, 512))
    pixels[40:90, 380:470] = 4095  # a burned-in label block on the nipple side, top
    pixels[560:572, 300:312] = 4095  # a small marker
    pixels[:14] = 3800  # film-edge / collimator strips: top, bottom, nipple side...
    pixels[-9:] = 3500
    pixels[:, -10:] = 3600
    pixels[:, :10] = np.maximum(pixels[:, :10], 3000)  # ...and a line along the chest wall joining them
    result = segment_tissue(pixels)
    assert not result.mask[40:90, 380:470].any()
    assert not result.mask[560:572, 300:312].any()
    assert not result.mask[:14].any() and not result.mask[-9:].any() and not result.mask[:, -10:].any()
    assert not result.mask[:40, :10].any() and not result.mask[-40:, :10].any()
    assert iou(result.mask, truth) > 0.96


def test_monochrome1_and_any_dtype_give_the_same_mask():
    pixels, _ = synthetic_breast(side="right")
    reference = segment_tissue(pixels).mask
    assert np.array_equal(segment_tissue(4095 - pixels, photometric="MONOCHROME1").mask, reference)
    assert np.array_equal(segment_tissue(pixels.astype(np.float32) / 4095).mask, reference)
    assert np.array_equal(segment_tissue((pixels >> 4).astype(np.uint8)).mask, reference)
    assert np.array_equal(segment_tissue(pixels.astype(np.int16) - 2048).mask, reference)


def test_statistics_match_the_mask():
    pixels, _ = synthetic_breast(shape=(1001, 803))  # not a multiple of the block size
    result = segment_tissue(pixels, spacing_mm=(0.1, 0.05))
    assert isinstance(result, TissueResult)
    mask = result.mask
    assert mask.shape == pixels.shape and mask.dtype == bool
    assert result.downsample == 2
    assert result.fraction == pytest.approx(mask.mean())
    assert result.area_cm2 == pytest.approx(mask.sum() * 0.1 * 0.05 / 100)
    rows, cols = np.nonzero(mask)
    assert result.bbox == (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1)
    stats = result.to_json()
    assert "mask" not in stats and json.loads(json.dumps(stats))["bbox"] == list(result.bbox)
    assert segment_tissue(pixels).area_cm2 is None


# --- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.zeros((0, 10)), np.zeros(100), np.zeros((4, 5, 6)),
                                 np.full((50, 40), np.nan), np.array([["a", "b"], ["c", "d"]])])
def test_what_is_not_an_image_is_a_clear_error(bad):
    with pytest.raises(MammoInputError):
        segment_tissue(bad)


def test_a_constant_image_has_no_tissue():
    result = segment_tissue(np.full((300, 200), 1234, dtype=np.uint16), spacing_mm=(0.1, 0.1))
    assert not result.mask.any() and result.fraction == 0.0 and result.area_cm2 == 0.0
    assert result.bbox is None
    assert result.to_json()["bbox"] is None


# --- volumes and MammoImage -------------------------------------------------------------------------

def _volume(n=5, shape=(240, 200)):
    slices, truths = zip(*(synthetic_breast(shape, side="right", seed=s) for s in range(n)))
    return np.stack(slices), np.stack(truths)


def test_volume_per_slice_decodes_each_slice_once():
    volume, truth = _volume()
    computed = []

    def load(i):
        computed.append(i)
        return volume[i:i + 1]

    lazy = da.concatenate([da.from_delayed(dask.delayed(load)(i), (1, *volume.shape[1:]), volume.dtype)
                           for i in range(len(volume))])
    result = segment_volume(lazy, spacing_mm=(1.0, 0.1, 0.1))
    assert sorted(computed) == list(range(len(volume)))
    assert result.mask.shape == volume.shape and result.chest_wall == "right"
    for i in range(len(volume)):
        assert np.array_equal(result.mask[i], segment_tissue(volume[i], chest_wall="right").mask)
    assert result.slice_fractions == pytest.approx([m.mean() for m in result.mask])
    assert result.area_cm2 == pytest.approx(result.mask.sum(axis=(1, 2)).mean() * 0.01 / 100)
    assert iou(result.mask, truth) > 0.97


def test_volume_shared_mask_is_one_mask_for_all_slices():
    volume, truth = _volume()
    result = segment_volume(volume, shared=True)
    assert result.shared and result.mask.shape == volume.shape
    assert all(np.array_equal(m, result.mask[0]) for m in result.mask)
    assert iou(result.mask[0], truth[0]) > 0.95


def test_tissue_of_a_dicom_ffdm_and_dbt(tmp_path):
    pixels, truth = synthetic_breast(side="right")
    path = write_ffdm(tmp_path / "mg.dcm", 4095 - pixels, photometric="MONOCHROME1", laterality="R",
                      spacing=(0.1, 0.1))
    result = tissue_of(open_file(path))
    assert iou(result.mask, truth) > 0.97 and result.chest_wall == "right"
    assert result.area_cm2 == pytest.approx(result.mask.sum() * 0.01 / 100)

    volume, _ = _volume(3)
    dbt = tissue_of(open_file(write_enhanced_dbt(tmp_path / "dbt.dcm", volume)), index=2)
    assert np.array_equal(dbt.mask, segment_tissue(volume[2]).mask)
    whole = tissue_of(open_file(tmp_path / "dbt.dcm"))
    assert whole.mask.shape == volume.shape
    with pytest.raises(MammoInputError):
        tissue_of(open_file(tmp_path / "dbt.dcm"), index=3)


# --- CLI -----------------------------------------------------------------------------------------------

def test_cli_prints_stats_and_writes_the_mask(tmp_path, capsys):
    pixels, _ = synthetic_breast()
    path = write_ffdm(tmp_path / "mg.dcm", pixels, spacing=(0.1, 0.1))
    out = tmp_path / "mask.png"
    assert main(["tissue", str(path), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = segment_tissue(pixels, spacing_mm=(0.1, 0.1))
    assert report["shape"] == list(pixels.shape) and report["chest_wall"] == "left"
    assert report["fraction"] == pytest.approx(expected.fraction)
    assert report["area_cm2"] == pytest.approx(expected.area_cm2)
    assert report["bbox"] == list(expected.bbox) and report["time_ms"] >= 0
    assert np.array_equal(np.array(Image.open(out)) == 255, expected.mask)


def test_cli_takes_the_chest_wall_side_from_the_header_as_the_viewer_does(tmp_path, capsys):
    """`mammodino tissue` goes through tissue_of, like the viewer, the sampler and inference: a header
    whose PatientOrientation puts the chest wall on the right wins over the pixels (which look left)."""
    pixels, _ = synthetic_breast()
    path = write_ffdm(tmp_path / "mg.dcm", pixels, PatientOrientation=["P", "L"])
    assert main(["tissue", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = tissue_of(open_image(path))
    assert report["chest_wall"] == expected.chest_wall == "right"
    assert segment_tissue(pixels, spacing_mm=(0.1, 0.1)).chest_wall == "left"
    assert report["bbox"] == list(expected.bbox) and report["fraction"] == pytest.approx(expected.fraction)


def test_cli_bad_frame_is_one_line(tmp_path):
    volume, _ = _volume(2)
    path = write_enhanced_dbt(tmp_path / "dbt.dcm", volume)
    done = subprocess.run([sys.executable, "-m", "training", "tissue", str(path), "--frame", "7"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "--frame 7" in done.stderr
