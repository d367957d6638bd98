"""One-click inference: what a trained encoder looks at and what it predicts, for one image.

:func:`infer_image` runs an :class:`~training.evaluate.encoder.Encoder` on a mammogram (or one DBT slice),
pre-processed exactly as in training (:func:`~training.evaluate.encoder.prepare_image`: tissue box, tissue-percentile
intensities, resolution), and returns an :class:`InferenceResult`:

* the last layer's class-token-to-patch attention, per head and averaged over heads, and optionally
  the attention rollout (Abnar & Zuidema 2020) over all layers;
* a PCA of the patch features as RGB (the DINOv2 paper's feature visualisation, Oquab et al. 2023,
  Fig. 1): three components fitted on the tissue patches of this image;
* the predictions of the encoder's image task heads (named classes with probabilities) and the
  heatmaps of its patch heads;
* ``attention_in_tissue``, the share of attention mass inside the breast-tissue mask;
* the :class:`~training.evaluate.encoder.Prepared` geometry that places each patch map on the image.

It is written as a generator of ``(done, total)`` progress steps (:func:`inference_steps`), so the
napari widget runs the very same code in a thread worker and tests and the CLI run it in place.
:func:`export` writes PNG overlays, NPY maps and JSON predictions. For tomosynthesis,
:class:`LazyAttentionStack` is a (slices, rows, cols) array whose slices are computed when indexed
(napari indexes the slice on screen), kept in a bounded cache, and, for a viewer (``on_ready``),
computed in the background with the next slices read ahead in the scroll direction: the lazy slice
stack of images and tissue masks (:class:`training.lazy.LazyStack`), in its non-blocking mode.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np

from training.dicom.image import MammoImage
from training.evaluate.encoder import Encoder, Output, Prepared
from training.errors import MammoInputError
from training.lazy import LRU, LazyStack, PlanePool
from training.progress import Steps, run_steps


Attention = Literal["last", "rollout"]


TISSUE_PATCH = 0.5  # a patch at least half inside the tissue mask is a tissue patch (PCA fit, PCA shown)


PCA_PERCENTILES = (1.0, 99.0)  # robust per-channel range of the PCA colours


N_STEPS = 4  # read + tissue and crop + resize (one call: prepare_image), forward, maps


AHEAD = 2  # DBT slices a viewer's attention stack reads ahead: each is a forward pass (0.1-1 s on a CPU)
VIEW_MB = 128.0  # planes each map of a lazy attention stack keeps, at most (an RGB PCA plane of a
# 2048 x 1664 slice is 40 MB): a bigger slice keeps fewer and reads fewer ahead


# The encoder's attention hooks switch timm's fused attention off and on around each pass, so two
# passes at once (the widget's worker and napari scrolling a lazy stack) must not interleave.
_FORWARD = threading.Lock()


class InferenceCancelled(Exception):
    """``should_stop()`` said stop; nothing was produced."""


@dataclass
class InferenceResult:
    """Maps and predictions of one image (patch grid (h, w) of ``prepared``).

    ``attention`` (h, w) last-layer class-token attention averaged over heads (sums to 1);
    ``head_attention`` (heads, h, w) the same per head (each sums to 1); both None, and
    ``attention_in_tissue`` None, for an encoder without attention (a CNN student); ``rollout`` (h, w) or None;
    ``pca`` (h, w, 3) float32 in [0, 1] (0 on patches outside the tissue); ``pca_explained`` the
    explained-variance ratio of its three components; ``predictions`` {task: {class: probability}};
    ``heatmaps`` {task: (h, w) probability of the head's last class}; ``attention_in_tissue`` see
    :func:`attention_in_tissue`; ``tissue_share`` the same with uniform attention (the mean patch
    tissue fraction: the chance level to compare with); ``kind`` the attention the maps were asked
    for ("last" or "rollout")."""

    prepared: Prepared
    attention: np.ndarray | None
    head_attention: np.ndarray | None
    rollout: np.ndarray | None
    pca: np.ndarray
    pca_explained: np.ndarray
    predictions: dict[str, dict[str, float]]
    heatmaps: dict[str, np.ndarray]
    attention_in_tissue: float | None
    tissue_share: float
    kind: Attention
    encoder: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    @property
    def frame(self) -> int | None:
        return self.prepared.frame

    @property
    def grid(self) -> tuple[int, int]:
        return self.prepared.grid

    @property
    def has_attention(self) -> bool:
        """False for an encoder without attention (a CNN student): PCA, predictions and heatmaps only."""
        return self.attention is not None

    @property
    def shown(self) -> np.ndarray | None:
        """The attention map asked for: the rollout for ``kind="rollout"``, else the head mean."""
        return self.rollout if self.kind == "rollout" and self.rollout is not None else self.attention

    def map(self, name: str) -> np.ndarray:
        """A map by name, for display: "attention" (the one asked for), "mean", "rollout", "head:K"
        (each as :func:`times_uniform`), "pca" (h, w, 3) or "heatmap:TASK" (probabilities)."""
        if name == "pca":
            return self.pca
        if name.startswith("heatmap:"):
            return self.heatmaps[name[len("heatmap:"):]]
        if not self.has_attention and (name in ("attention", "mean", "rollout") or name.startswith("head:")):
            raise MammoInputError(f"no {name} map: this encoder has no attention (features and heads only)")
        if name == "attention":
            values = self.shown
        elif name == "mean":
            values = self.attention
        elif name == "rollout":
            if self.rollout is None:
                raise MammoInputError("no rollout in this result: run with attention='rollout'")
            values = self.rollout
        elif name.startswith("head:"):
            values = self.head_attention[int(name[len("head:"):])]
        else:
            raise KeyError(name)
        return times_uniform(values)

    def summary(self) -> dict[str, Any]:
        """What the CLI prints and export writes as JSON."""
        p = self.prepared
        return {"path": self.path, "frame": self.frame, "attention": self.kind,
                "predictions": self.predictions,
                "heatmaps": {task: {"max": float(m.max()), "mean": float(m.mean())} for task, m in self.heatmaps.items()},
                "attention_in_tissue": None if self.attention_in_tissue is None else round(self.attention_in_tissue, 6),
                "tissue_share": round(self.tissue_share, 6),
                "pca_explained_variance": [round(float(v), 6) for v in self.pca_explained],
                "grid": list(p.grid), "input_px": list(p.pixels.shape), "box": list(p.box),
                "patch_px": [float(v) for v in p.patch_px], "image_shape": list(p.image_shape),
                "encoder": self.encoder}


def times_uniform(attention: np.ndarray) -> np.ndarray:
    """An attention distribution (sums to 1) as multiples of uniform attention (float32): 1 is the
    share every patch would get if the model looked everywhere alike, whatever the grid, so maps of
    different resolutions and slices share one colour scale, and a flat (untrained) map looks flat
    instead of being stretched into false structure."""
    values = np.asarray(attention, dtype=np.float32)
    return values * np.float32(values.size / max(float(values.sum()), 1e-12))


def display_limits(shown: np.ndarray) -> tuple[float, float]:
    """Colour range of a :func:`times_uniform` map: from uniform (1: no more than its share, dark, so
    additive blending leaves the image as it is) to its 99th percentile, but at least 1.1 so that a map
    within 10% of uniform (an untrained model) stays dim instead of showing its noise at full colour."""
    return 1.0, max(float(np.percentile(shown, 99)), 1.1)


def attention_in_tissue(attention: np.ndarray, tissue: np.ndarray) -> float:
    """Share of attention mass inside the breast-tissue mask:

        sum_p a_p * f_p / sum_p a_p

    over the patches p of the encoder's input, with a_p >= 0 the class token's attention to patch p
    and f_p in [0, 1] the fraction of patch p's image area inside the tissue mask
    (:attr:`Prepared.tissue`). 1 means all attention falls on tissue, and a uniform map gives the mean
    tissue fraction of the patches (the chance level). The input covers only the tissue bounding box,
    so attention can only leak onto the air and labels inside that box."""
    attention = np.asarray(attention, dtype=np.float64)
    tissue = np.asarray(tissue, dtype=np.float64)
    if attention.shape != tissue.shape:
        raise ValueError(f"attention {attention.shape} and tissue {tissue.shape} differ in shape")
    total = attention.sum()
    return float((attention * tissue).sum() / total) if total > 0 else 0.0


def pca_rgb(patches: np.ndarray, tissue: np.ndarray, threshold: float = TISSUE_PATCH) -> tuple[np.ndarray, np.ndarray]:
    """Patch features (h, w, D) -> ((h, w, 3) float32 RGB in [0, 1], explained-variance ratios (3,)).

    The three principal components are fitted on the tissue patches (tissue fraction >= threshold;
    all patches when fewer than 4 are tissue) and each is mapped to [0, 1] by its 1st-99th percentile
    over those patches, so one outlier patch does not wash the others out. Non-tissue patches are
    black: the colours describe the breast, not the air around it."""
    from sklearn.decomposition import PCA

    h, w, d = patches.shape
    x = patches.reshape(-1, d).astype(np.float32)
    inside = np.asarray(tissue).ravel() >= threshold
    if inside.sum() < 4:
        inside = np.ones_like(inside)
    fit = x[inside]
    n = min(3, fit.shape[0] - 1, d)
    rgb = np.zeros((x.shape[0], 3), dtype=np.float32)
    explained = np.zeros(3, dtype=np.float32)
    if n >= 1:
        # One BLAS thread: a few hundred patches gain nothing from more, and on a busy machine
        # OpenBLAS's spinning threads made this 100x slower. Randomized SVD (fixed seed: the same
        # colours every time) finds 3 components of 777 x 384 ViT-S features 4x faster than the
        # covariance's eigendecomposition.
        with _blas_controller().limit(limits=1):
            pca = PCA(n_components=n, svd_solver="randomized", random_state=0).fit(fit)
            y = pca.transform(x).astype(np.float32)
        lo, hi = np.percentile(y[inside], PCA_PERCENTILES, axis=0)
        rgb[:, :n] = np.clip((y - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0, 1.0)
        explained[:n] = pca.explained_variance_ratio_
    rgb[~inside] = 0.0
    return rgb.reshape(h, w, 3), explained


@functools.cache
def _blas_controller() -> Any:
    """threadpoolctl's view of the loaded BLAS/OpenMP pools, made once (finding them takes ~7 ms)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextlib.contextmanager
def _stoppable(encoder: Encoder, should_stop: Callable[[], bool] | None):
    """Check ``should_stop`` before every transformer block, so Cancel stops within one block."""
    if should_stop is None:
        yield
        return

    def check(module: Any, args: Any) -> None:
        if should_stop():
            raise InferenceCancelled()

    hooks = [block.register_forward_pre_hook(check) for block in encoder.backbone.blocks]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def forward(encoder: Encoder, prepared: Prepared, attention: Attention = "last",
            should_stop: Callable[[], bool] | None = None) -> Output:
    """One forward pass with attention (thread-safe; cancellable between blocks)."""
    if attention not in ("last", "rollout"):
        raise MammoInputError(f"attention {attention!r}: choose 'last' or 'rollout'")
    with _FORWARD, _stoppable(encoder, should_stop):
        return encoder.run(prepared, attention=attention)[0]


def result_of(encoder: Encoder, prepared: Prepared, output: Output, attention: Attention = "last",
              path: str | None = None) -> InferenceResult:
    """An :class:`InferenceResult` from one forward pass's output (without attention maps when the
    encoder has none)."""
    heads = output.attention
    mean = None
    if heads is not None:
        mean = heads.mean(0)
        mean = (mean / max(float(mean.sum()), 1e-12)).astype(np.float32)
        heads = heads.astype(np.float32)
    rollout = output.rollout
    shown = rollout if attention == "rollout" and rollout is not None else mean
    rgb, explained = pca_rgb(output.patches, prepared.tissue)
    return InferenceResult(
        prepared=prepared, attention=mean, head_attention=heads,
        rollout=None if rollout is None else rollout.astype(np.float32), pca=rgb, pca_explained=explained,
        predictions=output.predictions, heatmaps={k: v.astype(np.float32) for k, v in output.heatmaps.items()},
        attention_in_tissue=None if shown is None else attention_in_tissue(shown, prepared.tissue),
        tissue_share=float(np.mean(prepared.tissue)), kind=attention, encoder=encoder.describe(), path=path)


def inference_steps(encoder: Encoder, image: Any, frame: int | None = None, resolution: int | None = None,
                    attention: Attention = "last", should_stop: Callable[[], bool] | None = None) -> Steps:
    """:func:`infer_image` as a generator of ``(done, total)`` steps; returns the InferenceResult."""
    def check() -> None:
        if should_stop is not None and should_stop():
            raise InferenceCancelled()

    if attention not in ("last", "rollout"):
        raise MammoInputError(f"attention {attention!r}: choose 'last' or 'rollout'")
    check()
    if isinstance(image, Prepared):
        prepared = image
    else:
        prepared = encoder.prepare_image(image, frame, resolution)
        yield 1, N_STEPS
        check()
    yield 2, N_STEPS
    check()
    output = forward(encoder, prepared, attention, should_stop)
    yield 3, N_STEPS
    path = str(image.meta.path) if isinstance(image, MammoImage) else None
    result = result_of(encoder, prepared, output, attention, path)
    yield 4, N_STEPS
    return result


def infer_image(encoder: Encoder, image: Any, frame: int | None = None, resolution: int | None = None,
                attention: Attention = "last", should_stop: Callable[[], bool] | None = None,
                progress: Callable[[int, int], None] | None = None) -> InferenceResult:
    """Attention, PCA, predictions and heatmaps of one image.

    ``image``: a :class:`~training.dicom.image.MammoImage` (FFDM, or DBT slice ``frame``: default the middle
    one), a 2D array / 3D volume of MONOCHROME2 values, or an already :class:`Prepared` input;
    ``resolution``: the input's long side in pixels (default: the encoder's own); ``attention``:
    "last" (the last layer, per head and mean) or "rollout" (also the rollout, used for
    ``attention_in_tissue``); ``should_stop()`` is polled between steps and before each transformer
    block (True raises :class:`InferenceCancelled`); ``progress(done, total)`` follows the steps."""
    return run_steps(inference_steps(encoder, image, frame, resolution, attention, should_stop), progress)


def patch_placement(prepared: Prepared, flipped: bool = False) -> tuple[tuple[float, float], tuple[float, float]]:
    """(origin, step) in image pixels (pixel centres at integers) of patch (0, 0)'s centre and of one
    patch, on the image as stored, or mirrored left-right (``flipped``: the hanging protocol showed the
    image mirrored, and the patch map is shown mirrored too, ``map[:, ::-1]``)."""
    origin = prepared.patch_origin_px()
    if flipped:  # the box mirrored: columns [W - c1, W - c0)
        width, c1 = prepared.image_shape[1], prepared.box[3]
        origin = (origin[0], (width - c1) - 0.5 + 0.5 * prepared.patch_px[1])
    return origin, prepared.patch_px


def on_image_grid(prepared: Prepared, patch_map: np.ndarray, rows: np.ndarray | None = None,
                  cols: np.ndarray | None = None) -> np.ndarray:
    """A (h, w[, c]) patch map on image pixels ``rows`` x ``cols`` (default all), each pixel taking its
    patch's value (nearest: patch maps stay honest blocks), 0 outside the encoder's input box."""
    rows = np.arange(prepared.image_shape[0]) if rows is None else np.asarray(rows)
    cols = np.arange(prepared.image_shape[1]) if cols is None else np.asarray(cols)
    r0, c0, r1, c1 = prepared.box
    h, w = prepared.grid
    i = np.floor((rows - r0 + 0.5) / prepared.patch_px[0]).astype(np.int64)
    j = np.floor((cols - c0 + 0.5) / prepared.patch_px[1]).astype(np.int64)
    inside = ((rows >= r0) & (rows < r1))[:, None] & ((cols >= c0) & (cols < c1))[None, :]
    values = np.asarray(patch_map)[np.clip(i, 0, h - 1)[:, None], np.clip(j, 0, w - 1)[None, :]]
    return np.where(inside[(...,) + (None,) * (values.ndim - 2)], values, 0).astype(np.float32)


class SliceResults:
    """InferenceResults of the slices of one volume, computed on first request and kept in a bounded
    least-recently-used cache (thread-safe: napari may slice from another thread). ``computed`` lists
    every computation in order (a slice evicted and asked for again appears twice). :meth:`close`
    stops the forward pass running (within one transformer block) and any later one."""

    def __init__(self, encoder: Encoder, image: Any, resolution: int | None = None,
                 attention: Attention = "last", cache_size: int = 16):
        shape = tuple(image.data.shape if isinstance(image, MammoImage) else image.shape)
        if len(shape) != 3:
            raise MammoInputError(f"a lazy attention stack needs a 3D volume, got shape {shape}")
        self.encoder, self.image, self.resolution, self.attention = encoder, image, resolution, attention
        self.shape = shape
        self.computed: list[int] = []
        self._cache = LRU(cache_size)
        self._computing = threading.Lock()  # one slice at a time: two askers never compute it twice
        self._closed = threading.Event()

    @property
    def cache_size(self) -> int:
        return self._cache.size

    def __len__(self) -> int:
        return self.shape[0]

    def peek(self, index: int) -> InferenceResult | None:
        """The cached result of slice ``index``, or None (computes nothing)."""
        return self._cache.get(index)

    def put(self, index: int, result: InferenceResult) -> None:
        """Cache the result of slice ``index`` (computed here or by someone else: it is logged)."""
        self.computed.append(index)
        self._cache.put(index, result)

    def close(self) -> None:
        """Stop: the forward pass running raises InferenceCancelled within one block (releasing the
        lock), and so does any later one (the layers these results fed are gone)."""
        self._closed.set()

    def get(self, index: int, should_stop: Callable[[], bool] | None = None) -> InferenceResult:
        """The result of slice ``index``, computed now if it is not cached."""
        index = range(self.shape[0])[index]

        def stop() -> bool:
            return self._closed.is_set() or (should_stop is not None and should_stop())

        with self._computing:  # released however the pass ends (InferenceCancelled included)
            found = self.peek(index)
            if found is None:
                found = infer_image(self.encoder, self.image, index, self.resolution, self.attention, stop)
                self.put(index, found)
        return found


class LazyAttentionStack(LazyStack):
    """A read-only numpy-like (slices, rows, cols) float32 array on the image grid of a DBT volume:
    slice i is the map ``show`` of slice i's inference (see :meth:`InferenceResult.map`), computed
    when it is first indexed (:class:`training.lazy.LazyStack`) from the results cached in
    :class:`SliceResults` (``cache_size`` slices). ``show="pca"`` gives (slices, rows, cols, 3) RGB.
    ``flipped`` mirrors each plane left-right (a view the hanging protocol mirrored).

    Without ``on_ready`` a slice is computed on the thread that indexes it (scripts, the CLI). With
    ``on_ready`` (a viewer) indexing never waits for the encoder: a slice not computed yet is zeros,
    computed on ``pool`` (default: the shared pool of image slices) and then ``on_ready(i, error)``
    is called from the pool's thread; the ``ahead`` slices after it in the scroll direction are read
    ahead (both ways before any move). Each map keeps ``ahead + 2`` planes (one behind, the one shown;
    2 in place), at most ``max_mb`` MB. :meth:`view` makes a stack of another map on the same
    results: several maps read ahead the same slices, and each slice's forward pass runs once for all
    (one at a time, under :class:`SliceResults`'s lock; the others render from its cache)."""

    def __init__(self, encoder: Encoder | None = None, image: Any = None, *, resolution: int | None = None,
                 attention: Attention = "last", show: str = "attention", flipped: bool = False,
                 cache_size: int = 16, results: SliceResults | None = None,
                 on_ready: Callable[[int, BaseException | None], None] | None = None, ahead: int = AHEAD,
                 max_mb: float = VIEW_MB, pool: PlanePool | None = None):
        if results is None:
            if encoder is None or image is None:
                raise ValueError("LazyAttentionStack needs an encoder and an image, or shared results")
            results = SliceResults(encoder, image, resolution, attention, cache_size)
        self.results, self.show, self.flipped = results, show, flipped
        self._options = dict(ahead=ahead, max_mb=max_mb, pool=pool)  # for view(): as asked, not as fitted
        ahead = max(0, ahead) if on_ready is not None else 0  # computed in place: nothing read ahead
        super().__init__(results.shape + ((3,) if show == "pca" else ()), np.float32, self._render,
                         keep=ahead + 2, max_mb=max_mb, on_ready=on_ready, pool=pool)
        self.ahead = min(self.ahead, ahead)

    def view(self, show: str, on_ready: Callable[[int, BaseException | None], None] | None = None
             ) -> "LazyAttentionStack":
        """Another map of the same slices (same results, mirror, read-ahead and pool; ``on_ready``
        this one's unless given)."""
        return LazyAttentionStack(show=show, flipped=self.flipped, results=self.results,
                                  on_ready=on_ready or self.on_ready, **self._options)

    @property
    def computed(self) -> list[int]:
        return self.results.computed

    def __repr__(self) -> str:
        return f"LazyAttentionStack({self.shape}, {self.show!r})"

    def _render(self, index: int) -> np.ndarray:
        """Slice ``index`` on the image grid (its forward pass first, unless cached)."""
        result = self.results.get(index)
        plane = on_image_grid(result.prepared, result.map(self.show))
        return plane[:, ::-1] if self.flipped else plane
