"""The "Tissue mask" widget: the breast-tissue mask of the selected image as a Labels layer on the
image's grid (same mm scale, translate and mirror), with its area and tissue fraction.

The widget is thin: :func:`training.tissue.tissue_of` segments, this module only caches, mirrors
and draws. What both QA widgets need from an image layer lives in :class:`ImageSource`:

* Pixels. A layer made by this plugin's reader keeps its :class:`~training.dicom.image.MammoImage` (see
  ``_layers.mammo_image_of``), so the widgets segment and sample the *stored* modality values in the
  *stored* orientation, exactly as ``mammodino tissue`` / ``mammodino sample`` do; boxes and masks
  are then mirrored onto the layer when the hanging protocol mirrored it (``metadata["flipped"]``).
  Any other image layer is used as it is shown (MONOCHROME2, never mirrored).
* World coordinates. Every layer the widgets add takes the image layer's scale, translate and
  units, so one image pixel (row r, column c of the layer's data) is the same mm in both layers.
* Laziness. A DBT slice is segmented when something asks for it: the widget's worker (the current
  slice, or all slices with progress), or napari slicing the mask layer as the user scrolls. Masks
  are cached bit-packed (1/8 of a bool array), so a whole volume's masks stay small.

Computations are generators that yield ``(done, total)`` (stardist-napari's pattern): the widget
runs them in a napari thread worker with a progress bar; tests run them synchronously with
:func:`run_steps`.
"""

from __future__ import annotations

import copy
import functools
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
from magicgui.widgets import ComboBox, Container, Label, ProgressBar, PushButton
from napari.layers import Image, Labels
from napari.utils.colormaps import DirectLabelColormap

from training.errors import MammoInputError
from training.dicom.image import MammoImage
from training.progress import Steps, run_steps
from training.tissue import TissueResult, segment_tissue, tissue_of

from napari_mammodino._layers import mammo_image_of

if TYPE_CHECKING:
    import napari

SCOPES = ("current slice", "all slices")


# --- a lazily filled, read-only stack of planes (napari layer data) -------------------------------

class LazyPlanes:
    """A read-only (slices, rows, cols) array whose planes come from ``plane(i)`` when first indexed.

    napari indexes it one plane at a time, so a mask layer over a 60-slice DBT costs only the slices
    the user looks at. Implements what napari's layer-data protocol asks: shape, dtype, ndim,
    indexing, ``__array__``."""

    def __init__(self, shape: tuple[int, int, int], dtype: Any, plane: Callable[[int], np.ndarray]):
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), 3
        self._plane = plane

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyPlanes({self.shape}, {self.dtype})"

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, np.integer)):  # napari reads layer.data[0].dtype: make nothing for it
            return _Plane(self, range(self.shape[0])[key])
        key = key if isinstance(key, tuple) else (key,)
        first, rest = (key[0], key[1:]) if key else (slice(None), ())
        if first is Ellipsis:
            first, rest = slice(None), (Ellipsis, *rest)
        if isinstance(first, (int, np.integer)):
            return np.asarray(self._plane(range(self.shape[0])[first]), self.dtype)[rest]
        indices = np.arange(self.shape[0])[first]
        planes = [np.asarray(self._plane(int(i)), self.dtype) for i in indices]
        stacked = np.stack(planes) if planes else np.zeros((0, *self.shape[1:]), self.dtype)
        return stacked[(slice(None), *rest)]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype)


class _Plane:
    """Plane `index` of a LazyPlanes, made only when its values are read."""

    def __init__(self, planes: LazyPlanes, index: int):
        self._planes, self._index = planes, index
        self.shape, self.dtype, self.ndim = planes.shape[1:], planes.dtype, 2

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self)[key]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return np.asarray(self._planes[self._index, :, :], dtype=dtype)


# --- what the widgets need from an image layer ---------------------------------------------------

@dataclass(frozen=True)
class SliceTissue:
    """One slice's tissue statistics and its mask, bit-packed, in stored orientation."""

    stats: dict[str, Any]  # TissueResult.to_json()
    packed: np.ndarray
    shape: tuple[int, int]

    @classmethod
    def of(cls, result: TissueResult) -> "SliceTissue":
        return cls(result.to_json(), np.packbits(result.mask, axis=-1), tuple(result.mask.shape))

    def mask(self) -> np.ndarray:
        return np.unpackbits(self.packed, axis=-1, count=self.shape[1]).view(bool)


class ImageSource:
    """An image layer as the QA widgets see it: stored-orientation frames, per-slice tissue (cached,
    thread-safe), and the mirror and grid to draw results on the layer. Get one with :func:`source_of`."""

    def __init__(self, layer: Image):
        self.layer = layer
        self.data = layer.data
        self.image: MammoImage | None = mammo_image_of(layer.data)
        meta = layer.metadata.get("mammodino", {}) if self.image is not None else {}
        self.flipped = bool(layer.metadata.get("flipped", False)) if self.image is not None else False
        self.photometric = meta.get("photometric", "MONOCHROME2")
        shape = tuple(layer.data.shape)
        if len(shape) not in (2, 3):
            raise MammoInputError(f"layer {layer.name!r}: expected a 2D image or a 3D volume, got shape {shape}")
        self.shape = shape
        self.is_volume = len(shape) == 3
        self.n_slices = shape[0] if self.is_volume else 1
        self.spacing_mm = self._spacing(meta)
        self._tissue: dict[int, SliceTissue] = {}
        self._lock = threading.Lock()
        if self.image is not None:  # tissue_of and the sampler read one decode of each frame
            self._twin = copy.copy(self.image)
            self._twin.frame = functools.lru_cache(maxsize=2)(self.image.frame)

    def _spacing(self, meta: dict[str, Any]) -> tuple[float, float] | None:
        if meta.get("spacing_mm"):
            return tuple(float(s) for s in meta["spacing_mm"][-2:])
        units = [str(u) for u in self.layer.units][-2:]
        if units == ["millimeter", "millimeter"]:  # another reader's image in mm
            return tuple(float(s) for s in self.layer.scale[-2:])
        return None

    @property
    def name(self) -> str:
        return self.layer.name

    def frame(self, index: int) -> np.ndarray:
        """Values of slice `index` (0 for a 2D image) in stored orientation: modality values for our
        images, the layer's data as shown for others."""
        if self.image is not None:
            return self._twin.frame(index)
        return np.asarray(self.data[index] if self.is_volume else self.data)

    def tissue(self, index: int) -> SliceTissue:
        """The tissue of slice `index`, segmented on first use (from any thread) and then cached."""
        with self._lock:
            if index in self._tissue:
                return self._tissue[index]
        if self.image is not None:
            result = tissue_of(self._twin, index=index if self.is_volume else None)
        else:
            result = segment_tissue(self.frame(index), spacing_mm=self.spacing_mm, photometric=self.photometric)
        found = SliceTissue.of(result)
        with self._lock:
            return self._tissue.setdefault(index, found)

    def computed(self) -> list[int]:
        with self._lock:
            return sorted(self._tissue)

    def on_layer(self, plane: np.ndarray) -> np.ndarray:
        """A stored-orientation plane as the layer shows it (mirrored where the layer is)."""
        return plane[..., ::-1] if self.flipped else plane

    def mask_plane(self, index: int) -> np.ndarray:
        """Tissue mask of slice `index` on the layer's grid, uint8 (1 = tissue)."""
        return self.on_layer(self.tissue(index).mask()).view(np.uint8)

    def grid(self) -> dict[str, Any]:
        """Layer keywords that put a new layer on this image's grid (same pixels, same mm): every
        part of the data-to-world transform napari composes."""
        layer = self.layer
        out = dict(scale=tuple(layer.scale), translate=tuple(layer.translate), rotate=layer.rotate,
                   shear=layer.shear, affine=layer.affine.affine_matrix,
                   units=tuple(str(u) for u in layer.units))
        if self.is_volume:
            out["axis_labels"] = tuple(layer.axis_labels)
        return out

    def slice_index(self, viewer: "napari.Viewer") -> int:
        """The slice of this layer that the viewer shows now (0 for a 2D image)."""
        if not self.is_volume:
            return 0
        position = self.layer.world_to_data(viewer.dims.point)[0]
        return int(np.clip(np.round(position), 0, self.n_slices - 1))


_SOURCES: "weakref.WeakKeyDictionary[Image, ImageSource]" = weakref.WeakKeyDictionary()


def source_of(layer: Image) -> ImageSource:
    """The shared :class:`ImageSource` of a layer: both widgets reuse its tissue masks."""
    source = _SOURCES.get(layer)
    if source is None or source.data is not layer.data:  # new layer, or its data was replaced
        source = _SOURCES[layer] = ImageSource(layer)
    return source


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

def image_layer_choices(viewer: "napari.Viewer") -> Callable[[Any], list[tuple[str, Image]]]:
    return lambda _widget: [(layer.name, layer) for layer in viewer.layers if isinstance(layer, Image)]


@dataclass(frozen=True)
class _Refused:
    """A user mistake a computation met (no tissue, a bad slice...): said in one line, no traceback."""

    error: MammoInputError


def _guarded(steps_function: Callable[..., Steps], *args: Any) -> Steps:
    try:
        return (yield from steps_function(*args))
    except MammoInputError as exc:  # returned, not raised: napari would add a traceback to it
        return _Refused(exc)


def start_worker(steps_function: Callable[..., Steps], args: tuple, *, progress: ProgressBar,
                 done: Callable[[Any], None], failed: Callable[[], None], desc: str) -> Any:
    """Run a computation generator in a napari thread worker (started now). The widget's bar follows
    its progress; on the main thread `done(result)` runs at the end, or `failed()` after a user
    mistake (told in one line) or a bug (napari shows it with its traceback)."""
    from napari.qt.threading import create_worker
    from napari.utils.notifications import show_error

    def step(value: tuple[int, int]) -> None:
        progress.max, progress.value = value[1], value[0]

    def returned(result: Any) -> None:
        if isinstance(result, _Refused):
            show_error(str(result.error))
            failed()
        else:
            done(result)

    return create_worker(_guarded, steps_function, *args, _progress={"desc": desc},
                         _connect={"yielded": step, "returned": returned, "errored": lambda exc: failed()})


def report_error(exc: MammoInputError) -> None:
    """A user mistake, in one line."""
    from napari.utils.notifications import show_error

    show_error(str(exc))


class TissueWidget(Container):
    """Tissue mask of the selected image: a Labels layer aligned in mm, with area and fraction."""

    def __init__(self, napari_viewer: "napari.Viewer"):
        self.viewer = napari_viewer
        self.image = ComboBox(label="image", choices=image_layer_choices(napari_viewer), nullable=True)
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
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self.image.reset_choices)
        napari_viewer.layers.selection.events.active.connect(self._follow_selection)
        napari_viewer.dims.events.current_step.connect(self._slice_changed)
        self.reset_choices()
        self._follow_selection()

    def _follow_selection(self, event: Any = None) -> None:
        active = self.viewer.layers.selection.active
        if isinstance(active, Image):
            self.image.reset_choices()  # the layer may have been inserted a moment ago
            self.image.value = active

    def _request(self) -> tuple[ImageSource, list[int]]:
        """The image and slices to segment (MammoInputError when there is nothing to segment)."""
        layer = self.image.value
        if layer is None:
            raise MammoInputError("Tissue mask: open an image first (no image layer is selected)")
        source = source_of(layer)
        if source.is_volume and self.scope.value == "all slices":
            return source, list(range(source.n_slices))
        return source, [source.slice_index(self.viewer)]

    def start(self) -> Any:
        """Segment in a thread worker; the layer appears when it is done. Returns the worker."""
        try:
            source, slices = self._request()
        except MammoInputError as exc:
            return report_error(exc)
        self.run.enabled = False
        self.stats.value = "segmenting…"

        def failed() -> None:
            self.run.enabled, self.stats.value = True, ""

        self.worker = start_worker(tissue_steps, (source, slices), progress=self.progress,
                                   done=lambda summary: self.draw(source, summary), failed=failed,
                                   desc="tissue mask")
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
