"""Preprocessing cache for pretraining: each image decoded, segmented and downsampled once, then
memory-mapped by every epoch (and every DataLoader worker) instead of decoding DICOM again.

Where: ``mammodino pretrain`` builds and reads one automatically, in :func:`default_cache_dir`
(``$MAMMODINO_CACHE/frames``, else ``~/.cache/mammodino/frames``), unless given ``--cache DIR`` (a
folder of its own) or ``--no-cache`` (decode every draw). ``mammodino cache`` builds one ahead of time,
in parallel or on a cluster.

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
* ``DIR/<key>.json``: the entry, authoritative: source path, files with size, modification time and
  SHA-256 (``files``), kind, frames, source and cached shapes and spacings, photometric, scale,
  settings, preprocessing version. Written last, after the arrays, so an interrupted build leaves no
  entry that looks finished. An image that could not be decoded gets an entry with an ``error`` (no
  arrays): readers skip it, and every build tries it again.
* ``DIR/index.json``: the folder's settings and every entry, merged under a lock (``DIR/.lock``) at the
  end of each build: what readers load first (one file instead of one per image).

Keys and freshness. ``key`` is a hash of the image's file list (one file, or a DBT series' slice
files), the settings and :func:`preprocessing` (the format and the tissue segmentation's parameters):
two images never share an entry, and a change of settings or of the algorithm's version reads other
entries (the old ones stay on disk until the folder is deleted). An entry is current while its files'
sizes and modification times are those it recorded. When they change, the build hashes the files
again: the same SHA-256 (a copy, a ``touch``, an rsync without ``-t``) keeps the arrays, another
rebuilds them. The digests are memoised in the entry by (path, size, mtime_ns), so an unchanged
dataset is never re-hashed. Whole files are hashed, not their first and last megabytes: pixel edits
that keep a DICOM's size (burned-in annotations removed, pixels re-anonymised) sit in the middle of
the file, and the hash reads the bytes the build decodes anyway, in the same worker.

Concurrency. Arrays and entries are written under temporary names unique to the process and renamed
into place (atomic), the index is merged under an exclusive ``flock``, and readers fall back to the
per-entry JSON when the index lacks an entry: two runs building one cache at once (two jobs started
on the default cache) only duplicate work. Where ``flock`` is missing (Windows, some network file
systems) the index may miss the other build's entries; readers still find them.

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
worker must see the data and the cache folder at the same paths). An image that cannot be decoded
or segmented is skipped with one line on stderr and counted (``unreadable`` in the report); a long
build never stops for one damaged file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import sys
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from training.config import from_dict, to_dict
from training.errors import MammoInputError

OPEN_MAPS = 128  # memory maps a reader keeps open (two file descriptors each)
FORMAT = 2  # bump when what an entry holds changes: the layout, downsample(), or tissue.py's algorithm
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


def preprocessing() -> dict[str, Any]:
    """What else decides an entry's arrays: the format version and the tissue segmentation's parameters
    (the upper-case constants of :mod:`training.tissue`), so retuning the segmentation invalidates
    without anyone remembering to bump :data:`FORMAT` (a change of its code still needs the bump)."""
    from training import tissue

    parameters = {name: value for name, value in sorted(vars(tissue).items())
                  if name.isupper() and isinstance(value, (int, float)) and not isinstance(value, bool)}
    return {"format": FORMAT, "tissue": parameters}


def default_cache_dir() -> Path:
    """Where pretraining keeps its automatic cache: ``$MAMMODINO_CACHE/frames``, else
    ``$XDG_CACHE_HOME/mammodino/frames`` (``~/.cache/...``), next to the feature cache
    (:func:`training.evaluate.features.default_cache_dir`, whose rule this follows)."""
    from training.evaluate.features import default_cache_dir as features_dir

    base = features_dir()  # $MAMMODINO_CACHE itself, or .../mammodino/features
    return (base if os.environ.get("MAMMODINO_CACHE") else base.parent) / "frames"


# --- files and keys --------------------------------------------------------------------------------

def source_files(image: Any) -> list[str]:
    """The files an image's pixels come from (absolute paths, frame order, each once)."""
    return list(dict.fromkeys(str(Path(ref.source.path).resolve()) for ref in image.frames))


def file_stamps(files: Sequence[str]) -> list[list[Any]]:
    """``[path, size, mtime_ns]`` of each file: what says that a source may have changed."""
    stamps = []
    for path in files:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise MammoInputError(f"cache: cannot read {path} ({exc.strerror})") from None
        stamps.append([path, st.st_size, st.st_mtime_ns])
    return stamps


def file_digest(path: str | Path) -> str:
    """SHA-256 of a whole file (see the module notes for why not just its ends)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def entry_key(files: Sequence[str], settings: CacheSettings) -> str:
    what = json.dumps({"files": list(files), "settings": settings.to_dict(), "preprocessing": preprocessing()},
                      sort_keys=True)
    return hashlib.sha1(what.encode()).hexdigest()[:20]


def _current(entry: Any, stamps: list[list[Any]], settings: CacheSettings, folder: Path,
             errors: bool = False) -> bool:
    """Whether ``entry`` describes the files as they are now (sizes and modification times), with these
    settings and this preprocessing; an entry of an unreadable image counts only with ``errors``."""
    if not isinstance(entry, dict) or entry.get("preprocessing") != preprocessing():
        return False
    if entry.get("settings") != settings.to_dict() or [f[:3] for f in entry.get("files", [])] != stamps:
        return False
    if "error" in entry:
        return errors
    return (folder / entry["values"]).is_file() and (folder / entry["tissue"]).is_file()


# --- one entry -------------------------------------------------------------------------------------

def downsample(frame: np.ndarray, factor: float) -> np.ndarray:
    """``frame`` (2D, any real dtype) reduced by ``factor`` >= 1, float32: integer block means first
    (exact area means), then bilinear interpolation for the rest (a factor under 2). The sampler's own
    pyramid does the same; an exact fractional area resize (skimage's ``resize_local_mean``) cost 20x."""
    from skimage.transform import resize

    from training.tissue import block_mean

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
    """Hash, decode, segment, downsample and write one image's entry (runs in a dask worker). ``task``:
    ``files`` (the image's files), ``source``, ``folder``, ``key``, ``stamps``, ``settings`` and
    ``previous`` (the entry these files had, or None). Files whose SHA-256 did not change keep the
    previous arrays. An image that fails (any error of a decoder or of the segmentation: one damaged
    file must not stop a build of thousands) gets an entry with ``error`` and no arrays. Returns the
    entry, with ``"kept": True`` (not written) when the previous arrays were kept."""
    folder = Path(task["folder"])
    settings = CacheSettings.from_dict(task["settings"])
    base = {"key": task["key"], "source": task["source"], "settings": settings.to_dict(),
            "preprocessing": preprocessing()}
    try:
        files = [[*stamp, file_digest(stamp[0])] for stamp in task["stamps"]]
        previous = task.get("previous")
        if (isinstance(previous, dict) and "error" not in previous and previous.get("files")
                and previous.get("preprocessing") == base["preprocessing"]
                and [f[3:] for f in previous["files"]] == [f[3:] for f in files]
                and (folder / previous["values"]).is_file() and (folder / previous["tissue"]).is_file()):
            entry = {**previous, "files": files}  # same bytes: only the stamps moved
            _write_json(folder / f"{task['key']}.json", entry)
            return {**entry, "kept": True}
        entry = {**base, "files": files, **_write_arrays(task["files"], folder, task["key"], settings)}
    except Exception as exc:  # noqa: BLE001 - reported and counted, see the docstring
        reason = str(exc) if isinstance(exc, (MammoInputError, OSError)) else f"{type(exc).__name__}: {exc}"
        entry = {**base, "files": [[*stamp, None] for stamp in task["stamps"]], "error": _short(reason, task["source"])}
    _write_json(folder / f"{task['key']}.json", entry)
    return entry


def _write_arrays(files: list[str], folder: Path, key: str, settings: CacheSettings) -> dict[str, Any]:
    """The values and tissue arrays of one image, written atomically; returns what the entry says of them."""
    from training.dicom.io import open_file, open_series
    from training.tissue import frame_and_tissue

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
    names = {"values": f"{key}.values.npy", "tissue": f"{key}.tissue.npy"}
    for name, dtype, arrays in (("values", np.uint16, values), ("tissue", np.bool_, masks)):
        final = folder / names[name]
        temporary = _temporary(final)
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
    return {
        "source": image.meta.path, "kind": "dbt" if volume else "ffdm", "frames": n_frames,
        "photometric": image.meta.photometric, "source_shape": list(source_shape), "shape": list(shape),
        "factor": factor, "source_spacing_mm": [float(s) for s in spacing[-2:]] if spacing else None,
        "spacing_mm": cached_spacing, "scale": [lo, hi],
        "tissue_fraction": [float(m.mean()) for m in masks], **names,
    }


def _short(reason: str, source: str) -> str:
    """One line, without the path the skip line names already."""
    reason = " ".join(reason.split())
    return reason[len(source) + 2:] if reason.startswith(f"{source}: ") else reason


def _temporary(path: Path) -> Path:
    """A temporary name next to ``path``, unique to this process (and host: a cluster shares folders)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _write_json(path: Path, value: Any) -> None:
    temporary = _temporary(path)
    temporary.write_text(json.dumps(value), encoding="utf-8")
    os.replace(temporary, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder/.lock`` while the index is re-read, merged and rewritten, so two
    builds finishing together never drop each other's entries. Without ``flock`` (Windows, some
    network file systems) it runs unlocked: readers then find entries through their JSON files."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(folder / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            handle = None
        try:
            yield
        finally:
            if handle is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


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
                workers: int | None = None, scheduler: str | None = None, progress: bool = False,
                fixed_settings: bool = True) -> dict[str, Any]:
    """Build or update the cache in ``folder`` for ``images`` (:class:`training.dicom.image.MammoImage` objects,
    or a ``--data`` folder/CSV): entries whose files changed (or that are missing) are rebuilt in
    parallel, the others reused. ``workers``: local processes (default: one per CPU; 1 builds in this
    process); ``scheduler``: a ``dask.distributed`` scheduler address instead. ``fixed_settings``: the
    folder keeps the settings it was first built with (other ones are an error: a folder the user
    named); False lets entries of several settings live side by side (the default folder, which a new
    version with other defaults must not refuse). Returns a report; ``unreadable`` counts the images
    skipped (one line each on stderr)."""
    from training.labels import open_data_skipping

    start = time.perf_counter()
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MammoInputError(f"cache {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MammoInputError(f"cache {folder}: cannot create the folder ({exc.strerror}); "
                              f"choose another with --cache or set MAMMODINO_CACHE") from None
    settings = cache_settings(folder, settings) if fixed_settings else settings or CacheSettings()
    unopened: list[tuple[str, str]] = []
    if isinstance(images, (str, Path)):
        images, unopened = open_data_skipping(images)
    index = _read_json(folder / INDEX)
    entries: dict[str, Any] = dict(index.get("entries", {})) if isinstance(index, dict) else {}
    tasks: dict[str, dict[str, Any]] = {}
    keys = []
    for image in images:
        files = source_files(image)
        key = entry_key(files, settings)
        keys.append(key)
        stamps = file_stamps(files)
        if key in tasks or _current(entries.get(key), stamps, settings, folder):
            continue
        entry = _read_json(folder / f"{key}.json")  # another build's entry, not yet in this index
        if _current(entry, stamps, settings, folder):
            entries[key] = entry
        else:
            tasks[key] = {"files": files, "source": image.meta.path, "folder": str(folder), "key": key,
                          "stamps": stamps, "settings": settings.to_dict(),
                          "previous": entry if isinstance(entry, dict) else entries.get(key)}
    built = {entry["key"]: entry for entry in _run(list(tasks.values()), workers, scheduler, progress)}
    kept = sum(bool(entry.pop("kept", False)) for entry in built.values())  # touched or copied, same bytes
    entries.update(built)
    failed = [entry for entry in built.values() if "error" in entry]
    for entry in failed:
        print(f"mammodino: skipped {entry['source']}: {entry['error']}", file=sys.stderr)
    used = [entries[k] for k in dict.fromkeys(keys)]
    if used and len(failed) == len(used):
        raise MammoInputError(f"cache: none of the {len(used)} images could be read, e.g. "
                              f"{failed[0]['source']}: {failed[0]['error']}")
    with _locked(folder):  # merged with what another build wrote meanwhile
        index = _read_json(folder / INDEX)
        merged = dict(index.get("entries", {})) if isinstance(index, dict) else {}
        merged = {k: e for k, e in merged.items() if e.get("preprocessing") == preprocessing()}  # unreadable now
        merged.update({key: entries[key] for key in dict.fromkeys(keys)})
        _write_json(folder / INDEX, {"format": FORMAT, "settings": settings.to_dict(), "entries": merged})
    good = [e for e in used if "error" not in e]
    size = sum((folder / e[name]).stat().st_size for e in good for name in ("values", "tissue"))
    written = len(tasks) - len(failed) - kept
    return {"cache": str(folder), "settings": settings.to_dict(), "images": len(good), "built": written,
            "reused": len(good) - written, "rehashed": kept, "unreadable": len(failed) + len(unopened),
            "frames": sum(e["frames"] for e in good), "bytes": size, "seconds": round(time.perf_counter() - start, 2)}


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
    index only, and each worker maps the files it reads). ``settings``: which entries to read (default:
    the folder's); ``automatic``: whether this is the default folder pretraining chose by itself
    (recorded, so that ``--resume`` reads the same way)."""

    def __init__(self, folder: str | Path, settings: CacheSettings | None = None, automatic: bool = False):
        self.folder = Path(folder)
        self.automatic = automatic
        index = _read_json(self.folder / INDEX)
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            if settings is None:
                raise MammoInputError(f"cache {self.folder}: no cache index (build it with mammodino cache)")
            index = {}
        self.settings = settings or CacheSettings.from_dict(index["settings"])
        self.entries: dict[str, dict[str, Any]] = index.get("entries", {})
        self._maps: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": OrderedDict()}  # each process maps the files itself

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records about the cache (what a resumed run must read the same way)."""
        return {"folder": str(self.folder.resolve()), "settings": self.settings.to_dict(),
                "preprocessing": preprocessing(), "automatic": self.automatic}

    def entry(self, image: Any) -> dict[str, Any]:
        """The current entry of ``image`` (a :class:`training.dicom.image.MammoImage`), from the index or its own
        JSON file; it holds ``error`` when the image could not be read. A missing or stale entry is an
        error that says how to rebuild."""
        files = source_files(image)
        key = entry_key(files, self.settings)
        stamps = file_stamps(files)
        for entry in (self.entries.get(key), _read_json(self.folder / f"{key}.json")):
            if _current(entry, stamps, self.settings, self.folder, errors=True):
                return entry
        raise MammoInputError(f"cache {self.folder}: {image.meta.path} is missing or changed since the cache "
                              f"was built; update it (mammodino cache, or pretrain --cache)")

    def frame(self, entry: dict[str, Any], frame: int) -> tuple[np.ndarray, np.ndarray]:
        """Memory-mapped MONOCHROME2 values (uint16) and tissue mask (bool) of one frame. The maps of the
        last :data:`OPEN_MAPS` images stay open: opening two ``.npy`` files cost a sixth of a cached
        draw (each map holds a file descriptor, so not all of them)."""
        key = entry["key"]
        if key in self._maps:
            self._maps.move_to_end(key)
        else:
            self._maps[key] = (np.load(self.folder / entry["values"], mmap_mode="r"),
                               np.load(self.folder / entry["tissue"], mmap_mode="r"))
            while len(self._maps) > OPEN_MAPS:
                self._maps.popitem(last=False)
        values, tissue = self._maps[key]
        if entry["kind"] == "dbt":
            return values[frame], tissue[frame]
        return values, tissue
