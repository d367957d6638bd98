"""MammoImages -> napari layer-data tuples: scale in mm, DICOM window as contrast limits, hanging protocol.

Shared by the reader, the sample data and the demo so that all three show an exam the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from napari.utils.colormaps import Colormap

from training.dicom.display import ViewerDisplay, frames_share_display, to_display, viewer_display
from training.dicom.hanging import Placement, hanging_protocol
from training.lazy import FrameStack
from training.dicom.image import MammoImage

def mammo_image_of(data: Any) -> MammoImage | None:
    """The MammoImage behind an image layer made here (widgets reach its modality values,
    photometric and spacing without reopening files), or None for other data."""
    return data.image if isinstance(data, FrameStack) else None


def _colormap(display: ViewerDisplay, key: str) -> Any:
    if display.levels is None:
        return "gray_r" if display.inverted else "gray"
    levels = 1.0 - display.levels if display.inverted else display.levels
    colors = np.column_stack([levels, levels, levels, np.ones_like(levels)])
    return Colormap(colors=colors, name=f"mammodino-voi-{key}", display_name="DICOM VOI")


def image_layer(image: MammoImage, placement: Placement | None = None) -> tuple[Any, dict, str]:
    meta = image.meta
    steps = []  # applied to each frame as napari asks for it
    if frames_share_display(meta):
        display = viewer_display(meta)
        contrast, colormap, dtype = display.contrast_limits, _colormap(display, Path(meta.path).name), None
    else:  # frames carry different windows: apply each frame's own VOI
        steps.append(lambda values, frame: to_display(values, meta, frame=frame))
        contrast, colormap, dtype = (0.0, 1.0), "gray", np.float32
    name = f"{meta.laterality or ''}{meta.view or ''} {Path(meta.path).name}".strip()
    kwargs: dict[str, Any] = dict(name=name, contrast_limits=contrast, colormap=colormap,
                                  metadata={"mammodino": meta.to_json()})
    if placement is not None:
        if placement.flip:
            steps.append(lambda values, frame: values[..., ::-1])
        kwargs.update(scale=placement.scale, translate=placement.translate,
                      units=placement.units)
        kwargs["metadata"].update(flipped=placement.flip, chest_wall=placement.chest_wall,
                                  chest_wall_source=placement.chest_wall_source)
    elif meta.spacing_mm:
        kwargs.update(scale=meta.spacing_mm, units="mm")
    if meta.is_volume:
        kwargs["axis_labels"] = ("slice", "y", "x")
    # Decoded off the Qt thread, the next slices read ahead as the user scrolls (training.lazy).
    data = FrameStack.for_viewer(image, _chain(steps) if steps else None, dtype)
    return data, kwargs, "image"


def _chain(steps: list) -> Any:
    def transform(values: np.ndarray, frame: int) -> np.ndarray:
        for step in steps:
            values = step(values, frame)
        return values
    return transform


def exam_layers(images: list[MammoImage]) -> list[tuple[Any, dict, str]]:
    """One image as it is stored; several (an exam) in the hanging protocol."""
    if len(images) == 1:
        return [image_layer(images[0])]
    return [image_layer(p.image, p) for p in hanging_protocol(images)]
