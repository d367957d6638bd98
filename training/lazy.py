"""Lazy slice stacks for viewers: a volume's planes computed when first shown, a few kept, the next
ones read ahead in the direction of scrolling.

:class:`LazyStack` is the one such array: image frames (:class:`FrameStack`), attention maps per DBT
slice (``training.evaluate.infer.LazyAttentionStack``) and tissue or sampler masks per slice (the
napari widgets' ``LazyPlanes``) are all this class with their own per-plane function.

With ``prefetch`` a stack computes on a small shared pool of background threads (:class:`PlanePool`),
never on the thread that indexes it (napari's): the plane asked for first, then the next ones in the
direction the viewer last moved, nearest first. A jump cancels read-ahead that has not started. The
planes kept are bounded in number (``keep``) and in MB (``max_mb``); when full, the plane farthest from
the one shown that is not being read ahead goes first.

Planes too slow to wait for (an encoder's forward pass per DBT slice: 0.1-1 s on a CPU) use the
non-blocking mode, ``on_ready``: a plane not computed yet is zeros at once, is queued before every
read-ahead, and ``on_ready(index, error)`` says when it is there (from a pool thread: the viewer turns
it into a refresh on its own thread)."""

from __future__ import annotations

import atexit
import heapq
import itertools
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import CancelledError, Future, wait
from pathlib import Path
from typing import Any, Callable, Hashable

import numpy as np

from training.errors import MammoInputError
from training.dicom.image import MammoImage, one_thread_per_decode

CACHE_FRAMES = 8  # planes a viewer's stack keeps: the one shown, one behind, the rest read ahead
CACHE_MB = 256.0  # ... and never more than this, whatever the planes' size
POOL_THREADS = 2  # one always free for the plane the viewer waits for, one reading ahead on every core


def cache_settings() -> tuple[int, float]:
    """(planes, MB) a viewer's stack keeps: :data:`CACHE_FRAMES` and :data:`CACHE_MB`, or the
    environment's ``MAMMODINO_SLICE_CACHE`` (planes) and ``MAMMODINO_SLICE_CACHE_MB``."""
    planes, mb = os.environ.get("MAMMODINO_SLICE_CACHE", ""), os.environ.get("MAMMODINO_SLICE_CACHE_MB", "")
    try:
        found = (int(planes) if planes.strip() else CACHE_FRAMES, float(mb) if mb.strip() else CACHE_MB)
    except ValueError:
        found = (0, 0.0)
    if found[0] < 1 or not found[1] > 0:
        raise MammoInputError(f"MAMMODINO_SLICE_CACHE={planes!r} / MAMMODINO_SLICE_CACHE_MB={mb!r}: "
                              "expected a whole number of planes >= 1 and a number of MB > 0")
    return found


class LRU:
    """A small thread-safe least-recently-used cache (napari may slice from a worker thread)."""

    def __init__(self, size: int):
        self.size = max(1, int(size))
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Any:
        """The value of ``key`` (now the most recently used), or None."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class PlaneCache:
    """A stack's planes by index, at most ``size``. When full, the plane to go is the one farthest
    from ``focus`` (the plane shown) among those outside ``wanted`` (the read-ahead window), else the
    farthest of all but the focus; a plane that would go at once is not kept at all."""

    def __init__(self, size: int):
        self.size = max(1, int(size))
        self.focus = 0
        self.wanted: frozenset[int] = frozenset()
        self._planes: OrderedDict[int, np.ndarray] = OrderedDict()  # oldest first: ties go oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._planes)

    def __contains__(self, index: int) -> bool:
        return index in self._planes

    def indices(self) -> list[int]:
        with self._lock:
            return sorted(self._planes)

    def nbytes(self) -> int:
        with self._lock:
            return sum(p.nbytes for p in self._planes.values())

    def get(self, index: int) -> np.ndarray | None:
        with self._lock:
            found = self._planes.get(index)
            if found is not None:
                self._planes.move_to_end(index)
            return found

    def put(self, index: int, plane: np.ndarray) -> None:
        with self._lock:
            self._planes[index] = plane
            self._planes.move_to_end(index)
            while len(self._planes) > self.size:
                del self._planes[max(self._planes, key=self._badness)]

    def make_room(self) -> None:
        """Drop the plane to go next if the cache is full, before another is computed: the planes
        kept plus the one being computed stay within ``size`` (memory is the cache's setting, not
        one plane more)."""
        with self._lock:
            if len(self._planes) >= self.size:
                worst = max(self._planes, key=self._badness)
                if worst != self.focus:
                    del self._planes[worst]

    def refocus(self, focus: int, wanted: frozenset[int]) -> None:
        with self._lock:
            self.focus, self.wanted = focus, wanted

    def _badness(self, index: int) -> tuple[int, int]:
        if index == self.focus:
            return (-1, 0)
        return (int(index not in self.wanted), abs(index - self.focus))


class PlanePool:
    """A few daemon threads that compute planes for lazy stacks, off the thread that asks.

    Work waits in a priority queue: a plane a viewer waits for (priority 0) before read-ahead (1, 2,
    ...: its rank in the window). At most ``threads - 1`` workers read ahead at once, so one is always
    free for a plane someone waits for, and no read-ahead starts while such a plane is computed (it
    gets every core: a JPEG 2000 frame decodes on several threads). With the default two threads one
    frame is read ahead at a time on every core: as fast on two cores as two frames a core each, and
    the memory of one decoder, not two. With more, each read-ahead decodes on one thread. Queued work
    can be cancelled (its Future's ``cancel``); work that has started finishes. Workers start on
    demand (the last one only for a plane someone waits for: a decoder keeps memory on each thread it
    ran on) and exit after ``idle_s`` without work, so an unused pool holds no thread; they are
    daemons and :meth:`close` (run at exit for the shared pool) drops queued work, so the interpreter
    never waits for read-ahead."""

    def __init__(self, threads: int | None = None, idle_s: float = 10.0):
        self.threads, self.idle_s = max(2, int(threads or POOL_THREADS)), idle_s
        self._queue: list[tuple[int, int, Future, Callable[[], Any]]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._workers: set[threading.Thread] = set()
        self._idle = 0
        self._ahead = 0  # read-ahead tasks running
        self._waited = 0  # tasks someone waits for, running
        self._closed = False

    def submit(self, work: Callable[[], Any], priority: int = 0) -> Future:
        future: Future = Future()
        with self._cond:
            closed = self._closed
            if not closed:
                heapq.heappush(self._queue, (priority, next(self._order), future, work))
                # Read-ahead gets a thread of its own only up to what may read ahead at once: a
                # JPEG 2000 decoder keeps ~25 MB per thread it has run on, so scrolling that never
                # waits decodes on one thread, and the last one starts only for a plane someone waits for.
                if self._idle < len(self._queue) and len(self._workers) < self.threads - (priority > 0):
                    self._start_worker()
                self._cond.notify()
        if closed:  # at exit: nothing new runs
            future.cancel()
        return future

    def warm(self) -> None:
        """Start a worker now, if none is running, so the first plane asked for does not wait for a
        thread to start (a viewer makes its stack some milliseconds before it asks for a slice)."""
        with self._cond:
            if not self._workers and not self._closed:
                self._start_worker()

    def _start_worker(self) -> None:
        worker = threading.Thread(target=self._work, name="mammodino-planes", daemon=True)
        self._workers.add(worker)
        worker.start()

    def workers(self) -> list[threading.Thread]:
        with self._cond:
            return list(self._workers)

    def close(self, wait: bool = True, timeout: float | None = 10.0) -> None:
        """Cancel queued work, let running work finish, stop the threads (joined when `wait`)."""
        with self._cond:
            self._closed = True
            queued = [future for _, _, future, _ in self._queue]
            self._queue.clear()
            workers = list(self._workers)
            self._cond.notify_all()
        for future in queued:  # outside the lock: a Future's cancel runs callbacks that may submit
            future.cancel()
        if wait:
            for worker in workers:
                if worker is not threading.current_thread():
                    worker.join(timeout)

    def _next(self) -> tuple[int, Future, Callable[[], Any]] | None:
        """The most urgent runnable task (cancelled ones are dropped), or None. Caller holds the lock."""
        while self._queue and self._queue[0][2].cancelled():
            heapq.heappop(self._queue)
        if not self._queue or (self._queue[0][0] > 0 and (self._waited or self._ahead >= self.threads - 1)):
            return None
        priority, _, future, work = heapq.heappop(self._queue)
        return priority, future, work

    def _work(self) -> None:
        _WORKER.active = True
        while True:
            task = self._take()
            if task is None:
                return
            self._run(*task)
            del task  # nothing of a finished task (its plane) stays alive on an idle worker

    def _take(self) -> tuple[int, Future, Callable[[], Any]] | None:
        """The next task for this worker, waiting for one; None when it should end (closed, or idle)."""
        me = threading.current_thread()
        with self._cond:
            task = self._next()
            while task is None:
                if self._closed:
                    self._workers.discard(me)
                    return None
                self._idle += 1
                woken = self._cond.wait(self.idle_s)
                self._idle -= 1
                task = self._next()
                if task is None and not woken and not self._queue:
                    self._workers.discard(me)
                    return None
            if task[0] > 0:
                self._ahead += 1
            else:
                self._waited += 1
            return task

    def _run(self, priority: int, future: Future, work: Callable[[], Any]) -> None:
        try:
            if future.set_running_or_notify_cancel():
                try:
                    if priority > 0 and self.threads > 2:
                        with one_thread_per_decode():  # several read ahead at once: a core each
                            result = work()
                    else:
                        result = work()
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
                    future.set_exception(exc)
                else:
                    future.set_result(result)
        finally:
            with self._cond:
                if priority > 0:
                    self._ahead -= 1
                else:
                    self._waited -= 1
                self._cond.notify_all()


_WORKER = threading.local()
_SHARED: list[PlanePool] = []
_SHARED_LOCK = threading.Lock()


def shared_pool() -> PlanePool:
    """The pool every viewer stack uses unless given its own (made on first use, closed at exit)."""
    with _SHARED_LOCK:
        if not _SHARED:
            _SHARED.append(PlanePool())
            atexit.register(_SHARED[0].close, wait=False)
        return _SHARED[0]


def in_pool_worker() -> bool:
    """True on a pool's thread: a plane asked for there is computed there (waiting on the pool from
    inside it could leave no worker free)."""
    return getattr(_WORKER, "active", False)


class LazyStack:
    """A read-only numpy-style array whose planes ``plane(i)`` computes when they are first indexed.

    ``shape`` is (planes, rows, cols[, channels]), or (rows, cols) for a single plane (a 2D image:
    ``plane(0)`` is the whole array). Indexing computes only the planes it touches and keeps ``keep``
    of them (at most ``max_mb`` MB), so a layer over a 60-slice volume costs the slices the user looks
    at. ``plane(i)`` may return None: not ready yet (computed elsewhere), shown as zeros and not kept,
    so the next read asks again. With ``deferred`` a bare int index gives a :class:`DeferredPlane`,
    computed only when its values are read: napari reads ``data[0].dtype`` when it makes a Labels
    layer, which must not compute a slice nobody looks at.

    With ``prefetch`` planes are computed on ``pool`` (default :func:`shared_pool`), never on the
    indexing thread, and after each plane the next ``keep - 2`` in the direction of the last move (both
    ways before any move) are read ahead; one plane behind stays. :meth:`close` cancels what is queued.

    With ``on_ready`` (implies ``prefetch``) the indexing thread never waits: a plane not kept yet is
    zeros (not kept: the next read asks again), queued once, and ``on_ready(index, error)`` is called
    from the pool's thread when it is kept (error None) or failed. Such a plane is queued as the most
    urgent read-ahead (priority 1, its read-ahead 2, 3, ...), not as a plane someone waits for (0):
    a slow plane must neither take the worker kept free for planes a viewer does wait for (an image
    layer's frame) nor hold up every other stack's read-ahead while it computes."""

    def __init__(self, shape: tuple[int, ...], dtype: Any, plane: Callable[[int], np.ndarray | None],
                 keep: int = 1, deferred: bool = False, *, prefetch: bool = False, max_mb: float | None = None,
                 pool: PlanePool | None = None, on_ready: Callable[[int, BaseException | None], None] | None = None):
        self.shape: tuple[int, ...] = tuple(int(n) for n in shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(dtype)
        self._compute, self._deferred = plane, deferred
        plane_bytes = max(1, int(np.prod(self.plane_shape)) * self.dtype.itemsize)
        if max_mb is not None:
            keep = min(keep, int(max_mb * 2**20 // plane_bytes))
        self.keep = max(1, int(keep))
        self._cache = PlaneCache(self.keep)
        self._prefetch = prefetch or on_ready is not None  # on the pool (a 2D image too: nothing to read ahead)
        self._pool = pool
        self.on_ready = on_ready
        self._pending: dict[int, Future] = {}
        self._lock = threading.RLock()  # a Future's cancel runs its callbacks (which take it) at once
        self._shown: int | None = None
        self._step = 0  # +1 or -1: the direction of the last move; 0 before any
        self._scheduling = 0  # read-ahead to be queued by a worker once the plane it computes is handed over
        volume = self.ndim >= 3 and self.shape[0] > 1
        self.ahead = 0 if not volume else max(0, self.keep - 2) if self.keep > 2 else self.keep - 1

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.shape}, {self.dtype})"

    @property
    def plane_shape(self) -> tuple[int, ...]:
        return self.shape if self.ndim == 2 else self.shape[1:]

    def cached(self) -> list[int]:
        """Indices of the planes kept now."""
        return self._cache.indices()

    def pending(self) -> list[int]:
        """Indices of the planes queued or being computed in the background now."""
        with self._lock:
            return sorted(i for i, f in self._pending.items() if not f.done())

    def is_ready(self, index: int) -> bool:
        """True when plane ``index`` is kept: reading it now waits for nothing."""
        return index in self._cache

    def plane(self, index: int) -> np.ndarray:
        """Plane ``index`` (read-only), from the cache or computed now (zeros while not ready)."""
        if not self._prefetch:
            self._cache.refocus(index, frozenset())
            found = self._cache.get(index)
            return found if found is not None else self._keep(index, self._compute(index), index)
        self._move_to(index)
        found = self._cache.get(index)
        if found is not None or in_pool_worker():
            if found is None:
                found = self._keep(index, self._computed(index), index)
            self._read_ahead(index)
            return found
        if self.on_ready is not None:
            found = self._ask(index)
            return found if found is not None else np.zeros(self.plane_shape, self.dtype)
        try:  # the worker queues the read-ahead once the plane is there: not on this thread's time
            found = self._wanted_now(index).result()
        except CancelledError:  # the pool was closed (at exit): compute here
            found = self._keep(index, self._compute(index), index)
            self._read_ahead(index)
        return found if found is not None else np.zeros(self.plane_shape, self.dtype)

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until nothing of this stack is queued, computing or about to be read ahead (True), or
        ``timeout`` s (False)."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                futures, scheduling = [f for f in self._pending.values() if not f.done()], self._scheduling
            left = None if end is None else end - time.monotonic()
            if not futures and not scheduling:
                return True
            if left is not None and left <= 0:
                return False
            if futures:
                wait(futures, left)
            else:
                time.sleep(0.001)

    def close(self) -> None:
        """Cancel this stack's queued read-ahead (what is running finishes)."""
        with self._lock:
            for future in list(self._pending.values()):  # a cancel forgets its plane at once
                future.cancel()

    def _keep(self, index: int, values: np.ndarray | None, shown: int | None) -> np.ndarray | None:
        """``values`` read-only and cached; None (not ready) stays None and is not kept."""
        if values is None:
            return np.zeros(self.plane_shape, self.dtype) if shown is not None else None
        values = np.asarray(values, dtype=self.dtype).view()  # a view: the caller's array stays writeable
        values.flags.writeable = False  # shared with later readers of the cache
        self._cache.put(index, values)
        return values

    def _window(self, index: int) -> list[int]:
        """The planes to read ahead of ``index``, nearest first."""
        n, step = self.shape[0], self._step
        if step:
            ahead = [index + step * k for k in range(1, self.ahead + 1)]
        else:  # no move yet: both ways
            ahead = [index + sign * k for k in range(1, self.ahead + 1) for sign in (1, -1)]
        return [i for i in ahead if 0 <= i < n][:self.ahead]

    def _move_to(self, index: int) -> None:
        """The viewer shows ``index`` now: note the direction, refocus the cache, cancel stale work."""
        with self._lock:
            if self._shown is not None and index != self._shown:
                self._step = 1 if index > self._shown else -1
            self._shown = index
            wanted = frozenset(self._window(index))
            self._cache.refocus(index, wanted)
            for i, future in list(self._pending.items()):
                if i != index and i not in wanted and not getattr(future, "waited_for", False):
                    future.cancel()  # only if it has not started; its callback forgets it

    def _submit(self, index: int, priority: int) -> Future:
        """Compute plane ``index`` on the pool (caller holds the lock)."""
        pool = self._pool or shared_pool()
        future = pool.submit(lambda: self._keep(index, self._computed(index), None), priority)
        future.priority = priority  # type: ignore[attr-defined]
        self._pending[index] = future
        future.add_done_callback(lambda done: self._forget(index, done))
        if self.on_ready is not None:
            future.add_done_callback(lambda done: self._report(index, done))
        return future

    def _computed(self, index: int) -> np.ndarray | None:
        """Plane ``index`` computed, room made for it in the cache first."""
        self._cache.make_room()
        return self._compute(index)

    def _report(self, index: int, done: Future) -> None:
        """Non-blocking: tell ``on_ready`` that plane ``index`` is kept, or failed (not when cancelled,
        nor when the plane function said "not ready": nothing new to show)."""
        if done.cancelled():
            return
        error = done.exception()
        if error is not None or done.result() is not None:
            self.on_ready(index, error)  # type: ignore[misc]

    def _ask(self, index: int) -> np.ndarray | None:
        """Non-blocking: plane ``index`` if kept by now; else queue it (once: a plane queued or running
        is left alone, read-ahead moved to the front) before all read-ahead, and None."""
        with self._lock:
            future = self._pending.get(index)
            if future is None or future.done() or (future.priority > 1 and future.cancel()):
                found = self._cache.get(index)  # kept since plane() looked: not computed twice
                if found is None:
                    self._submit(index, 1)
            else:
                found = None
            self._read_ahead(index, first=2)  # behind it: one plane computed at a time gets it first
        return found

    def _forget(self, index: int, done: Future) -> None:
        with self._lock:
            if self._pending.get(index) is done:
                del self._pending[index]

    def _wanted_now(self, index: int) -> Future:
        """The Future of plane ``index``: its read-ahead if that has started, else a task that goes
        before all read-ahead."""
        with self._lock:
            future = self._pending.get(index)
            if future is None or not (future.running() or future.done()):
                if future is not None:
                    future.cancel()
                future = self._submit(index, 0)
                future.waited_for = True  # type: ignore[attr-defined]  # a move elsewhere leaves it alone
            self._scheduling += 1
        future.add_done_callback(lambda _: self._read_ahead(index, after_result=True))
        return future

    def _read_ahead(self, index: int, after_result: bool = False, first: int = 1) -> None:
        if after_result:  # on the worker that just handed plane `index` over: let the waiting thread
            time.sleep(0)  # take the GIL first (else it waits while this one queues and starts work)
        with self._lock:
            if after_result:
                self._scheduling -= 1
            if self._shown != index:  # the viewer moved on while this plane was computed
                return
            for rank, i in enumerate(self._window(index), first):
                if i not in self._cache and i not in self._pending:
                    self._submit(i, rank)

    def __getitem__(self, key: Any) -> Any:
        if self.ndim == 2:
            return self.plane(0)[key]
        if self._deferred and isinstance(key, (int, np.integer)):
            return DeferredPlane(self, range(self.shape[0])[key])
        key = key if isinstance(key, tuple) else (key,)
        if key and key[0] is Ellipsis:
            key = (slice(None),) * (self.ndim - len(key) + 1) + key[1:]
        first, rest = (key[0], key[1:]) if key else (slice(None), ())
        if isinstance(first, (int, np.integer)):
            return self.plane(range(self.shape[0])[first])[rest]  # range: negative indices, bounds
        indices = np.arange(self.shape[0])[first]
        stacked = np.stack([self.plane(int(i)) for i in indices]) if len(indices) else \
            np.zeros((0, *self.shape[1:]), self.dtype)
        return stacked[(slice(None), *rest)]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return np.asarray(self[...] if self.ndim == 2 else self[:], dtype=dtype)


class DeferredPlane:
    """Plane ``index`` of a :class:`LazyStack`, computed only when its values are read."""

    def __init__(self, stack: LazyStack, index: int):
        self._stack, self._index = stack, index
        self.shape, self.dtype = stack.plane_shape, stack.dtype
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self)[key]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return np.asarray(self._stack.plane(self._index), dtype=dtype)


class FrameStack(LazyStack):
    """An image's frames as a read-only numpy-style array, for viewers.

    Indexing decodes only the frames it touches and keeps the last `keep` of them, so resident memory
    stays a few frames whatever the volume. `transform(values, frame)` (a per-frame VOI, a mirror)
    runs once per decoded frame. napari indexes this rather than the dask array: dask costs about
    4 ms per compute, more than reading a whole uncompressed frame, which made it the larger part of
    showing or scrolling to a slice. Pipelines keep using ``MammoImage.data``. :meth:`for_viewer`
    makes the stack a viewer scrolls: decoded off its thread, read ahead, :func:`cache_settings` kept."""

    def __init__(self, image: MammoImage, transform: Callable[[np.ndarray, int], np.ndarray] | None = None,
                 dtype: Any = None, keep: int = 1, **options: Any):
        self._image, self._transform = image, transform
        super().__init__(image.shape, dtype or image.dtype, self._decode, keep, **options)

    @classmethod
    def for_viewer(cls, image: MammoImage, transform: Callable[[np.ndarray, int], np.ndarray] | None = None,
                   dtype: Any = None, pool: PlanePool | None = None) -> "FrameStack":
        planes, mb = cache_settings()
        pool = pool or shared_pool()
        pool.warm()
        return cls(image, transform, dtype, keep=planes, max_mb=mb, prefetch=True, pool=pool)

    @property
    def image(self) -> MammoImage:
        """The image whose frames these are (its metadata, its dask array)."""
        return self._image

    def __repr__(self) -> str:
        return f"FrameStack({self.shape}, {self.dtype}, {Path(self._image.meta.path).name})"

    def _decode(self, index: int) -> np.ndarray:
        values = self._image.frame(index)
        return values if self._transform is None else self._transform(values, index)
