"""npe2 reader: DICOM files (with or without extension), per-slice DBT series folders, exam folders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from training.errors import MammoInputError
from training.io import is_dicom_file, open_many

from ._layers import exam_layers


def _claims(path: str | os.PathLike) -> bool:
    """A DICOM file, or a folder with a DICOM file within two levels (stops at the first one)."""
    path = Path(path)
    if path.is_file():
        return is_dicom_file(path)
    if path.is_dir():
        for depth, (dirpath, dirnames, filenames) in enumerate(os.walk(path)):
            if any(is_dicom_file(Path(dirpath) / f) for f in sorted(filenames)[:50]):
                return True
            if depth > 20:
                return False
    return False


def napari_get_reader(path: str | list[str]) -> Callable | None:
    """Return the reader if `path` is ours. Never raises: a bad path simply isn't claimed."""
    try:
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        if paths and all(_claims(p) for p in paths):
            return read_mammograms
    except Exception:  # napari probes every file with every reader; it must never crash here
        return None
    return None


def read_mammograms(path: str | list[str]) -> list[tuple[Any, ...]]:
    """Lazy layers for the files/folders; a file we claimed but can't read gives one notification."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    try:
        return exam_layers(open_many(paths))
    except MammoInputError as exc:
        from napari.utils.notifications import show_error

        show_error(str(exc))
        return [(None,)]  # npe2's "nothing to add" sentinel: no second error, napari keeps running
