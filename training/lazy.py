"""Lazy slice stacks for viewers: a volume's planes computed when first shown, a few kept."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from training.dicom.image import MammoImage


class FrameStack:
    """An image's frames as a read-only numpy-style array, for viewers.

    Indexing decodes only the frames it touches and keeps the last `keep` of them (one: napari
    shows one slice of a volume at a time), so resident memory stays a few frames whatever the
    volume. `transform(values, frame)` (a per-frame VOI, a mirror) runs once per decoded frame.
    napari indexes this rather than the dask array: dask costs
    about 4 ms per compute, more than reading a whole uncompressed frame, which made it the larger
    part of showing or scrolling to a slice. Pipelines keep using ``MammoImage.data``."""

    def __init__(self, image: MammoImage, transform: Callable[[np.ndarray, int], np.ndarray] | None = None,
                 dtype: Any = None, keep: int = 1):
        self._image, self._transform, self._keep = image, transform, keep
        self.shape: tuple[int, ...] = tuple(image.data.shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(dtype or image.data.dtype)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # napari may slice from a worker thread

    @property
    def image(self) -> MammoImage:
        """The image whose frames these are (its metadata, its dask array)."""
        return self._image

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"FrameStack({self.shape}, {self.dtype}, {Path(self._image.meta.path).name})"

    def frame(self, index: int) -> np.ndarray:
        with self._lock:
            if index in self._cache:
                self._cache.move_to_end(index)
                return self._cache[index]
        values = self._image.frame(index)
        if self._transform is not None:
            values = self._transform(values, index)
        values = np.asarray(values, dtype=self.dtype)
        values.flags.writeable = False  # shared with later readers of the cache
        with self._lock:
            self._cache[index] = values
            while len(self._cache) > self._keep:
                self._cache.popitem(last=False)
        return values

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if key and key[0] is Ellipsis and self.ndim == 3:
            key = (slice(None),) * (self.ndim - len(key) + 1) + key[1:]
        if self.ndim == 2:
            return self.frame(0)[key]
        first, rest = (key[0], key[1:]) if key else (slice(None), ())
        if isinstance(first, (int, np.integer)):
            return self.frame(range(self.shape[0])[first])[rest]  # range: negative indices, bounds
        indices = np.arange(self.shape[0])[first]
        stacked = np.stack([self.frame(int(i)) for i in indices]) if len(indices) else \
            np.empty((0, *self.shape[1:]), self.dtype)
        return stacked[(slice(None), *rest)]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return np.asarray(self[...], dtype=dtype)
