"""The "Tissue mask" and "Sampler QA" widgets in a headless viewer: layers on the image's grid (a
mirrored right breast included), crops where the sampler put them, seeds, the naive switch, DBT
slices and pairs, the thread-worker path, the real CBIS-DDSM exam."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from dicom_factory import write_enhanced_dbt, write_ffdm
from napari_mammodino.widgets.sampler_qa import (SamplerQAWidget, box_rectangle, masked_patch_planes)
from napari_mammodino._sources import source_of
from napari_mammodino.widgets.tissue import TissueWidget, run_steps, tissue_steps
from training.dicom.io import open_file
from training.sampler.sampler import sample_images

PLUGIN = "napari-mammodino"
SPACING = (0.1, 0.1)


def breast(shape=(320, 256), radius=(0.42, 0.6), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A 12-bit breast-like image, chest wall on the left: bright half-ellipse on dark air, and its
    true mask."""
    rows, cols = shape
    rng = np.random.default_rng(seed)
    r = (np.arange(rows)[:, None] - rows / 2) / (rows * radius[0])
    c = np.arange(cols)[None, :] / (cols * radius[1])
    rho = np.hypot(r, c)
    truth = rho < 1
    texture = ndi.gaussian_filter(rng.standard_normal(shape), 4)
    tissue = 900 + 1600 * np.sqrt(np.clip(1 - rho ** 2, 0, None)) * (0.7 + 0.3 * texture / texture.std())
    pixels = np.where(truth, 300 + tissue, 300) + rng.normal(0, 12, shape)
    return np.clip(pixels, 0, 4095).astype(np.uint16), truth


@pytest.fixture
def exam(tmp_path):
    """A right and a left CC, both stored chest wall on the left (PatientOrientation A): the hanging
    protocol mirrors the right one so that the chest walls face each other."""
    folder = tmp_path / "exam"
    folder.mkdir()
    pixels, truth = breast()
    write_ffdm(folder / "rcc.dcm", pixels, view="CC", laterality="R", spacing=SPACING, PatientOrientation=["A", "R"])
    write_ffdm(folder / "lcc.dcm", pixels, view="CC", laterality="L", spacing=SPACING, PatientOrientation=["A", "L"])
    return folder, pixels, truth


def open_exam(viewer, folder):
    layers = {layer.name.split()[0]: layer for layer in viewer.open(str(folder), plugin=PLUGIN)}
    assert layers["RCC"].metadata["flipped"] and not layers["LCC"].metadata["flipped"]
    return layers


def same_grid(a, b) -> None:
    assert tuple(a.scale) == pytest.approx(tuple(b.scale))
    assert tuple(a.translate) == pytest.approx(tuple(b.translate))
    assert [str(u) for u in a.units] == [str(u) for u in b.units]


# --- tissue mask --------------------------------------------------------------------------------------

def test_tissue_mask_lies_on_the_breast_of_a_mirrored_view_and_reports_its_area(make_napari_viewer, exam):
    folder, pixels, truth = exam
    viewer = make_napari_viewer()
    views = open_exam(viewer, folder)
    widget = TissueWidget(viewer)
    for name, image in views.items():
        widget.image.value = image
        mask_layer = widget.compute()
        assert mask_layer.name == f"{image.name} tissue"
        same_grid(mask_layer, image)
        mask = np.asarray(mask_layer.data).astype(bool)
        shown = np.asarray(image.data)  # as napari draws it: mirrored for RCC
        assert mask.shape == shown.shape
        assert shown[mask].mean() > 3 * shown[~mask].mean()  # the mask is the bright breast
        expected = truth[:, ::-1] if name == "RCC" else truth
        assert np.logical_and(mask, expected).sum() / np.logical_or(mask, expected).sum() > 0.95
        # A pixel of the mask and the same pixel of the image are one place in the world (mm).
        np.testing.assert_allclose(mask_layer.data_to_world((10, 20)), image.data_to_world((10, 20)))
        area = mask.sum() * SPACING[0] * SPACING[1] / 100
        assert widget.summary.area_cm2 == pytest.approx(area)
        assert f"{area:.1f} cm²" in widget.stats.value and f"{100 * mask.mean():.1f}%" in widget.stats.value
    assert viewer.layers["RCC rcc.dcm tissue"].data[:, :40].sum() == 0  # mirrored: the chest wall is right


def dbt_volume(n=6, shape=(128, 96)) -> tuple[np.ndarray, np.ndarray]:
    """Slices whose breast outline differs slice to slice (it grows with the index), and the truths."""
    slices = [breast(shape, radius=(0.28 + 0.03 * i, 0.45), seed=i) for i in range(n)]
    return np.stack([p for p, _ in slices]), np.stack([t for _, t in slices])


def test_tissue_of_a_dbt_is_segmented_per_slice_on_demand_or_all_at_once(make_napari_viewer, tmp_path):
    volume, truth = dbt_volume()
    path = write_enhanced_dbt(tmp_path / "dbt.dcm", volume, spacing=SPACING, slice_spacing=1.0)
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(path), plugin=PLUGIN)
    viewer.dims.set_point(0, image.data_to_world([4, 0, 0])[0])
    widget = TissueWidget(viewer)
    widget.image.value = image
    source = source_of(image)
    layer = widget.compute()  # current slice only (the layer then reads its neighbours ahead)
    assert source.computed()[:1] == [4] or 4 in source.computed()
    assert widget.summary.slices == [4] and "slice 4" in widget.stats.value
    assert layer.data.shape == volume.shape
    same_grid(layer, image)
    viewer.dims.set_point(0, image.data_to_world([1, 0, 0])[0])  # scrolling segments the slice shown
    assert 1 in source.computed() and "slice 1" in widget.stats.value
    assert layer.data.settle(timeout=60)  # read ahead off the Qt thread, towards slice 0 once scrolled down
    assert {0, 1, 4} <= set(source.computed())  # (read-ahead of slice 4 not yet begun was dropped)
    for i in (1, 4):  # each slice's own outline
        mask = np.asarray(layer.data[i]).astype(bool)
        assert np.logical_and(mask, truth[i]).sum() / np.logical_or(mask, truth[i]).sum() > 0.9
    widget.scope.value = "all slices"
    progress = []
    summary = run_steps(tissue_steps(source, range(6)), lambda done, total: progress.append((done, total)))
    assert progress[-1] == (6, 6) and source.computed() == list(range(6))
    per_slice = [np.asarray(layer.data[i]).mean() for i in range(6)]
    assert summary.fraction == pytest.approx(np.mean(per_slice))
    widget.compute()
    assert "6 slices" in widget.stats.value


def test_tissue_worker_runs_in_the_background_and_completes(make_napari_viewer, exam, qtbot):
    folder, _, _ = exam
    viewer = make_napari_viewer()
    views = open_exam(viewer, folder)
    widget = TissueWidget(viewer)
    widget.image.value = views["LCC"]
    widget.start()
    assert not widget.run.enabled  # no second run while one is going
    qtbot.waitUntil(lambda: "LCC lcc.dcm tissue" in viewer.layers, timeout=20000)
    assert widget.run.enabled and widget.progress.value == widget.progress.max
    assert "cm²" in widget.stats.value


# --- sampler QA -----------------------------------------------------------------------------------

def test_crops_are_drawn_over_the_pixels_the_sampler_took_on_a_mirrored_view(make_napari_viewer, exam):
    folder, pixels, _ = exam
    viewer = make_napari_viewer()
    views = open_exam(viewer, folder)
    widget = SamplerQAWidget(viewer)
    widget.image.value = image = views["RCC"]
    widget.n_samples.value, widget.seed.value = 2, 7
    result = widget.compute()
    crops, masks = viewer.layers["RCC rcc.dcm crops"], viewer.layers["RCC rcc.dcm masked patches"]
    samples = result.samples["tissue-aware"]
    n = sum(len(s.crops) for s in samples)
    assert n == 2 * (2 + 8) and len(crops.data) == n and all(t == "rectangle" for t in crops.shape_type)
    same_grid(crops, image)
    same_grid(masks, image)
    # The CLI's records for the same seeds: the widget shows exactly what `mammodino sample` reports.
    cli = sample_images(open_file(folder / "rcc.dcm"), [7, 8])
    assert [s.record() for s in samples] == [s.record() for s in cli]
    shown = np.asarray(image.data)  # mirrored
    for (r0, c0, r1, c1), corners, fraction in zip([c.box for s in samples for c in s.crops], crops.data,
                                                  crops.features["tissue_fraction"]):
        world = np.array([crops.data_to_world(v) for v in corners])
        top, left = np.round(image.world_to_data(world.min(axis=0)) + 0.5).astype(int)
        bottom, right = np.round(image.world_to_data(world.max(axis=0)) + 0.5).astype(int)
        # back in the image layer's pixels, the rectangle holds the crop's pixels (mirrored on screen)
        np.testing.assert_array_equal(shown[top:bottom, left:right][:, ::-1], pixels[r0:r1, c0:c1])
        assert fraction >= 0.5  # tissue-aware: every crop meets the threshold
    # masked patches: on the image grid, mirrored, all on tissue, one label per masked global crop
    tissue = source_of(image).mask_plane(0).astype(bool)
    labelled = np.asarray(masks.data)
    assert labelled.shape == shown.shape and labelled.any()
    assert tissue[labelled > 0].mean() > 0.9  # patches need >= 50% tissue; most pixels are tissue
    assert set(np.unique(labelled)) - {0} == set(range(1, sum(c.masked for s in samples for c in s.crops) + 1))
    inside = np.zeros(shown.shape, bool)  # in stored orientation, every patch is inside a masked crop
    for crop in (c for s in samples for c in s.crops if c.masked):
        inside[crop.box[0]:crop.box[2], crop.box[1]:crop.box[3]] = True
    assert inside[labelled[:, ::-1] > 0].all()


def test_same_seed_same_picture_and_the_naive_switch_shows_low_tissue_crops(make_napari_viewer, tmp_path):
    # A small breast on a large detector: most of the image is air, where naive crops fall.
    pixels, _ = breast((320, 256), radius=(0.25, 0.3))
    path = write_ffdm(tmp_path / "small.dcm", pixels, view="MLO", laterality="L", spacing=SPACING)
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(path), plugin=PLUGIN)
    widget = SamplerQAWidget(viewer)
    widget.image.value = image
    widget.n_samples.value, widget.seed.value = 3, 11

    def picture():
        return ([c.copy() for c in viewer.layers["LMLO small.dcm crops"].data],
                np.asarray(viewer.layers["LMLO small.dcm masked patches"].data).copy())

    widget.compute()
    first = picture()
    widget.compute()
    again = picture()
    assert all(np.array_equal(a, b) for a, b in zip(first[0], again[0])) and np.array_equal(first[1], again[1])
    widget.seed.value = 12
    widget.compute()
    assert not all(np.array_equal(a, b) for a, b in zip(first[0], picture()[0]))

    aware = np.array(viewer.layers["LMLO small.dcm crops"].features["tissue_fraction"])
    widget.sampler.value = "naive"  # drawn already: the switch only redraws
    naive_layer = viewer.layers["LMLO small.dcm crops"]
    naive = np.array(naive_layer.features["tissue_fraction"])
    assert naive_layer.metadata["mammodino_sampler"] == "naive" and len(naive) == len(aware)
    # redrawn in place: texts and colours follow the new crops
    assert list(naive_layer.text.values) == list(naive_layer.features["label"])
    cyan = np.array([0, 229, 255, 255]) / 255
    assert [np.allclose(c, cyan) for c in naive_layer.edge_color] == list(naive_layer.features["kind"] == "global")
    assert (aware >= 0.5).all() and (naive < 0.5).mean() > 0.5
    # The histogram beside the viewer counts every crop of both samplers.
    (ax,) = widget.figure.axes
    counts = [sum(p.get_height() for p in bars) for bars in ax.containers]
    assert counts == [len(aware), len(naive)]
    assert "tissue-aware (0% < 50%)" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert widget._dock is not None  # docked beside the viewer


def test_dbt_pairs_show_the_same_boxes_and_masks_on_both_slices(make_napari_viewer, tmp_path):
    path = write_enhanced_dbt(tmp_path / "dbt.dcm", dbt_volume()[0], spacing=SPACING, slice_spacing=1.0)
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(path), plugin=PLUGIN)
    viewer.dims.set_point(0, image.data_to_world([2, 0, 0])[0])
    widget = SamplerQAWidget(viewer)
    widget.image.value = image
    widget.n_samples.value = 2
    result = widget.compute()
    samples = result.samples["tissue-aware"]
    assert all(s.pair[0] == 2 and abs(s.pair[1] - 2) == 1 for s in samples)  # anchored at the slice shown
    crops = viewer.layers[f"{image.name} crops"]
    same_grid(crops, image)
    slices = np.array([int(round(corners[0, 0])) for corners in crops.data])
    assert (slices == crops.features["slice"]).all()
    for sample in samples:
        i, j = sample.pair
        on_i = [c.box for c in sample.crops if c.slice_index == i]
        assert on_i == [c.box for c in sample.crops if c.slice_index == j]
    assert "↔" in crops.features["label"][0] and "pairs 2↔" in widget.info.value
    masks = viewer.layers[f"{image.name} masked patches"]
    assert masks.data.shape == image.data.shape
    pair_slices = {k for s in samples for k in s.pair}
    for k in range(image.data.shape[0]):
        assert np.asarray(masks.data[k]).any() == (k in pair_slices)
    planes = masked_patch_planes(samples[:1], source_of(image))
    assert np.array_equal(*(planes[k] for k in samples[0].pair))  # same masks on both slices of a pair
    widget.anchor.value = False  # free pairs: the viewer moves to a slice that holds crops
    result = widget.compute()
    shown = source_of(image).slice_index(viewer)
    assert shown in {k for s in result.samples["tissue-aware"] for k in s.pair}


def test_sampler_worker_completes_and_bad_input_is_one_line(make_napari_viewer, tmp_path, qtbot):
    from napari.utils.notifications import notification_manager

    blank = write_ffdm(tmp_path / "blank.dcm", np.full((64, 48), 500, np.uint16), laterality="L")
    pixels, _ = breast((160, 128))
    good = write_ffdm(tmp_path / "good.dcm", pixels, laterality="L")
    viewer = make_napari_viewer()
    (blank_layer,) = viewer.open(str(blank), plugin=PLUGIN)
    (good_layer,) = viewer.open(str(good), plugin=PLUGIN)
    messages = []
    notification_manager.notification_ready.connect(lambda n: messages.append(str(n.message)))
    widget = SamplerQAWidget(viewer)
    widget.image.value = blank_layer
    widget.start()
    qtbot.waitUntil(lambda: widget.run.enabled, timeout=20000)
    assert len(messages) == 1 and "no breast tissue" in messages[0] and "\n" not in messages[0]
    assert f"{blank_layer.name} crops" not in viewer.layers
    widget.image.value = good_layer
    widget.start()
    qtbot.waitUntil(lambda: f"{good_layer.name} crops" in viewer.layers, timeout=20000)
    assert widget.run.enabled and len(viewer.layers[f"{good_layer.name} crops"].data) == 2 * 10


def test_box_rectangle_maps_pixel_edges_and_mirrors_columns(make_napari_viewer, exam):
    folder, _, _ = exam
    viewer = make_napari_viewer()
    views = open_exam(viewer, folder)
    rcc, lcc = source_of(views["RCC"]), source_of(views["LCC"])
    width = rcc.shape[1]
    np.testing.assert_array_equal(box_rectangle((10, 20, 30, 60), lcc),
                                  [[9.5, 19.5], [9.5, 59.5], [29.5, 59.5], [29.5, 19.5]])
    np.testing.assert_array_equal(box_rectangle((10, 20, 30, 60), rcc)[:, 1],
                                  np.array([width - 60, width - 20, width - 20, width - 60]) - 0.5)
    # In the world: the mirrored right CC's box sits where the left CC's sits, mirrored about the
    # centre line between them (both images are the same picture, one mirrored).
    outer_on_right = views["RCC"].data_to_world(box_rectangle((10, 20, 30, 60), rcc)[0])  # top-left corner
    outer_on_left = views["LCC"].data_to_world(box_rectangle((10, 20, 30, 60), lcc)[1])  # top-right corner
    centre = (views["RCC"].data_to_world((0, width - 0.5))[1] + views["LCC"].data_to_world((0, -0.5))[1]) / 2
    assert outer_on_right[0] == outer_on_left[0]
    assert centre - outer_on_right[1] == pytest.approx(outer_on_left[1] - centre)


def test_real_cbis_exam_crops_stay_on_the_breast(make_napari_viewer, cbis_cases):
    from napari_mammodino._sample_data import cbis_benign_exam

    viewer = make_napari_viewer()
    for data, kwargs, _ in cbis_benign_exam():
        viewer.add_image(data, **kwargs)
    image = next(layer for layer in viewer.layers if layer.name.startswith("RCC"))
    widget = SamplerQAWidget(viewer)
    widget.image.value = image
    widget.n_samples.value = 1
    result = widget.compute()
    assert result.low_share("tissue-aware") == 0 and result.low_share("naive") > 0
    crops = viewer.layers[f"{image.name} crops"]
    tissue = source_of(image).mask_plane(0).astype(bool)
    for corners, fraction in zip(crops.data, crops.features["tissue_fraction"]):
        (top, left), (bottom, right) = corners.min(axis=0) + 0.5, corners.max(axis=0) + 0.5
        assert tissue[int(top):int(bottom), int(left):int(right)].mean() == pytest.approx(fraction, abs=1e-6)


def test_both_widgets_dock_from_the_plugin_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    widgets = [viewer.window.add_plugin_dock_widget(PLUGIN, title)[1] for title in ("Tissue mask", "Sampler QA")]
    assert [type(w) for w in widgets] == [TissueWidget, SamplerQAWidget]
    pixels, truth = breast((160, 128))
    layer = viewer.add_image(pixels, name="mine", scale=SPACING, units="mm")  # any image layer, not only ours
    assert all(w.image.value is layer for w in widgets)  # they follow the viewer they were docked in
    mask = np.asarray(widgets[0].compute().data).astype(bool)
    assert np.logical_and(mask, truth).sum() / np.logical_or(mask, truth).sum() > 0.95
    assert widgets[0].summary.area_cm2 == pytest.approx(mask.sum() * 0.01 / 100)  # mm from the layer's scale
    assert widgets[1].compute().low_share("tissue-aware") == 0


def test_a_computation_ends_in_its_result_a_one_line_refusal_or_cancelled():
    from napari_mammodino._workers import Cancelled, Refused, guarded, settle
    from training.errors import MammoInputError

    class Stopped(Exception):
        pass

    def steps(end):
        yield 1, 2
        if isinstance(end, BaseException):
            raise end
        return end

    assert run_steps(guarded(steps(7))) == 7
    refused = run_steps(guarded(steps(MammoInputError("no tissue\nin this image"))))
    assert refused == Refused("no tissue in this image")
    assert isinstance(run_steps(guarded(steps(Stopped()), cancelled_by=(Stopped,))), Cancelled)
    with pytest.raises(Stopped):  # a bug keeps its traceback
        run_steps(guarded(steps(Stopped())))
    said = []
    assert settle(7, done=lambda x: x + 1) == 8
    settle(refused, done=said.append, refused=lambda r: said.append(r.message))
    settle(Cancelled(), done=said.append, cancelled=lambda: said.append("cancelled"))
    assert said == ["no tissue in this image", "cancelled"]
