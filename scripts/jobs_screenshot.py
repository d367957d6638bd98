"""Screenshot of the Training jobs widget attached to a finished pretraining run, its learning-curve tab
shown -> docs/jobs_learning_curve.png.

    xvfb-run -a .venv/bin/python scripts/jobs_screenshot.py --run RUN [--out docs/jobs_learning_curve.png]

The run folder needs a ``metrics.jsonl`` with eval lines (a run started with ``--monitor-real`` /
``--monitor-phantom``, as ``scripts/train_release_encoder.sh`` does); jobs the widget did not start are
attached read-only from their folder. Needs a display (Xvfb when headless).
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a pretraining run folder")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "jobs_learning_curve.png")
    args = parser.parse_args(argv)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_mammodino.widgets.jobs import JobsWidget

    viewer = napari.Viewer(title="MammoDINO training jobs - learning curve")
    viewer.window.resize(1600, 1000)
    widget = JobsWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Training jobs", area="right")
    widget.attach(args.run)
    widget.plots.setCurrentIndex(1)  # the learning-curve tab
    for _ in range(5):
        QApplication.processEvents()
    widget.plots.grab().save(str(args.out))
    print(args.out)
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
