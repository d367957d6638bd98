"""Long computations as generators that yield ``(done, total)`` and return their result, so the same
code runs in a napari thread worker (which forwards the yields to a progress bar and can stop between
them) and plainly in a test or on the command line (:func:`run_steps`). stardist-napari's pattern."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Generator, Iterator

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


@contextlib.contextmanager
def sigterm_flag() -> Iterator[Callable[[], bool]]:
    """While open, SIGTERM (a scheduler, the jobs widget's Cancel) sets a flag instead of killing the
    process; yields the flag's reader, so a training loop ends at its next step, saves and returns.
    Outside the main thread (a GUI worker cannot install handlers) the flag never rises. The previous
    handler is put back on exit; the reader keeps answering after it."""
    terminated: list[bool] = []
    installed = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: terminated.append(True)) if installed else None
    try:
        yield lambda: bool(terminated)
    finally:
        if installed:  # None: the old handler was not set from Python
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
