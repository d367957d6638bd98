"""How the dock widgets run their computations: in a napari thread worker (never on the Qt thread), with
progress, a user mistake said in one line, and Cancel.

A computation is a generator of progress steps (:mod:`training.progress`: it yields ``(done, total)`` and
returns its result), so the same code runs here in a worker and plainly in tests and scripts. Its end is
one of four, each handled on the Qt thread: the result; a :class:`Refused` (a ``MammoInputError``: one
line, no traceback); :class:`Cancelled`; or a bug, which napari shows with its traceback.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

from training.errors import MammoInputError
from training.progress import Steps


@dataclass(frozen=True)
class Refused:
    """A user mistake a computation met (no tissue, a bad slice, a checkpoint that does not load)."""

    message: str

    @classmethod
    def of(cls, exc: BaseException) -> "Refused":
        return cls(" ".join(str(exc).split()))  # one line, whatever the library said

    def show(self) -> None:
        """Tell the user, in a napari notification."""
        from napari.utils.notifications import show_error

        show_error(self.message)


class Cancelled:
    """Cancel was pressed: the computation stopped and there is nothing to draw."""


def guarded(steps: Steps, cancelled_by: tuple[type[BaseException], ...] = ()) -> Steps:
    """``steps``, returning their result, a :class:`Refused` for a ``MammoInputError``, or :class:`Cancelled`
    when one of ``cancelled_by`` (how the computation says it stopped as asked) ended them. Returned, not
    raised: napari would show a worker's exception with a traceback."""
    try:
        return (yield from steps)
    except MammoInputError as exc:
        return Refused.of(exc)
    except cancelled_by:
        return Cancelled()


def settle(outcome: Any, done: Callable[[Any], Any], refused: Callable[[Refused], Any] = Refused.show,
           cancelled: Callable[[], Any] = lambda: None) -> Any:
    """Hand a guarded computation's outcome to the callback for its kind; returns what that one returns."""
    if isinstance(outcome, Refused):
        return refused(outcome)
    if isinstance(outcome, Cancelled):
        return cancelled()
    return done(outcome)


class Task:
    """A computation running in a napari thread worker (made by :func:`start`)."""

    def __init__(self, worker: Any, stop: threading.Event):
        self.worker, self.stop = worker, stop

    def cancel(self) -> None:
        """Stop at the next step, or sooner where the computation polls ``stop``."""
        self.stop.set()
        self.worker.quit()


def start(steps: Steps, *, done: Callable[[Any], Any], ended: Callable[[], Any] = lambda: None,
          progress: Callable[[int, int], Any] | None = None, refused: Callable[[Refused], Any] = Refused.show,
          cancelled: Callable[[], Any] = lambda: None, stop: threading.Event | None = None,
          desc: str | None = None) -> Task:
    """Run ``steps`` in a napari thread worker, started now. On the Qt thread: ``progress(done, total)`` at
    each step; at the end ``ended()`` (re-enable the buttons), then ``done(result)``, ``refused(Refused)``
    or ``cancelled()``; after a bug only ``ended()``. ``stop`` is the event the computation polls, set
    by :meth:`Task.cancel`; ``desc`` names it in napari's activity dock."""
    from napari.qt.threading import create_worker

    def returned(outcome: Any) -> None:
        ended()
        settle(outcome, done, refused, cancelled)

    def aborted() -> None:  # quit() took effect between two steps
        ended()
        cancelled()

    connect: dict[str, Callable] = {"returned": returned, "aborted": aborted, "errored": lambda exc: ended()}
    if progress is not None:
        connect["yielded"] = lambda step: progress(*step)
    options = {"_progress": {"desc": desc}} if desc else {}
    worker = create_worker(guarded, steps, _connect=connect, **options)
    return Task(worker, stop or threading.Event())


def start_form(request: Callable[[], Any], steps: Callable[[Any], Steps], done: Callable[[Any, Any], Any], *,
               button: Any, status: Any, busy: str, bar: Any, desc: str) -> Task | None:
    """A magicgui form's Run: ``request()`` reads the form (a user mistake is one :class:`Refused` line and
    nothing starts); while ``steps(request)`` runs in a worker the ``button`` is disabled, the ``status``
    label says ``busy`` and the progress ``bar`` follows; then ``done(request, result)``."""
    try:
        asked = request()
    except MammoInputError as exc:
        return Refused.of(exc).show()
    button.enabled, status.value = False, busy

    def ended() -> None:
        button.enabled, status.value = True, ""

    def step(finished: int, total: int) -> None:
        bar.max, bar.value = total, finished

    return start(steps(asked), progress=step, ended=ended, done=lambda result: done(asked, result), desc=desc)
