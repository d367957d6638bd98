"""Frozen image features for probes and retrieval, cached on disk.

One row per image: the encoder's probe features (class token + mean patch token,
:attr:`training.evaluate.encoder.Output.features`) of the whole breast region (:meth:`Encoder.prepare_image`)
at ``resolution`` px on its long side. A DBT volume is the mean of the features of up to
``max_slices`` evenly spaced slices, so volumes and 2D views give rows of the same width.

A path is a DICOM file or a folder holding exactly one series (a folder with several images is an
error: one row is one image). The cache holds one ``.npz`` per image, named by a sha256 of the
encoder's weights, its pre-processing, the feature settings and the image files' paths, sizes and
modification times: a retrained encoder or an edited file never reads stale features, and a hit
opens no DICOM at all. Nothing is pickled (``np.load(allow_pickle=False)``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from training.errors import MammoInputError

FEATURES_VERSION = 1  # bump when what a row holds changes, so old cache files are never read
DEFAULT_MAX_SLICES = 8


def default_cache_dir() -> Path:
    """``$MAMMODINO_CACHE``, else ``$XDG_CACHE_HOME/mammodino/features`` (``~/.cache/...``)."""
    if os.environ.get("MAMMODINO_CACHE"):
        return Path(os.environ["MAMMODINO_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "mammodino" / "features"


@dataclass
class FeatureSet:
    """``features`` (N, F) float32, one row per ``paths`` entry, and how they were obtained."""

    features: np.ndarray
    paths: list[str]
    encoder: dict[str, Any]
    resolution: int
    max_slices: int
    cached: int = 0
    computed: int = 0
    seconds: float = 0.0
    cache_dir: str | None = None

    def summary(self) -> dict[str, Any]:
        """What reports print about the features (not the features themselves)."""
        return {"dim": int(self.features.shape[1]), "resolution": self.resolution, "max_slices": self.max_slices,
                "cached": self.cached, "computed": self.computed, "seconds": round(self.seconds, 2),
                "cache": self.cache_dir}


def encoder_identity(encoder: Any) -> str:
    """sha256 of what makes an encoder's features: its weights (names, dtypes, shapes, bytes), model
    config and intensity percentiles. Task heads do not change features and are left out."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"config": encoder.config.to_dict(), "percentiles": list(encoder.percentiles)},
                             sort_keys=True, default=str).encode())
    for name, tensor in sorted(encoder.backbone.state_dict().items()):
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{name}|{array.dtype}|{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def volume_slices(n: int, max_slices: int) -> list[int]:
    """Up to ``max_slices`` slice indices spread evenly over ``n`` (centres of equal bins: one slice
    is the middle one, ``max_slices >= n`` takes every slice)."""
    m = max(1, min(n, max_slices))
    return sorted({int((i + 0.5) * n / m) for i in range(m)})


def features_of(encoder: Any, image: Any, resolution: int | None = None,
                   max_slices: int = DEFAULT_MAX_SLICES) -> np.ndarray:
    """Probe features (F,) float32 of one :class:`training.dicom.image.MammoImage` (DBT: slice mean)."""
    if image.data.ndim == 3:
        frames: list[int | None] = volume_slices(image.data.shape[0], max_slices)
    else:
        frames = [None]
    prepared = [encoder.prepare_image(image, frame=f, resolution=resolution) for f in frames]
    return encoder.features(prepared).mean(axis=0).astype(np.float32)


def extract_features(encoder: Any, sources: Sequence[Any], resolution: int | None = None,
                     max_slices: int = DEFAULT_MAX_SLICES, cache: str | Path | None | bool = True,
                     progress: bool = True) -> FeatureSet:
    """Features of ``sources`` (paths, or already opened MammoImages) in order. ``cache``: True for
    :func:`default_cache_dir`, a folder, or False/None for no cache."""
    from tqdm import tqdm

    if max_slices < 1:
        raise MammoInputError(f"--slices {max_slices}: take at least one slice per volume")
    resolution = int(resolution or encoder.resolution)
    if resolution < encoder.patch_size:
        raise MammoInputError(f"--resolution {resolution}: smaller than one patch ({encoder.patch_size} px)")
    cache_dir = default_cache_dir() if cache is True else (Path(cache) if cache else None)
    if cache_dir is not None:
        _check_writable(cache_dir)
    settings = {"version": FEATURES_VERSION, "encoder": encoder_identity(encoder) if cache_dir else None,
                "resolution": resolution, "max_slices": max_slices}
    start = time.perf_counter()
    rows: list[np.ndarray] = []
    labels: list[str] = []
    hits = 0
    for source in tqdm(sources, desc="features", unit="image", file=sys.stderr, disable=not progress,
                       mininterval=0.5):
        label, files = _describe(source)
        labels.append(label)
        entry = cache_dir / f"{_entry_key(settings, files)}.npz" if cache_dir else None
        row = _read_entry(entry) if entry else None
        if row is None:
            image = _open(source)
            row = features_of(encoder, image, resolution, max_slices)
            if entry:
                _write_entry(entry, row, label)
        else:
            hits += 1
        rows.append(row)
    if not rows:
        raise MammoInputError("no images to compute features of")
    if len({r.shape for r in rows}) != 1:  # a cache entry from another width would be a key bug
        raise RuntimeError("feature rows of different widths")
    return FeatureSet(np.stack(rows), labels, encoder.describe(), resolution, max_slices, hits,
                      len(rows) - hits, time.perf_counter() - start, str(cache_dir) if cache_dir else None)


# --- sources ---------------------------------------------------------------------------------------

def _describe(source: Any) -> tuple[str, list[tuple[str, int, int]]]:
    """(label, [(absolute path, size, mtime_ns) of each file the image is read from])."""
    if hasattr(source, "frames") and hasattr(source, "meta"):  # an opened MammoImage
        paths = sorted({os.path.abspath(ref.source.path) for ref in source.frames})
        return str(source.meta.path), [_stat(p) for p in paths]
    path = Path(source)
    if path.is_dir():
        files = sorted(os.path.abspath(os.path.join(d, name)) for d, dirs, names in os.walk(path)
                       for name in names if not name.startswith("."))
        return str(source), [_stat(p) for p in files]
    if not path.exists():
        raise MammoInputError(f"{path}: no such file or folder")
    return str(source), [_stat(os.path.abspath(path))]


def _stat(path: str) -> tuple[str, int, int]:
    info = os.stat(path)
    return (path, info.st_size, info.st_mtime_ns)


def _open(source: Any) -> Any:
    if hasattr(source, "frames") and hasattr(source, "meta"):
        return source
    from training.dicom.io import open_image

    return open_image(source)  # a folder of several images -> one-line error: one row is one image


# --- cache entries ---------------------------------------------------------------------------------

def _entry_key(settings: dict[str, Any], files: list[tuple[str, int, int]]) -> str:
    return hashlib.sha256(json.dumps({**settings, "files": files}, sort_keys=True).encode()).hexdigest()


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MammoInputError(f"--cache {folder}: cannot create the feature cache ({exc.strerror}); "
                              f"pass another --cache folder or --no-cache") from None
    if not os.access(folder, os.W_OK):
        raise MammoInputError(f"--cache {folder}: not writable; pass another --cache folder or --no-cache")


def _read_entry(entry: Path) -> np.ndarray | None:
    """The cached row, or None when absent or unreadable (a damaged entry is recomputed)."""
    try:
        with np.load(entry, allow_pickle=False) as data:
            row = np.asarray(data["features"], dtype=np.float32)
    except (FileNotFoundError, OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None
    return row if row.ndim == 1 and np.isfinite(row).all() else None


def _write_entry(entry: Path, row: np.ndarray, label: str) -> None:
    """Write atomically (temporary file + rename), so a killed run leaves no half-written entry and
    parallel runs sharing a cache never read one."""
    try:
        handle, temporary = tempfile.mkstemp(dir=entry.parent, suffix=".tmp")
    except OSError as exc:  # the features are right; only the cache is lost (e.g. a full disk)
        warnings.warn(f"feature cache {entry.parent}: cannot write ({exc.strerror}); features not cached")
        return
    try:
        with os.fdopen(handle, "wb") as f:
            np.savez(f, features=row, path=np.array(label))
        os.replace(temporary, entry)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        warnings.warn(f"feature cache {entry.parent}: cannot write ({exc.strerror}); features not cached")
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
