"""The "Inference" widget: one click runs an encoder on the selected image and adds what it looks at
(attention), how it groups the tissue (feature PCA) and what it predicts, as layers on the image in mm.

The widget is thin: :mod:`training.evaluate.infer` does the work (the same code as ``mammodino infer``), this
module loads the encoder in a thread worker, places the maps and shows the predictions.

* Placement. An FFDM's maps are patch grids: patch (i, j) of a map lies where
  :func:`training.evaluate.infer.patch_placement` says on the image, and the image layer's scale, translate,
  rotation and shear carry that into the world (mm). A view the hanging protocol mirrored
  (``metadata["flipped"]``) gets mirrored maps.
* DBT. Attention (and every other map) of a volume is a :class:`training.evaluate.infer.LazyAttentionStack`
  on the volume's grid: the slice on screen is computed first, by the Run worker; the others on the
  pool that reads image slices ahead (:mod:`training.lazy`), the slice scrolled to first, then two
  ahead in the scroll direction. A layer shows nothing on a slice not computed yet and refreshes when
  the pool says it is ready (a Qt signal: queued to the GUI thread), so scrolling a 60-slice volume
  never waits for the encoder. Slices are cached (LRU) and shared by all maps (one forward pass per
  slice); replacing or deleting the layers cancels their queued slices.
* Find. A text box finds a sentence in the image with an image-report (CLIP) model: a ``find: <sentence>``
  patch map placed like the attention, and zero-shot probabilities (:mod:`napari_mammodino.widgets.find`).
* Failures. A checkpoint that does not load, a bad resolution or an image without tissue is one
  line in the widget and a napari notification; Cancel stops within one transformer block.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from napari.layers import Image
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QProgressBar,
                            QPushButton, QSlider, QSpinBox, QVBoxLayout, QWidget)

# torch._dynamo (imported through timm -> torchvision) loads triton, torch's GPU kernel compiler, when
# it is installed. Loaded after napari has made its OpenGL context, triton's bundled LLVM clashes with
# Mesa's llvmpipe (Xvfb, headless servers, VMs) and the process segfaults. The viewer never compiles
# kernels (training runs in subprocesses), so unless something already loaded it, keep it out.
sys.modules.setdefault("triton", None)

from training.evaluate.encoder import Encoder, load_encoder  # noqa: E402 (after the triton guard)
from training.errors import MammoInputError  # noqa: E402
from training.evaluate.infer import (N_STEPS, InferenceCancelled, InferenceResult, LazyAttentionStack,
    SliceResults, display_limits, inference_steps, patch_placement)
from training.lazy import LazyStack
from training.progress import Steps, run_steps  # noqa: E402
from training.evaluate.export import export

from napari_mammodino._sources import ImageSource, source_of
from napari_mammodino._workers import Refused, guarded, settle, start
from napari_mammodino.widgets.find import FindBox

if TYPE_CHECKING:
    import napari

MODES = {"mean over heads": "last", "per head": "last", "rollout": "rollout"}
TAG = "mammodino_inference"  # layer metadata key of the layers this widget adds
ATTENTION_COLORMAP = "inferno"  # perceptually uniform, dark = little attention (additive blending)
HEATMAP_COLORMAP = "red"


# --- what one run needs and gives ------------------------------------------------------------------

@dataclass
class Request:
    """One click: the encoder spec, the image and how to run it."""

    spec: str | None  # None: the demo encoder
    source: ImageSource
    image: Any  # a MammoImage, or the layer's data as shown for other layers
    frame: int | None  # the DBT slice on screen
    resolution: int | None
    mode: str

    @property
    def attention(self) -> str:
        return MODES[self.mode]


@dataclass
class Done:
    encoder: Encoder
    result: InferenceResult


def inference_job(request: Request, load: Callable[[str | None], Encoder], stop: threading.Event) -> Steps:
    """Load the encoder, then infer: yields (done, total), returns Done, or a Refused or Cancelled of
    :mod:`napari_mammodino._workers` (never raises for a user mistake: a worker's exception would reach
    the user as a traceback). ``stop`` set: the inference stops within one transformer block."""
    return guarded(_load_and_infer(request, load, stop), cancelled_by=(InferenceCancelled,))


def _load_and_infer(request: Request, load: Callable[[str | None], Encoder], stop: threading.Event) -> Steps:
    total = 1 + N_STEPS
    yield 0, total
    try:
        encoder = load(request.spec)
    except MammoInputError:
        raise
    except Exception as exc:  # a damaged file can fail anywhere in the loader: still one line
        raise MammoInputError(f"cannot load the checkpoint {request.spec or 'demo'}: "
                              f"{type(exc).__name__}: {exc}") from None
    yield 1, total
    steps = inference_steps(encoder, request.image, request.frame, request.resolution, request.attention,
                            should_stop=stop.is_set)
    result = yield from shifted(steps, 1, total)
    return Done(encoder, result)


def shifted(steps: Steps, offset: int, total: int) -> Steps:
    """Re-yield a step generator's steps as (offset + done, total); return what it returns."""
    while True:
        try:
            done, _ = next(steps)
        except StopIteration as stop:
            return stop.value
        yield offset + done, total


# --- placing maps on an image layer --------------------------------------------------------------

def patch_grid(layer: Image, result: Any, flipped: bool, frame: int | None = None) -> dict[str, Any]:
    """Layer keywords that put a (h, w) patch map of ``result`` (anything with a ``prepared``: an
    InferenceResult, a Find) on a 2D image layer: patch (i, j)'s centre lands on the image pixels it
    summarises, through every part of the layer's transform. ``frame``: a (1, h, w) map of that slice of
    a volume layer."""
    from napari.utils.transforms import Affine

    origin, step = patch_placement(result.prepared, flipped)
    if frame is not None:
        origin, step = (frame, *origin), (1, *step)
    physical = Affine(scale=layer.scale, translate=layer.translate, rotate=layer.rotate, shear=layer.shear)
    out = dict(scale=tuple(np.multiply(layer.scale, step)), translate=tuple(physical(np.asarray(origin))),
               rotate=layer.rotate, shear=layer.shear, affine=layer.affine.affine_matrix,
               units=tuple(str(u) for u in layer.units))
    if frame is not None:
        out["axis_labels"] = tuple(layer.axis_labels)
    return out


def map_names(result: InferenceResult, mode: str) -> list[tuple[str, str]]:
    """(layer suffix, :meth:`InferenceResult.map` name) of the maps a mode shows (no attention map for
    an encoder without attention, such as a CNN student)."""
    if not result.has_attention:
        maps = []
    elif mode == "per head":
        maps = [(f"attention head {k}", f"head:{k}") for k in range(result.head_attention.shape[0])]
    elif mode == "rollout":
        maps = [("attention rollout", "rollout")]
    else:
        maps = [("attention", "mean")]
    return maps + [("features PCA", "pca")] + [(f"{task} heatmap", f"heatmap:{task}") for task in result.heatmaps]


def describe(result: InferenceResult) -> str:
    """The predictions and the attention summary, for people."""
    enc = result.encoder
    network = enc.get("timm") or f"ViT-{enc.get('arch')}"  # a distilled student is named by timm
    lines = [f"encoder: {enc.get('source', '?')} ({network}/{enc.get('patch_size')}, "
             f"input {max(result.prepared.pixels.shape)} px)"]
    if result.frame is not None:
        lines.append(f"slice {result.frame}")
    if result.has_attention:
        lines.append(f"attention in tissue: {100 * result.attention_in_tissue:.1f}% "
                     f"(tissue covers {100 * result.tissue_share:.1f}% of the input)")
        lines.append(f"attention peak: {float(result.map('attention').max()):.2f}x uniform")
    else:
        lines.append("no attention in this encoder (a CNN): feature PCA and predictions")
    if not result.predictions and not result.heatmaps:
        lines.append("no task heads in this encoder: attention and features only")
    for task, probabilities in result.predictions.items():
        ranked = sorted(probabilities.items(), key=lambda item: -item[1])
        lines.append(f"{task}: " + " · ".join(f"{name} {100 * p:.0f}%" for name, p in ranked))
    for task, heatmap in result.heatmaps.items():
        lines.append(f"{task} heatmap: peak {float(heatmap.max()):.2f}")
    return "\n".join(lines)


def layer_slice(layer: Image, viewer: "napari.Viewer") -> int:
    """The slice of a volume layer the viewer shows now."""
    position = layer.world_to_data(viewer.dims.point)[0]
    return int(np.clip(np.round(position), 0, layer.data.shape[0] - 1))


# --- the widget -----------------------------------------------------------------------------------

class InferenceWidget(QWidget):
    """Run an encoder on the selected image: attention, feature PCA, task-head predictions."""

    _plane_ready = Signal(object, int, object)  # (stack, index, error) from a pool thread: queued to the GUI thread

    def __init__(self, napari_viewer: "napari.Viewer"):
        super().__init__()
        self.viewer = napari_viewer
        self.checkpoint = QLineEdit()
        self.checkpoint.setPlaceholderText("demo encoder")
        self.checkpoint.setToolTip("empty: the demo encoder; a .safetensors checkpoint or encoder, a training run "
                                   "folder, or random:ARCH[/PATCH] (e.g. random:tiny/16)")
        self.browse = QPushButton("…")
        self.browse.setToolTip("choose a .safetensors checkpoint")
        self.image = QComboBox()
        self.resolution = QSpinBox()
        self.resolution.setRange(0, 4096)
        self.resolution.setSingleStep(14)
        self.resolution.setSpecialValueText("encoder's own")
        self.resolution.setToolTip("long side of the encoder's input in pixels")
        self.mode = QComboBox()
        self.mode.addItems(list(MODES))
        self.opacity = QSlider(Qt.Orientation.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(80)
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.export_button = QPushButton("Export…")
        self.export_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.message = QLabel("")
        self.message.setWordWrap(True)
        self.message.setStyleSheet("color: #ff6b6b")
        self.results = QLabel("")
        self.results.setWordWrap(True)
        self.results.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        picker = QHBoxLayout()
        picker.addWidget(self.checkpoint)
        picker.addWidget(self.browse)
        form = QFormLayout()
        form.addRow("encoder", picker)
        form.addRow("image", self.image)
        form.addRow("resolution", self.resolution)
        form.addRow("attention", self.mode)
        form.addRow("opacity", self.opacity)
        buttons = QHBoxLayout()
        for button in (self.run_button, self.cancel_button, self.export_button):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.message)
        layout.addWidget(self.results)
        self.finder = FindBox(napari_viewer, self.spec, self._where, lambda: self.resolution.value() or None,
                              patch_grid, self.message, TAG)
        layout.addWidget(self.finder)
        layout.addStretch(1)

        self.worker: Any = None
        self.request: Request | None = None  # what the shown layers were computed from
        self.result: InferenceResult | None = None  # the shown (slice's) result
        self.slices: SliceResults | None = None  # DBT: per-slice results behind the lazy layers
        self.layers: list[Image] = []
        self._encoder: tuple[str | None, Encoder] | None = None
        self._stop = threading.Event()

        self.browse.clicked.connect(self._browse)
        self.checkpoint.textChanged.connect(lambda _: self.message.setText(""))
        self.run_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self.export_button.clicked.connect(self._export_dialog)
        self.opacity.valueChanged.connect(self._set_opacity)
        self._plane_ready.connect(self._show_ready)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self._refresh_images)
        napari_viewer.layers.events.removed.connect(self._layer_removed)
        napari_viewer.layers.selection.events.active.connect(self._follow_selection)
        napari_viewer.dims.events.current_step.connect(self._slice_changed)
        self._refresh_images()
        self._follow_selection()

    # --- public -------------------------------------------------------------------------------------
    def use_checkpoint(self, path: str) -> None:
        """Use this checkpoint (a .safetensors file or a training run folder) from the next Run on: the
        training-jobs widget hands its latest checkpoint over with this."""
        self.checkpoint.setText(str(path))
        self._encoder = None
        self.finder.forget()
        self.results.setText(f"checkpoint {path}: click Run")

    def select_image(self, layer: Image) -> None:
        """Run on this image layer."""
        self._refresh_images()
        index = self.image.findData(layer)
        if index < 0:
            raise MammoInputError(f"Inference: {layer.name!r} is not an image layer of this viewer")
        self.image.setCurrentIndex(index)

    def spec(self) -> str | None:
        return self.checkpoint.text().strip() or None

    def start(self) -> Any:
        """Run in a napari thread worker; the layers appear when it is done. Returns the task."""
        try:
            request = self._make_request()
        except MammoInputError as exc:
            return self._refuse(str(exc))
        self._stop = threading.Event()
        self._busy(True)
        self.worker = start(inference_job(request, self._load, self._stop), progress=self._step,
                            ended=lambda: self._busy(False), done=lambda done: self._draw_done(request, done),
                            refused=self._refused, cancelled=self._cancelled, stop=self._stop)
        return self.worker

    def compute(self) -> list[Image] | None:
        """The same work in this thread (scripts and tests): the layers added, or None after a refusal."""
        try:
            request = self._make_request()
        except MammoInputError as exc:
            return self._refuse(str(exc))
        self._stop = threading.Event()
        outcome = run_steps(inference_job(request, self._load, self._stop), self._step)
        self._busy(False)
        return settle(outcome, lambda done: self._draw_done(request, done), self._refused, self._cancelled)

    def cancel(self) -> None:
        """Stop the running inference (within one transformer block)."""
        self._stop.set()
        if self.worker is not None:
            self.worker.cancel()

    def export_to(self, folder: str | Path) -> dict[str, str]:
        """Write the shown result (PNG overlays, NPY maps, JSON predictions) into ``folder``."""
        if self.result is None or self.request is None:
            raise MammoInputError("Inference: nothing to export yet (click Run first)")
        prefix = f"slice{self.result.frame:03d}_" if self.result.frame is not None else ""
        return export(self.result, folder, image=self.request.image, prefix=prefix)

    # --- running --------------------------------------------------------------------------------------
    def _load(self, spec: str | None) -> Encoder:
        """The encoder of ``spec`` (the last one stays loaded)."""
        cached = self._encoder
        if cached is not None and cached[0] == spec:
            return cached[1]
        encoder = load_encoder(spec)
        self._encoder = (spec, encoder)
        return encoder

    def _where(self) -> tuple[ImageSource, int | None]:
        """The chosen image and the slice on screen (None for a 2D image)."""
        layer = self.image.currentData()
        if layer is None or layer not in self.viewer.layers:
            raise MammoInputError("Inference: open an image first (no image layer is selected)")
        source = source_of(layer)
        return source, source.slice_index(self.viewer) if source.is_volume else None

    def _make_request(self) -> Request:
        source, frame = self._where()
        return Request(self.spec(), source, source.image_or_data(), frame, self.resolution.value() or None,
                       self.mode.currentText())

    def _step(self, done: int, total: int) -> None:
        self.progress.setMaximum(total)
        self.progress.setValue(done)

    def _busy(self, busy: bool) -> None:
        self.run_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        if busy:
            self.message.setText("")
            self.results.setText("running…")

    def _refuse(self, message: str) -> None:
        self._busy(False)
        self.message.setText(message)
        self.results.setText("")
        Refused(message).show()
        return None

    def _refused(self, refused: Refused) -> None:
        return self._refuse(refused.message)

    def _cancelled(self) -> None:
        self.results.setText("cancelled")
        self.progress.setValue(0)
        return None

    def _draw_done(self, request: Request, done: Done) -> list[Image]:
        return self.draw(request, done.encoder, done.result)

    # --- drawing --------------------------------------------------------------------------------------
    def draw(self, request: Request, encoder: Encoder, result: InferenceResult) -> list[Image]:
        """Replace this image's previous inference layers by the maps of ``result``."""
        source = request.source
        for layer in [la for la in self.viewer.layers if la.metadata.get(TAG, {}).get("image") == source.name
                      and la.metadata[TAG].get("map") != "find"]:  # a Find's map stays
            self.viewer.layers.remove(layer)  # its queued slices are cancelled (_layer_removed)
            if isinstance(layer.data, LazyAttentionStack):
                layer.data.results.close()  # and the forward pass running stops within one block
        self.request, self.result = request, result
        names = map_names(result, request.mode)
        if source.is_volume:
            self.slices = SliceResults(encoder, request.image, request.resolution, request.attention)
            self.slices.put(result.frame, result)  # the slice on screen: already computed
            grid = source.grid()
            data = {show: self._background_view(show, source.flipped) for _, show in names}
        else:
            self.slices = None
            grid = patch_grid(source.layer, result, source.flipped)
            data = {show: result.map(show) for _, show in names}
            if source.flipped:
                data = {show: values[:, ::-1] for show, values in data.items()}
        layers = []
        for k, (suffix, show) in enumerate(names):
            metadata = {TAG: {"image": source.name, "map": show, "flipped": source.flipped, "frame": result.frame,
                              "encoder": result.encoder.get("source")}}
            style = self._style(show, first=k == 0, limits=display_limits(result.map(show)))
            visible = style.pop("visible")
            # Added hidden: a new layer first slices itself at slice 0, which a lazy stack would compute.
            layer = Image(data[show], name=f"{source.name} {suffix}", metadata=metadata, visible=False,
                          **grid, **style)
            self.viewer.add_layer(layer)
            layer.visible = visible
            layers.append(layer)
        self.layers = layers
        self.viewer.layers.selection.active = source.layer  # keep the image selected
        self.results.setText(describe(result))
        self.export_button.setEnabled(True)
        self.progress.setValue(self.progress.maximum())
        return layers

    def _style(self, show: str, first: bool, limits: tuple[float, float]) -> dict[str, Any]:
        if show == "pca":  # hidden behind attention: one eye-click away (shown first when there is no attention)
            return dict(rgb=True, blending="translucent", opacity=0.7, visible=first)
        if show.startswith("heatmap:"):
            return dict(colormap=HEATMAP_COLORMAP, blending="additive", contrast_limits=(0.0, 1.0),
                        opacity=self.opacity.value() / 100, visible=True)
        # Attention in multiples of uniform, dark at uniform: only what the model favours glows. The
        # limits come from the slice computed first (a lazy stack can't look at the others).
        # Per head: only the first head shown (additive blending would sum the others on top).
        return dict(colormap=ATTENTION_COLORMAP, blending="additive", contrast_limits=limits,
                    opacity=self.opacity.value() / 100, visible=first)

    def _set_opacity(self, value: int) -> None:
        for layer in self.layers:
            if layer in self.viewer.layers and layer.metadata[TAG]["map"] != "pca":
                layer.opacity = value / 100

    # --- DBT: the other slices, in the background ------------------------------------------------------
    def _background_view(self, show: str, flipped: bool) -> LazyAttentionStack:
        """Map ``show`` of the volume's slices, computed on the pool; when a slice is ready the pool's
        thread emits a signal that names this stack (so only its layer refreshes, on the GUI thread)."""
        def ready(index: int, error: BaseException | None) -> None:
            try:
                self._plane_ready.emit(stack, index, error)
            except RuntimeError:  # the widget was closed while its layers stay open: nobody to tell
                stack.close()

        stack = LazyAttentionStack(results=self.slices, show=show, flipped=flipped, on_ready=ready)
        return stack

    def _show_ready(self, stack: LazyStack, index: int, error: BaseException | None) -> None:
        """A lazy layer's slice ``index`` is computed (or failed) on the pool: refresh the layer if it
        shows that slice. A stack whose layer is gone (replaced by a newer run, deleted) is ignored."""
        for layer in [la for la in self.viewer.layers if la.data is stack]:
            if layer_slice(layer, self.viewer) != index:
                continue  # read ahead: shown from the cache when scrolled to
            if error is not None:
                said = error if isinstance(error, MammoInputError) else f"{type(error).__name__}: {error}"
                self.message.setText(f"slice {index}: {said}")
                return
            layer.refresh()
        self._slice_changed()

    def _layer_removed(self, event: Any) -> None:
        """A lazy layer left the viewer: drop the slices it queued (one forward pass each)."""
        if isinstance(event.value.data, LazyStack) and TAG in event.value.metadata:
            event.value.data.close()

    def _slice_changed(self, event: Any = None) -> None:
        """Scrolling a volume with inference layers: the text follows the slice on screen."""
        if self.slices is None or self.request is None or self.request.source.layer not in self.viewer.layers:
            return
        index = self.request.source.slice_index(self.viewer)
        found = self.slices.peek(index)
        if found is not None:
            self.result = found
            self.results.setText(describe(found))
        elif any(layer.visible for layer in self.layers if layer in self.viewer.layers):
            self.results.setText(f"slice {index}: computing…")  # the layers asked the pool; _show_ready brings it
        else:  # nothing shown asks for it
            self.results.setText(f"slice {index}: not computed (its map layers are hidden)")

    # --- image choice ---------------------------------------------------------------------------------
    def _refresh_images(self, event: Any = None) -> None:
        current = self.image.currentData()
        self.image.blockSignals(True)
        self.image.clear()
        for layer in self.viewer.layers:
            if isinstance(layer, Image) and TAG not in layer.metadata:
                self.image.addItem(layer.name, layer)
        index = self.image.findData(current) if current is not None else -1
        self.image.setCurrentIndex(max(index, 0) if self.image.count() else -1)
        self.image.blockSignals(False)

    def _follow_selection(self, event: Any = None) -> None:
        active = self.viewer.layers.selection.active
        if isinstance(active, Image) and TAG not in active.metadata:
            self.select_image(active)

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Encoder checkpoint", "", "safetensors (*.safetensors);;all (*)")
        if path:
            self.use_checkpoint(path)

    def _export_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export inference results to")
        if not folder:
            return
        try:
            files = self.export_to(folder)
        except MammoInputError as exc:
            self._refuse(str(exc))
            return
        self.message.setText("")
        self.results.setText(self.results.text() + f"\nexported {len(files)} files to {folder}")
