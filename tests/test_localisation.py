"""Lesion localisation scores against hand-computed cases: patch targets from masks and boxes, FROC
sensitivities at 1 and 2 false positives per image, patch AUROC as scikit-learn computes it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.evaluate.encoder import Prepared
from training.errors import MammoInputError
from training.evaluate.heads.localise import (froc, lesion_regions, local_maxima, patch_auroc, patch_fraction,
    patch_targets)


def prepared(box, grid, image_shape, frame=None) -> Prepared:
    r0, c0, r1, c1 = box
    patch_px = ((r1 - r0) / grid[0], (c1 - c0) / grid[1])
    return Prepared(np.zeros((1, 1), np.float32), box, grid, patch_px, np.ones(grid, np.float32), image_shape, frame)


def test_patch_fractions_are_exact_areas():
    item = prepared((0, 0, 64, 48), (4, 3), (64, 48))  # 16-pixel patches
    mask = np.zeros((64, 48), bool)
    mask[0:8, 0:16] = True  # half of patch (0, 0)
    mask[20:28, 36:40] = True  # 32 pixels of patch (1, 2)
    fraction = patch_fraction(mask, item)
    expected = np.zeros((4, 3))
    expected[0, 0] = 0.5
    expected[1, 2] = 32 / 256
    assert np.allclose(fraction, expected)


def test_patch_fractions_weigh_fractional_pixels_inside_the_box():
    item = prepared((10, 5, 40, 35), (4, 4), (50, 50))  # 7.5-pixel patches starting at (10, 5)
    mask = np.zeros((50, 50), bool)
    mask[17, 12] = True  # row 17 lies in patch 0 for 0.5 px and patch 1 for 0.5 px; col 12 likewise
    mask[0:10, :] = True  # outside the box: no patch sees it
    fraction = patch_fraction(mask, item)
    expected = np.zeros((4, 4))
    expected[0:2, 0:2] = 0.25 / 7.5 ** 2
    assert np.allclose(fraction, expected)
    inside = np.zeros((50, 50), bool)
    inside[10:40, 5:35] = True
    assert np.allclose(patch_fraction(inside, item), 1.0)


def test_targets_mark_covered_patches_the_best_patch_of_small_lesions_and_leave_out_slivers():
    item = prepared((0, 0, 64, 64), (4, 4), (64, 64))
    mass = np.zeros((64, 64), bool)
    mass[0:16, 0:20] = True  # patch (0, 0) fully, (0, 1) a quarter
    calc = np.zeros((64, 64), bool)
    calc[40:42, 40:42] = True  # 4 pixels in patch (2, 2): under any threshold, still its best patch
    targets, touches = patch_targets([mass, calc], item, threshold=0.3)
    expected = np.zeros((4, 4), np.int8)
    expected[0, 0] = 1
    expected[0, 1] = -1  # touched, 0.25 < 0.3: neither lesion nor background
    expected[2, 2] = 1
    assert (targets == expected).all()
    assert touches.shape == (2, 4, 4)
    assert set(zip(*np.nonzero(touches[0]))) == {(0, 0), (0, 1)} and set(zip(*np.nonzero(touches[1]))) == {(2, 2)}
    empty, none = patch_targets([], item)
    assert (empty == 0).all() and none.shape == (0, 4, 4)


def test_masks_and_boxes_give_the_same_regions(tmp_path):
    from training.phantom.dataset import write_mask

    mask = np.zeros((32, 24), np.uint8)
    mask[2:6, 3:9] = 1
    mask[20:30, 10:12] = 2
    write_mask(mask, tmp_path / "m.png")
    row = {"lesion_mask": "m.png",
           "lesions": json.dumps([{"box": [2, 3, 6, 9]}, {"box": [20, 10, 30, 12]}])}
    item = prepared((0, 0, 32, 24), (4, 3), (32, 24))
    from_mask = lesion_regions(row, "lesion_mask", tmp_path, item)
    from_boxes = lesion_regions(row, "lesions", tmp_path, item)
    assert len(from_mask) == 2 and all((a == b).all() for a, b in zip(from_mask, from_boxes))

    volume = np.zeros((5, 32, 24), np.uint8)
    volume[3, 2:6, 3:9] = 1
    write_mask(volume, tmp_path / "v.npz")
    on_slice = lesion_regions({"lesion_mask": "v.npz"}, "lesion_mask", tmp_path, prepared((0, 0, 32, 24), (4, 3),
                                                                                          (32, 24), frame=3))
    off_slice = lesion_regions({"lesion_mask": "v.npz"}, "lesion_mask", tmp_path, prepared((0, 0, 32, 24), (4, 3),
                                                                                           (32, 24), frame=1))
    assert len(on_slice) == 1 and (on_slice[0] == from_mask[0]).all() and off_slice == []
    with pytest.raises(MammoInputError, match="does not match"):
        lesion_regions(row, "lesion_mask", tmp_path, prepared((0, 0, 40, 24), (4, 3), (40, 24)))


def test_froc_sensitivities_match_the_hand_count():
    # Image A: lesion 1 touches patches (1, 1)-(1, 3), detected at 0.9 and again at 0.7 (the second mark
    # is neither a hit nor a false positive); lesion 2 touches (3, 3), detected at 0.4; a false
    # positive at 0.8. Image B (no lesion): false positives at 0.95, 0.6 and 0.35.
    a = np.zeros((5, 5))
    a[1, 1], a[1, 3], a[4, 0], a[3, 3] = 0.9, 0.7, 0.8, 0.4
    a[1, 2] = 0.1
    touch_a = np.zeros((2, 5, 5), bool)
    touch_a[0, 1, 1:4] = True
    touch_a[1, 3, 3] = True
    b = np.zeros((5, 5))
    b[0, 0], b[4, 4], b[2, 2] = 0.95, 0.6, 0.35
    # thresholds: 0.95 (FP/image 0.5, sens 0), 0.9 (0.5, 1/2), 0.8 (1.0, 1/2), 0.6 (1.5, 1/2),
    # 0.4 (1.5, 2/2), 0.35 (2.0, 2/2)
    result = froc([a, b], [touch_a, np.zeros((0, 5, 5), bool)])
    assert result["n_lesions"] == 2 and result["n_images"] == 2
    assert result["sensitivity_at_1_fp"] == 0.5 and result["sensitivity_at_2_fp"] == 1.0
    assert result["sensitivity_at_fp"]["0.25"] == 0.0 and result["sensitivity_at_fp"]["0.5"] == 0.5
    # a lesion no detection touches is never found
    missed = froc([b], [touch_a[:1]])
    assert missed["sensitivity_at_fp"]["8"] == 0.0


def test_local_maxima_are_the_patches_no_neighbour_exceeds():
    heat = np.array([[0.1, 0.2, 0.1], [0.0, 0.1, 0.0], [0.5, 0.0, 0.3]])
    assert set(zip(*local_maxima(heat))) == {(0, 1), (2, 0), (2, 2)}


def test_patch_auroc_is_sklearns_over_lesion_and_breast_patches():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    heatmaps = [rng.random((6, 5)) for _ in range(3)]
    targets = [rng.choice(np.array([-1, 0, 0, 0, 1], np.int8), (6, 5)) for _ in range(3)]
    tissue = [rng.random((6, 5)) for _ in range(3)]
    keep = [(t == 1) | ((t == 0) & (s >= 0.5)) for t, s in zip(targets, tissue)]
    expected = roc_auc_score(np.concatenate([t[k] for t, k in zip(targets, keep)]),
                             np.concatenate([h[k] for h, k in zip(heatmaps, keep)]))
    assert patch_auroc(heatmaps, targets, tissue) == pytest.approx(expected, abs=1e-12)
    assert patch_auroc(heatmaps, [np.zeros((6, 5), np.int8)] * 3, tissue) is None
