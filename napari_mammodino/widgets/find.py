"""The Inference widget's text box: where a sentence ("spiculated mass in the upper outer quadrant") is in
the selected image, by an image-report model (:mod:`training.ssl.clip`), as a patch map layer on the image.

The work is :func:`training.evaluate.attribute_maps.find` (the same code as ``mammodino infer --find``),
run in a napari thread worker: a new query supersedes a running one (its result is dropped). The model is
the Inference widget's checkpoint (a CLIP file or a ``mammodino clip`` run folder), or the demo CLIP
model when the encoder box is empty; it is loaded once and kept until the checkpoint changes. A
checkpoint without a text tower, a missing demo model, an empty sentence or no image is one line in the
widget's status, as the widget's other refusals are.

The map is a layer ``find: <sentence>`` placed on the image like the attention maps (the Inference
widget's ``patch_grid``, handed in as ``place``: this module does not import the widget); for a DBT it
is the slice on screen, shown on that slice only. Its label gives the sentence's similarity with the
image and the zero-shot class probabilities of the default prompts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from napari.layers import Image
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QHBoxLayout, QLabel, QLineEdit, QPushButton, QVBoxLayout, QWidget

from training.errors import MammoInputError
from training.progress import Steps

from napari_mammodino._sources import ImageSource
from napari_mammodino._workers import Refused, Task, start

if TYPE_CHECKING:
    import napari

FIND_COLORMAP = "inferno"
FIND_OPACITY = 0.5
PLACEHOLDER = "find: spiculated mass in the upper outer quadrant"


@dataclass
class Query:
    """One Find: the model spec (None: the demo CLIP model), the sentence and where to look."""

    spec: str | None
    sentence: str
    source: ImageSource
    image: Any  # what the library reads (ImageSource.image_or_data)
    frame: int | None  # the DBT slice on screen
    resolution: int | None


def load_clip_line(spec: str | None) -> Any:
    """:func:`training.ssl.clip.load_clip`, every failure one ``MammoInputError`` line (a damaged file can
    fail anywhere in the loader)."""
    from training.ssl.clip import load_clip

    try:
        return load_clip(spec)
    except MammoInputError:
        raise
    except Exception as exc:
        raise MammoInputError(f"cannot load the CLIP model {spec or 'demo'}: {type(exc).__name__}: {exc}") from None


def find_steps(query: Query, load: Callable[[str | None], Any]) -> Steps:
    """Load the model (cached by ``load``), then find: yields (done, 2), returns the ``Found``."""
    from training.evaluate.attribute_maps import find

    yield 0, 2
    try:
        clip = load(query.spec)
    except MammoInputError as exc:
        raise MammoInputError(f"Find: {exc}") from None
    yield 1, 2
    found = find(clip, query.image, query.sentence, frame=query.frame, resolution=query.resolution)
    yield 2, 2
    return found


def describe_found(found: Any) -> str:
    """Zero-shot class probabilities (ranked, one line a target) and the sentence's similarity."""
    lines = []
    for target, probabilities in found.probabilities.items():
        ranked = sorted(probabilities.items(), key=lambda item: -item[1])
        lines.append(f"{target.replace('_', ' ')}: " + " · ".join(f"{name} {p:.2f}" for name, p in ranked))
    where = f" (slice {found.prepared.frame})" if found.prepared.frame is not None else ""
    lines.append(f"similarity {found.similarity:.2f}{where}")
    return "\n".join(lines)


def score_limits(scores: np.ndarray) -> tuple[float, float]:
    """Colour range of a map: dark where a patch adds nothing to the similarity (additive blending leaves
    the image as it is), bright at the 99th percentile of what patches add."""
    return 0.0, max(float(np.percentile(scores, 99)), 1e-6)


class FindBox(QWidget):
    """The text box, the Find button and the result label; the map goes into ``viewer``. ``spec()`` is
    the widget's checkpoint, ``where()`` the chosen image and slice (a ``MammoInputError`` when none),
    ``place(layer, found, flipped, frame)`` the layer keywords of a patch map, ``status`` the widget's
    one-line status label, ``tag`` the metadata key of the widget's layers."""

    def __init__(self, viewer: "napari.Viewer", spec: Callable[[], str | None],
                 where: Callable[[], tuple[ImageSource, int | None]], resolution: Callable[[], int | None],
                 place: Callable[..., dict[str, Any]], status: QLabel, tag: str):
        super().__init__()
        self.viewer, self.spec, self.where, self.resolution = viewer, spec, where, resolution
        self.place, self.status, self.tag = place, status, tag
        self.text = QLineEdit()
        self.text.setPlaceholderText(PLACEHOLDER)
        self.text.setToolTip("a sentence of a report: where in the image is it? (Enter runs it)")
        self.button = QPushButton("Find")
        self.label = QLabel("")
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        row = QHBoxLayout()
        row.addWidget(self.text)
        row.addWidget(self.button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.label)

        self.task: Task | None = None
        self.found: Any = None  # the last Found drawn
        self.layer: Image | None = None
        self._ticket = 0  # the query whose answer is wanted (a newer one supersedes)
        self._clip: tuple[str | None, Any] | None = None
        self._lock = threading.Lock()
        self.button.clicked.connect(self.start)
        self.text.returnPressed.connect(self.start)

    def forget(self) -> None:
        """The checkpoint changed: load the model again at the next Find."""
        with self._lock:
            self._clip = None

    def load(self, spec: str | None) -> Any:
        """The CLIP model of ``spec`` (the last one stays loaded; called in the worker)."""
        with self._lock:
            if self._clip is not None and self._clip[0] == spec:
                return self._clip[1]
        clip = load_clip_line(spec)
        with self._lock:
            self._clip = (spec, clip)
        return clip

    def query(self) -> Query:
        sentence = " ".join(self.text.text().split())
        if not sentence:
            raise MammoInputError("Find: type a sentence first, e.g. 'spiculated mass in the upper outer quadrant'")
        source, frame = self.where()
        return Query(self.spec(), sentence, source, source.image_or_data(), frame, self.resolution())

    def start(self) -> Task | None:
        """Find the sentence in a worker (a running Find is superseded). Returns the task, or None after
        a refusal."""
        self._ticket += 1
        ticket = self._ticket
        if self.task is not None:
            self.task.cancel()
            self.task = None
        try:
            query = self.query()
        except MammoInputError as exc:
            return self._refuse(Refused.of(exc))
        self.status.setText("")
        self.label.setText(f"finding {query.sentence!r}…")
        current = lambda: ticket == self._ticket  # noqa: E731
        self.task = start(find_steps(query, self.load), desc="find",
                          done=lambda found: self.draw(query, found) if current() else None,
                          refused=lambda refused: self._refuse(refused) if current() else None,
                          cancelled=lambda: self.label.setText("") if current() else None,
                          ended=lambda: setattr(self, "task", None) if current() else None)
        return self.task

    def _refuse(self, refused: Refused) -> None:
        self.status.setText(refused.message)
        self.label.setText("")
        refused.show()
        return None

    def draw(self, query: Query, found: Any) -> Image:
        """Add (or update) the layer ``find: <sentence>`` holding ``found``'s patch map on the image."""
        source = query.source
        scores = np.asarray(found.scores, dtype=np.float32)
        data = scores[:, ::-1] if source.flipped else scores
        frame = found.prepared.frame if source.is_volume else None
        if frame is not None:
            data = data[None]  # one slice of the volume's grid: shown on that slice only
        grid = self.place(source.layer, found, source.flipped, frame=frame)
        name = f"find: {query.sentence}"
        metadata = {self.tag: {"image": source.name, "map": "find", "sentence": query.sentence, "frame": frame,
                               "flipped": source.flipped, "similarity": found.similarity,
                               "probabilities": found.probabilities}}
        old = next((la for la in self.viewer.layers if la.name == name and isinstance(la, Image)
                    and la.metadata.get(self.tag, {}).get("map") == "find"), None)
        if old is not None and old.ndim == data.ndim:
            old.data = data
            for key, value in grid.items():
                setattr(old, key, value)
            old.metadata = metadata
            old.contrast_limits = score_limits(scores)
            layer = old
        else:
            if old is not None:
                self.viewer.layers.remove(old)
            layer = Image(data, name=name, metadata=metadata, colormap=FIND_COLORMAP, blending="additive",
                          opacity=FIND_OPACITY, contrast_limits=score_limits(scores), **grid)
            self.viewer.add_layer(layer)
        self.viewer.layers.selection.active = source.layer  # keep the image selected
        self.found, self.layer = found, layer
        self.label.setText(describe_found(found))
        return layer
