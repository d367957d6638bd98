"""The napari reader through a headless viewer: mm scale, DICOM window, laziness, bad files."""


import numpy as np
import pytest

from napari_mammodino._reader import napari_get_reader
from dicom_factory import labelled_volume, ramp, truncate, write_enhanced_dbt, write_ffdm, write_slice_series

PLUGIN = "napari-mammodino"


def test_get_reader_claims_dicom_by_marker_and_never_raises(tmp_path):
    dicom = write_ffdm(tmp_path / "no_extension", ramp((32, 24)))
    (tmp_path / "notes.txt").write_text("not an image")
    assert callable(napari_get_reader(str(dicom)))
    assert callable(napari_get_reader(str(tmp_path)))  # a folder holding DICOM
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None
    assert napari_get_reader(str(tmp_path / "missing.dcm")) is None
    assert napari_get_reader([str(dicom), str(tmp_path / "notes.txt")]) is None
    assert napari_get_reader(12345) is None  # nonsense in, None out, no exception


def test_ffdm_opens_in_mm_with_the_dicom_window(make_napari_viewer, tmp_path):
    path = write_ffdm(tmp_path / "lcc.dcm", ramp((64, 48)), window=(1000, 801), spacing=(0.07, 0.065),
                      view="CC", laterality="L")
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin=PLUGIN)
    (layer,) = layers
    assert layer.name.startswith("LCC")
    assert tuple(layer.scale) == pytest.approx((0.07, 0.065))
    assert [str(u) for u in layer.units] == ["millimeter", "millimeter"]
    # DICOM LINEAR window 1000/801: the ramp runs over c - 0.5 -+ (w - 1) / 2.
    assert tuple(layer.contrast_limits) == pytest.approx((599.5, 1399.5))
    assert layer.colormap.name == "gray"


def _screenshot_of(viewer, path):
    viewer.layers.clear()
    viewer.open(str(path), plugin=PLUGIN)
    viewer.reset_view()
    return viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)


def test_monochrome1_twin_looks_exactly_like_monochrome2(make_napari_viewer, tmp_path):
    stored = ramp((64, 48), top=4095)
    m2 = write_ffdm(tmp_path / "m2.dcm", stored, window=(1500, 2000))
    m1 = write_ffdm(tmp_path / "m1.dcm", (4095 - stored).astype(np.uint16), photometric="MONOCHROME1",
                    window=(4095 - 1500, 2000))
    viewer = make_napari_viewer(show=True)
    shot2, shot1 = _screenshot_of(viewer, m2), _screenshot_of(viewer, m1)
    assert shot2.std() > 10  # the image is really drawn
    assert np.abs(shot2 - shot1).max() <= 2


def test_sigmoid_window_is_drawn_as_dicom_defines_it(make_napari_viewer, tmp_path):
    path = write_ffdm(tmp_path / "sig.dcm", ramp((64, 48)), window=(2000, 1000), voi_function="SIGMOID")
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin=PLUGIN)
    lo, hi = layer.contrast_limits
    x = np.linspace(lo, hi, 9)
    expected = 1 / (1 + np.exp(-4 * (x - 2000) / 1000))  # PS3.3 C.11.2.1.3.1
    drawn = layer.colormap.map((x - lo) / (hi - lo))[:, 0]
    np.testing.assert_allclose(drawn, expected, atol=2e-3)


def test_dbt_decodes_the_slice_shown_first_off_the_qt_thread_then_reads_ahead(make_napari_viewer, tmp_path,
                                                                              monkeypatch):
    import threading

    import training.dicom.image

    decoded, threads = [], set()
    original = training.dicom.image.FrameSource.read

    def spy(self, index):
        decoded.append(index)
        threads.add(threading.current_thread().name)
        return original(self, index)

    monkeypatch.setattr(training.dicom.image.FrameSource, "read", spy)
    path = write_enhanced_dbt(tmp_path / "dbt", labelled_volume(60), window=(3000, 6000),
                              spacing=(0.1, 0.1), slice_spacing=1.0)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin=PLUGIN)
    shown = viewer.dims.current_step[0]
    assert decoded[:1] == [shown]  # nothing decoded before the slice on screen
    assert layer.visible and layer.ndim == 3 and layer.data.keep == 8
    assert tuple(layer.scale) == pytest.approx((1.0, 0.1, 0.1))
    assert layer.data.settle(timeout=60)
    assert sorted(decoded) == list(range(shown - 3, shown + 4))  # 6 ahead, both ways before any move

    decoded.clear()
    viewer.dims.set_current_step(0, 7)  # a jump back: slice 7 now, then 6, 5, ... read ahead
    assert decoded[:1] == [7]
    assert int(np.asarray(layer._slice.image.raw).min()) // 100 == 7  # slice 7 is the one on screen
    assert layer.data.settle(timeout=60) and sorted(decoded) == [1, 2, 3, 4, 5, 6, 7]
    decoded.clear()
    viewer.dims.set_current_step(0, 6)  # scrolling on: the slice is ready, one more is read ahead
    assert int(np.asarray(layer._slice.image.raw).min()) // 100 == 6
    assert layer.data.settle(timeout=60) and decoded == [0]
    assert threads == {"mammodino-planes"}  # never on the Qt thread


def test_shuffled_series_folder_opens_as_a_volume_in_position_order(make_napari_viewer, tmp_path):
    write_slice_series(tmp_path / "series", labelled_volume(8), slice_spacing=1.5)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(tmp_path / "series"), plugin=PLUGIN)
    assert layer.data.shape == (8, 64, 48)
    assert tuple(layer.scale) == pytest.approx((1.5, 0.1, 0.1))
    firsts = [int(layer.data[i].min()) // 100 for i in range(8)]
    assert firsts == list(range(8))


def test_claimed_but_unreadable_file_notifies_and_napari_goes_on(make_napari_viewer, tmp_path):
    from napari.utils.notifications import notification_manager

    path = truncate(write_ffdm(tmp_path / "cut.dcm", ramp((64, 48))), -1000)
    messages = []
    notification_manager.notification_ready.connect(lambda n: messages.append(str(n.message)))
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin=PLUGIN)
    assert len(viewer.layers) == 0
    assert len(messages) == 1 and "shorter than the header says" in messages[0]
    ok = write_ffdm(tmp_path / "ok.dcm", ramp((64, 48)))
    assert len(viewer.open(str(ok), plugin=PLUGIN)) == 1  # and the viewer still works


def test_a_dropped_dbt_series_folder_opens_with_ours_once_it_is_the_preferred_reader(
        make_napari_viewer, tmp_path, monkeypatch):
    """napari's builtins also claim folders and .dcm files, so a drop asks which reader to use until
    a preference says ours (the README's recipe); then the drop opens the series with ours, no dialog."""
    from napari.errors import MultipleReaderError
    from napari.settings import get_settings
    from qtpy.QtCore import QMimeData, QPointF, Qt, QUrl
    from qtpy.QtGui import QDropEvent

    import napari._qt.qt_viewer

    series = tmp_path / "exam" / "RCC_dbt"
    write_slice_series(series, labelled_volume(8), slice_spacing=1.5)
    viewer = make_napari_viewer()
    with pytest.raises(MultipleReaderError):  # without the preference napari must ask
        viewer.open(str(series), plugin=None)  # None: what a drop does (the default is napari's builtins)

    def asked(*args, **kwargs):
        raise AssertionError("napari asked which reader to use")

    monkeypatch.setattr(napari._qt.qt_viewer, "handle_gui_reading", asked)
    settings = get_settings().plugins
    monkeypatch.setattr(settings, "extension2reader",
                        {**settings.extension2reader, "*.dcm": PLUGIN, f"{tmp_path}/exam/*/": PLUGIN})
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(series))])
    drop = QDropEvent(QPointF(5, 5), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                      Qt.KeyboardModifier.NoModifier)
    viewer.window._qt_viewer.dropEvent(drop)
    (layer,) = viewer.layers
    assert layer.data.shape == (8, 64, 48) and type(layer.data).__name__ == "FrameStack"
    assert tuple(layer.scale) == pytest.approx((1.5, 0.1, 0.1))
    assert layer.data.settle(timeout=60)
