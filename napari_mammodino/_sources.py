"""What the widgets read images from: an image layer as :class:`ImageSource`, and the combo box that picks it.

* Pixels. A layer made by this plugin's reader keeps its :class:`~training.dicom.image.MammoImage` (see
  ``_layers.mammo_image_of``), so the widgets segment, sample and infer on the *stored* modality values in
  the *stored* orientation, exactly as ``mammodino tissue`` / ``sample`` / ``infer`` do; results are then
  mirrored onto the layer when the hanging protocol mirrored it (``metadata["flipped"]``). Any other image
  layer is used as it is shown (MONOCHROME2, never mirrored).
* World coordinates. Every layer the widgets add takes the image layer's scale, translate and units, so
  one image pixel (row r, column c of the layer's data) is the same mm in both layers.
* Tissue. Each slice is segmented once, on first use (from any thread), and kept bit-packed (1/8 of a
  bool array): the Tissue mask, Sampler QA and Inference widgets share one :class:`ImageSource` per layer.
"""

from __future__ import annotations

import copy
import functools
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox
from napari.layers import Image

from training.errors import MammoInputError
from training.dicom.image import MammoImage
from training.tissue import TissueResult, segment_tissue, tissue_of

from napari_mammodino._layers import mammo_image_of

if TYPE_CHECKING:
    import napari


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
    """An image layer as the widgets see it: stored-orientation frames, per-slice tissue (cached,
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

    def image_or_data(self) -> Any:
        """What the library's functions read: the MammoImage, or another plugin's layer data as shown (an
        array for a 2D image; a volume stays as it is, read slice by slice)."""
        if self.image is not None:
            return self.image
        return self.data if self.is_volume else np.asarray(self.data)

    def frame(self, index: int) -> np.ndarray:
        """Values of slice `index` (0 for a 2D image) in stored orientation: modality values for our
        images, the layer's data as shown for others."""
        if self.image is not None:
            return self._twin.frame(index)
        return np.asarray(self.data[index] if self.is_volume else self.data)

    def frame_and_tissue(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Slice `index` with tissue bright (MONOCHROME1 inverted) and its tissue mask: what
        :func:`training.tissue.frame_and_tissue` gives the sampler, from this source's caches."""
        values = self.frame(index)
        if self.photometric == "MONOCHROME1":
            values = np.negative(values, dtype=np.float32)
        return values, self.tissue(index).mask()

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
    """The shared :class:`ImageSource` of a layer: the widgets reuse its tissue masks."""
    source = _SOURCES.get(layer)
    if source is None or source.data is not layer.data:  # new layer, or its data was replaced
        source = _SOURCES[layer] = ImageSource(layer)
    return source


class ImagePicker(ComboBox):
    """The "image" combo box of a magicgui widget: the viewer's image layers, following the layer list
    and the selection (the image the user clicks is the one the widget works on)."""

    def __init__(self, viewer: "napari.Viewer"):
        self.viewer = viewer
        super().__init__(label="image", choices=self._images, nullable=True)
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(self.reset_choices)
        viewer.layers.selection.events.active.connect(self.follow_selection)
        self.reset_choices()
        self.follow_selection()

    def _images(self, _widget: Any = None) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)]

    def follow_selection(self, event: Any = None) -> None:
        active = self.viewer.layers.selection.active
        if isinstance(active, Image):
            self.reset_choices()  # the layer may have been inserted a moment ago
            self.value = active

    def source(self, widget: str) -> ImageSource:
        """The chosen image (a MammoInputError names the widget when there is none)."""
        if self.value is None:
            raise MammoInputError(f"{widget}: open an image first (no image layer is selected)")
        return source_of(self.value)
