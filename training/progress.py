"""Long computations as generators that yield ``(done, total)`` and return their result, so the same
code runs in a napari thread worker (which forwards the yields to a progress bar and can stop between
them) and plainly in a test or on the command line (:func:`run_steps`). stardist-napari's pattern."""

from __future__ import annotations

from typing import Any, Callable, Generator

Steps = Generator[tuple[int, int], None, Any]  # yields (done, total), returns the result


def run_steps(steps: Steps, progress: Callable[[int, int], None] | None = None) -> Any:
    """Run a step generator to the end in this thread; returns what it returns."""
    while True:
        try:
            done, total = next(steps)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(done, total)
