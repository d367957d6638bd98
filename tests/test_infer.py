"""One-click inference without a viewer: maps, their normalisation and placement, attention inside the
tissue, task-head predictions, cancelling, the lazy per-slice stack of a DBT (computed in place, or
in the background with read-ahead for a viewer), export and
`mammodino infer`."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dicom_factory import write_enhanced_dbt
from training.cli import main
from training.evaluate.encoder import Encoder, TaskHead, random_encoder, save_encoder
from training.evaluate.infer import (InferenceCancelled, LazyAttentionStack, attention_in_tissue, infer_image,
    on_image_grid, patch_placement, pca_rgb)
from training.evaluate.export import export
from training.dicom.io import open_image
from training.lazy import PlanePool

LCC = "sample_data/exam/LCC.dcm"
DBT = "sample_data/dbt/LCC_dbt.dcm"
RESOLUTION = 128


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    """A tiny random ViT with an image head (density A-D) and a patch head (lesion heatmap)."""
    base = random_encoder("tiny/16")
    dim = base.embed_dim
    heads = {"density": TaskHead(2 * dim, ["A", "B", "C", "D"]), "lesion": TaskHead(dim, ["no", "yes"], on="patch")}
    return Encoder(base.backbone, heads, source="tiny test encoder")


@pytest.fixture(scope="module")
def encoder_file(encoder, tmp_path_factory):
    return save_encoder(tmp_path_factory.mktemp("enc") / "tiny.safetensors", encoder, {"note": "test"})


@pytest.fixture(scope="module")
def lcc_result(encoder):
    return infer_image(encoder, open_image(LCC), resolution=RESOLUTION, attention="rollout")


def test_maps_have_the_patch_grid_and_are_normalised(lcc_result, encoder):
    result = lcc_result
    p = result.prepared
    h, w = result.grid
    assert p.pixels.shape == (h * 16, w * 16) and max(p.pixels.shape) == RESOLUTION
    assert result.head_attention.shape == (3, h, w)
    np.testing.assert_allclose(result.head_attention.sum((1, 2)), 1, rtol=1e-5)  # each head: a distribution
    np.testing.assert_allclose(result.attention, result.head_attention.mean(0), rtol=1e-5)
    assert result.attention.sum() == pytest.approx(1, rel=1e-5) and result.rollout.sum() == pytest.approx(1, rel=1e-5)
    h_w = h * w  # display maps: multiples of uniform attention
    assert result.map("mean").mean() == pytest.approx(1, rel=1e-4) and result.map("mean").min() >= 0
    np.testing.assert_allclose(result.map("attention"), result.rollout * h_w, rtol=1e-5)
    np.testing.assert_allclose(result.map("head:2"), result.head_attention[2] * h_w, rtol=1e-5)
    # PCA: three robustly scaled channels on the tissue patches, black elsewhere
    tissue = p.tissue >= 0.5
    assert result.pca.shape == (h, w, 3) and result.pca.dtype == np.float32
    assert result.pca.min() >= 0 and result.pca.max() <= 1 and not result.pca[~tissue].any()
    for channel in range(3):
        values = result.pca[..., channel][tissue]
        assert values.min() == 0 and values.max() == 1  # 1st-99th percentile stretched
    assert 0 < result.pca_explained.sum() <= 1 and np.all(np.diff(result.pca_explained) <= 0)
    # heads: named classes with probabilities, a heatmap per patch head
    assert list(result.predictions) == ["density"] and list(result.predictions["density"]) == ["A", "B", "C", "D"]
    assert sum(result.predictions["density"].values()) == pytest.approx(1)
    assert result.heatmaps["lesion"].shape == (h, w) and 0 <= result.heatmaps["lesion"].min() <= 1
    assert 0 <= result.attention_in_tissue <= 1
    assert result.attention_in_tissue == pytest.approx(attention_in_tissue(result.rollout, p.tissue))
    assert result.tissue_share == pytest.approx(p.tissue.mean())
    summary = json.loads(json.dumps(result.summary()))
    assert summary["encoder"]["source"] == "tiny test encoder" and summary["grid"] == [h, w]


def test_attention_in_tissue_by_hand():
    tissue = np.array([[1.0, 0.5], [0.0, 1.0]])
    assert attention_in_tissue(np.array([[0.5, 0.0], [0.0, 0.5]]), tissue) == 1.0  # all on full-tissue patches
    assert attention_in_tissue(np.array([[0.0, 0.0], [1.0, 0.0]]), tissue) == 0.0  # all on air
    assert attention_in_tissue(np.array([[0.0, 2.0], [2.0, 0.0]]), tissue) == pytest.approx(0.25)  # unnormalised too
    uniform = np.full((2, 2), 0.25)
    assert attention_in_tissue(uniform, tissue) == pytest.approx(tissue.mean())  # the chance level


def test_pca_colours_follow_the_feature_structure():
    """Two kinds of tissue patches (features differing along one direction) get two colours."""
    rng = np.random.default_rng(0)
    patches = rng.normal(0, 0.01, (6, 8, 16)).astype(np.float32)
    patches[:, :4, 3] += 5.0  # left half differs from the right half along feature 3
    tissue = np.ones((6, 8))
    tissue[0, 0] = 0.0  # an air patch
    rgb, explained = pca_rgb(patches, tissue)
    assert explained[0] > 0.9
    first = rgb[..., 0]
    assert abs(first[1:, :4].mean() - first[:, 4:].mean()) > 0.9 and (rgb[0, 0] == 0).all()


def test_patch_maps_land_on_the_image_pixels_they_summarise(lcc_result):
    p = lcc_result.prepared
    h, w = p.grid
    ids = np.arange(h * w, dtype=np.float32).reshape(h, w) + 1
    on_image = on_image_grid(p, ids)
    assert on_image.shape == p.image_shape
    r0, c0, r1, c1 = p.box
    assert not on_image[:r0].any() and not on_image[r1:].any() and not on_image[:, c1:].any()
    for i, j in ((0, 0), (h - 1, w - 1), (h // 2, w // 3)):
        (row, col), _ = patch_placement(p)
        centre = (round(row + i * p.patch_px[0]), round(col + j * p.patch_px[1]))
        assert on_image[centre] == ids[i, j]
        (row, col), _ = patch_placement(p, flipped=True)  # the mirrored layer shows ids[:, ::-1]
        centre = (round(row + i * p.patch_px[0]), round(col + j * p.patch_px[1]))
        assert on_image[:, ::-1][centre] == ids[:, ::-1][i, j]


def test_cancel_stops_inside_the_forward_pass(encoder):
    image = open_image(LCC)
    polls = []

    def stop_after_three_blocks() -> bool:
        polls.append(1)
        return len(polls) > 6  # 3 checks before the forward pass, then one per block

    with pytest.raises(InferenceCancelled):
        infer_image(encoder, image, resolution=RESOLUTION, should_stop=stop_after_three_blocks)
    assert len(polls) == 7 < 3 + len(encoder.backbone.blocks)
    with pytest.raises(InferenceCancelled):
        infer_image(encoder, image, resolution=RESOLUTION, should_stop=lambda: True)
    steps = []
    infer_image(encoder, image, resolution=RESOLUTION, progress=lambda done, total: steps.append((done, total)))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_lazy_stack_computes_only_the_slices_indexed_and_keeps_a_bounded_cache(encoder):
    volume = open_image(DBT)
    n, rows, cols = volume.data.shape
    stack = LazyAttentionStack(encoder, volume, resolution=96, cache_size=2)
    assert stack.shape == (n, rows, cols) and stack.dtype == np.float32 and stack.ndim == 3 and stack.computed == []
    plane = stack[5]
    result = stack.results.peek(5)
    assert plane.shape == (rows, cols) and stack.computed == [5] and result.frame == 5
    r0, c0, r1, c1 = result.prepared.box  # multiples of uniform attention inside the input box, 0 outside
    assert plane[r0:r1, c0:c1].mean() == pytest.approx(1, rel=0.1) and not plane[:r0].any()
    assert stack[5, 10:20, 30:40].shape == (10, 10) and stack.computed == [5]  # cached
    pca = stack.view("pca")
    assert pca.shape == (n, rows, cols, 3) and pca[5].shape == (rows, cols, 3) and stack.computed == [5]  # shared
    assert stack[7:9].shape == (2, rows, cols) and stack.computed == [5, 7, 8]
    stack[5]  # evicted from the cache of 2 by slices 7 and 8: computed again
    assert stack.computed == [5, 7, 8, 5]
    mirrored = LazyAttentionStack(results=stack.results, flipped=True)
    np.testing.assert_array_equal(mirrored[8], stack[8][:, ::-1])
    assert stack.computed == [5, 7, 8, 5]


def test_a_viewer_attention_stack_never_waits_and_reads_ahead_once_for_all_maps(encoder):
    volume = open_image(DBT)
    pool = PlanePool(threads=2)  # as the shared pool: one read-ahead at a time, in order
    ready = []
    try:
        attention = LazyAttentionStack(encoder, volume, resolution=96, pool=pool,
                                       on_ready=lambda i, error: ready.append(("mean", i, error)))
        pca = attention.view("pca", on_ready=lambda i, error: ready.append(("pca", i, error)))
        assert attention.ahead == pca.ahead == 2
        with attention.results._computing:  # no forward pass can run now: indexing must not wait for one
            assert not attention[20].any() and not pca[20].any()  # zeros at once
            assert attention.computed == []
        assert attention.settle(30) and pca.settle(30)
        assert attention.computed == [20, 21, 19]  # shown, then one each way (no move yet): once for both maps
        assert until(lambda: {(m, i) for m, i, _ in ready} == {(m, i) for m in ("mean", "pca") for i in (19, 20, 21)})
        assert all(error is None for *_, error in ready)
        result = attention.results.peek(20)
        np.testing.assert_array_equal(attention[20], on_image_grid(result.prepared, result.map("mean")))
        assert attention.is_ready(21) and pca.is_ready(21)  # read ahead: scrolling there shows it at once
        attention[21], pca[21]  # scrolling up: the next two
        assert attention.settle(30) and pca.settle(30) and attention.computed == [20, 21, 19, 22, 23]

        results = attention.results  # the layers go away while a forward pass waits to run
        from training.evaluate import infer
        with infer._FORWARD:
            attention[30]
            assert until(lambda: results._computing.locked())  # slice 30's pass has begun, and waits
            results.close()
        assert until(lambda: ("mean", 30) in {(m, i) for m, i, _ in ready})
        (error,) = [e for m, i, e in ready if (m, i) == ("mean", 30)]
        assert isinstance(error, InferenceCancelled) and 30 not in results.computed
        assert results._computing.acquire(blocking=False)  # not left held
        results._computing.release()
    finally:
        pool.close()


def until(condition, timeout=30.0):
    """Wait for the pool's threads (the timeout only stops a hang)."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "gave up waiting"
        time.sleep(0.002)
    return True


def test_export_writes_maps_overlays_and_predictions(lcc_result, tmp_path):
    from PIL import Image

    image = open_image(LCC)
    files = export(lcc_result, tmp_path / "out", image=image)
    names = {"attention.npy", "attention_heads.npy", "rollout.npy", "pca.npy", "tissue.npy", "heatmap_lesion.npy",
             "attention.png", "pca.png", "heatmap_lesion.png", "predictions.json"}
    assert set(files) == names and all((tmp_path / "out" / name).is_file() for name in names)
    np.testing.assert_array_equal(np.load(files["attention.npy"]), lcc_result.attention)
    saved = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert saved["predictions"] == lcc_result.predictions and saved["files"]["pca.png"] == files["pca.png"]
    bare = export(lcc_result, tmp_path / "bare")  # without the image: on the encoder's input
    assert np.asarray(Image.open(bare["pca.png"])).shape[:2] == lcc_result.prepared.pixels.shape

    # The overlay colours the patch the model looks at, over the windowed image, and nothing else.
    p = lcc_result.prepared
    peaked = np.full(p.grid, 0.2 / (p.grid[0] * p.grid[1]), np.float32)
    peaked[3, 4] = 0.8
    looking = replace(lcc_result, attention=peaked, kind="last")
    overlay = np.asarray(Image.open(export(looking, tmp_path / "peak", image=image)["attention.png"]))[..., :3]
    assert overlay.shape[:2] == image.data.shape  # drawn on the whole image
    (row, col), _ = patch_placement(p)
    there = overlay[round(row + 3 * p.patch_px[0]), round(col + 4 * p.patch_px[1])].astype(int)
    elsewhere = overlay[round(row + 8 * p.patch_px[0]), round(col + 2 * p.patch_px[1])].astype(int)
    assert there[0] - there[2] > 60  # inferno's top colour (yellow) on the attended patch
    assert elsewhere[0] == elsewhere[1] == elsewhere[2]  # grey: below uniform attention, the image only


def test_cli_infer_writes_files_and_prints_one_json_object(encoder_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["infer", LCC, "--checkpoint", str(encoder_file), "--out", str(out), "--resolution", "96", "--json"])
    captured = capsys.readouterr()
    assert code == 0
    report = json.loads(captured.out)  # exactly one JSON object
    assert set(report["predictions"]["density"]) == {"A", "B", "C", "D"}
    assert 0 <= report["attention_in_tissue"] <= 1 and report["encoder"]["heads"]["lesion"]["on"] == "patch"
    assert all(Path(path).is_file() for path in report["files"].values()) and "attention.png" in report["files"]

    code = main(["infer", LCC, "--checkpoint", str(tmp_path / "missing.safetensors"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "missing.safetensors" in err
    code = main(["infer", LCC, "--checkpoint", str(encoder_file), "--out", str(out), "--all-slices"])
    err = capsys.readouterr().err
    assert code == 2 and "2D image" in err and err.count("\n") == 1


def test_cli_infer_all_slices_of_a_dbt(encoder_file, tmp_path, capsys):
    rng = np.random.default_rng(0)
    volume = np.zeros((3, 96, 72), np.uint16)
    volume[:, 10:86, :50] = 2000 + rng.integers(0, 400, (3, 76, 50))
    path = write_enhanced_dbt(tmp_path / "dbt.dcm", volume, spacing=(0.2, 0.2), slice_spacing=1.0)
    code = main(["infer", str(path), "--checkpoint", str(encoder_file), "--out", str(tmp_path / "o"),
                 "--resolution", "64", "--all-slices", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and [s["frame"] for s in report["slices"]] == [0, 1, 2]
    assert (tmp_path / "o" / "slice002_attention.png").is_file()
    mean_a = np.mean([s["predictions"]["density"]["A"] for s in report["slices"]])
    assert report["predictions"]["density"]["A"] == pytest.approx(mean_a)


def test_real_cbis_view(cbis_cases, encoder, tmp_path):
    """A real CBIS-DDSM mammogram (RLE lossless, 4560 x 2864): its tissue box and an overlay."""
    image = open_image(cbis_cases[0]["lcc"])
    result = infer_image(encoder, image, resolution=RESOLUTION)
    r0, c0, r1, c1 = result.prepared.box
    assert (r1 - r0) * (c1 - c0) < 0.9 * np.prod(image.data.shape)  # cropped to the breast
    assert result.tissue_share > 0.5 and 0 <= result.attention_in_tissue <= 1
    files = export(result, tmp_path, image=image)
    from PIL import Image

    assert max(Image.open(files["attention.png"]).size) <= 1536  # a full-field PNG, reduced
