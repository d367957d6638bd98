"""The Inference widget's Find box in a headless viewer: a sentence's patch map as a layer placed on the
image like the attention maps (a mirrored view's mirrored), the zero-shot probabilities in the label, a
DBT's slice on screen (and only there), a newer query superseding a running one, and the user mistakes
(an empty sentence, a checkpoint without a text tower, a missing demo CLIP model) as one line in the
widget's status."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from qtpy.QtCore import Qt

from napari_mammodino.widgets.inference import InferenceWidget

PLUGIN = "napari-mammodino"
SAMPLE = "sample_data"
RESOLUTION = 192
SENTENCE = "spiculated mass in the upper outer quadrant"
PLAIN_ENCODER = "training/weights/mammodino-demo.safetensors"  # an image encoder, no text tower

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory, one_torch_thread):
    """A tiny image-report model trained for 3 steps on the sample data (the demo CLIP model is not
    shipped yet, and the tests never rely on it)."""
    from training.ssl.clip_train import ClipConfig, train_clip

    out = tmp_path_factory.mktemp("find") / "clip"
    summary = train_clip(f"{SAMPLE}/labels.csv", out, ClipConfig(steps=3, batch_size=4, width=32, depth=1, heads=2,
                                                                 embed_dim=32, save_every=3), progress=False)
    return summary["checkpoint"]


def widget_for(viewer, checkpoint) -> InferenceWidget:
    widget = InferenceWidget(viewer)
    widget.use_checkpoint(str(checkpoint))
    widget.resolution.setValue(RESOLUTION)
    return widget


def find(widget, qtbot, sentence, enter=False):
    widget.finder.text.setText(sentence)
    if enter:
        qtbot.keyClick(widget.finder.text, Qt.Key.Key_Return)
    else:
        widget.finder.button.click()
    assert widget.finder.task is not None  # running in a worker, not here
    qtbot.waitUntil(lambda: widget.finder.task is None, timeout=60000)


def test_find_places_the_map_on_the_patches_and_gives_the_probabilities(make_napari_viewer, qtbot, clip_model):
    viewer = make_napari_viewer()
    (image,) = viewer.open(f"{SAMPLE}/exam/RCC.dcm", plugin=PLUGIN)
    widget = widget_for(viewer, clip_model)
    find(widget, qtbot, SENTENCE, enter=True)  # Enter in the box runs it
    assert widget.message.text() == ""
    layer = viewer.layers[f"find: {SENTENCE}"]
    found = widget.finder.found
    prepared = found.prepared
    assert found.sentence == SENTENCE and prepared.frame is None
    assert layer.data.shape == prepared.grid
    np.testing.assert_allclose(layer.data, found.scores)
    assert layer.colormap.name == "inferno" and layer.blending == "additive" and layer.opacity == pytest.approx(0.5)
    spacing = np.asarray(image.scale)
    np.testing.assert_allclose(spacing, [0.32, 0.32])  # the sample's PixelSpacing, in mm
    assert tuple(layer.scale) == pytest.approx(tuple(spacing * np.asarray(prepared.patch_px)))
    assert tuple(layer.translate) == pytest.approx(tuple(np.asarray(image.translate)
                                                         + spacing * np.asarray(prepared.patch_origin_px())))
    # Patch (0, 0)'s outer corner is the crop box's corner, the last patch's the box's far corner.
    r0, c0, r1, c1 = prepared.box
    h, w = prepared.grid
    np.testing.assert_allclose(layer.data_to_world((-0.5, -0.5)), image.data_to_world((r0 - 0.5, c0 - 0.5)), atol=1e-9)
    np.testing.assert_allclose(layer.data_to_world((h - 0.5, w - 0.5)), image.data_to_world((r1 - 0.5, c1 - 0.5)),
                               atol=1e-9)
    assert [str(u) for u in layer.units] == [str(u) for u in image.units]
    # The label: zero-shot probabilities of every density class, and the similarity.
    lines = widget.finder.label.text().splitlines()
    density = next(line for line in lines if line.startswith("density:"))
    for name, p in found.probabilities["density"].items():
        assert f"{name} {p:.2f}" in density
    assert set(found.probabilities["density"]) == {"A", "B", "C", "D"}
    assert any(line.startswith("lesion type:") for line in lines)
    assert f"similarity {found.similarity:.2f}" in lines[-1]
    assert viewer.layers.selection.active is image and widget.image.currentData() is image  # the image stays chosen

    # The same sentence again updates its layer; Run keeps it (a Find is not an inference map).
    find(widget, qtbot, SENTENCE)
    assert [la.name for la in viewer.layers] == [image.name, f"find: {SENTENCE}"]
    assert viewer.layers[f"find: {SENTENCE}"] is layer
    widget.compute()
    assert f"find: {SENTENCE}" in viewer.layers and f"{image.name} attention" in viewer.layers


def test_a_view_the_hanging_protocol_mirrored_gets_a_mirrored_map(make_napari_viewer, qtbot, clip_model, tmp_path):
    ds = pydicom.dcmread(f"{SAMPLE}/exam/RCC.dcm")  # the RCC stored mirrored (chest wall on the left)
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:, ::-1]).tobytes()
    ds.PatientOrientation = ["A", "R"]
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "RCC_mirrored.dcm")
    shutil.copy(f"{SAMPLE}/exam/LCC.dcm", tmp_path / "LCC.dcm")
    viewer = make_napari_viewer()
    image = next(la for la in viewer.open(str(tmp_path), plugin=PLUGIN) if la.name.startswith("RCC"))
    assert image.metadata["flipped"]
    widget = widget_for(viewer, clip_model)
    widget.select_image(image)
    find(widget, qtbot, SENTENCE)
    layer = viewer.layers[f"find: {SENTENCE}"]
    found = widget.finder.found
    np.testing.assert_allclose(layer.data, found.scores[:, ::-1])
    r0, c0, r1, c1 = found.prepared.box
    h, w = found.prepared.grid
    width = found.prepared.image_shape[1]  # the box mirrored: columns [width - c1, width - c0) on the layer
    np.testing.assert_allclose(layer.data_to_world((-0.5, -0.5)), image.data_to_world((r0 - 0.5, width - c1 - 0.5)),
                               atol=1e-9)
    np.testing.assert_allclose(layer.data_to_world((h - 0.5, w - 0.5)),
                               image.data_to_world((r1 - 0.5, width - c0 - 0.5)), atol=1e-9)


def test_a_new_query_supersedes_a_running_one(make_napari_viewer, qtbot, clip_model):
    viewer = make_napari_viewer()
    viewer.open(f"{SAMPLE}/exam/RCC.dcm", plugin=PLUGIN)
    widget = widget_for(viewer, clip_model)
    widget.finder.text.setText("There is a mass.")
    widget.finder.start()
    find(widget, qtbot, "There are grouped calcifications.")
    qtbot.wait(200)  # the first worker's end, if it had any effect, would be in by now
    assert "find: There are grouped calcifications." in viewer.layers
    assert "find: There is a mass." not in viewer.layers
    assert widget.finder.found.sentence == "There are grouped calcifications."


def test_dbt_finds_on_the_slice_on_screen(make_napari_viewer, qtbot, clip_model):
    viewer = make_napari_viewer()
    (image,) = viewer.open(f"{SAMPLE}/dbt/LCC_dbt.dcm", plugin=PLUGIN)
    viewer.dims.set_point(0, image.data_to_world([7, 0, 0])[0])
    widget = widget_for(viewer, clip_model)
    find(widget, qtbot, SENTENCE)
    layer = viewer.layers[f"find: {SENTENCE}"]
    prepared = widget.finder.found.prepared
    assert prepared.frame == viewer.dims.current_step[0] == 7
    assert layer.data.shape == (1, *prepared.grid)
    np.testing.assert_allclose(layer.data_to_world((0, -0.5, -0.5)),
                               image.data_to_world((7, prepared.box[0] - 0.5, prepared.box[1] - 0.5)), atol=1e-9)
    assert viewer.dims.current_step[0] == 7  # adding the layer did not move the viewer
    assert "slice 7" in widget.finder.label.text()
    assert not layer._slice.empty and np.asarray(layer._slice.image.view).shape == prepared.grid
    viewer.dims.set_point(0, image.data_to_world([30, 0, 0])[0])
    assert layer._slice.empty  # the map of slice 7 is not drawn over slice 30


def one_line_and_no_layer(widget, viewer, qtbot, expected):
    qtbot.waitUntil(lambda: bool(widget.message.text()), timeout=60000)
    message = widget.message.text()
    assert expected in message and "\n" not in message and "Traceback" not in message
    assert len(viewer.layers) == 1 and widget.finder.label.text() == ""


def test_user_mistakes_are_one_line_in_the_status(make_napari_viewer, qtbot, clip_model, tmp_path, monkeypatch):
    import training.ssl.clip

    viewer = make_napari_viewer()
    viewer.open(f"{SAMPLE}/exam/RCC.dcm", plugin=PLUGIN)
    widget = widget_for(viewer, clip_model)
    widget.finder.text.setText("   ")  # an empty sentence: refused before any worker starts
    assert widget.finder.start() is None
    one_line_and_no_layer(widget, viewer, qtbot, "type a sentence")

    widget.use_checkpoint(PLAIN_ENCODER)  # an image encoder without a text tower
    widget.finder.text.setText(SENTENCE)
    assert widget.finder.start() is not None and widget.message.text() == ""
    one_line_and_no_layer(widget, viewer, qtbot, "no text tower")

    monkeypatch.setattr(training.ssl.clip, "DEMO_CLIP", tmp_path / "missing.safetensors")
    widget.use_checkpoint("")  # the demo CLIP model, missing here
    widget.finder.start()
    one_line_and_no_layer(widget, viewer, qtbot, "demo CLIP model is missing")

    widget.finder.text.setText(SENTENCE)  # and the widget still works
    widget.use_checkpoint(clip_model)
    widget.finder.start()
    qtbot.waitUntil(lambda: f"find: {SENTENCE}" in viewer.layers, timeout=60000)
    assert widget.message.text() == ""
