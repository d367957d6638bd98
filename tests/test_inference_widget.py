"""The "Inference" widget in a headless viewer: attention and PCA layers on the image in mm (a view the
hanging protocol mirrored included), lazy per-slice attention of a DBT, a checkpoint that does not
load, the thread-worker path, and what the overlay looks like on screen."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest

from napari_mammodino._workers import Cancelled
from napari_mammodino.widgets.inference import InferenceWidget, inference_job
from training.evaluate.infer import display_limits, on_image_grid, times_uniform
from training.progress import run_steps

PLUGIN = "napari-mammodino"
SAMPLE = "sample_data"
ENCODER = "random:tiny/16"
RESOLUTION = 192  # 12 x ~8 patches of 16 px: fast, and still a grid to place


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def widget_for(viewer, resolution=RESOLUTION, spec=ENCODER) -> InferenceWidget:
    widget = InferenceWidget(viewer)
    widget.checkpoint.setText(spec)
    widget.resolution.setValue(resolution)
    return widget


def patch_centre_px(prepared, i, j, flipped):
    """Where patch (i, j) of a map as the layer shows it lies on the image layer's pixels."""
    r0, c0, r1, c1 = prepared.box
    h, w = prepared.grid
    j_stored = w - 1 - j if flipped else j
    row = r0 - 0.5 + (i + 0.5) * prepared.patch_px[0]
    col = c0 - 0.5 + (j_stored + 0.5) * prepared.patch_px[1]
    return row, (prepared.image_shape[1] - 1 - col) if flipped else col


@pytest.fixture
def mirrored_exam(tmp_path):
    """Two exams (RCC + LCC): the sample RCC as stored (not mirrored when hung), and the same view
    stored mirrored (chest wall on the left, PatientOrientation A\\R), which the hanging protocol
    mirrors back."""
    folder, other = tmp_path / "exam", tmp_path / "mirrored"
    folder.mkdir()
    other.mkdir()
    shutil.copy(f"{SAMPLE}/exam/RCC.dcm", folder / "RCC.dcm")
    ds = pydicom.dcmread(f"{SAMPLE}/exam/RCC.dcm")
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:, ::-1]).tobytes()
    ds.PatientOrientation = ["A", "R"]
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(other / "RCC_mirrored.dcm")
    shutil.copy(f"{SAMPLE}/exam/LCC.dcm", folder / "LCC.dcm")
    shutil.copy(f"{SAMPLE}/exam/LCC.dcm", other / "LCC.dcm")
    return folder, other


def test_attention_and_pca_layers_sit_on_the_patches_they_describe(make_napari_viewer, mirrored_exam):
    folder, other = mirrored_exam
    viewer = make_napari_viewer()
    views = {layer.name.split()[0]: layer for layer in viewer.open(str(folder), plugin=PLUGIN)}
    mirrored = next(la for la in viewer.open(str(other), plugin=PLUGIN) if la.name.startswith("RCC"))
    widget = widget_for(viewer)
    centres = {}
    for image in (views["RCC"], views["LCC"]):
        widget.select_image(image)
        attention, pca = widget.compute()
        result = widget.result
        h, w = result.grid
        assert attention.data.shape == (h, w) and pca.data.shape == (h, w, 3) and pca.rgb
        assert attention.colormap.name == "inferno" and attention.blending == "additive"
        np.testing.assert_allclose(attention.data, times_uniform(result.attention))
        assert tuple(attention.contrast_limits) == pytest.approx(display_limits(attention.data))
        for layer in (attention, pca):
            assert tuple(layer.scale) == pytest.approx(tuple(np.multiply(image.scale, result.prepared.patch_px)))
            assert [str(u) for u in layer.units] == [str(u) for u in image.units]
            for i, j in ((0, 0), (h - 1, w - 1), (h // 2, 1)):
                np.testing.assert_allclose(layer.data_to_world((i, j)),
                                           image.data_to_world(patch_centre_px(result.prepared, i, j, False)),
                                           atol=1e-9)
        assert f"{image.name} attention" in viewer.layers and "attention in tissue" in widget.results.text()
        centres[image.name] = np.array([attention.data_to_world((0, 0)), attention.data_to_world((h - 1, w - 1))])

    # The mirrored file, hung mirrored: the same breast on screen, so its maps must cover the same mm.
    assert mirrored.metadata["flipped"] and not views["RCC"].metadata["flipped"]
    assert tuple(mirrored.translate) == pytest.approx(tuple(views["RCC"].translate))
    widget.select_image(mirrored)
    attention, pca = widget.compute()
    result = widget.result
    h, w = result.grid
    for i, j in ((0, 0), (h - 1, w - 1), (3, w - 2)):
        np.testing.assert_allclose(attention.data_to_world((i, j)),
                                   mirrored.data_to_world(patch_centre_px(result.prepared, i, j, True)), atol=1e-9)
    np.testing.assert_allclose(attention.data, times_uniform(result.attention)[:, ::-1])  # the map mirrored too
    np.testing.assert_allclose(pca.data, result.pca[:, ::-1])
    spacing = float(views["RCC"].scale[-1])
    first, last = centres[views["RCC"].name]
    assert np.abs(attention.data_to_world((0, 0)) - first).max() <= spacing
    assert np.abs(attention.data_to_world((h - 1, w - 1)) - last).max() <= spacing


def test_modes_replace_the_layers_and_the_opacity_slider_drives_them(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open(f"{SAMPLE}/exam/LCC.dcm", plugin=PLUGIN)
    widget = widget_for(viewer)
    widget.select_image(layers[0])
    widget.mode.setCurrentText("per head")
    added = widget.compute()
    heads = widget.result.head_attention.shape[0]
    assert [layer.name.split(" ", 2)[-1] for layer in added] == [f"attention head {k}" for k in range(heads)] + \
        ["features PCA"]
    assert [layer.visible for layer in added[:heads]] == [True] + [False] * (heads - 1)
    widget.mode.setCurrentText("rollout")
    added = widget.compute()
    assert [la.name for la in viewer.layers] == [layers[0].name, f"{layers[0].name} attention rollout",
                                                 f"{layers[0].name} features PCA"]
    assert widget.result.rollout is not None
    widget.opacity.setValue(30)
    assert added[0].opacity == pytest.approx(0.3) and added[1].opacity == pytest.approx(0.7)  # PCA keeps its own


def test_dbt_attention_is_computed_in_the_background_and_read_ahead_as_the_user_scrolls(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    (image,) = viewer.open(f"{SAMPLE}/dbt/LCC_dbt.dcm", plugin=PLUGIN)
    n = image.data.shape[0]

    def go_to(index):
        viewer.dims.set_point(0, image.data_to_world([index, 0, 0])[0])

    def shows(index):  # what napari draws now is slice `index`'s map on its grid
        found = widget.slices.peek(index)
        view = np.asarray(attention._slice.image.view)
        return found is not None and np.array_equal(view, on_image_grid(found.prepared, found.map("mean")))

    go_to(7)
    widget = widget_for(viewer, resolution=128)
    widget.select_image(image)
    attention, pca = widget.compute()
    assert attention.data.shape == image.data.shape and pca.data.shape == (*image.data.shape, 3)
    assert tuple(attention.scale) == pytest.approx(tuple(image.scale))
    assert tuple(attention.translate) == pytest.approx(tuple(image.translate))
    assert widget.slices.computed[0] == 7 and widget.result.frame == 7  # the slice on screen, first
    qtbot.waitUntil(lambda: shows(7), timeout=20000)  # drawn on the pool, then the layer refreshed
    assert attention.data.settle(20)
    assert widget.slices.computed == [7, 8, 6]  # and one slice each way read ahead (no scroll yet)

    with widget.slices._computing:  # hold every forward pass: scrolling must not wait for one
        go_to(30)
        assert not np.asarray(attention._slice.image.view).any()  # nothing there yet
        assert "slice 30: computing" in widget.results.text()
    qtbot.waitUntil(lambda: shows(30) and widget.result.frame == 30, timeout=20000)  # refreshed by itself
    assert "slice 30" in widget.results.text()
    assert attention.data.settle(20)
    assert widget.slices.computed == [7, 8, 6, 30, 31, 32]  # two ahead in the scroll direction, no other slice

    go_to(31)  # read ahead: on screen at once, and the next one read ahead behind it
    assert shows(31) and widget.result.frame == 31
    qtbot.waitUntil(lambda: widget.slices.computed[-1] == 33, timeout=20000)
    go_to(7)  # back: from the cache
    assert 7 in widget.slices.computed and widget.result.frame == 7
    assert widget.slices.computed.count(7) == 1 and n == 42
    assert not pca.data.cached()  # a hidden map computes nothing


def test_late_slices_of_replaced_layers_are_ignored_and_their_queue_dropped(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    (image,) = viewer.open(f"{SAMPLE}/dbt/LCC_dbt.dcm", plugin=PLUGIN)
    viewer.dims.set_point(0, image.data_to_world([7, 0, 0])[0])
    widget = widget_for(viewer, resolution=128)
    widget.select_image(image)
    old, _ = widget.compute()
    old_slices = widget.slices
    with old_slices._computing:  # the old layers' slices wait to be computed ...
        viewer.dims.set_point(0, image.data_to_world([20, 0, 0])[0])
        assert old.data.pending()
        new, _ = widget.compute()  # ... when a new Run replaces them: their queue is dropped
        assert old not in viewer.layers and widget.slices is not old_slices
    assert old.data.settle(20) and 20 not in old_slices.computed  # stopped, not computed for nobody
    qtbot.waitUntil(lambda: np.asarray(new._slice.image.view).max() > 1, timeout=20000)  # the new run shows
    assert widget.message.text() == ""  # the old run's cancelled slices said nothing


def test_a_broken_checkpoint_is_one_message_not_a_crash(make_napari_viewer, tmp_path, qtbot):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 64)
    viewer = make_napari_viewer()
    layers = viewer.open(f"{SAMPLE}/exam/LCC.dcm", plugin=PLUGIN)
    widget = widget_for(viewer)
    widget.use_checkpoint(str(bad))
    assert widget.compute() is None
    assert "broken.safetensors" in widget.message.text() and "\n" not in widget.message.text()
    assert len(viewer.layers) == 1 and widget.run_button.isEnabled()
    widget.start()  # the worker path says the same
    assert widget.message.text() == ""
    qtbot.waitUntil(lambda: widget.run_button.isEnabled() and bool(widget.message.text()), timeout=20000)
    assert "broken.safetensors" in widget.message.text() and len(viewer.layers) == 1
    widget.use_checkpoint("random:tiny/16")  # and the widget still works
    assert len(widget.compute()) == 2 and widget.message.text() == ""
    assert layers[0].name in widget.image.currentText()


def test_worker_runs_in_the_background_and_cancel_stops_it(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    (image,) = viewer.open(f"{SAMPLE}/exam/LCC.dcm", plugin=PLUGIN)
    widget = widget_for(viewer)
    widget.start()
    assert not widget.run_button.isEnabled() and widget.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: f"{image.name} attention" in viewer.layers, timeout=20000)
    assert widget.run_button.isEnabled() and widget.progress.value() == widget.progress.maximum()
    files = widget.export_to(tmp_path / "export")
    assert {"attention.png", "pca.png", "attention.npy", "predictions.json"} <= set(files)
    # Cancel: the job stops before it produces anything, and the widget is ready again.
    for layer in widget.layers:
        viewer.layers.remove(layer)
    widget.start()
    widget.cancel()
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=20000)
    assert widget.results.text() == "cancelled" and len(viewer.layers) == 1
    assert isinstance(run_steps(inference_job(widget._make_request(), widget._load, widget._stop)), Cancelled)


def test_the_overlay_shows_on_screen(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    (image,) = viewer.open(f"{SAMPLE}/exam/LCC.dcm", plugin=PLUGIN)
    widget = widget_for(viewer)
    attention, _ = widget.compute()
    viewer.reset_view()
    with_overlay = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    attention.visible = False
    without = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    added = with_overlay - without
    glowing = added.max(-1) > 12
    # Every patch well above uniform attention glows on screen (a random model has a few), and only
    # patches above uniform do.
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    patch_on_screen = np.prod(attention.scale) * camera.zoom ** 2  # screen pixels per patch
    lo, hi = attention.contrast_limits
    strong, above = (attention.data > lo + 0.3 * (hi - lo)).sum(), (attention.data > lo).sum()
    assert strong >= 1
    assert 0.8 * strong * patch_on_screen <= glowing.sum() <= 1.1 * above * patch_on_screen
    assert (added[glowing].max(-1) - added[glowing].min(-1)).mean() > 10  # a colour map, not a grey veil
    assert (added >= -2).all()  # additive blending: it only brightens the image


def test_the_plugin_menu_opens_the_widget(make_napari_viewer):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Inference")
    assert isinstance(widget, InferenceWidget) and widget.spec() is None  # the demo encoder by default
    widget.use_checkpoint("/runs/pretrain/checkpoints/last.safetensors")  # what the jobs widget hands over
    assert widget.spec() == "/runs/pretrain/checkpoints/last.safetensors"


def test_task_heads_give_named_predictions_and_a_heatmap_layer(make_napari_viewer, tmp_path):
    from training.evaluate.encoder import Encoder, TaskHead, random_encoder, save_encoder

    base = random_encoder("tiny/16")
    heads = {"density": TaskHead(2 * base.embed_dim, ["A", "B", "C", "D"]),
             "lesion": TaskHead(base.embed_dim, ["no", "yes"], on="patch")}
    path = save_encoder(tmp_path / "heads.safetensors", Encoder(base.backbone, heads))
    viewer = make_napari_viewer()
    (image,) = viewer.open(f"{SAMPLE}/exam/LCC.dcm", plugin=PLUGIN)
    widget = widget_for(viewer)
    widget.use_checkpoint(str(path))
    attention, pca, heatmap = widget.compute()
    assert heatmap.name == f"{image.name} lesion heatmap" and heatmap.data.shape == attention.data.shape
    np.testing.assert_allclose(heatmap.data, widget.result.heatmaps["lesion"])
    assert tuple(heatmap.translate) == pytest.approx(tuple(attention.translate))
    probabilities = widget.result.predictions["density"]
    line = next(line for line in widget.results.text().splitlines() if line.startswith("density:"))
    for name, p in probabilities.items():
        assert f"{name} {100 * p:.0f}%" in line
