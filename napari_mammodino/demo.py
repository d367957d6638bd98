"""Open napari on a real CBIS-DDSM exam in the hanging protocol, or render that view to a PNG.

    python -m napari_mammodino.demo                 # a window
    python -m napari_mammodino.demo --headless      # out/hanging_protocol.png (needs a display: Xvfb)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def build_viewer(exam: str = "benign", show: bool = True):
    import napari

    from ._sample_data import cbis_benign_exam, cbis_malignant_exam

    layers = cbis_benign_exam() if exam == "benign" else cbis_malignant_exam()
    viewer = napari.Viewer(title=f"MammoDINO - CBIS-DDSM {exam} exam", show=show)
    for data, kwargs, _ in layers:
        viewer.add_image(data, **kwargs)
    # View labels at each image's outer top corner, as clinical viewers print them.
    corners, texts = [], []
    for layer in viewer.layers:
        (top, left), (bottom, right) = layer.extent.world[:, -2:]
        corners.append([top + 0.03 * (bottom - top), left + 0.1 * (right - left) if layer.metadata.get(
            "chest_wall") == "right" or layer.name.startswith("R") else right - 0.1 * (right - left)])
        texts.append(layer.name.split()[0])
    viewer.add_points(np.array(corners), name="view labels", size=0, features={"view": texts},
                      text={"string": "{view}", "color": "yellow", "size": 14})
    viewer.reset_view()
    return viewer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--headless", nargs="?", const="out/hanging_protocol.png", metavar="PNG",
                        help="render to this PNG instead of opening a window")
    parser.add_argument("--exam", choices=["benign", "malignant"], default="benign")
    args = parser.parse_args(argv)
    viewer = build_viewer(args.exam, show=True)  # headless still draws, on Xvfb
    if args.headless:
        out = Path(args.headless)
        out.parent.mkdir(parents=True, exist_ok=True)
        viewer.window.resize(1400, 1000)
        viewer.reset_view()
        viewer.screenshot(str(out), canvas_only=True, flash=False)
        viewer.close()
        print(out)
        return 0
    import napari

    napari.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
