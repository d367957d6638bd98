"""Open mammograms and tomosynthesis volumes lazily: a DICOM file, a per-slice series folder, an exam.

Opening reads headers only. Each image becomes a dask array with one chunk per frame; computing a
chunk seeks to that frame's bytes and decodes just them with pydicom 3's per-frame decoder
(``Decoder.as_array(file, index=i)``). Values are modality values (rescale applied); display
(VOI window/LUT, MONOCHROME1 inversion) lives in :mod:`training.dicom.display`.

Every header value that sizes work is checked against the file before anything is allocated, so a
header that lies about its size gives a one-line :class:`MammoInputError`, not a 10 GB allocation.
"""

from __future__ import annotations

import os
import struct
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import dask.array as da
import numpy as np
from dask.highlevelgraph import HighLevelGraph
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from training.errors import MammoInputError
from training.dicom.metadata import (DBT_SOP_CLASSES, ImageMeta, build_meta, laterality_of, rescale_of,
    slice_normal, view_of, windows_of)

MAX_SIDE = 16384  # no mammography detector comes near; a larger Rows/Columns is a lying header
MAX_FRAME_PIXELS = 64_000_000
MAX_FRAMES = 4096
MAX_FILES = 5000  # in one folder scan
PIXEL_DATA_TAG = (0x7FE0, 0x0010)
NATIVE_LITTLE_ENDIAN = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # Implicit / Explicit VR Little Endian
ITEM, SEQ_DELIM = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)

# What to install for each decodable transfer syntax whose decoder is missing.
INSTALL_HINTS = {
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg", "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg", "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg", "1.2.840.10008.1.2.4.80": "pyjpegls",
    "1.2.840.10008.1.2.4.81": "pyjpegls", "1.2.840.10008.1.2.4.57": "python-gdcm",
    "1.2.840.10008.1.2.4.70": "python-gdcm", "1.2.840.10008.1.2.4.50": "pillow",
    "1.2.840.10008.1.2.4.51": "python-gdcm", "1.2.840.10008.1.2.5": "pylibjpeg-rle",
}


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True if the file has the DICOM Part 10 'DICM' marker at byte 128 (extension is irrelevant)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


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

    def frame(self, index: int = 0) -> np.ndarray:
        """Modality values of one frame, decoded now."""
        return decode_frame(self.frames[index], _value_dtype(self.frames))


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


# --- one file ------------------------------------------------------------------------------------

def read_header(path: str | os.PathLike) -> tuple[Dataset, FrameSource]:
    """Parse everything but the pixel data and check that the pixel data the header promises exists."""
    path = str(path)
    if not os.path.exists(path):
        raise MammoInputError(f"{path}: no such file or folder")
    if not os.path.isfile(path):
        raise MammoInputError(f"{path}: not a file")
    if not is_dicom_file(path):
        raise MammoInputError(f"{path}: not a DICOM file (no 'DICM' marker at byte 128)")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many types for a damaged header
            raise MammoInputError(f"{path}: damaged or truncated DICOM header ({_short(exc)})") from None
        tag_start = f.tell()
        return ds, _pixel_source(path, ds, f, tag_start, size)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def _pixel_source(path: str, ds: Dataset, f: Any, tag_start: int, size: int) -> FrameSource:
    if str(ds.file_meta.get("TransferSyntaxUID", "")) == "1.2.840.10008.1.2.1.99":
        raise MammoInputError(f"{path}: Deflated Explicit VR Little Endian cannot be read frame by frame; "
                              "inflate it first (e.g. dcmconv +te)")
    head = f.read(12)
    if len(head) < 8:
        raise MammoInputError(f"{path}: has no pixel data (the file ends after the header; truncated?)")
    group, element = struct.unpack("<HH", head[:4])
    if (group, element) != PIXEL_DATA_TAG:
        raise MammoInputError(f"{path}: has no (7FE0,0010) Pixel Data (found ({group:04X},{element:04X}) "
                              "instead); float pixel data is not a mammogram")
    implicit, little = ds.original_encoding
    if little is False:
        raise MammoInputError(f"{path}: Explicit VR Big Endian is retired and not supported; "
                              "convert it to little endian (e.g. dcmconv +te)")
    if implicit:
        length, value_start = struct.unpack("<L", head[4:8])[0], tag_start + 8
    else:
        length, value_start = struct.unpack("<L", head[8:12])[0], tag_start + 12

    rows, cols = _required_int(ds, "Rows", path), _required_int(ds, "Columns", path)
    bits_allocated = _required_int(ds, "BitsAllocated", path)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    n_frames = _required_int(ds, "NumberOfFrames", path, default=1) or 1
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise MammoInputError(f"{path}: {photometric or 'no photometric'} with {samples} samples per "
                              "pixel is not a grey-scale X-ray image (MONOCHROME1/2 expected)")
    if not (0 < rows <= MAX_SIDE and 0 < cols <= MAX_SIDE) or rows * cols > MAX_FRAME_PIXELS:
        raise MammoInputError(f"{path}: header claims an implausible {rows} x {cols} image "
                              f"(at most {MAX_SIDE} per side); the header is corrupt")
    if not 0 < n_frames <= MAX_FRAMES:
        raise MammoInputError(f"{path}: header claims {n_frames} frames (at most {MAX_FRAMES}); "
                              "the header is corrupt")
    if bits_allocated not in (8, 16, 32):
        raise MammoInputError(f"{path}: {bits_allocated} bits allocated is not supported (8, 16 or 32)")

    ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2")))
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise MammoInputError(f"{path}: transfer syntax {ts.name or 'unknown'} ({ts}) cannot be decoded "
                              "by any installed or known decoder; convert the file to an uncompressed "
                              "or JPEG 2000 syntax") from None
    if not decoder.is_available:
        hint = INSTALL_HINTS.get(str(ts), " or ".join(decoder.missing_dependencies) or "a decoder plugin")
        raise MammoInputError(f"{path}: transfer syntax {ts.name} ({ts}) needs a decoder that is not "
                              f"installed: pip install {hint}")

    options: dict[str, Any] = dict(
        rows=rows, columns=cols, samples_per_pixel=1, bits_allocated=bits_allocated,
        bits_stored=int(ds.get("BitsStored", bits_allocated) or bits_allocated),
        pixel_representation=int(ds.get("PixelRepresentation", 0) or 0),
        photometric_interpretation=photometric, number_of_frames=n_frames, pixel_keyword="PixelData",
    )
    if ts.is_encapsulated:
        if length != 0xFFFFFFFF:
            raise MammoInputError(f"{path}: compressed pixel data must have undefined length; file is corrupt")
        offsets = _fragment_table(path, f, value_start, size, n_frames)
        if offsets is not None:
            options["extended_offsets"] = offsets
    else:
        expected = rows * cols * n_frames * bits_allocated // 8
        available = size - value_start
        if length == 0xFFFFFFFF or length < expected or available < expected:
            have = min(length, available) if length != 0xFFFFFFFF else available
            raise MammoInputError(f"{path}: pixel data is shorter than the header says ({have} of "
                                  f"{expected} bytes for {n_frames} x {rows} x {cols}); the file is "
                                  "truncated or its header is wrong")
    try:  # rescale changes every pixel value: a damaged one must fail here, with the file named
        rescale = tuple(rescale_of(ds, frame)[:2] for frame in range(n_frames))
    except MammoInputError as exc:
        raise MammoInputError(f"{path}: {exc}") from None
    return FrameSource(path, value_start, str(ts), n_frames, options, rescale)


def _required_int(ds: Dataset, keyword: str, path: str, default: int | None = None) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        if default is not None:
            return default
        raise MammoInputError(f"{path}: required attribute {keyword} is missing")
    try:  # a text VR (IS) may hold anything in a damaged header
        return int(value)
    except (TypeError, ValueError):
        raise MammoInputError(f"{path}: {keyword} is {str(value)[:40]!r}, not a number; the header is "
                              "corrupt") from None


def _fragment_table(path: str, f: Any, start: int, size: int, n_frames: int) -> tuple[list[int], list[int]] | None:
    """Walk the encapsulated items by seeking (nothing decoded). Returns (offsets, lengths) usable as
    an Extended Offset Table when there is one fragment per frame, else None (pydicom then uses the
    Basic Offset Table). Raises if the data is truncated or holds fewer frames than the header claims."""
    f.seek(start)
    header = f.read(8)
    if len(header) < 8 or struct.unpack("<HH", header[:4]) != ITEM:
        raise MammoInputError(f"{path}: compressed pixel data has no Basic Offset Table item; file is corrupt")
    bot_length = struct.unpack("<L", header[4:])[0]
    first = start + 8 + bot_length
    if first > size:
        raise MammoInputError(f"{path}: pixel data is truncated (inside the offset table)")
    f.seek(first)
    offsets: list[int] = []
    lengths: list[int] = []
    while True:
        header = f.read(8)
        if len(header) < 8:
            raise MammoInputError(f"{path}: compressed pixel data is truncated after {len(offsets)} "
                                  f"fragments (header says {n_frames} frames)")
        tag, length = struct.unpack("<HH", header[:4]), struct.unpack("<L", header[4:])[0]
        if tag == SEQ_DELIM:
            break
        position = f.tell()
        if tag != ITEM or position + length > size:
            raise MammoInputError(f"{path}: compressed pixel data is truncated or corrupt at fragment "
                                  f"{len(offsets) + 1} (header says {n_frames} frames)")
        offsets.append(position - 8 - first)
        lengths.append(length)
        f.seek(length, 1)
        if len(offsets) > MAX_FRAMES * 64:
            raise MammoInputError(f"{path}: implausibly many pixel-data fragments; file is corrupt")
    n_bot = bot_length // 4
    if n_bot and n_bot != n_frames:
        raise MammoInputError(f"{path}: header claims {n_frames} frames but the offset table lists {n_bot}")
    if len(offsets) < n_frames:
        raise MammoInputError(f"{path}: header claims {n_frames} frames but the pixel data holds only "
                              f"{len(offsets)} fragments; the file is truncated or its header is wrong")
    return (offsets, lengths) if len(offsets) == n_frames and n_frames > 1 else None


def open_file(path: str | os.PathLike) -> MammoImage:
    """One DICOM file: a 2D image, or a multi-frame (e.g. enhanced DBT) volume. A PNG/JPEG/TIFF file
    (by suffix; a DICM marker wins) opens through :mod:`training.dicom.raster`."""
    from training.dicom.raster import is_raster_file, open_raster  # lazy: training.raster builds on this module

    if is_raster_file(path) and not is_dicom_file(path):
        return open_raster(path)
    return _from_header(Path(path), *read_header(path))


# --- folders -------------------------------------------------------------------------------------

def dicom_files_in(folder: str | os.PathLike, max_depth: int = 3) -> list[Path]:
    """DICOM files (by their DICM marker, any or no extension) below `folder`, sorted by path."""
    root = Path(folder)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if depth < max_depth else []
        for name in sorted(filenames):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            candidate = Path(dirpath) / name
            if is_dicom_file(candidate):
                found.append(candidate)
                if len(found) > MAX_FILES:
                    raise MammoInputError(f"{folder}: more than {MAX_FILES} DICOM files; open a smaller folder")
    return found


def _is_slice_series(headers: list[Dataset]) -> bool:
    """Several single-frame files of one series, one size, one breast and view: slices of a volume."""
    if len(headers) < 2:
        return False
    first = headers[0]
    same = all(int(h.get("NumberOfFrames", 1) or 1) == 1 and h.get("Rows") == first.get("Rows")
               and h.get("Columns") == first.get("Columns") for h in headers)
    views = {(view_of(h)[0], laterality_of(h)[0]) for h in headers}
    tomo = str(first.get("SOPClassUID", "")) in DBT_SOP_CLASSES or all("ImagePositionPatient" in h for h in headers)
    return same and len(views) == 1 and tomo


def _slice_order(headers: list[Dataset], paths: list[Path]) -> tuple[list[int], list[np.ndarray] | None]:
    """Order of slices by position along the slice normal, else InstanceNumber (never by file name)."""
    normal = slice_normal(headers[0])
    if all("ImagePositionPatient" in h for h in headers):
        positions = [np.array([float(v) for v in h.ImagePositionPatient]) for h in headers]
        keys = [float(p @ normal) if normal is not None else float(p[2]) for p in positions]
        order = sorted(range(len(headers)), key=lambda i: (keys[i], str(paths[i])))
        if len(set(keys)) != len(keys):
            raise MammoInputError(f"{paths[0].parent}: two slices share one position; the folder mixes volumes")
        return order, [positions[i] for i in order]
    if all("InstanceNumber" in h for h in headers):
        return sorted(range(len(headers)), key=lambda i: int(headers[i].InstanceNumber)), None
    raise MammoInputError(f"{paths[0].parent}: slices have neither ImagePositionPatient nor InstanceNumber; "
                          "their order is unknown")


def open_series(paths: list[Path], headers: list[tuple[Dataset, FrameSource]] | None = None) -> MammoImage:
    """Single-frame files of one volume, sorted by position into a (slices, rows, cols) lazy stack."""
    headers = headers or [read_header(p) for p in paths]
    order, positions = _slice_order([h for h, _ in headers], paths)
    frames = [FrameRef(headers[i][1], 0, *headers[i][1].rescale[0]) for i in order]
    first = headers[order[0]][0]
    data = lazy_stack(frames, volume=True)
    meta = build_meta(first, str(paths[order[0]].parent), data.shape, str(data.dtype), len(frames),
                      n_files=len(frames), positions=positions)
    slice_windows = [windows_of(headers[i][0], 1)[0] for i in order]
    if any(w != slice_windows[0] for w in slice_windows):
        meta.frame_windows = slice_windows
    return MammoImage(data, meta, first, frames)


def open_folder(folder: str | os.PathLike) -> list[MammoImage]:
    """Every image in a folder: per-slice series become volumes, other files stay separate images."""
    paths = dicom_files_in(folder)
    if not paths:
        raise MammoInputError(f"{folder}: no DICOM files found (checked for the DICM marker)")
    headers = [read_header(p) for p in paths]
    by_series: dict[str, list[int]] = {}
    for i, (ds, _) in enumerate(headers):
        by_series.setdefault(str(ds.get("SeriesInstanceUID", f"file-{i}")), []).append(i)
    images: list[MammoImage] = []
    for members in by_series.values():
        if _is_slice_series([headers[i][0] for i in members]):
            images.append(open_series([paths[i] for i in members], [headers[i] for i in members]))
        else:
            images.extend(_from_header(paths[i], *headers[i]) for i in members)
    return images


def _from_header(path: Path, ds: Dataset, source: FrameSource) -> MammoImage:
    frames = [FrameRef(source, i, *source.rescale[i]) for i in range(source.n_frames)]
    data = lazy_stack(frames, source.n_frames > 1)
    return MammoImage(data, build_meta(ds, str(path), data.shape, str(data.dtype), source.n_frames), ds, frames)


def open_path(path: str | os.PathLike) -> list[MammoImage]:
    """A file gives one image; a folder gives its volumes and images (an exam gives four views)."""
    if os.path.isdir(path):
        return open_folder(path)
    return [open_file(path)]


def open_image(path: str | os.PathLike) -> MammoImage:
    """Exactly one image: a file, or a folder that holds one series (else a clear error)."""
    images = open_path(path)
    if len(images) != 1:
        names = ", ".join(_label(im) for im in images[:6])
        raise MammoInputError(f"{path}: folder mixes {len(images)} images or series ({names}); "
                              "pass one file or a folder holding one series")
    return images[0]


def _label(image: MammoImage) -> str:
    return f"{image.meta.laterality or '?'}{image.meta.view or '?'} {Path(image.meta.path).name}"


def open_many(paths: Iterable[str | os.PathLike]) -> list[MammoImage]:
    images: list[MammoImage] = []
    for p in paths:
        images.extend(open_path(p))
    return images
