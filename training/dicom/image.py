"""A mammogram as the readers return it: where each frame's encoded bytes live
(:class:`FrameSource`), which frame is which (:class:`FrameRef`), and the lazily decoded image with
its header facts (:class:`MammoImage`). The limits against lying headers live here too."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np
from dask.highlevelgraph import HighLevelGraph
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from training.errors import MammoInputError
from training.dicom.metadata import ImageMeta


MAX_SIDE = 16384  # no mammography detector comes near; a larger Rows/Columns is a lying header


MAX_FRAME_PIXELS = 64_000_000


MAX_FRAMES = 4096


NATIVE_LITTLE_ENDIAN = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # Implicit / Explicit VR Little Endian


@dataclass(frozen=True)
class FrameSource:
    """Where one file's encoded pixel data lives, and what pydicom needs to decode one frame of it."""

    path: str
    offset: int  # first byte of the Pixel Data value
    transfer_syntax: str
    n_frames: int
    options: dict[str, Any] = field(hash=False)
    rescale: tuple[tuple[float, float], ...] = field(hash=False, default=())  # (slope, intercept) per frame

    def read(self, index: int) -> np.ndarray:
        """Decode frame `index` only (stored values, before any LUT)."""
        if self.transfer_syntax in NATIVE_LITTLE_ENDIAN:
            return self._read_native(index)
        decoder = get_decoder(UID(self.transfer_syntax))
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            array, _ = decoder.as_array(f, index=index, **self.options)
        return array

    def _read_native(self, index: int) -> np.ndarray:
        """Uncompressed frames need no decoder: read the frame's bytes straight into an array.
        pydicom's native path does the same plus bookkeeping that cost 3x the read itself."""
        o = self.options
        dtype = np.dtype(f"<{'i' if o['pixel_representation'] == 1 else 'u'}{o['bits_allocated'] // 8}")
        count = o["rows"] * o["columns"]
        with open(self.path, "rb") as f:
            f.seek(self.offset + index * count * dtype.itemsize)
            array = np.fromfile(f, dtype=dtype, count=count)
        if array.size != count:  # the file shrank after it was opened
            raise MammoInputError(f"{self.path}: frame {index} is truncated")
        # Clear the unused high bits, as pydicom's correct_unused_bits: one mask pass for unsigned
        # data, a shift pair (sign extension) for signed.
        shift = o["bits_allocated"] - o["bits_stored"]
        if shift > 0 and o["pixel_representation"] == 1:
            np.left_shift(array, shift, out=array)
            np.right_shift(array, shift, out=array)
        elif shift > 0:
            np.bitwise_and(array, (1 << o["bits_stored"]) - 1, out=array)
        return array.reshape(o["rows"], o["columns"])


@dataclass(frozen=True)
class FrameRef:
    """One displayed frame: which file's which frame, and its modality rescale."""

    source: FrameSource
    index: int
    slope: float = 1.0
    intercept: float = 0.0


@dataclass
class MammoImage:
    """A lazily decoded mammogram (rows, cols) or DBT volume (slices, rows, cols) plus its header facts."""

    data: da.Array
    meta: ImageMeta
    header: Dataset = field(repr=False)
    frames: list[FrameRef] = field(repr=False, default_factory=list)

    @property
    def n_frames(self) -> int:
        """Frames of the image: a DBT volume's slices, or 1 for a 2D image."""
        return int(self.data.shape[0]) if self.data.ndim == 3 else 1

    def frame_index(self, frame: int | None = None, label: str = "frame") -> int:
        """``frame`` checked against this image's frames (see :func:`frame_index`)."""
        return frame_index(frame, self.n_frames, label)

    def frame(self, index: int = 0) -> np.ndarray:
        """Modality values of one frame, decoded now."""
        return decode_frame(self.frames[index], _value_dtype(self.frames))


def frame_index(frame: int | None, n_frames: int, label: str = "frame") -> int:
    """The index of ``frame`` among ``n_frames`` (negative counts from the end; None: the middle slice,
    0 for a 2D image); a frame that does not exist is one line naming it as the caller's user knows
    it (``label``: "frame", "--frame")."""
    if frame is None:
        return n_frames // 2
    if not -n_frames <= frame < n_frames:
        frames = "only frame 0" if n_frames == 1 else f"frames 0..{n_frames - 1}"
        raise MammoInputError(f"{label} {frame} does not exist: the image has {frames}")
    return int(frame) % n_frames


def decode_frame(ref: FrameRef, dtype: np.dtype) -> np.ndarray:
    stored = ref.source.read(ref.index)
    if ref.slope == 1.0 and ref.intercept == 0.0:
        return stored.astype(dtype, copy=False)
    return (stored * np.float32(ref.slope) + np.float32(ref.intercept)).astype(dtype, copy=False)


def _value_dtype(frames: list[FrameRef]) -> np.dtype:
    """Stored dtype when no frame is rescaled (no copy, no cost), float32 otherwise."""
    if all(f.slope == 1.0 and f.intercept == 0.0 for f in frames):
        options = frames[0].source.options
        signed = options["pixel_representation"] == 1
        size = {8: 1, 16: 2, 32: 4}[options["bits_allocated"]]
        return np.dtype(f"{'i' if signed else 'u'}{size}")
    return np.dtype(np.float32)


def lazy_stack(frames: list[FrameRef], volume: bool) -> da.Array:
    """A dask array with exactly one chunk per frame; nothing is decoded until a chunk is computed."""
    dtype = _value_dtype(frames)
    rows, cols = frames[0].source.options["rows"], frames[0].source.options["columns"]
    # A plain task per frame: da.map_blocks' blockwise machinery cost more than reading a frame.
    name = f"mammodino-frames-{uuid.uuid4().hex}"  # unique: a file may change between two opens
    if volume:
        graph = {(name, i, 0, 0): (_decode_slice, ref, dtype) for i, ref in enumerate(frames)}
        chunks: tuple = ((1,) * len(frames), (rows,), (cols,))
    else:
        graph = {(name, 0, 0): (decode_frame, frames[0], dtype)}
        chunks = ((rows,), (cols,))
    meta = np.empty((0,) * len(chunks), dtype=dtype)
    return da.Array(HighLevelGraph.from_collections(name, graph, dependencies=()), name, chunks, meta=meta)


def _decode_slice(ref: FrameRef, dtype: np.dtype) -> np.ndarray:
    return decode_frame(ref, dtype)[None]
