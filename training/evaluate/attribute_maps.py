"""Where a sentence is in an image: attribute maps of an image-report model (Mammo-FActOR's idea,
Ghosh et al. 2024, read from the model itself; see :mod:`training.ssl.clip`), and the pointing game
that measures them on phantoms.

* :func:`find`: a sentence ("spiculated mass in the upper outer quadrant") on one image (a DBT slice)
  -> the map of each patch's share of the image-sentence similarity beyond a normal breast's (the
  sentence's text embedding minus that of ``REFERENCE``, "no mass or suspicious calcifications", so
  what every breast shares, its density and tissue, cancels), the sentence's similarity with the
  image, and the zero-shot class probabilities of the default prompts' targets. What the viewer's text
  box and ``mammodino infer --find`` show.
* :func:`pointing_game` (Zhang et al. 2018, "Top-down neural attention by excitation backprop"): the
  share of lesion images whose map peak (over the breast's patches) falls on a patch that holds lesion
  pixels, against the last-layer attention of the same encoder, and against a random peak, whose
  expected score is the share of breast patches that hold lesion pixels (computed exactly, not drawn).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from training.errors import MammoInputError

# The sentence each phantom lesion type is looked for with (the report templates' wording).
POINTING_SENTENCES = {"mass": "There is a mass.", "calc": "There are grouped calcifications."}
REFERENCE = "No mass or suspicious calcifications are seen."  # a normal breast, what a map is read against
SHOWN_TARGETS = ("density", "lesion_type")  # zero-shot probabilities `find` reports
MIN_TISSUE = 0.5  # a patch counts as breast when at least this share of it is tissue


@dataclass
class Found:
    """A sentence on one image: ``scores`` (h, w) on the ``prepared`` grid, ``similarity`` (cosine of
    the image and sentence embeddings), ``probabilities`` {target: {class: p}} zero-shot."""

    sentence: str
    prepared: Any
    scores: np.ndarray
    similarity: float
    probabilities: dict[str, dict[str, float]] = field(default_factory=dict)

    def on_image(self) -> np.ndarray:
        """The map resampled onto the stored image grid (zero outside the encoder's crop)."""
        return self.prepared.to_image(self.scores)


def _embedding_and_direction(clip: Any, sentence: str, reference: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The sentence's embedding and the direction its map reads, from one pass of the text encoder."""
    embeddings = clip.text_embeddings([sentence] if reference is None else [sentence, reference])
    own = embeddings[0]
    return own, own if reference is None or sentence.strip() == reference else own - embeddings[1]


def map_direction(clip: Any, sentence: str, reference: str | None = REFERENCE) -> np.ndarray:
    """The text direction a map reads: the sentence's embedding minus the reference's (None: the
    sentence's own, which mostly maps what the sentence shares with every breast)."""
    return _embedding_and_direction(clip, sentence, reference)[1]


def find(clip: Any, image: Any, sentence: str, frame: int | None = None, resolution: int | None = None,
         targets: Sequence[str] = SHOWN_TARGETS, reference: str | None = REFERENCE) -> Found:
    """The attribute map of ``sentence`` on ``image`` (a MammoImage or an array, see
    :func:`training.evaluate.encoder.prepare_image`); an empty sentence is one line."""
    from training.evaluate.zeroshot import class_embeddings, shipped_prompts

    text, direction = _embedding_and_direction(clip, sentence, reference)
    prepared = clip.encoder.prepare_image(image, frame=frame, resolution=resolution)
    output = clip.encoder.run(prepared, attention="none")[0]
    embedding = clip.image_embeddings([output])
    prompts = shipped_prompts()
    probabilities = {}
    for target in targets:
        table = prompts.get(target)
        if isinstance(table, dict):
            p = clip.probabilities(embedding, class_embeddings(clip, table))[0]
            probabilities[target] = {name: round(float(v), 4) for name, v in zip(table, p)}
    scores = clip.patch_scores(output, direction)
    return Found(sentence, prepared, scores, float(embedding[0] @ text), probabilities)


def patch_coverage(mask: np.ndarray, prepared: Any) -> np.ndarray:
    """(h, w) share of each patch's image footprint that ``mask`` (image grid) covers."""
    r0, c0, r1, c1 = prepared.box
    h, w = prepared.grid
    rows = np.linspace(r0, r1, h + 1).round().astype(int)
    cols = np.linspace(c0, c1, w + 1).round().astype(int)
    region = np.asarray(mask, dtype=np.float64)
    sums = np.add.reduceat(np.add.reduceat(region[rows[0]:rows[-1], cols[0]:cols[-1]], rows[:-1] - rows[0], axis=0),
                           cols[:-1] - cols[0], axis=1)
    area = np.outer(np.diff(rows), np.diff(cols)).clip(1)
    return sums / area


def _peak_hits(scores: np.ndarray, breast: np.ndarray, lesion: np.ndarray) -> bool:
    masked = np.where(breast, scores, -np.inf)
    return bool(lesion.flat[int(np.argmax(masked))])


def pointing_game(clip: Any, labels: str | Path, sentences: Mapping[str, str] | None = None,
                  resolution: int | None = None, max_images: int | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """The pointing game on a phantom labels CSV (``lesion_type`` and ``lesion_mask`` columns): for each
    lesion image, the map of its type's sentence (read against :data:`REFERENCE`, and without it), the
    mean last-layer attention and a random peak."""
    from tqdm import tqdm

    from training.dicom.io import open_image
    from training.evaluate.heads.localise import lesion_regions
    from training.labels import read_rows

    labels = Path(labels)
    sentences = dict(POINTING_SENTENCES if sentences is None else sentences)
    rows = read_rows(labels)
    for column in ("lesion_type", "lesion_mask"):
        if column not in rows[0]:
            raise MammoInputError(f"{labels.name}: the pointing game needs a {column!r} column (a phantom labels CSV)")
    rows = [r for r in rows if r["lesion_type"].strip() in sentences and r["lesion_mask"].strip()]
    if max_images is not None:
        rows = rows[:max_images]
    if not rows:
        raise MammoInputError(f"{labels.name}: no image with a lesion of type {', '.join(sentences)}")
    directions = {kind: map_direction(clip, text) for kind, text in sentences.items()}
    plain = {kind: map_direction(clip, text, None) for kind, text in sentences.items()}
    start = time.perf_counter()
    hits = {"clip": [], "clip_without_reference": [], "attention": []}
    chance, kinds = [], []
    for row in tqdm(rows, desc="pointing", unit="image", disable=not progress):
        prepared = clip.encoder.prepare_image(open_image(labels.parent / row["path"]), resolution=resolution)
        output = clip.encoder.run(prepared, attention="last")[0]
        regions = lesion_regions(row, "lesion_mask", labels.parent, prepared)
        lesion = patch_coverage(np.any(regions, axis=0), prepared) > 0 if regions else None
        breast = prepared.tissue >= MIN_TISSUE
        if lesion is None or not (lesion & breast).any():
            continue  # the lesion lies outside the encoder's crop or off the breast patches
        kind = row["lesion_type"].strip()
        kinds.append(kind)
        hits["clip"].append(_peak_hits(clip.patch_scores(output, directions[kind]), breast, lesion))
        hits["clip_without_reference"].append(_peak_hits(clip.patch_scores(output, plain[kind]), breast, lesion))
        if output.attention is not None:
            hits["attention"].append(_peak_hits(output.attention.mean(0), breast, lesion))
        chance.append(float((lesion & breast).sum() / breast.sum()))
    if not kinds:
        raise MammoInputError(f"{labels.name}: no lesion falls on the breast patches the encoder sees")
    kinds_arr = np.asarray(kinds)
    report: dict[str, Any] = {"labels": str(labels), "images": len(kinds), "sentences": sentences,
                              "reference": REFERENCE,
                              "random": round(float(np.mean(chance)), 4)}
    for name, values in hits.items():
        report[name] = round(float(np.mean(values)), 4) if values else None
    def share(values: list, kind: str) -> float | None:
        return round(float(np.mean(np.asarray(values)[kinds_arr == kind])), 4) if values else None

    report["by_type"] = {kind: {"images": int((kinds_arr == kind).sum()), **{name: share(v, kind) for name, v in
                                                                           hits.items()}, "random": share(chance, kind)}
                         for kind in sorted(set(kinds))}
    report["model"] = clip.describe()["source"]
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report


def find_command(path: str | Path, sentence: str, out: str | Path, checkpoint: str | None = None,
                 frame: int | None = None, resolution: int | None = None) -> dict[str, Any]:
    """``mammodino infer --find SENTENCE``: the sentence's map on the stored image grid as ``find.npy`` in
    ``out`` (float32; a DBT volume: the slice's map), and what :func:`find` says about the image."""
    from training.dicom.io import open_image
    from training.ssl.clip import load_clip

    clip = load_clip(checkpoint)
    found = find(clip, open_image(path), sentence, frame, resolution)
    target = Path(out) / "find.npy"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        np.save(target, found.on_image().astype(np.float32))
    except OSError as exc:
        raise MammoInputError(f"--out {out}: cannot write the map ({exc})") from None
    return {"sentence": sentence, "similarity": round(found.similarity, 4), "probabilities": found.probabilities,
            "frame": found.prepared.frame, "grid": list(found.prepared.grid), "model": clip.source, "file": str(target)}


def evaluate_clip(checkpoint: str | None, labels: str | Path,
                  targets: Sequence[str] = ("density", "lesion", "lesion_type"), repeats: int = 5,
                  group: str | None = "patient_id", max_images: int | None = None) -> dict[str, Any]:
    """What a CLIP model knows on a phantom labels CSV: zero-shot and the label-efficiency curve per
    target, and the pointing game (:func:`pointing_game`). The model
    card of the shipped demo and ``benchmarks/bench_clip.py`` report this."""
    from training.evaluate.zeroshot import run_zeroshot
    from training.ssl.clip import load_clip

    start = time.perf_counter()
    report: dict[str, Any] = {"checkpoint": str(checkpoint or "demo"), "labels": str(labels), "zero_shot": {}}
    for target in targets:
        result = run_zeroshot(labels, target, checkpoint=checkpoint, group=group, curve=True, repeats=repeats,
                              progress=False)
        report["zero_shot"][target] = {k: result[k] for k in ("n", "counts", "auroc", "balanced_accuracy", "chance",
                                                              "label_efficiency")}
    report["pointing_game"] = pointing_game(load_clip(checkpoint), labels, max_images=max_images, progress=False)
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report
