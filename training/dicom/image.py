"""A mammogram as the readers return it: where each frame's encoded bytes live
(:class:`FrameSource`), which frame is which (:class:`FrameRef`), and the lazily decoded image with
its header facts (:class:`MammoImage`). The limits against lying headers live here too."""

from __future__ import annotations

import mmap
import os
import threading
import uuid
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

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


JPEG_2000 = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}  # lossless only, and lossy


try:  # OpenJPEG behind a binding that lets go of the GIL (pydicom's GDCM and pylibjpeg hold it)
    from imagecodecs import jpeg2k_decode as _jpeg2k_decode
except ImportError:  # pragma: no cover - a declared dependency; pydicom's decoders still work
    _jpeg2k_decode = None


_DECODING = threading.local()


def decode_threads() -> int:
    """Threads one JPEG 2000 frame may decode on: every core (at most 4) for a frame someone waits
    for, 1 inside :func:`one_thread_per_decode` (frames read ahead, several at once)."""
    return getattr(_DECODING, "threads", None) or min(4, os.cpu_count() or 1)


@contextmanager
def one_thread_per_decode() -> Iterator[None]:
    previous = getattr(_DECODING, "threads", None)
    _DECODING.threads = 1
    try:
        yield
    finally:
        _DECODING.threads = previous


HUGE_PAGE = 2 << 20  # Linux's transparent huge pages on x86-64 and most arm64 systems


def frame_buffer(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An empty array for one decoded frame, in a private memory mapping of its own.

    * It goes back to the system the moment the frame is dropped. Decoded into malloc'd arrays, JPEG
      2000 frames and the decoder's buffers stayed in glibc's heap once its mmap threshold had risen
      past a frame: scrolling held 167 MB where the cache and one decoder need 79.
    * Its whole 2 MB stretches are asked to be huge pages (where the kernel has transparent huge
      pages): a fresh frame is faulted in 2 MB at a time, not 4 kB, so reading an uncompressed
      2048 x 1664 frame into it took 2.0 ms where ``np.fromfile`` took 2.8. The tail stays in small
      pages: resident memory is the frame's size, not rounded up to 2 MB.

    A frame under 2 MB (a small phantom, a thumbnail) is a plain array: it gains nothing from huge
    pages, and malloc's reused memory is already faulted in. So is one where private anonymous
    mappings don't exist (Windows)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    nbytes = count * dtype.itemsize
    if nbytes < HUGE_PAGE:
        return np.empty(shape, dtype)
    try:
        mapped = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE)
    except (AttributeError, OSError, ValueError, TypeError):
        return np.empty(shape, dtype)
    skip = -np.frombuffer(mapped, np.uint8, 1).ctypes.data % HUGE_PAGE  # to a 2 MB boundary
    whole = nbytes // HUGE_PAGE * HUGE_PAGE
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mapped.madvise(mmap.MADV_HUGEPAGE, skip, whole)
        except OSError:  # a kernel without huge pages: small ones it is
            pass
    return np.frombuffer(mapped, dtype, count, offset=skip).reshape(shape)


@dataclass(frozen=True)
class FrameSource:
    """Where one file's encoded pixel data lives, and what pydicom needs to decode one frame of it."""

    path: str
    offset: int  # first byte of the Pixel Data value
    transfer_syntax: str
    n_frames: int
    options: dict[str, Any] = field(hash=False)
    rescale: tuple[tuple[float, float], ...] = field(hash=False, default=())  # (slope, intercept) per frame
    first_fragment: int = 0  # file position of the first fragment's item tag (after the offset table)

    def read(self, index: int) -> np.ndarray:
        """Decode frame `index` only (stored values, before any LUT)."""
        if self.transfer_syntax in NATIVE_LITTLE_ENDIAN:
            return self._read_native(index)
        if self.transfer_syntax in JPEG_2000 and _jpeg2k_decode is not None and "extended_offsets" in self.options:
            found = self._read_jpeg2000(index)
            if found is not None:
                return found
        decoder = get_decoder(UID(self.transfer_syntax))
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            array, _ = decoder.as_array(f, index=index, **self.options)
        return array

    def _read_jpeg2000(self, index: int) -> np.ndarray | None:
        """One frame's JPEG 2000 codestream (one fragment per frame) decoded by OpenJPEG through
        imagecodecs, which releases the GIL: frames read ahead decode beside the viewer's thread, not
        in its way. None (pydicom decodes) for anything but a plain unsigned grey codestream whose
        precision is BitsStored, where pydicom's corrections could apply."""
        o = self.options
        offsets, lengths = o["extended_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self.first_fragment + offsets[index] + 8)
            encoded = f.read(lengths[index])
        if len(encoded) != lengths[index]:  # the file shrank after it was opened
            raise MammoInputError(f"{self.path}: frame {index} is truncated")
        # SOC, SIZ: Csiz at byte 40, component 0's Ssiz (signed bit, precision - 1) at byte 42
        if (encoded[:4] != b"\xff\x4f\xff\x51" or len(encoded) < 43 or encoded[40:42] != b"\x00\x01"
                or encoded[42] != o["bits_stored"] - 1 or o["pixel_representation"] != 0):
            return None
        out = frame_buffer((o["rows"], o["columns"]), np.dtype(f"u{o['bits_allocated'] // 8}"))
        try:
            return _jpeg2k_decode(encoded, numthreads=decode_threads(), out=out)
        except (ValueError, TypeError, RuntimeError):  # not the shape or dtype the header says: pydicom's
            return None  # decoder tells what is wrong

    def _read_native(self, index: int) -> np.ndarray:
        """Uncompressed frames need no decoder: read the frame's bytes straight into an array
        (:func:`frame_buffer`). pydicom's native path does the same plus bookkeeping that cost 3x the
        read itself."""
        o = self.options
        dtype = np.dtype(f"<{'i' if o['pixel_representation'] == 1 else 'u'}{o['bits_allocated'] // 8}")
        array = frame_buffer((o["rows"] * o["columns"],), dtype)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset + index * array.nbytes)
            read = _read_into(f, array)
        if read != array.nbytes:  # the file shrank after it was opened
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


def _read_into(f: Any, array: np.ndarray) -> int:
    """Fill ``array`` from the unbuffered file ``f``; the bytes read (fewer only at the end of the file)."""
    view, done = memoryview(array).cast("B"), 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            break
        done += got
    return done


@dataclass(frozen=True)
class FrameRef:
    """One displayed frame: which file's which frame, and its modality rescale."""

    source: FrameSource
    index: int
    slope: float = 1.0
    intercept: float = 0.0


class FrameRefs(Sequence):
    """The :class:`FrameRef` of each frame of one file, made when asked for: a 240-frame volume
    opens without making 240 of them."""

    def __init__(self, source: FrameSource):
        self.source = source

    def __len__(self) -> int:
        return self.source.n_frames

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(self.source.n_frames)[index]]
        index = range(self.source.n_frames)[index]
        return FrameRef(self.source, index, *self.source.rescale[index])

    def __repr__(self) -> str:
        return f"FrameRefs({self.source.path!r}, {self.source.n_frames} frames)"


class MammoImage:
    """A lazily decoded mammogram (rows, cols) or DBT volume (slices, rows, cols) plus its header facts.

    ``data`` is its dask array, one chunk per frame. It may be given as a function that makes it:
    then it is made on first use (a viewer shows frames through ``frame`` and never needs it, and
    making a 240-chunk graph cost a tenth of opening a volume)."""

    def __init__(self, data: da.Array | Callable[[], da.Array], meta: ImageMeta, header: Dataset,
                 frames: Sequence[FrameRef] = ()):
        self._data, self.meta, self.header, self.frames = data, meta, header, frames

    def __repr__(self) -> str:
        return f"MammoImage({self.meta.path!r}, {self.shape}, {self.dtype})"

    @property
    def data(self) -> da.Array:
        if not isinstance(self._data, da.Array):
            self._data = self._data()
        return self._data

    @property
    def shape(self) -> tuple[int, ...]:
        """(rows, cols) or (slices, rows, cols), as ``data.shape``."""
        return tuple(self.meta.shape)

    @property
    def dtype(self) -> np.dtype:
        """The values' dtype, as ``data.dtype``: stored, or float32 where a rescale applies."""
        return np.dtype(self.meta.dtype)

    @property
    def n_frames(self) -> int:
        """Frames of the image: a DBT volume's slices, or 1 for a 2D image."""
        return int(self.shape[0]) if len(self.shape) == 3 else 1

    def frame_index(self, frame: int | None = None, label: str = "frame") -> int:
        """``frame`` checked against this image's frames (see :func:`frame_index`)."""
        return frame_index(frame, self.n_frames, label)

    def frame(self, index: int = 0) -> np.ndarray:
        """Modality values of one frame, decoded now."""
        return decode_frame(self.frames[index], self.dtype)


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


def _value_dtype(frames: Sequence[FrameRef]) -> np.dtype:
    """Stored dtype when no frame is rescaled (no copy, no cost), float32 otherwise."""
    rescales = set(frames.source.rescale) if isinstance(frames, FrameRefs) else {(f.slope, f.intercept) for f in frames}
    if rescales <= {(1.0, 0.0)}:
        options = frames[0].source.options
        signed = options["pixel_representation"] == 1
        size = {8: 1, 16: 2, 32: 4}[options["bits_allocated"]]
        return np.dtype(f"{'i' if signed else 'u'}{size}")
    return np.dtype(np.float32)


def stack_shape(frames: Sequence[FrameRef], volume: bool) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype :func:`lazy_stack` gives these frames, without making it."""
    rows, cols = frames[0].source.options["rows"], frames[0].source.options["columns"]
    return ((len(frames), rows, cols) if volume else (rows, cols)), _value_dtype(frames)


def lazy_stack(frames: Sequence[FrameRef], volume: bool) -> da.Array:
    """A dask array with exactly one chunk per frame; nothing is decoded until a chunk is computed."""
    dtype = _value_dtype(frames)
    rows, cols = frames[0].source.options["rows"], frames[0].source.options["columns"]
    # A plain task per frame: da.map_blocks' blockwise machinery cost more than reading a frame.
    # Each task holds the frames' bound __getitem__ (opaque to dask) and an index, so no FrameRef
    # is made before its frame is computed.
    name = f"mammodino-frames-{uuid.uuid4().hex}"  # unique: a file may change between two opens
    if volume:
        ref_of = frames.__getitem__
        graph = {(name, i, 0, 0): (_decode_slice, ref_of, i, dtype) for i in range(len(frames))}
        chunks: tuple = ((1,) * len(frames), (rows,), (cols,))
    else:
        graph = {(name, 0, 0): (decode_frame, frames[0], dtype)}
        chunks = ((rows,), (cols,))
    meta = np.empty((0,) * len(chunks), dtype=dtype)
    return da.Array(HighLevelGraph.from_collections(name, graph, dependencies=()), name, chunks, meta=meta)


def _decode_slice(ref_of: Any, index: int, dtype: np.dtype) -> np.ndarray:
    return decode_frame(ref_of(index), dtype)[None]
