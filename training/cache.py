"""Preprocessing cache for pretraining: each image decoded, segmented and downsampled once, then
memory-mapped by every epoch (and every DataLoader worker) instead of decoding DICOM again.

Layout of a cache folder ``DIR``:

* ``DIR/<key>.values.npy``: the image's MONOCHROME2 values (tissue bright, MONOCHROME1 inverted as the
  sampler expects), downsampled and stored as uint16: ``(rows, cols)`` for FFDM, ``(slices, rows, cols)``
  for DBT (one slice per frame). Values map back by ``lo + u * (hi - lo) / 65535`` with the entry's
  ``scale`` ``[lo, hi]`` to modality values (negated for MONOCHROME1): one increasing affine map per
  image, which the sampler's percentile window undoes, and one for all slices of a volume, so both
  slices of a DBT pair keep one intensity window.
* ``DIR/<key>.tissue.npy``: the tissue mask (bool, same shape): :func:`training.tissue.tissue_of` of the
  full-resolution frame (per slice for DBT), downsampled like the values (0/1 means) and kept where
  at least half tissue.
* ``DIR/<key>.json``: the entry: source path, files with size and modification time (``files``), kind,
  frames, source and cached shapes and spacings, photometric, scale, settings. Written last, after
  the arrays, so an interrupted build leaves no entry that looks finished.
* ``DIR/index.json``: settings and every entry, rewritten at the end of each build; what readers load.

``key`` is a hash of the image's file list (one file, or a DBT series' slice files), so two images
of one folder never share an entry. An entry is reused when its files' sizes and modification times,
the settings and the format version still match; otherwise it is rebuilt. The arrays are written with
``np.lib.format.open_memmap`` under a temporary name and renamed into place (atomic).

Resolution (:class:`CacheSettings`): the long side is brought down to ``long_side`` pixels (default
1024) and/or the pixel spacing up to ``spacing_mm``, whichever is coarser; never upsampled. Integer
block means, then bilinear interpolation for the remaining factor (under 2), as the sampler's own pyramid.

What differs from sampling the DICOM directly (same seeds, same rule, same batch layout): boxes are
drawn on the cached pixel grid, so crops come from a coarser source (a global crop of 224 px of a
1024 px image covers the same fraction of the breast as before but holds fewer source pixels); the
tissue fractions are measured on the downsampled mask; the region's minimum side (``global_size``
pixels) is in cached pixels; intensities are quantised to 16 bits (1/65535 of the image's range,
far below the noise). With ``long_side`` at least the image size the crops equal the uncached ones
up to that quantisation (within 5e-5 on the sample data's crops in [0, 1]).

Parallel build with dask (:func:`build_cache`): one task per image (a DBT volume's slices together,
so that they share one intensity scale) over local processes by default
(``dask.bag`` on the ``processes`` scheduler), or on a ``dask.distributed`` cluster given its scheduler
address (``tcp://host:8786``; ``distributed`` is then imported, and must be installed, and every
worker must see the data and the cache folder at the same paths).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import from_dict, to_dict
from .errors import MammoInputError

VERSION = 1
INDEX = "index.json"
U16 = 65535


@dataclass(frozen=True)
class CacheSettings:
    """How far images are downsampled: long side at most ``long_side`` pixels (None: no limit) and
    pixel spacing at least ``spacing_mm`` (None: no limit); the coarser of the two wins."""

    long_side: int | None = 1024
    spacing_mm: float | None = None

    def __post_init__(self) -> None:
        if self.long_side is not None and self.long_side < 16:
            raise MammoInputError(f"cache: long_side {self.long_side} is too small (at least 16 pixels)")
        if self.spacing_mm is not None and not self.spacing_mm > 0:
            raise MammoInputError(f"cache: spacing_mm must be positive, not {self.spacing_mm}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CacheSettings":
        return from_dict(cls, values, "cache settings")

    def factor(self, shape: Sequence[int], spacing_mm: Sequence[float] | None) -> float:
        """The downsampling factor (>= 1) for a frame of ``shape`` (rows, cols) and spacing (mm)."""
        factor = 1.0
        if self.long_side is not None:
            factor = max(factor, max(shape) / self.long_side)
        if self.spacing_mm is not None and spacing_mm:
            factor = max(factor, self.spacing_mm / min(float(s) for s in spacing_mm[-2:]))
        return factor


# --- files and keys --------------------------------------------------------------------------------

def source_files(image: Any) -> list[str]:
    """The files an image's pixels come from (absolute paths, frame order, each once)."""
    return list(dict.fromkeys(str(Path(ref.source.path).resolve()) for ref in image.frames))


def file_stamps(files: Sequence[str]) -> list[list[Any]]:
    """``[path, size, mtime_ns]`` of each file: what says that a source changed."""
    stamps = []
    for path in files:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise MammoInputError(f"cache: cannot read {path} ({exc.strerror})") from None
        stamps.append([path, st.st_size, st.st_mtime_ns])
    return stamps


def entry_key(files: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(files).encode()).hexdigest()[:20]


def _fresh(entry: dict[str, Any] | None, stamps: list[list[Any]], settings: CacheSettings, folder: Path) -> bool:
    return (entry is not None and entry.get("version") == VERSION and entry.get("files") == stamps
            and entry.get("settings") == settings.to_dict()
            and (folder / entry["values"]).is_file() and (folder / entry["tissue"]).is_file())


# --- one entry -------------------------------------------------------------------------------------

def downsample(frame: np.ndarray, factor: float) -> np.ndarray:
    """``frame`` (2D, any real dtype) reduced by ``factor`` >= 1, float32: integer block means first
    (exact area means), then bilinear interpolation for the rest (a factor under 2). The sampler's own
    pyramid does the same; an exact fractional area resize (skimage's ``resize_local_mean``) cost 20x."""
    from skimage.transform import resize

    from .tissue import block_mean

    if factor <= 1.0:
        return np.asarray(frame, dtype=np.float32)
    rows, cols = (max(1, round(n / factor)) for n in frame.shape)
    k = max(1, int(factor))
    reduced = block_mean(frame, k) if k > 1 else np.asarray(frame, dtype=np.float32)
    if reduced.shape != (rows, cols):
        reduced = resize(reduced, (rows, cols), order=1, mode="edge", anti_aliasing=False,
                         preserve_range=True).astype(np.float32, copy=False)
    return reduced


def build_entry(task: dict[str, Any]) -> dict[str, Any]:
    """Decode, segment, downsample and write one image's entry (runs in a dask worker). ``task``:
    ``files`` (the image's files), ``folder``, ``key``, ``stamps``, ``settings``."""
    from .tissue import frame_and_tissue
    from .io import open_file, open_series

    files = task["files"]
    folder = Path(task["folder"])
    settings = CacheSettings.from_dict(task["settings"])
    image = open_file(files[0]) if len(files) == 1 else open_series([Path(f) for f in files])
    volume = image.data.ndim == 3
    n_frames = image.data.shape[0] if volume else 1
    spacing = image.meta.spacing_mm
    factor = settings.factor(image.data.shape[-2:], spacing)
    values, masks = [], []
    for index in range(n_frames):
        frame, tissue = frame_and_tissue(image, index)
        values.append(downsample(frame, factor))
        masks.append(downsample(tissue.view(np.uint8), factor) >= 0.5)
    lo = float(min(v.min() for v in values))
    hi = float(max(v.max() for v in values))
    if not hi > lo:
        hi = lo + 1.0
    shape = values[0].shape
    stored = (n_frames, *shape) if volume else shape
    key = task["key"]
    names = {"values": f"{key}.values.npy", "tissue": f"{key}.tissue.npy"}
    for name, dtype, arrays in (("values", np.uint16, values), ("tissue", np.bool_, masks)):
        final = folder / names[name]
        temporary = folder / f".{final.name}.{os.getpid()}.tmp"
        out = np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=stored)
        for index, array in enumerate(arrays):
            if name == "values":
                array = np.rint((array - lo) * (U16 / (hi - lo)))
            out[index if volume else ...] = array
        out.flush()
        del out  # closes the map before the rename
        os.replace(temporary, final)
    source_shape = tuple(int(n) for n in image.data.shape[-2:])
    used = [(n // max(1, int(factor))) * max(1, int(factor)) for n in source_shape]  # rows block means kept
    cached_spacing = None
    if spacing:
        cached_spacing = [round(float(s) * u / c, 9) for s, u, c in zip(spacing[-2:], used, shape)]
    entry = {
        "version": VERSION, "key": key, "source": image.meta.path, "files": task["stamps"],
        "kind": "dbt" if volume else "ffdm", "frames": n_frames, "photometric": image.meta.photometric,
        "source_shape": list(source_shape), "shape": list(shape), "factor": factor,
        "source_spacing_mm": [float(s) for s in spacing[-2:]] if spacing else None,
        "spacing_mm": cached_spacing, "scale": [lo, hi],
        "tissue_fraction": [float(m.mean()) for m in masks], "settings": settings.to_dict(), **names,
    }
    _write_json(folder / f"{key}.json", entry)
    return entry


def _write_json(path: Path, value: Any) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(value), encoding="utf-8")
    os.replace(temporary, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --- the whole cache -------------------------------------------------------------------------------

def cache_settings(folder: str | Path, settings: CacheSettings | None = None) -> CacheSettings:
    """The settings of the cache in ``folder``: ``settings`` (checked against an existing index), the
    existing index's, or the defaults for a new folder."""
    index = _read_json(Path(folder) / INDEX)
    existing = CacheSettings.from_dict(index["settings"]) if isinstance(index, dict) and "settings" in index else None
    if settings is not None and existing is not None and settings != existing:
        raise MammoInputError(f"cache {folder} was built with {existing.to_dict()}, not {settings.to_dict()}; "
                              f"choose another cache folder")
    return settings or existing or CacheSettings()


def build_cache(images: Sequence[Any] | str | Path, folder: str | Path, settings: CacheSettings | None = None,
                workers: int | None = None, scheduler: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Build or update the cache in ``folder`` for ``images`` (:class:`training.io.MammoImage` objects,
    or a ``--data`` folder/CSV): entries whose files changed (or that are missing) are rebuilt in
    parallel, the others reused. ``workers``: local processes (default: one per CPU; 1 builds in this
    process); ``scheduler``: a ``dask.distributed`` scheduler address instead. Returns a report."""
    from .data import open_data

    start = time.perf_counter()
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MammoInputError(f"cache {folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    settings = cache_settings(folder, settings)
    if isinstance(images, (str, Path)):
        images = open_data(images)
    index = _read_json(folder / INDEX)
    entries: dict[str, Any] = dict(index.get("entries", {})) if isinstance(index, dict) else {}
    tasks: dict[str, dict[str, Any]] = {}
    keys = []
    for image in images:
        files = source_files(image)
        key = entry_key(files)
        keys.append(key)
        stamps = file_stamps(files)
        if key in tasks or _fresh(entries.get(key), stamps, settings, folder):
            continue
        entry = _read_json(folder / f"{key}.json")  # an interrupted build's entry, not yet in the index
        if _fresh(entry, stamps, settings, folder):
            entries[key] = entry
        else:
            tasks[key] = {"files": files, "folder": str(folder), "key": key, "stamps": stamps,
                          "settings": settings.to_dict()}
    for entry in _run(list(tasks.values()), workers, scheduler, progress):
        entries[entry["key"]] = entry
    _write_json(folder / INDEX, {"version": VERSION, "settings": settings.to_dict(), "entries": entries})
    used = [entries[k] for k in dict.fromkeys(keys)]
    size = sum((folder / e[name]).stat().st_size for e in used for name in ("values", "tissue"))
    return {"cache": str(folder), "settings": settings.to_dict(), "images": len(used), "built": len(tasks),
            "reused": len(used) - len(tasks), "frames": sum(e["frames"] for e in used),
            "bytes": size, "seconds": round(time.perf_counter() - start, 2)}


def _run(tasks: list[dict[str, Any]], workers: int | None, scheduler: str | None, progress: bool) -> list[dict]:
    """``build_entry`` over ``tasks`` with dask: local processes, this process, or a distributed cluster."""
    if not tasks:
        return []
    import dask.bag as db

    workers = max(1, workers or os.cpu_count() or 1)
    if scheduler is None and (workers == 1 or len(tasks) == 1):  # no process start-up: this process
        from tqdm import tqdm

        return [build_entry(task) for task in tqdm(tasks, disable=not progress, file=sys.stderr, unit="image")]
    # Small partitions balance images of very different cost (a DBT volume against an FFDM view).
    partitions = min(len(tasks), max(4 * workers, math.ceil(len(tasks) / 64)))
    bag = db.from_sequence(tasks, npartitions=partitions).map(build_entry)
    if scheduler is not None:
        try:
            from distributed import Client
        except ImportError:
            raise MammoInputError(f"--scheduler {scheduler}: needs dask.distributed "
                                  f"(pip install distributed)") from None
        try:
            client = Client(scheduler, timeout=30)
        except (OSError, TimeoutError) as exc:
            raise MammoInputError(f"--scheduler {scheduler}: cannot connect ({exc})") from None
        with client:
            return list(bag.compute(scheduler=client))
    if progress:
        from dask.diagnostics import ProgressBar

        with ProgressBar(out=sys.stderr):
            return list(bag.compute(scheduler="processes", num_workers=workers))
    return list(bag.compute(scheduler="processes", num_workers=workers))


# --- reading ---------------------------------------------------------------------------------------

class FrameCache:
    """A built cache, read through memory maps (cheap to pickle into DataLoader workers: it holds the
    index only, and each worker maps the files it reads)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = _read_json(self.folder / INDEX)
        if not isinstance(index, dict) or index.get("version") != VERSION:
            raise MammoInputError(f"cache {self.folder}: no cache index (build it with mammodino cache)")
        self.settings = CacheSettings.from_dict(index["settings"])
        self.entries: dict[str, dict[str, Any]] = index["entries"]

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records about the cache."""
        return {"folder": str(self.folder.resolve()), "settings": self.settings.to_dict(), "version": VERSION}

    def entry(self, image: Any) -> dict[str, Any]:
        """The up-to-date entry of ``image`` (a :class:`training.io.MammoImage`); a missing or stale one
        is an error that says how to rebuild."""
        files = source_files(image)
        entry = self.entries.get(entry_key(files))
        if not _fresh(entry, file_stamps(files), self.settings, self.folder):
            raise MammoInputError(f"cache {self.folder}: {image.meta.path} is missing or changed since the cache "
                                  f"was built; update it (mammodino cache, or pretrain --cache)")
        return entry

    def frame(self, entry: dict[str, Any], frame: int) -> tuple[np.ndarray, np.ndarray]:
        """Memory-mapped MONOCHROME2 values (uint16) and tissue mask (bool) of one frame."""
        values = np.load(self.folder / entry["values"], mmap_mode="r")
        tissue = np.load(self.folder / entry["tissue"], mmap_mode="r")
        if entry["kind"] == "dbt":
            return values[frame], tissue[frame]
        return values, tissue
