"""What a radiologist sees (to_display) follows DICOM PS3.3 C.11.2, and a viewer given only contrast
limits, a level curve and an inversion flag (viewer_display) draws the very same picture."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_factory import labelled_volume, ramp, write_enhanced_dbt, write_ffdm
from training.dicom.display import to_display, viewer_display
from training.dicom.io import open_file

TOP = 4095  # 12 bits stored
GREY_LEVEL = 1 / 255  # what an 8-bit screen can tell apart


def dicom_window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR), C.11.2.1.3.2 (LINEAR_EXACT) and C.11.2.1.3.1 (SIGMOID), output in [0, 1]."""
    x = np.asarray(x, dtype=np.float64)
    if function == "SIGMOID":
        return 1 / (1 + np.exp(-4 * (x - center) / width))
    if function == "LINEAR":
        center, width = center - 0.5, width - 1
    return np.clip((x - center) / width + 0.5, 0, 1)


def as_viewer_draws(values: np.ndarray, meta, frame: int | None = None) -> np.ndarray:
    """A viewer's rendering: linear contrast limits, then the level curve as a colormap, then inversion."""
    view = viewer_display(meta, frame=frame)
    lo, hi = view.contrast_limits
    t = np.clip((values.astype(np.float64) - lo) / (hi - lo), 0, 1)
    if view.levels is not None:
        t = np.interp(t, np.linspace(0, 1, len(view.levels)), view.levels)
    return 1 - t if view.inverted else t


def opened(path, frame: int | None = None):
    image = open_file(path)
    values = np.asarray(image.data[frame] if frame is not None else image.data)
    return values, image.meta


# Mirroring a window for inverted stored values (v -> TOP - v): LINEAR's ramp is centred on c - 0.5,
# so its mirrored centre is TOP + 1 - c; LINEAR_EXACT and SIGMOID are centred on c itself.
@pytest.mark.parametrize("function, mirrored_center", [
    ("LINEAR", TOP + 1 - 1500), ("LINEAR_EXACT", TOP - 1500), ("SIGMOID", TOP - 1500)])
def test_monochrome1_twin_displays_exactly_like_monochrome2(tmp_path, function, mirrored_center):
    stored = ramp((64, 48), top=TOP)
    m2 = write_ffdm(tmp_path / "m2.dcm", stored, window=(1500, 1000), voi_function=function)
    m1 = write_ffdm(tmp_path / "m1.dcm", TOP - stored, photometric="MONOCHROME1",
                    window=(mirrored_center, 1000), voi_function=function)
    (v2, meta2), (v1, meta1) = opened(m2), opened(m1)
    shown2, shown1 = to_display(v2, meta2), to_display(v1, meta1)

    np.testing.assert_allclose(shown2, dicom_window(stored, 1500, 1000, function), atol=1e-5)
    assert shown2.min() < 0.01 and shown2.max() > 0.99  # the window really cuts both ends
    np.testing.assert_allclose(shown1, shown2, atol=1e-5)
    assert viewer_display(meta1).inverted and not viewer_display(meta2).inverted
    np.testing.assert_allclose(as_viewer_draws(v1, meta1), shown2, atol=GREY_LEVEL)
    np.testing.assert_allclose(as_viewer_draws(v2, meta2), shown2, atol=GREY_LEVEL)


@pytest.mark.parametrize("function", ["SIGMOID", "LINEAR_EXACT", "LINEAR"])
def test_voi_lut_function_follows_the_dicom_formula(tmp_path, function):
    stored = ramp((64, 48), top=TOP)
    values, meta = opened(write_ffdm(tmp_path / "w.dcm", stored, window=(2000, 1000), voi_function=function))
    assert (meta.windows[0].function, meta.voi_lut_function) == (function, function)

    expected = dicom_window(stored, 2000, 1000, function)
    np.testing.assert_allclose(to_display(values, meta), expected, atol=1e-5)
    np.testing.assert_allclose(as_viewer_draws(values, meta), expected, atol=GREY_LEVEL)


@pytest.mark.parametrize("bits", [16, 12, 8])
def test_voi_lut_sequence_maps_through_its_table(tmp_path, bits):
    first, n = 500, 3000
    t = np.linspace(0, 1, n)
    table = np.rint((2 ** bits - 1) * (3 * t**2 - 2 * t**3)).astype(np.uint16)  # an S-shaped curve
    stored = ramp((64, 48), top=TOP)  # spans below the table's first entry and beyond its last
    path = write_ffdm(tmp_path / "lut.dcm", stored, voi_lut=(first, table, bits))
    values, meta = opened(path)
    assert (meta.voi_luts[0].first_mapped, len(meta.voi_luts[0].data)) == (first, n)

    # PS3.3 C.11.2.1.1: values below the first mapped one take the first entry, above the last the last.
    expected = table[np.clip(stored.astype(int) - first, 0, n - 1)] / (2 ** bits - 1)
    np.testing.assert_allclose(to_display(values, meta), expected, atol=1e-6)
    np.testing.assert_allclose(as_viewer_draws(values, meta), expected, atol=GREY_LEVEL)


def test_dbt_frames_are_shown_through_their_own_windows(tmp_path):
    windows = [(100 * i + 25, 50 + 10 * i) for i in range(6)]  # each frame's window fits its values
    path = write_enhanced_dbt(tmp_path / "dbt", labelled_volume(6), per_frame_windows=windows)
    for i in (0, 3, 5):
        values, meta = opened(path, frame=i)
        expected = dicom_window(values, *windows[i], "LINEAR")
        assert expected.std() > 0.1  # the wrong frame's window would show a flat black or white
        np.testing.assert_allclose(to_display(values, meta, frame=i), expected, atol=1e-5)
        np.testing.assert_allclose(as_viewer_draws(values, meta, frame=i), expected, atol=GREY_LEVEL)


@pytest.mark.parametrize("extra, lo, hi", [({}, 0, TOP),
                                           ({"SmallestImagePixelValue": 1000, "LargestImagePixelValue": 3000},
                                            1000, 3000)])
def test_without_a_stored_window_the_header_range_is_shown(tmp_path, extra, lo, hi):
    stored = ramp((64, 48), top=TOP)
    values, meta = opened(write_ffdm(tmp_path / "plain.dcm", stored, **extra))
    assert not meta.windows and not meta.voi_luts
    expected = np.clip((stored.astype(float) - lo) / (hi - lo), 0, 1)  # header range -> black..white, no pixel scan
    np.testing.assert_allclose(to_display(values, meta), expected, atol=GREY_LEVEL)
    np.testing.assert_allclose(as_viewer_draws(values, meta), expected, atol=GREY_LEVEL)
