"""Montage of the phantom simulator for the README: a four-view FFDM exam (hanging protocol:
RCC | LCC over RMLO | LMLO, chest walls facing each other) and DBT slices around a lesion.

    .venv/bin/python scripts/phantom_montage.py                    # writes docs/phantom_montage.png
    .venv/bin/python scripts/phantom_montage.py --out /tmp/m.png --seed 7

Every image is shown through its own stored window, as a viewer would. Red boxes: ground-truth
lesion boxes; red contours on the DBT crops: the lesion's label in that slice.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.phantom import simulate_dbt, simulate_exam  # noqa: E402


def show(ax, image: np.ndarray, window: tuple[float, float], title: str) -> None:
    centre, width = window
    ax.imshow(image, cmap="gray", vmin=centre - width / 2, vmax=centre + width / 2, interpolation="lanczos")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "phantom_montage.png"))
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--dbt-seed", type=int, default=0)
    args = parser.parse_args()

    exam = simulate_exam(args.seed, kind="ffdm", lesion="mass", density="C")
    volume = simulate_dbt(args.dbt_seed, lesion="mass+calc", density="B")

    fig = plt.figure(figsize=(16, 10.6), dpi=100)
    outer = fig.add_gridspec(2, 1, height_ratios=[1.0, 0.78], hspace=0.06)
    top = outer[0].subgridspec(1, 4, wspace=0.03)
    order = [("CC", "R"), ("CC", "L"), ("MLO", "R"), ("MLO", "L")]
    for image in exam:
        ax = fig.add_subplot(top[0, order.index((image.view, image.laterality))])
        title = f"{image.laterality}{image.view}, density {image.density}"
        if image.lesions:
            title += f", {image.lesions[0].shape} mass {image.lesions[0].size_mm:.0f} mm"
        show(ax, image.pixels, image.window, title)
        for lesion in image.lesions:
            r0, c0, r1, c1 = lesion.box
            ax.add_patch(plt.Rectangle((c0 - 25, r0 - 25), c1 - c0 + 50, r1 - r0 + 50, fill=False, ec="r", lw=0.8))
    bottom = outer[1].subgridspec(2, 6, wspace=0.03, hspace=0.2)
    slice_mm = volume.spacing_mm[0]
    for row, kind in enumerate(("mass", "calc")):
        lesion = next(item for item in volume.lesions if item.kind == kind)
        r0, c0, r1, c1 = lesion.box
        margin = 50 if kind == "mass" else 30
        rows = slice(max(r0 - margin, 0), r1 + margin)
        cols = slice(max(c0 - margin, 0), c1 + margin)
        name = f"{lesion.shape} mass {lesion.size_mm:.0f} mm" if kind == "mass" else "calcifications"
        for j, offset_mm in enumerate((-12, -6, -3, 0, 3, 6)):
            k = int(np.clip(lesion.center_slice + round(offset_mm / slice_mm), 0, volume.pixels.shape[0] - 1))
            ax = fig.add_subplot(bottom[row, j])
            where = "in focus" if offset_mm == 0 else f"{offset_mm:+d} mm"
            show(ax, volume.pixels[k, rows, cols], volume.window, f"{name + ', ' if j == 0 else ''}slice {k} ({where})")
            present = volume.lesion_labels[k, rows, cols] == lesion.label
            if present.any() and kind == "mass":
                ax.contour(present, [0.5], colors="r", linewidths=0.5)
    fig.suptitle(f"Top: FFDM exam, 2048 x 1664 at 0.1 mm (hanging protocol). Bottom: one DBT volume, "
                 f"{volume.pixels.shape[0]} slices of 1 mm, 1024 x 832 at 0.2 mm, 15 projections over 15 degrees, SART"
                 " (red: ground truth)", fontsize=10, y=0.93)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, bbox_inches="tight", dpi=100)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
