"""The tissue-aware multi-crop sampler (MammoDINO) and its naive variant (plain DINOv2): what a
researcher checks before spending GPU-weeks on it. Images are small synthetic breasts so this stays fast."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from training.errors import MammoInputError
from training.sampler.augment import AugmentConfig
from training.sampler.sampler import MultiCropSampler, NoTissueError, SamplerConfig
from training.sampler.masking import block_mask
from training.sampler.boxes import random_resized_box

# Small crops keep the tests fast; everything else is DINOv2's default.
SMALL = SamplerConfig(global_size=112, local_size=48, n_local=4, patch_size=14)


def breast(shape=(320, 256), radius=(0.42, 0.55), seed=0, chest_wall="left"):
    """A half-ellipse of bright textured 'tissue' on the chest-wall edge, over dark noisy air."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    depth = cols if chest_wall == "left" else shape[1] - 1 - cols
    tissue = ((rows - shape[0] / 2) / (radius[0] * shape[0])) ** 2 + (depth / (radius[1] * shape[1])) ** 2 < 1
    image = rng.normal(200, 30, shape)
    image[tissue] += 1500 + 400 * np.sin(rows[tissue] / 7.0) * np.cos(cols[tissue] / 5.0)
    return np.clip(image, 0, 4095).astype(np.uint16), tissue


def box_fraction(tissue, box):
    r0, c0, r1, c1 = box
    return tissue[r0:r1, c0:c1].mean()


def test_same_seed_gives_the_same_record_and_pixels_and_another_seed_does_not():
    image, tissue = breast()
    for tissue_aware in (True, False):
        sampler = MultiCropSampler(SMALL, tissue_aware=tissue_aware)
        a, b = sampler.sample(image, tissue, 7), sampler.sample(image, tissue, 7)
        assert json.dumps(a.record()) == json.dumps(b.record())
        for x, y in zip(a.crops, b.crops):
            np.testing.assert_array_equal(x.pixels, y.pixels)
        other = sampler.sample(image, tissue, 8).record()
        assert [c["box"] for c in other["crops"]] != [c["box"] for c in a.record()["crops"]]


def test_every_tissue_aware_crop_meets_the_threshold_or_is_a_counted_fallback():
    image, tissue = breast(radius=(0.3, 0.35))
    sampler = MultiCropSampler(SMALL)
    n_crops = 0
    for seed in range(12):
        record = sampler.sample(image, tissue, seed).record()
        assert record["threshold"] == 0.5
        assert record["fallbacks"] == sum(c["fallback"] for c in record["crops"])
        for crop in record["crops"]:
            n_crops += 1
            # the recorded fraction is the true share of tissue pixels in the box
            assert crop["tissue_fraction"] == pytest.approx(box_fraction(tissue, crop["box"]), abs=1e-4)
            assert crop["tissue_fraction"] >= 0.5 or crop["fallback"]
    assert n_crops == 12 * (2 + 4)


def test_local_crops_can_be_held_to_a_stricter_tissue_share_than_global_ones():
    image, tissue = breast()
    strict = MultiCropSampler(replace(SMALL, local_min_tissue=0.9))
    shares = {"global": [], "local": []}
    for seed in range(12):
        for crop in strict.sample(image, tissue, seed).record()["crops"]:
            if not crop["fallback"]:
                shares[crop["kind"]].append(crop["tissue_fraction"])
    assert len(shares["local"]) >= 40 and min(shares["local"]) >= 0.9
    assert min(shares["global"]) >= 0.5 and min(shares["global"]) < 0.9  # the globals keep air at the edge
    # unset, the locals follow min_tissue and the draws are those of the default sampler
    same = MultiCropSampler(replace(SMALL, local_min_tissue=None)).sample(image, tissue, 3).record()
    assert same == MultiCropSampler(SMALL).sample(image, tissue, 3).record()


def test_global_crops_can_range_over_the_whole_image_while_locals_and_masks_stay_on_tissue():
    image, tissue = breast(radius=(0.3, 0.35))  # a small breast: most of the image is air
    wide = MultiCropSampler(replace(SMALL, global_region="image", min_tissue=0.0, local_min_tissue=0.9))
    globals_, locals_ = [], []
    for seed in range(16):
        sample = wide.sample(image, tissue, seed)
        for crop in sample.crops:
            (globals_ if crop.kind == "global" else locals_).append(crop)
            if crop.kind == "global" and crop.patch_mask is not None and crop.patch_mask.any():
                assert (crop.patch_tissue[crop.patch_mask] >= SMALL.patch_min_tissue).all()
    assert min(c.tissue_fraction for c in globals_) < 0.5  # globals see air...
    assert all(c.tissue_fraction >= 0.9 for c in locals_ if not c.fallback)  # ...locals do not
    assert all(c.pixels.shape == (SMALL.global_size,) * 2 for c in globals_)
    tight = [c.tissue_fraction for seed in range(16) for c in MultiCropSampler(SMALL).sample(image, tissue, seed).crops
             if c.kind == "global"]
    assert np.mean([c.tissue_fraction for c in globals_]) < np.mean(tight)


def test_masked_patches_are_all_on_tissue_and_half_the_globals_are_masked():
    image, tissue = breast(radius=(0.35, 0.4))
    sampler = MultiCropSampler(SMALL)
    masked_patches = 0
    for seed in range(10):
        record = sampler.sample(image, tissue, seed).record()
        globals_ = [c for c in record["crops"] if c["kind"] == "global"]
        assert sum(c["masked"] for c in globals_) == 1  # DINOv2: half the global crops carry a mask
        for crop in globals_:
            if not crop["masked"]:
                assert crop["mask_grid"] is None
                continue
            assert 0.1 <= crop["mask_ratio"] <= 0.5
            grid = np.array(crop["mask_grid"], bool)
            assert grid.shape == (SMALL.grid, SMALL.grid)
            r0, c0, r1, c1 = crop["box"]
            for a, b in zip(*np.nonzero(grid)):  # each masked patch's footprint in the image
                rows = slice(r0 + a * (r1 - r0) // SMALL.grid, r0 + (a + 1) * (r1 - r0) // SMALL.grid)
                cols = slice(c0 + b * (c1 - c0) // SMALL.grid, c0 + (b + 1) * (c1 - c0) // SMALL.grid)
                assert tissue[rows, cols].mean() >= 0.5
                masked_patches += 1
    assert masked_patches > 50


def test_naive_sampler_takes_low_tissue_crops_and_masks_air_on_a_mostly_air_image():
    image, tissue = breast(radius=(0.2, 0.25))  # about 8% of the image is tissue
    naive = MultiCropSampler(SMALL, tissue_aware=False)
    aware = MultiCropSampler(SMALL)
    naive_fractions, air_masked = [], 0
    for seed in range(10):
        sample = naive.sample(image, tissue, seed)
        record = sample.record()
        assert record["sampler"] == "naive" and record["threshold"] is None and record["fallbacks"] == 0
        assert record["region"] == [0, 0, 320, 256]
        naive_fractions += [c["tissue_fraction"] for c in record["crops"]]
        air_masked += sum(int((c.patch_mask & (c.patch_tissue < 0.5)).sum()) for c in sample.crops if c.masked)
        assert all(c["tissue_fraction"] >= 0.5 or c["fallback"]
                   for c in aware.sample(image, tissue, seed).record()["crops"])
    assert np.mean(np.array(naive_fractions) < 0.5) > 0.5
    assert air_masked > 0


def test_crop_boxes_follow_dinov2_scale_and_aspect_ranges():
    image, tissue = breast(shape=(480, 400))
    for tissue_aware in (True, False):
        sampler = MultiCropSampler(SMALL, tissue_aware=tissue_aware)
        for seed in range(8):
            record = sampler.sample(image, tissue, seed).record()
            r0, c0, r1, c1 = record["region"]
            assert 0 <= r0 < r1 <= 480 and 0 <= c0 < c1 <= 400
            for crop in record["crops"]:
                b0, b1, b2, b3 = crop["box"]
                assert r0 <= b0 < b2 <= r1 and c0 <= b1 < b3 <= c1
                height, width = b2 - b0, b3 - b1
                low, high = SMALL.global_scale if crop["kind"] == "global" else SMALL.local_scale
                slack = (1 + 0.5 / height) * (1 + 0.5 / width)  # boxes are whole pixels
                area = height * width / ((r1 - r0) * (c1 - c0))
                assert low / slack <= area <= high * slack
                assert 3 / 4 / slack <= width / height <= 4 / 3 * slack


def test_random_resized_box_draws_the_whole_scale_range_log_uniform_aspect():
    rng = np.random.default_rng(0)
    boxes = [random_resized_box((0, 0, 1000, 1000), (0.05, 0.32), (3 / 4, 4 / 3), rng) for _ in range(2000)]
    areas = np.array([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]) / 1e6
    log_aspect = np.log([(b[3] - b[1]) / (b[2] - b[0]) for b in boxes])
    assert areas.min() < 0.06 and areas.max() > 0.31 and abs(areas.mean() - 0.185) < 0.01  # uniform area
    assert abs(log_aspect.mean()) < 0.02 and abs(np.abs(log_aspect).max() - math.log(4 / 3)) < 0.01


def test_crops_have_the_configured_sizes_and_training_arrays_stack():
    image, tissue = breast()
    sample = MultiCropSampler(SMALL).sample(image, tissue, 3)
    assert [c.kind for c in sample.crops] == ["global"] * 2 + ["local"] * 4
    for crop in sample.crops:
        size = 112 if crop.kind == "global" else 48
        assert crop.pixels.shape == (size, size) and crop.pixels.dtype == np.float32
        assert np.isfinite(crop.pixels).all() and 0 <= crop.pixels.min() and crop.pixels.max() <= 1
        if crop.kind == "global":
            assert crop.patch_mask.shape == (8, 8)
            assert crop.patch_tissue is None if not crop.masked else crop.patch_tissue.shape == (8, 8)
        else:
            assert crop.patch_mask is None and crop.patch_tissue is None
    views = sample.views()
    assert views["global"].shape == (2, 112, 112) and views["local"].shape == (4, 48, 48)
    assert views["masks"].shape == (2, 8, 8) and views["masks"].dtype == bool
    big = MultiCropSampler().sample(*breast((600, 480)), 0)  # DINOv2 defaults: 224/96, 16x16 patches
    assert big.views()["global"].shape == (2, 224, 224) and big.views()["local"].shape == (8, 96, 96)
    assert big.views()["masks"].shape == (2, 16, 16)


def test_dbt_pair_has_the_same_boxes_and_masks_on_slices_k_apart():
    slices = [breast((240, 200), radius=(0.4 - 0.01 * s, 0.5), seed=s) for s in range(6)]
    volume = np.stack([s[0] for s in slices])
    tissue = np.stack([s[1] for s in slices])
    sampler = MultiCropSampler(replace(SMALL, dbt_offset=2))
    pairs = set()
    for seed in range(8):
        sample = sampler.sample_pair(volume, tissue, seed)
        i, j = sample.pair
        pairs.add((i, j))
        assert abs(i - j) == 2 and 0 <= min(i, j) and max(i, j) < 6
        record = sample.record()
        assert record["slices"] == [i, j]
        first = [c for c in sample.crops if c.slice_index == i]
        second = [c for c in sample.crops if c.slice_index == j]
        assert len(first) == len(second) == 6
        for a, b in zip(first, second):
            assert a.box == b.box and (a.hflip, a.vflip) == (b.hflip, b.vflip)
            assert a.tissue_fraction == pytest.approx(box_fraction(tissue[i], a.box))
            assert b.tissue_fraction == pytest.approx(box_fraction(tissue[j], b.box))
            assert (a.tissue_fraction >= 0.5 and b.tissue_fraction >= 0.5) or a.fallback
            if a.kind == "global":
                np.testing.assert_array_equal(a.patch_mask, b.patch_mask)
            assert not np.array_equal(a.pixels, b.pixels)
        assert sample.views(j)["global"].shape == (2, 112, 112)
    assert len(pairs) > 3  # pairs and their order vary with the seed
    anchored = sampler.sample_pair(volume, tissue[0], 5, anchor=1)  # one mask shared by all slices
    assert anchored.pair == (1, 3)
    with pytest.raises(MammoInputError, match="no slice pair"):
        MultiCropSampler(replace(SMALL, dbt_offset=6)).sample_pair(volume, tissue, 0)


def test_augmentations_keep_shape_values_finite_and_do_not_move_boxes_or_masks():
    image, tissue = breast()
    plain = MultiCropSampler(replace(SMALL, augment=None)).sample(image, tissue, 4)
    everything = AugmentConfig(hflip=1.0, vflip=1.0, jitter=1.0, gamma=1.0, blur=(1.0, 1.0, 1.0), noise=1.0)
    heavy = MultiCropSampler(replace(SMALL, augment=everything)).sample(image, tissue, 4)
    assert [c["box"] for c in plain.record()["crops"]] == [c["box"] for c in heavy.record()["crops"]]
    assert [c["mask_grid"] for c in plain.record()["crops"]] == [c["mask_grid"] for c in heavy.record()["crops"]]
    for a, b in zip(plain.crops, heavy.crops):
        assert a.pixels.shape == b.pixels.shape and np.isfinite(b.pixels).all()
        assert 0 <= b.pixels.min() and b.pixels.max() <= 1 and not np.allclose(a.pixels, b.pixels)
    # a flip alone mirrors the crop, its tissue grid and its mask; the record keeps image orientation
    flip_only = AugmentConfig(hflip=1.0, jitter=0.0, gamma=0.0, blur=(0.0, 0.0, 0.0), noise=0.0)
    flipped = MultiCropSampler(replace(SMALL, augment=flip_only)).sample(image, tissue, 4)
    for a, b in zip(plain.crops, flipped.crops):
        np.testing.assert_allclose(b.pixels, a.pixels[:, ::-1], atol=1e-6)
        if a.kind == "global":
            np.testing.assert_array_equal(b.patch_mask, a.patch_mask[:, ::-1])
            np.testing.assert_array_equal(b.mask_on_box(), a.patch_mask)


def test_a_tiny_tissue_island_takes_the_counted_fallback_and_never_loops():
    image = np.full((400, 400), 100, np.uint16)
    tissue = np.zeros((400, 400), bool)
    tissue[200:204, 300:304] = True
    image[tissue] = 3000
    record = MultiCropSampler(replace(SMALL, max_tries=5)).sample(image, tissue, 0).record()
    assert record["fallbacks"] == len(record["crops"]) == 6
    for crop in record["crops"]:
        assert crop["fallback"] and 0 < crop["tissue_fraction"] < 0.5  # the best box still holds the island
    r0, c0, r1, c1 = record["region"]
    assert (r1 - r0, c1 - c0) == (112, 112)  # the region grew around the speck to a global crop's size


def test_no_tissue_is_a_clear_error_for_the_tissue_aware_sampler_only():
    image = np.full((200, 160), 50, np.uint16)
    empty = np.zeros_like(image, bool)
    with pytest.raises(NoTissueError, match="no breast tissue"):
        MultiCropSampler(SMALL).sample(image, empty, 0)
    assert issubclass(NoTissueError, MammoInputError)
    record = MultiCropSampler(SMALL, tissue_aware=False).sample(image, empty, 0).record()
    assert all(c["tissue_fraction"] == 0 for c in record["crops"])


def test_bad_inputs_and_configs_are_one_clear_error():
    image, tissue = breast()
    sampler = MultiCropSampler(SMALL)
    with pytest.raises(MammoInputError, match="differs from image shape"):
        sampler.sample(image, tissue[:-1], 0)
    with pytest.raises(MammoInputError, match="2D image"):
        sampler.sample(image[None], tissue[None], 0)
    with pytest.raises(MammoInputError, match="seed"):
        sampler.sample(image, tissue, -1)
    with pytest.raises(MammoInputError, match="multiple of patch_size"):
        SamplerConfig(global_size=100)
    with pytest.raises(MammoInputError, match="unknown keys"):
        SamplerConfig.from_dict({"global_sise": 224})
    for wrong in ({"global_scale": "big"}, {"min_tissue": [1, 2]}, {"augment": {"blur": 0.5}}, {"augment": 3}):
        with pytest.raises(MammoInputError, match="sampler config|augment"):
            SamplerConfig.from_dict(wrong)


def test_config_round_trips_through_json():
    config = replace(SMALL, min_tissue=0.7, augment=replace(AugmentConfig(), noise=0.0))
    again = SamplerConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert SamplerConfig.from_dict({"augment": None}).augment is None


def test_block_mask_reaches_its_target_only_on_eligible_patches():
    rng = np.random.default_rng(0)
    everywhere = np.ones((16, 16), bool)
    counts = [int(block_mask(everywhere, 77, rng, max_block=128).sum()) for _ in range(50)]
    assert np.mean(counts) > 0.9 * 77 and max(counts) <= 77
    half = np.zeros((16, 16), bool)
    half[:, :8] = True
    for _ in range(50):
        mask = block_mask(half, 40, rng, max_block=128)
        assert not (mask & ~half).any() and 0 < mask.sum() <= 40
    assert not block_mask(np.zeros((16, 16), bool), 40, rng).any()


# --- from DICOM files: sample_images and `mammodino sample` ----------------------------------------

def _cli_json(capsys, *args) -> dict:
    from training.cli import main

    assert main(["sample", *map(str, args), "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # exactly one JSON object
    return json.loads(out)


def test_cli_prints_the_qa_records_as_one_json_object(tmp_path, capsys):
    from dicom_factory import write_ffdm

    image, _ = breast((320, 256), chest_wall="right")
    path = write_ffdm(tmp_path / "rcc.dcm", image, view="CC", laterality="R")
    report = _cli_json(capsys, path, "--seed", 3, "--n", 2)
    assert report["sampler"] == "tissue-aware" and report["threshold"] == 0.5 and report["n"] == 2
    assert len(report["crops"]) == 2 * 10 and [s["seed"] for s in report["samples"]] == [3, 4]
    for crop in report["crops"]:
        assert crop["kind"] in ("global", "local")
        r0, c0, r1, c1 = crop["box"]
        assert 0 <= r0 < r1 <= 320 and 0 <= c0 < c1 <= 256
        assert crop["tissue_fraction"] >= 0.5 or crop["fallback"]
        assert crop["slice_index"] is None
        if crop["masked"]:
            assert np.array(crop["mask_grid"]).shape == (16, 16)
    assert sum(c["masked"] for c in report["crops"]) == 2  # one of the two globals, per sample
    assert _cli_json(capsys, path, "--seed", 3, "--n", 2) == report  # same seed, same records
    naive = _cli_json(capsys, path, "--seed", 3, "--naive")
    assert naive["sampler"] == "naive" and naive["threshold"] is None
    assert naive["samples"][0]["region"] == [0, 0, 320, 256]


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    from training.cli import main

    text = tmp_path / "report.dcm"
    text.write_text("BI-RADS 2\n")
    for args in ([text], [text, "--n", "0"], [text, "--config", tmp_path / "missing.json"]):
        assert main(["sample", *map(str, args), "--json"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and "mammodino sample: error:" in captured.err


def test_dbt_file_decodes_only_the_slices_of_its_pairs(tmp_path, capsys, decoded):
    from dicom_factory import write_enhanced_dbt

    volume = np.stack([breast((160, 128), radius=(0.4, 0.5), seed=s, chest_wall="right")[0] for s in range(8)])
    path = write_enhanced_dbt(tmp_path / "dbt.dcm", volume)
    report = _cli_json(capsys, path, "--seed", 0, "--n", 3)
    pairs = [tuple(s["slices"]) for s in report["samples"]]
    assert all(abs(i - j) == 1 for i, j in pairs)
    assert sorted(set(decoded)) == sorted({s for pair in pairs for s in pair})
    assert len(decoded) == len(set(decoded))  # each slice decoded once
    for sample in range(3):
        crops = [c for c in report["crops"] if c["sample"] == sample]
        i, j = pairs[sample]
        assert [c["box"] for c in crops if c["slice_index"] == i] == [c["box"] for c in crops if c["slice_index"] == j]


def test_a_monochrome1_file_gives_the_same_crops_as_its_monochrome2_twin(tmp_path):
    from dicom_factory import write_ffdm
    from training.dicom.io import open_image
    from training.sampler.sampler import sample_image

    image, _ = breast((320, 256))
    mono2 = sample_image(open_image(write_ffdm(tmp_path / "m2.dcm", image)), seed=5)
    mono1 = sample_image(open_image(write_ffdm(tmp_path / "m1.dcm", 4095 - image, photometric="MONOCHROME1")), seed=5)
    assert [c["box"] for c in mono1.record()["crops"]] == [c["box"] for c in mono2.record()["crops"]]
    for a, b in zip(mono1.crops, mono2.crops):
        np.testing.assert_allclose(a.pixels, b.pixels, atol=1e-4)  # tissue bright in both
