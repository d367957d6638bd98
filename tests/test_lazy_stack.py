"""The lazy slice stack viewers scroll: planes computed off the asking thread, the next ones read ahead
in the direction of scrolling, stale read-ahead cancelled by a jump, the cache bounded in planes and MB,
and a pool that never outlives its use (no thread left behind, no hang at interpreter exit); the
non-blocking mode (``on_ready``) for planes too slow to wait for: zeros at once, a callback when ready."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from dicom_factory import labelled_volume, write_enhanced_dbt
from helpers import REPO
from training.dicom.io import open_file
from training.errors import MammoInputError
from training.lazy import FrameStack, LazyStack, PlanePool, cache_settings


@pytest.fixture
def pool():
    pool = PlanePool(threads=3)
    yield pool
    pool.close()
    assert not pool.workers()  # every thread joined: nothing leaks into the next test


class Planes:
    """A plane function that records what it computed and on which thread; with a `gate`, every
    plane but those in `free` waits for it to be set (so work can be seen queued or running)."""

    def __init__(self, shape=(60, 4, 3), gate: threading.Event | None = None, free: set[int] = frozenset()):
        self.shape, self.gate, self.free = shape, gate, free
        self.computed: list[int] = []
        self.threads: set[str] = set()
        self.started = threading.Semaphore(0)

    def __call__(self, index: int) -> np.ndarray:
        if self.gate is not None and index not in self.free:
            self.started.release()
            self.gate.wait()
        self.computed.append(index)
        self.threads.add(threading.current_thread().name)
        return np.full(self.shape[1:], index, np.uint16)


def test_read_ahead_follows_the_direction_of_scrolling(pool):
    planes = Planes()
    stack = LazyStack(planes.shape, np.uint16, planes, keep=8, prefetch=True, pool=pool)
    assert stack.ahead == 6  # 8 kept: the one shown, one behind, six ahead
    assert stack[30][0, 0] == 30 and planes.computed[0] == 30
    assert stack.settle(10)
    assert sorted(planes.computed) == list(range(27, 34))  # no move yet: three each way
    planes.computed.clear()
    for index in (31, 32):  # scrolling up: each plane is ready before it is asked for
        assert stack.is_ready(index) and stack[index][0, 0] == index
    assert stack.settle(10)
    assert sorted(planes.computed) == [34, 35, 36, 37, 38]  # the six above 32 not kept already
    assert stack.cached() == list(range(31, 39))  # one behind, the one shown, six ahead
    planes.computed.clear()
    stack[31]  # a step back turns the read-ahead round
    assert stack.settle(10) and sorted(planes.computed) == [25, 26, 27, 28, 29, 30]
    assert planes.threads == {"mammodino-planes"}  # never on the asking thread


def test_read_ahead_goes_nearest_first():
    pool = PlanePool(threads=2)  # one worker reads ahead: the order is the queue's
    try:
        gate = threading.Event()
        planes = Planes(gate=gate, free={20})
        stack = LazyStack(planes.shape, np.uint16, planes, keep=6, prefetch=True, pool=pool)
        try:
            stack[20]
            assert planes.started.acquire(timeout=10) and until(lambda: stack.pending() == [18, 19, 21, 22])
        finally:
            gate.set()
        assert stack.settle(10)
        assert planes.computed == [20, 21, 19, 22, 18]  # no move yet: both ways, nearest first
    finally:
        pool.close()
    assert not pool.workers()


def until(condition, timeout=10.0):
    """Wait for work other threads do (not a timing: the timeout only stops a hang)."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "gave up waiting"
        time.sleep(0.001)
    return True


def test_a_jump_cancels_stale_read_ahead_and_goes_first(pool):
    gate = threading.Event()
    planes = Planes(gate=gate, free={0, 50})
    stack = LazyStack(planes.shape, np.uint16, planes, keep=8, prefetch=True, pool=pool)
    try:
        stack[0]  # shown; 1..6 read ahead: two run (and wait at the gate), four are queued
        for _ in range(2):
            assert planes.started.acquire(timeout=10)
        assert until(lambda: stack.pending() == [1, 2, 3, 4, 5, 6])
        assert stack[50][0, 0] == 50  # the jump is served by the worker kept free, while 1 and 2 still run
        # 3..6 were dropped before they started; 51..56 are queued behind 1 and 2
        assert until(lambda: stack.pending() == [1, 2, 51, 52, 53, 54, 55, 56])
    finally:
        gate.set()
    assert stack.settle(10)
    assert sorted(planes.computed) == [0, 1, 2, 50, 51, 52, 53, 54, 55, 56]
    assert len(stack.cached()) <= 8


def test_the_cache_never_holds_more_than_its_planes_or_its_megabytes(pool):
    planes = Planes(shape=(40, 512, 512))  # 0.5 MB planes
    stack = LazyStack(planes.shape, np.uint16, planes, keep=8, max_mb=2.2, prefetch=True, pool=pool)
    assert stack.keep == 4 and stack.ahead == 2  # 2.2 MB holds 4 planes, fewer than the 8 asked for
    rng = np.random.default_rng(0)
    for index in [*range(0, 12), *rng.integers(0, 40, 20), *range(39, 25, -1)]:
        assert stack[int(index)][0, 0] == index
        assert len(stack.cached()) <= 4 and stack._cache.nbytes() <= 2.2 * 2**20
    assert stack.settle(10)
    assert len(stack.cached()) <= 4 and stack._cache.nbytes() <= 2.2 * 2**20


def test_scrolling_that_never_waits_reads_ahead_on_one_thread():
    """A JPEG 2000 decoder keeps ~25 MB on each thread it has run on: read-ahead alone must not
    spread over the pool's threads (the last one starts for a plane someone waits for)."""
    pool = PlanePool(threads=2)
    try:
        threads: set[int] = set()

        def plane(index):
            threads.add(threading.get_ident())
            return np.full((2, 2), index, np.uint8)

        stack = LazyStack((60, 2, 2), np.uint8, plane, keep=8, prefetch=True, pool=pool)
        stack[30]
        for index in range(31, 50):
            assert stack.settle(10) and stack.is_ready(index)
            stack[index]
        assert stack.settle(10)
        assert len(threads) == 1 and len(pool.workers()) == 1
    finally:
        pool.close()


def test_a_plane_being_computed_counts_against_the_cache(pool):
    """Memory is the cache's setting: room is made before a plane is computed, not after."""
    held: list[int] = []

    def plane(index):
        held.append(len(stack.cached()))  # planes kept while this one is computed
        return np.full((2, 2), index, np.uint8)

    stack = LazyStack((30, 2, 2), np.uint8, plane, keep=4, prefetch=True, pool=pool)
    for index in range(30):
        stack[index]
        assert stack.settle(10)
    assert max(held) <= 3 and len(stack.cached()) <= 4
    assert held.count(3) > 10  # a full cache made room each time, rather than never filling


def test_a_viewer_frame_stack_shows_the_volume_exactly(tmp_path, pool, decoded):
    volume = labelled_volume(20)
    stack = FrameStack.for_viewer(open_file(write_enhanced_dbt(tmp_path / "dbt.dcm", volume)), pool=pool)
    assert decoded == []  # making the layer data decodes nothing
    np.testing.assert_array_equal(stack[10], volume[10])
    np.testing.assert_array_equal(np.asarray(stack), volume)  # every slice, in order
    np.testing.assert_array_equal(stack[::-3, 5:9], volume[::-3, 5:9])
    assert stack.settle(10) and len(stack.cached()) <= stack.keep


def test_plane_errors_reach_the_viewer_and_are_not_kept(pool):
    def plane(index):
        if index == 3:
            raise MammoInputError("frame 3 is truncated")
        return np.zeros((2, 2), np.uint8)

    stack = LazyStack((6, 2, 2), np.uint8, plane, keep=4, prefetch=True, pool=pool)
    stack[2]  # reads 3 ahead, which fails there
    assert stack.settle(10)
    with pytest.raises(MammoInputError, match="frame 3 is truncated"):
        stack[3]
    assert 3 not in stack.cached()


def test_cache_settings_come_from_the_environment(monkeypatch):
    assert cache_settings() == (8, 256.0)
    monkeypatch.setenv("MAMMODINO_SLICE_CACHE", "16")
    monkeypatch.setenv("MAMMODINO_SLICE_CACHE_MB", "64")
    assert cache_settings() == (16, 64.0)
    monkeypatch.setenv("MAMMODINO_SLICE_CACHE", "many")
    with pytest.raises(MammoInputError, match="^MAMMODINO_SLICE_CACHE='many'"):
        cache_settings()


def test_idle_workers_go_away_and_come_back():
    pool = PlanePool(threads=2, idle_s=0.05)
    try:
        assert pool.submit(lambda: 7).result(10) == 7
        worker = pool.workers()[0]
        worker.join(10)  # idle for idle_s: it exits by itself
        assert not worker.is_alive() and not pool.workers()
        assert pool.submit(lambda: 8).result(10) == 8  # and a new one starts on demand
    finally:
        pool.close()
    assert not pool.workers()


@pytest.mark.parametrize("planes", ["stuck for ever", "instant"])
def test_the_interpreter_exits_without_waiting_for_read_ahead(planes):
    """Read-ahead stuck for ever must not keep Python from exiting (daemon workers, queue dropped), nor
    may read-ahead being scheduled while the pool closes at exit deadlock it (run a few times)."""
    code = (
        "import threading, numpy as np\n"
        "from training.lazy import LazyStack\n"
        "never = threading.Event()\n"
        "def plane(i):\n"
        f"    if i != 0 and {planes == 'stuck for ever'}: never.wait()\n"
        "    return np.zeros((2, 2), np.uint8)\n"
        "stack = LazyStack((50, 2, 2), np.uint8, plane, keep=8, prefetch=True)\n"
        "stack[0]\n"
        "print('shown', flush=True)\n"
    )
    for _ in range(3 if planes == "instant" else 1):
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "shown"


class Ready:
    """An ``on_ready`` that records its calls: (index, error)."""

    def __init__(self):
        self.calls: list[tuple[int, BaseException | None]] = []

    def __call__(self, index, error):
        self.calls.append((index, error))

    def indices(self) -> list[int]:
        return sorted(i for i, _ in self.calls)


def test_a_non_blocking_stack_shows_zeros_at_once_and_says_when_a_plane_is_ready(pool):
    gate = threading.Event()
    planes, ready = Planes(gate=gate), Ready()
    stack = LazyStack(planes.shape, np.uint16, planes, keep=4, pool=pool, on_ready=ready)
    assert stack.ahead == 2
    try:
        assert not stack[30].any()  # zeros at once: plane 30 is computing behind the gate
        assert planes.started.acquire(timeout=10)
        assert not stack[30].any() and not stack.is_ready(30) and ready.calls == []  # asked twice: still computing
        assert stack.pending() == [29, 30, 31]  # queued once, its read-ahead behind it (both ways: no move yet)
    finally:
        gate.set()
    assert stack.settle(10) and until(lambda: ready.indices() == [29, 30, 31])
    assert all(error is None for _, error in ready.calls)
    assert sorted(planes.computed) == [29, 30, 31]  # each computed once
    assert stack[30][0, 0] == 30 and stack.is_ready(30)  # kept: now shown without asking the pool
    assert planes.threads == {"mammodino-planes"}


def test_non_blocking_read_ahead_follows_the_scroll_and_a_jump_cancels_it():
    pool = PlanePool(threads=2)  # one read-ahead at a time: queued work stays visible
    try:
        gate = threading.Event()
        planes, ready = Planes(gate=gate, free=set(range(9, 14))), Ready()
        stack = LazyStack(planes.shape, np.uint16, planes, keep=4, pool=pool, on_ready=ready)
        stack[10]
        assert stack.settle(10) and sorted(planes.computed) == [9, 10, 11]
        assert stack[11][0, 0] == 11  # read ahead: shown at once
        assert stack.settle(10) and sorted(planes.computed) == [9, 10, 11, 12, 13]  # two ahead, upwards
        planes.computed.clear()
        try:
            assert not stack[14].any()  # not read ahead yet: zeros, 14 computes (at the gate), 15, 16 queued
            assert planes.started.acquire(timeout=10) and stack.pending() == [14, 15, 16]
            assert not stack[40].any()  # a jump: 15 and 16 dropped; 40 first, then 41 and 42
            assert stack.pending() == [14, 40, 41, 42]
        finally:
            gate.set()
        assert stack.settle(10) and planes.computed == [14, 40, 41, 42]
        assert until(lambda: {14, 40, 41, 42} <= set(ready.indices()))
    finally:
        pool.close()
    assert not pool.workers()


def test_a_slow_non_blocking_plane_never_holds_up_a_plane_a_viewer_waits_for():
    """A non-blocking plane is read-ahead to the pool: it never takes the worker kept for planes a
    viewer waits for (an image's frame), however many are queued."""
    pool = PlanePool(threads=2)
    gate = threading.Event()
    try:
        slow = Planes(gate=gate)
        attention = LazyStack(slow.shape, np.uint16, slow, keep=4, pool=pool, on_ready=Ready())
        image = LazyStack(slow.shape, np.uint16, Planes(), keep=4, prefetch=True, pool=pool)
        attention[5]
        assert slow.started.acquire(timeout=10)  # computing, for ever until the gate opens
        attention[20]  # queued too
        shown = []
        viewer = threading.Thread(target=lambda: shown.extend(int(image[i][0, 0]) for i in (3, 30)))
        viewer.start()
        viewer.join(10)
        assert shown == [3, 30]  # both frames, while the slow plane still computes
        assert slow.computed == []
    finally:
        gate.set()
        pool.close()


def test_a_non_blocking_plane_that_fails_says_so_and_is_asked_again(pool):
    def plane(index):
        if index == 3:
            raise MammoInputError("slice 3 has no tissue")
        return np.ones((2, 2), np.uint8)

    ready = Ready()
    stack = LazyStack((6, 2, 2), np.uint8, plane, keep=2, pool=pool, on_ready=ready)
    assert not stack[3].any()
    assert stack.settle(10) and until(lambda: 3 in ready.indices())
    (error,) = [e for i, e in ready.calls if i == 3]
    assert isinstance(error, MammoInputError) and 3 not in stack.cached()
    assert not stack[3].any()  # not kept: the next read asks again
    assert stack.settle(10) and until(lambda: ready.indices().count(3) == 2)
