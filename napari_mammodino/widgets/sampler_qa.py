"""The "Sampler QA" widget: where MammoDINO's multi-crop sampler takes its crops and iBOT masks.

Draws K samples (seeds seed .. seed+K-1) from the selected image with both samplers, tissue-aware and
naive (plain DINOv2), through the library's sampling path (:func:`training.sampler.sampler.sample_frames`,
which ``mammodino sample --seed S --n K`` runs too: same seeds, same records), and shows the chosen one:

* crops as Shapes rectangles, coloured by kind (global cyan, local amber, fallback red), labelled
  with sample number, kind and tissue fraction (and the slice pair on a DBT volume);
* iBOT masked patches as a Labels layer on the image grid (one label per masked global crop);
* a matplotlib histogram of the tissue fraction per crop of *both* samplers, docked beside the viewer.

Image pixels to world: the sampler works in stored image pixels (row, col), exactly as the CLI
records them. A box [r0, r1) x [c0, c1) covers pixel centres r0 .. r1-1, so its rectangle runs from
r0 - 0.5 to r1 - 0.5 in the layer's data coordinates; where the hanging protocol mirrored the layer,
columns become W - c. The new layers take the image layer's scale and translate (mm), so napari
maps them to the same world position as the pixels underneath. The same seed gives the same boxes,
masks and picture (the sampler is deterministic by seed).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
from magicgui.widgets import CheckBox, Container, FloatSpinBox, Label, ProgressBar, PushButton, RadioButtons, \
    SpinBox
from napari.layers import Labels, Shapes

from training.progress import Steps, run_steps
from training.sampler.sampler import Sample, SamplerConfig, sample_frames

from napari_mammodino._sources import ImagePicker, ImageSource
from napari_mammodino._workers import start_form
from napari_mammodino.widgets.tissue import LazyPlanes

if TYPE_CHECKING:
    import napari

KIND_COLORS = {"global": "#00e5ff", "local": "#ffb000", "fallback": "#ff3b30"}
SAMPLER_COLORS = {"tissue-aware": "#2ca02c", "naive": "#7f7f7f"}
SAMPLERS = ("tissue-aware", "naive")
LOW_TISSUE = 0.5  # the issue reports the share of crops under 50% tissue


# --- the computation ----------------------------------------------------------------------------

@dataclass
class QAResult:
    """Samples of both samplers for the same seeds (the same slice pairs on a DBT)."""

    source: ImageSource
    seeds: list[int]
    config: SamplerConfig
    samples: dict[str, list[Sample]]  # "tissue-aware" / "naive" -> one Sample per seed

    def fractions(self, sampler: str) -> np.ndarray:
        return np.array([c.tissue_fraction for s in self.samples[sampler] for c in s.crops])

    def low_share(self, sampler: str) -> float:
        return float(np.mean(self.fractions(sampler) < LOW_TISSUE))


def sample_steps(source: ImageSource, seeds: Iterable[int], config: SamplerConfig | None = None,
                 anchor: int | None = None) -> Steps:
    """Draw one sample per seed with each sampler; yields progress, returns a :class:`QAResult`.

    Samples as :func:`training.sampler.sampler.sample_images` (the CLI's path) does, from the source's
    frames and tissue masks (:meth:`ImageSource.frame_and_tissue`): each slice is decoded and segmented
    once for both samplers, and the tissue masks are those the Tissue mask widget shows."""
    seeds = [int(s) for s in seeds]
    config = config or SamplerConfig()
    read = functools.lru_cache(maxsize=4)(source.frame_and_tissue)
    samples: dict[str, list[Sample]] = {name: [] for name in SAMPLERS}
    done, total = 0, len(SAMPLERS) * len(seeds)
    for name in SAMPLERS:
        for seed in seeds:  # one seed at a time: a step of progress each
            samples[name] += sample_frames(read, source.shape, [seed], naive=name == "naive", config=config,
                                           frame=anchor)
            done += 1
            yield done, total
    return QAResult(source, seeds, config, samples)


# --- image pixels -> layer data coordinates -------------------------------------------------------

def box_rectangle(box: tuple[int, int, int, int], source: ImageSource, slice_index: int | None = None
                  ) -> np.ndarray:
    """Corners (4, 2) or (4, 3) of a stored-pixel box [r0, r1) x [c0, c1) in the layer's data
    coordinates: pixel edges are half a pixel from centres; mirrored layers swap columns to W - c."""
    r0, c0, r1, c1 = box
    if source.flipped:
        width = source.shape[-1]
        c0, c1 = width - c1, width - c0
    top, left, bottom, right = r0 - 0.5, c0 - 0.5, r1 - 0.5, c1 - 0.5
    corners = np.array([[top, left], [top, right], [bottom, right], [bottom, left]], dtype=float)
    if slice_index is not None:
        corners = np.column_stack([np.full(4, float(slice_index)), corners])
    return corners


def crop_shapes(samples: list[Sample], source: ImageSource) -> tuple[list[np.ndarray], dict[str, list]]:
    """Rectangles and their features (kind, tissue fraction, fallback, sample, seed, slice, label)."""
    rectangles: list[np.ndarray] = []
    features: dict[str, list] = {k: [] for k in ("kind", "tissue_fraction", "fallback", "sample", "seed",
                                                   "slice", "pair_with", "label")}
    for number, sample in enumerate(samples, 1):
        for crop in sample.crops:
            rectangles.append(box_rectangle(crop.box, source, crop.slice_index if source.is_volume else None))
            partner = None
            if sample.pair is not None:
                partner = sample.pair[1] if crop.slice_index == sample.pair[0] else sample.pair[0]
            label = f"{number}{crop.kind[0].upper()} {crop.tissue_fraction:.2f}"
            if crop.fallback:
                label += " fallback"
            if partner is not None:
                label += f" {crop.slice_index}↔{partner}"
            for key, value in (("kind", crop.kind), ("tissue_fraction", float(crop.tissue_fraction)),
                               ("fallback", bool(crop.fallback)), ("sample", number), ("seed", sample.seed),
                               ("slice", -1 if crop.slice_index is None else crop.slice_index),
                               ("pair_with", -1 if partner is None else partner), ("label", label)):
                features[key].append(value)
    return rectangles, features


def masked_patch_planes(samples: list[Sample], source: ImageSource) -> dict[int, np.ndarray]:
    """iBOT masked patches on the layer's grid, one uint8 plane per slice that has any (key 0 for a
    2D image). Each masked global crop gets its own label, the same on both slices of a DBT pair.
    Patches split a box as the sampler's patch-tissue grid does: patch i of g spans rows
    r0 + i*h//g .. r0 + (i+1)*h//g."""
    planes: dict[int, np.ndarray] = {}
    rows, cols = source.shape[-2:]
    labels = 0
    for sample in samples:
        per_slice = len(sample.crops) // (2 if sample.pair else 1)  # a pair lists slice i's crops, then j's
        masked = sorted({n % per_slice for n, crop in enumerate(sample.crops) if crop.masked})
        for n, crop in enumerate(sample.crops):
            if not crop.masked:
                continue
            grid = crop.mask_on_box()
            r0, c0, r1, c1 = crop.box
            row_edges = r0 + np.arange(grid.shape[0] + 1) * (r1 - r0) // grid.shape[0]
            col_edges = c0 + np.arange(grid.shape[1] + 1) * (c1 - c0) // grid.shape[1]
            patches = np.repeat(np.repeat(grid, np.diff(row_edges), axis=0), np.diff(col_edges), axis=1)
            plane = planes.setdefault(crop.slice_index or 0, np.zeros((rows, cols), np.uint8))
            plane[r0:r1, c0:c1][patches] = min(labels + 1 + masked.index(n % per_slice), 255)
        labels += len(masked)
    return {k: source.on_layer(v) for k, v in planes.items()}


# --- the widget -----------------------------------------------------------------------------------

class SamplerQAWidget(Container):
    """Draw K samples with a seed; show crops, masked patches and tissue-fraction histograms."""

    def __init__(self, napari_viewer: "napari.Viewer"):
        self.viewer = napari_viewer
        defaults = SamplerConfig()
        self.image = ImagePicker(napari_viewer)
        self.n_samples = SpinBox(label="samples (K)", value=2, min=1, max=64)
        self.seed = SpinBox(label="seed", value=0, min=0, max=2 ** 31 - 1)
        self.min_tissue = FloatSpinBox(label="min tissue", value=defaults.min_tissue, min=0.0, max=1.0, step=0.05,
                                       tooltip="a tissue-aware crop's tissue fraction must reach this")
        self.anchor = CheckBox(text="DBT: pairs at the current slice", value=True)
        self.sampler = RadioButtons(label="show", choices=SAMPLERS, value="tissue-aware", orientation="horizontal")
        self.run = PushButton(text="Draw samples")
        self.progress = ProgressBar(value=0, max=1, label="progress")
        self.info = Label(value="")
        super().__init__(widgets=[self.image, self.n_samples, self.seed, self.min_tissue, self.anchor,
                                  self.sampler, self.run, self.progress, self.info])
        self.result: QAResult | None = None
        self._drawn: str | None = None  # the sampler whose crops are on screen
        self.worker: Any = None
        self.figure, self.canvas, self._dock = None, None, None
        self.run.changed.connect(self.start)
        self.sampler.changed.connect(self._switch)

    def _request(self) -> tuple:
        """Arguments of :func:`sample_steps` from the controls (MammoInputError: nothing to sample)."""
        source = self.image.source("Sampler QA")
        seeds = range(self.seed.value, self.seed.value + self.n_samples.value)
        config = SamplerConfig(min_tissue=float(self.min_tissue.value))
        anchor = source.slice_index(self.viewer) if source.is_volume and self.anchor.value else None
        return source, seeds, config, anchor

    def start(self) -> Any:
        """Sample in a thread worker; layers and histogram appear when it is done. Returns the task."""
        self.worker = start_form(self._request, lambda request: sample_steps(*request),
                                 lambda _, result: self.draw(result), button=self.run, status=self.info,
                                 busy="sampling…", bar=self.progress, desc="sampler QA")
        return self.worker

    def compute(self) -> QAResult:
        """The same work in this thread (scripts and tests)."""
        self.draw(run_steps(sample_steps(*self._request())))
        return self.result

    # -- drawing --

    def draw(self, result: QAResult) -> None:
        """Draw the chosen sampler's crops and masks, and both histograms."""
        self.run.enabled = True
        self.progress.value = self.progress.max
        self.result = result
        self._draw()
        self._histogram()

    def _switch(self, value: Any = None) -> None:
        # Both samplers were drawn already: switching only redraws, the selected image's last draw.
        # (napari's reset_choices on layer changes re-emits the value: redraw only on a real change.)
        result = self.result
        if result is not None and result.source.layer is self.image.value and self.sampler.value != self._drawn:
            self._draw()

    def _draw(self) -> None:
        result, name = self.result, self.sampler.value
        self._drawn = name
        source = result.source
        samples = result.samples[name]
        rectangles, features = crop_shapes(samples, source)
        colors = [KIND_COLORS["fallback"] if fb else KIND_COLORS[kind]
                  for kind, fb in zip(features["kind"], features["fallback"])]
        planes = masked_patch_planes(samples, source)
        if source.is_volume:
            zeros = np.zeros(source.shape[-2:], np.uint8)
            masks: Any = LazyPlanes(source.shape, np.uint8, lambda i: planes.get(i, zeros))
        else:
            masks = planes.get(0, np.zeros(source.shape, np.uint8))
        metadata = {"mammodino_sampler": name, "seeds": result.seeds, "image": source.name}
        self._masks_layer(f"{source.name} masked patches", masks, metadata, source)
        self._crops_layer(f"{source.name} crops", rectangles, features, colors, metadata, source)
        self.viewer.layers.selection.active = source.layer
        self._show_pairs(samples, source)
        fallbacks = sum(s.fallbacks for s in samples)
        self.info.value = (f"{name}: {len(features['kind'])} crops, {fallbacks} fallbacks; crops under "
                           f"{LOW_TISSUE:.0%} tissue: tissue-aware {result.low_share('tissue-aware'):.0%}, "
                           f"naive {result.low_share('naive'):.0%}")
        if source.is_volume:
            self.info.value += "; pairs " + ", ".join(f"{s.pair[0]}↔{s.pair[1]}" for s in samples)

    # A redraw updates the layers in place: new layers cost napari ~0.4 s of Qt controls each.

    def _masks_layer(self, name: str, data: Any, metadata: dict, source: ImageSource) -> None:
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        if isinstance(layer, Labels) and layer.data.shape == tuple(source.shape):
            layer.data, layer.metadata = data, metadata
            return
        layer = Labels(data, name=name, opacity=0.5, metadata=metadata, **source.grid())
        layer.editable = False  # the sampler's masks, not an annotation
        self.viewer.add_layer(layer)

    def _crops_layer(self, name: str, rectangles: list[np.ndarray], features: dict[str, list],
                     colors: list[str], metadata: dict, source: ImageSource) -> None:
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        if isinstance(layer, Shapes) and layer.ndim == len(source.shape):
            layer.selected_data = set()
            layer.data = rectangles
            layer.features, layer.edge_color, layer.metadata = features, colors, metadata
            layer.refresh_text()
            return
        width = max(2.0, max(source.shape[-2:]) / 400)  # data pixels: about 2 screen pixels when fitted
        self.viewer.add_layer(Shapes(
            rectangles, shape_type="rectangle", name=name, features=features, edge_color=colors,
            face_color="transparent", edge_width=width, metadata=metadata, **source.grid(),
            text={"string": "{label}", "size": 8, "color": "white", "anchor": "upper_left"}))

    def _show_pairs(self, samples: list[Sample], source: ImageSource) -> None:
        """On a volume, go to the first pair's slice unless the slice on screen holds crops."""
        if not source.is_volume:
            return
        slices = {i for s in samples for i in s.pair}
        if source.slice_index(self.viewer) not in slices:
            axis = self.viewer.dims.ndim - 3
            world = source.layer.data_to_world([samples[0].pair[0], 0, 0])[0]
            self.viewer.dims.set_point(axis, world)

    def _histogram(self) -> None:
        """Tissue fraction per crop of both samplers, in a dock beside the viewer."""
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        if self.figure is None:
            self.figure = Figure(figsize=(4.5, 3.2), layout="constrained")
            self.canvas = FigureCanvasQTAgg(self.figure)
            self.canvas.setMinimumSize(320, 240)
        result = self.result
        self.figure.clear()
        ax = self.figure.add_subplot()
        bins = np.linspace(0.0, 1.0, 21)
        labels = [f"{name} ({result.low_share(name):.0%} < {LOW_TISSUE:.0%})" for name in SAMPLERS]
        ax.hist([result.fractions(name) for name in SAMPLERS], bins=bins, label=labels,
                color=[SAMPLER_COLORS[name] for name in SAMPLERS])
        ax.axvline(result.config.min_tissue, color="#d62728", linestyle="--", linewidth=1,
                   label=f"threshold {result.config.min_tissue:.2f}")
        ax.set_xlim(0, 1)
        ax.set_xlabel("tissue fraction of the crop")
        ax.set_ylabel("crops")
        seeds = result.seeds
        ax.set_title(f"{result.source.name}: {len(seeds)} samples, seeds {seeds[0]}–{seeds[-1]}", fontsize=9)
        ax.legend(fontsize=8, loc="upper left")
        self.canvas.draw_idle()
        if self._dock is None and getattr(self.viewer, "window", None) is not None:
            self._dock = self.viewer.window.add_dock_widget(self.canvas, name="Tissue fraction per crop",
                                                            area="right")
