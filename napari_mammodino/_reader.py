"""npe2 reader: DICOM files (with or without extension), per-slice DBT series folders, exam folders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from training.errors import MammoInputError
from training.dicom.io import is_dicom_file, open_many

from napari_mammodino._layers import exam_layers
from napari_mammodino._workers import Refused


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
        layers = exam_layers(open_many(paths))
    except MammoInputError as exc:
        Refused.of(exc).show()
        return [(None,)]  # npe2's "nothing to add" sentinel: no second error, napari keeps running
    _show_only_the_current_slice(layers)
    return layers


def _show_only_the_current_slice(layers: list[tuple[Any, dict, str]]) -> None:
    """A new layer slices itself at index 0 before the viewer moves it to the middle slice, which
    would decode a frame nobody sees. Volumes are therefore created hidden and revealed once they
    are in the viewer, so the first decode is the slice on screen."""
    from napari import current_viewer

    viewer = current_viewer()
    if viewer is None:
        return
    viewer.layers.events.inserted.connect(_reveal)  # the same callback twice is connected once
    for data, kwargs, _ in layers:
        if getattr(data, "ndim", 0) == 3 and kwargs.get("visible", True):
            kwargs["visible"] = False
            kwargs["metadata"]["mammodino_reveal"] = True


def _reveal(event: Any) -> None:
    layer = event.value
    if layer.metadata.pop("mammodino_reveal", False):
        layer.visible = True
