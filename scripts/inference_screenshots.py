"""Screenshots of the Inference widget for the README: the real CBIS-DDSM exam (attention on all four
views, hanging protocol) and a slice of the phantom DBT (lazy per-slice attention).

    xvfb-run -a .venv/bin/python scripts/inference_screenshots.py                      # the demo encoder
    xvfb-run -a .venv/bin/python scripts/inference_screenshots.py --checkpoint random:small/14

Writes docs/inference_cbis.png and docs/inference_dbt.png (whole window: canvas and widget).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _window(viewer, widget, size=(1500, 950)):
    from qtpy.QtWidgets import QApplication

    viewer.window.add_dock_widget(widget, name="Inference", area="right")
    viewer.window.resize(*size)
    viewer.window._qt_window.show()
    for _ in range(5):  # let the canvas take its final size before the view is fitted to it
        QApplication.processEvents()


def _run_all(widget, layers) -> None:
    for layer in layers:
        widget.select_image(layer)
        if widget.compute() is None:
            raise SystemExit(f"inference failed: {widget.message.text()}")


def cbis(checkpoint: str | None, resolution: int, out: Path) -> Path:
    import napari

    from napari_mammodino.demo import show_exam
    from napari_mammodino.widgets.inference import InferenceWidget

    viewer = napari.Viewer(title="MammoDINO inference - CBIS-DDSM benign exam")
    show_exam(viewer, "benign")
    widget = InferenceWidget(viewer)
    widget.checkpoint.setText(checkpoint or "")
    widget.resolution.setValue(resolution)
    views = [layer for layer in viewer.layers if layer.name.split()[0] in ("RCC", "LCC", "RMLO", "LMLO")
             and layer.ndim == 2 and "mammodino" in layer.metadata]
    _run_all(widget, views)
    viewer.layers.move(viewer.layers.index("view labels"), len(viewer.layers))  # labels on top
    _window(viewer, widget)
    widget.select_image(views[0])
    viewer.reset_view()
    return _save(viewer, out)


def dbt(checkpoint: str | None, resolution: int, out: Path) -> Path:
    import napari

    from napari_mammodino._sample_data import phantom_dbt
    from napari_mammodino.widgets.inference import InferenceWidget

    viewer = napari.Viewer(title="MammoDINO inference - phantom DBT")
    for data, kwargs, kind in phantom_dbt():
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    image = next(layer for layer in viewer.layers if layer.metadata.get("mammodino"))
    lesions = next(layer for layer in viewer.layers if layer.metadata.get("mammodino_truth") == "lesions")
    area = (np.asarray(lesions.data) > 0).sum(axis=(1, 2))
    in_focus = int(np.argmax(area))  # the slice where the lesion is largest
    viewer.dims.set_point(0, image.data_to_world([in_focus, 0, 0])[0])
    lesions.opacity, lesions.blending = 0.35, "translucent"
    widget = InferenceWidget(viewer)
    widget.checkpoint.setText(checkpoint or "")
    widget.resolution.setValue(resolution)
    _run_all(widget, [image])
    for layer in widget.layers:  # a volume's maps are drawn on the read-ahead pool: wait, then show them
        layer.data.settle(120)
        layer.refresh()
    _window(viewer, widget)
    viewer.reset_view()
    r0, c0, r1, c1 = widget.result.prepared.box  # zoom onto the breast: the volume is mostly air
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.center = image.data_to_world([in_focus, (r0 + r1) / 2, (c0 + c1) / 2])[1:]
    camera.zoom *= 0.9 * min(image.data.shape[1] / (r1 - r0), image.data.shape[2] / (c1 - c0))
    return _save(viewer, out)


def _save(viewer, out: Path) -> Path:
    from qtpy.QtWidgets import QApplication

    for _ in range(5):
        QApplication.processEvents()
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out), canvas_only=False, flash=False)
    viewer.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="encoder (default: the demo encoder)")
    parser.add_argument("--resolution", type=int, default=0, help="input long side (default: the encoder's own)")
    parser.add_argument("--out", default=str(ROOT / "docs"), help="folder for the two PNGs (default docs/)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    print(cbis(args.checkpoint, args.resolution, out / "inference_cbis.png"))
    print(dbt(args.checkpoint, args.resolution, out / "inference_dbt.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
