"""Open mammograms and tomosynthesis volumes lazily: a DICOM file, a per-slice series folder, an exam.

Opening reads headers only (per-frame functional groups as frames are asked for, see
:mod:`training.dicom.frame_groups`). Each image becomes a dask array with one chunk per frame (made on
first use); computing a chunk seeks to that frame's bytes and decodes just them: uncompressed frames
straight into an array, one-fragment-per-frame JPEG 2000 by imagecodecs (it releases the GIL), the
rest with pydicom 3's per-frame decoder (``Decoder.as_array(file, index=i)``). Values are modality values (rescale applied); display
(VOI window/LUT, MONOCHROME1 inversion) lives in :mod:`training.dicom.display`.

Every header value that sizes work is checked against the file before anything is allocated, so a
header that lies about its size gives a one-line :class:`MammoInputError`, not a 10 GB allocation.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from training.errors import MammoInputError
from training.dicom.frame_groups import read_until_pixels, value_of
from training.dicom.metadata import (DBT_SOP_CLASSES, build_meta, frame_rescales, laterality_of,
    slice_normal, view_of, windows_of)
from training.dicom.raster import is_raster_file, open_raster
from training.dicom.image import (FrameRef, FrameRefs, FrameSource, MAX_FRAMES, MAX_FRAME_PIXELS, MAX_SIDE,
    MammoImage, lazy_stack, stack_shape)


MAX_FILES = 5000  # in one folder scan


PIXEL_DATA_TAG = (0x7FE0, 0x0010)


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
            ds = read_until_pixels(f)  # pydicom's reading, but per-frame items are parsed when asked for
        except Exception as exc:  # pydicom raises many types for a damaged header
            raise MammoInputError(f"{path}: damaged or truncated DICOM header ({_short(exc)})") from None
        tag_start = f.tell()
        return ds, _pixel_source(path, ds, f, tag_start, size)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def _pixel_source(path: str, ds: Dataset, f: Any, tag_start: int, size: int) -> FrameSource:
    if str(value_of(ds.file_meta, "TransferSyntaxUID", "")) == "1.2.840.10008.1.2.1.99":
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
    samples = int(value_of(ds, "SamplesPerPixel", 1) or 1)
    photometric = str(value_of(ds, "PhotometricInterpretation", "")).strip().upper()
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

    ts = UID(str(value_of(ds.file_meta, "TransferSyntaxUID", "1.2.840.10008.1.2")))
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
        bits_stored=int(value_of(ds, "BitsStored", bits_allocated) or bits_allocated),
        pixel_representation=int(value_of(ds, "PixelRepresentation", 0) or 0),
        photometric_interpretation=photometric, number_of_frames=n_frames, pixel_keyword="PixelData",
    )
    if ts.is_encapsulated:
        if length != 0xFFFFFFFF:
            raise MammoInputError(f"{path}: compressed pixel data must have undefined length; file is corrupt")
        offsets, first_fragment = _fragment_table(path, f, value_start, size, n_frames)
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
        rescale = frame_rescales(ds, n_frames)
    except MammoInputError as exc:
        raise MammoInputError(f"{path}: {exc}") from None
    return FrameSource(path, value_start, str(ts), n_frames, options, rescale,
                       first_fragment if ts.is_encapsulated else 0)


def _required_int(ds: Dataset, keyword: str, path: str, default: int | None = None) -> int:
    value = value_of(ds, keyword)
    if value is None or value == "":
        if default is not None:
            return default
        raise MammoInputError(f"{path}: required attribute {keyword} is missing")
    try:  # a text VR (IS) may hold anything in a damaged header
        return int(value)
    except (TypeError, ValueError):
        raise MammoInputError(f"{path}: {keyword} is {str(value)[:40]!r}, not a number; the header is "
                              "corrupt") from None


def _fragment_table(path: str, f: Any, start: int, size: int,
                    n_frames: int) -> tuple[tuple[list[int], list[int]] | None, int]:
    """Walk the encapsulated items by seeking (nothing decoded). Returns (offsets, lengths) usable as
    an Extended Offset Table when there is one fragment per frame, else None (pydicom then uses the
    Basic Offset Table), and the file position the offsets count from (the first fragment's item).
    Raises if the data is truncated or holds fewer frames than the header claims."""
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
    return ((offsets, lengths) if len(offsets) == n_frames and n_frames > 1 else None), first


def open_file(path: str | os.PathLike) -> MammoImage:
    """One DICOM file: a 2D image, or a multi-frame (e.g. enhanced DBT) volume. A PNG/JPEG/TIFF file
    (by suffix; a DICM marker wins) opens through :mod:`training.dicom.raster`."""
    if is_raster_file(path) and not is_dicom_file(path):
        return open_raster(path)
    return _from_header(Path(path), *read_header(path))


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
    frames, volume = FrameRefs(source), source.n_frames > 1
    shape, dtype = stack_shape(frames, volume)
    meta = build_meta(ds, str(path), shape, str(dtype), source.n_frames)
    return MammoImage(lambda: lazy_stack(frames, volume), meta, ds, frames)  # the dask graph when first used


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
