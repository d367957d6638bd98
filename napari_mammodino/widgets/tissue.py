"""The "Tissue mask" widget: the breast-tissue mask of the selected image as a Labels layer on the
image's grid (same mm scale, translate and mirror), with its area and tissue fraction.

The widget is thin: :func:`training.tissue.tissue_of` segments, :class:`~napari_mammodino._sources.ImageSource`
caches each slice's mask (the Sampler QA and Inference widgets reuse it), this module only mirrors and
draws. A DBT slice is segmented when something asks for it: the widget's worker (the current slice, or all
slices with progress), or napari slicing the mask layer as the user scrolls.

The computation is a generator of progress steps: the widget runs it in a napari thread worker
(:mod:`napari_mammodino._workers`); tests and scripts run it in their thread with ``compute``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
from magicgui.widgets import ComboBox, Container, Label, ProgressBar, PushButton
from napari.layers import Labels
from napari.utils.colormaps import DirectLabelColormap

from training.lazy import LazyStack, cache_settings
from training.progress import Steps, run_steps

from napari_mammodino._sources import ImagePicker, ImageSource
from napari_mammodino._workers import start_form

if TYPE_CHECKING:
    import napari

SCOPES = ("current slice", "all slices")


# --- a lazily filled, read-only stack of planes (napari layer data) -------------------------------

class LazyPlanes(LazyStack):
    """A read-only (slices, rows, cols) mask stack whose planes come from ``plane(i)`` when first
    indexed (:class:`training.lazy.LazyStack`); a bare int index computes nothing until read, since
    napari reads ``layer.data[0].dtype`` when it makes a Labels layer. Like the image it lies on, it
    is computed off the Qt thread and read ahead in the direction of scrolling."""

    def __init__(self, shape: tuple[int, int, int], dtype: Any, plane: Callable[[int], np.ndarray]):
        planes, mb = cache_settings()
        super().__init__(shape, dtype, plane, keep=planes, deferred=True, prefetch=True, max_mb=mb)


# --- the computation ----------------------------------------------------------------------------

@dataclass
class TissueSummary:
    """What the widget shows: statistics over the slices asked for."""

    slices: list[int]
    fraction: float  # mean tissue fraction over those slices
    area_cm2: float | None  # tissue area (mean per slice for several); None without spacing
    chest_wall: str
    volume: bool

    def text(self) -> str:
        area = f"{self.area_cm2:.1f} cm²" if self.area_cm2 is not None else "n/a (no pixel spacing)"
        where = ""
        if self.volume:
            where = (f"slice {self.slices[0]}: " if len(self.slices) == 1
                     else f"{len(self.slices)} slices, mean per slice: ")
        return f"{where}tissue area {area} · fraction {100 * self.fraction:.1f}% · chest wall {self.chest_wall}"


def tissue_steps(source: ImageSource, slices: Iterable[int]) -> Steps:
    """Segment the given slices (cached ones are free); yields progress, returns a TissueSummary."""
    slices = list(slices)
    found = []
    for done, index in enumerate(slices, 1):
        found.append(source.tissue(index))
        yield done, len(slices)
    areas = [t.stats["area_cm2"] for t in found]
    return TissueSummary(slices, float(np.mean([t.stats["fraction"] for t in found])),
                         None if None in areas else float(np.mean(areas)),
                         found[0].stats["chest_wall"], source.is_volume)


def mask_layer_data(source: ImageSource) -> Any:
    """Layer data of the mask: an array for a 2D image, lazy planes for a volume."""
    if source.is_volume:
        return LazyPlanes(source.shape, np.uint8, source.mask_plane)
    return source.mask_plane(0)


# --- the widget -----------------------------------------------------------------------------------

class TissueWidget(Container):
    """Tissue mask of the selected image: a Labels layer aligned in mm, with area and fraction."""

    def __init__(self, napari_viewer: "napari.Viewer"):
        self.viewer = napari_viewer
        self.image = ImagePicker(napari_viewer)
        self.scope = ComboBox(label="DBT", choices=SCOPES, value=SCOPES[0],
                              tooltip="current slice: segment it now, others as you scroll to them; "
                                      "all slices: segment the whole volume now (statistics over it)")
        self.run = PushButton(text="Compute tissue mask")
        self.progress = ProgressBar(value=0, max=1, label="progress")
        self.stats = Label(value="")
        super().__init__(widgets=[self.image, self.scope, self.run, self.progress, self.stats])
        self.worker: Any = None
        self.summary: TissueSummary | None = None
        self._shown: ImageSource | None = None  # the image whose mask the statistics describe
        self.run.changed.connect(self.start)
        napari_viewer.dims.events.current_step.connect(self._slice_changed)

    def _request(self) -> tuple[ImageSource, list[int]]:
        """The image and slices to segment (MammoInputError when there is nothing to segment)."""
        source = self.image.source("Tissue mask")
        if source.is_volume and self.scope.value == "all slices":
            return source, list(range(source.n_slices))
        return source, [source.slice_index(self.viewer)]

    def start(self) -> Any:
        """Segment in a thread worker; the layer appears when it is done. Returns the task."""
        self.worker = start_form(self._request, lambda request: tissue_steps(*request),
                                 lambda request, summary: self.draw(request[0], summary), button=self.run,
                                 status=self.stats, busy="segmenting…", bar=self.progress, desc="tissue mask")
        return self.worker

    def compute(self) -> Labels | None:
        """The same work in this thread (scripts and tests)."""
        source, slices = self._request()
        return self.draw(source, run_steps(tissue_steps(source, slices)))

    def draw(self, source: ImageSource, summary: TissueSummary) -> Labels:
        """Add (or refresh) the mask layer on the image's grid and show the statistics."""
        self.run.enabled = True
        self.summary, self._shown = summary, source
        self.stats.value = summary.text()
        self.progress.value = self.progress.max
        name = f"{source.name} tissue"
        metadata = {"mammodino_tissue_of": source.name, "mammodino_tissue": {
            "slices": summary.slices, "fraction": summary.fraction, "area_cm2": summary.area_cm2,
            "chest_wall": summary.chest_wall, "flipped": source.flipped}}
        data = mask_layer_data(source)
        if name in self.viewer.layers and isinstance(self.viewer.layers[name], Labels):
            layer = self.viewer.layers[name]
            layer.data, layer.metadata = data, metadata
        else:
            # Hidden until it is in the viewer: a new layer slices itself at slice 0 first, which
            # would segment a slice nobody looks at.
            colors = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: "#39ff14"})
            layer = Labels(data, name=name, opacity=0.3, colormap=colors, metadata=metadata,
                           visible=False, **source.grid())
            layer.editable = False  # a computed mask; painting it would not change the statistics
            self.viewer.add_layer(layer)
            layer.visible = True
            self.viewer.layers.selection.active = source.layer  # keep the image selected
        return layer

    def _slice_changed(self, event: Any = None) -> None:
        """Scrolling a volume with its mask shown: statistics of the slice on screen (the mask layer
        segments that slice anyway; this reuses it)."""
        source = self._shown
        if source is None or not source.is_volume or self.scope.value != "current slice":
            return
        name = f"{source.name} tissue"
        if name not in self.viewer.layers or not self.viewer.layers[name].visible:
            return
        self.summary = run_steps(tissue_steps(source, [source.slice_index(self.viewer)]))
        self.stats.value = self.summary.text()
