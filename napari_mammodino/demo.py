"""Open napari on a real CBIS-DDSM exam in the hanging protocol, or render that view to a PNG.

    python -m napari_mammodino.demo                 # a window, with the Inference (demo encoder: press
                                                    # Run) and Training jobs widgets docked
    python -m napari_mammodino.demo --headless      # out/hanging_protocol.png (needs a display: Xvfb)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def show_exam(viewer, exam: str = "benign"):
    """Add a CBIS-DDSM exam in the hanging protocol, with view labels, to `viewer`."""
    from napari_mammodino._sample_data import cbis_benign_exam, cbis_malignant_exam

    layers = cbis_benign_exam() if exam == "benign" else cbis_malignant_exam()
    for data, kwargs, _ in layers:
        viewer.add_image(data, **kwargs)
    # View labels at each image's outer bottom corner (film labels usually sit at the top).
    corners, texts = [], []
    for layer in viewer.layers:
        (top, left), (bottom, right) = layer.extent.world[:, -2:]
        inset = 0.08 * (right - left)
        corners.append([bottom - 0.04 * (bottom - top), left + inset if layer.name[:1] == "R" else right - inset])
        texts.append(layer.name.split()[0])
    viewer.add_points(np.array(corners), name="view labels", size=0, features={"view": texts},
                      text={"string": "{view}", "color": "yellow", "size": 14})
    viewer.reset_view()
    return viewer


def dock_widgets(viewer):
    """Dock Inference (the demo encoder on the selected view: one click on Run) and Training jobs."""
    inference = viewer.window.add_plugin_dock_widget("napari-mammodino", "Inference")[1]
    viewer.window.add_plugin_dock_widget("napari-mammodino", "Training jobs", tabify=True)
    return inference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--headless", nargs="?", const="out/hanging_protocol.png", metavar="PNG",
                        help="render to this PNG instead of opening a window")
    parser.add_argument("--exam", choices=["benign", "malignant"], default="benign")
    args = parser.parse_args(argv)
    import napari

    # Headless still shows the window, on Xvfb: an unshown canvas renders nothing.
    viewer = show_exam(napari.Viewer(title=f"MammoDINO - CBIS-DDSM {args.exam} exam"), args.exam)
    if args.headless:
        out = Path(args.headless)
        out.parent.mkdir(parents=True, exist_ok=True)
        viewer.window.resize(1400, 1000)
        viewer.reset_view()
        viewer.screenshot(str(out), canvas_only=True, flash=False)
        viewer.close()
        print(out)
        return 0
    dock_widgets(viewer)
    napari.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
