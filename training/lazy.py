"""Lazy slice stacks for viewers: a volume's planes computed when first shown, a few kept.

:class:`LazyStack` is the one such array: image frames (:class:`FrameStack`), attention maps per DBT
slice (``training.evaluate.infer.LazyAttentionStack``) and tissue or sampler masks per slice (the
napari widgets' ``LazyPlanes``) are all this class with their own per-plane function."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Hashable

import numpy as np

from training.dicom.image import MammoImage


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


class LazyStack:
    """A read-only numpy-style array whose planes ``plane(i)`` computes when they are first indexed.

    ``shape`` is (planes, rows, cols[, channels]), or (rows, cols) for a single plane (a 2D image:
    ``plane(0)`` is the whole array). Indexing computes only the planes it touches and keeps the last
    ``keep`` of them (napari shows one slice at a time), so a layer over a 60-slice volume costs the
    slices the user looks at. ``plane(i)`` may return None: not ready yet (computed elsewhere), shown
    as zeros and not kept, so the next read asks again. With ``deferred`` a bare int index gives a
    :class:`DeferredPlane`, computed only when its values are read: napari reads ``data[0].dtype``
    when it makes a Labels layer, which must not compute a slice nobody looks at."""

    def __init__(self, shape: tuple[int, ...], dtype: Any, plane: Callable[[int], np.ndarray | None],
                 keep: int = 1, deferred: bool = False):
        self.shape: tuple[int, ...] = tuple(int(n) for n in shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(dtype)
        self._compute, self._deferred = plane, deferred
        self._cache = LRU(keep)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.shape}, {self.dtype})"

    @property
    def plane_shape(self) -> tuple[int, ...]:
        return self.shape if self.ndim == 2 else self.shape[1:]

    def plane(self, index: int) -> np.ndarray:
        """Plane ``index`` (read-only), from the cache or computed now (zeros while not ready)."""
        found = self._cache.get(index)
        if found is not None:
            return found
        values = self._compute(index)
        if values is None:
            return np.zeros(self.plane_shape, self.dtype)
        values = np.asarray(values, dtype=self.dtype).view()  # a view: the caller's array stays writeable
        values.flags.writeable = False  # shared with later readers of the cache
        self._cache.put(index, values)
        return values

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

    Indexing decodes only the frames it touches and keeps the last `keep` of them (one: napari
    shows one slice of a volume at a time), so resident memory stays a few frames whatever the
    volume. `transform(values, frame)` (a per-frame VOI, a mirror) runs once per decoded frame.
    napari indexes this rather than the dask array: dask costs
    about 4 ms per compute, more than reading a whole uncompressed frame, which made it the larger
    part of showing or scrolling to a slice. Pipelines keep using ``MammoImage.data``."""

    def __init__(self, image: MammoImage, transform: Callable[[np.ndarray, int], np.ndarray] | None = None,
                 dtype: Any = None, keep: int = 1):
        self._image, self._transform = image, transform
        super().__init__(image.data.shape, dtype or image.data.dtype, self._decode, keep)

    @property
    def image(self) -> MammoImage:
        """The image whose frames these are (its metadata, its dask array)."""
        return self._image

    def __repr__(self) -> str:
        return f"FrameStack({self.shape}, {self.dtype}, {Path(self._image.meta.path).name})"

    def _decode(self, index: int) -> np.ndarray:
        values = self._image.frame(index)
        return values if self._transform is None else self._transform(values, index)
