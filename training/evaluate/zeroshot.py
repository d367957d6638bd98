"""Zero-shot classification with an image-report model (`mammodino zeroshot`), and the label-efficiency
curve Mammo-CLIP reports (Ghosh et al. 2024: a linear probe on 1%, 10% and 100% of the labels).

Zero-shot: each class of the target is described by a few sentences (``prompts.json`` beside this
module, or ``--prompts``); a class's embedding is the normalised mean of its sentences' embeddings
(CLIP's prompt ensembling, Radford et al. 2021), and an image's class probabilities are the softmax of
the model's learnt scale times its cosine similarity with each class. No label is used.

Label efficiency: patient-grouped train/test splits; the probe (:func:`training.evaluate.probe.fit_probe`)
is fitted on a stratified share of the training images (at least one per class) and scored on the test
images, for the CLIP image embeddings and for the image encoder's own features (class token + mean
patch token: the MammoDINO features the CLIP model was built on), averaged over ``repeats`` splits.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from training.errors import MammoInputError

DEFAULT_PROMPTS = Path(__file__).with_name("prompts.json")
FRACTIONS = (0.01, 0.1, 1.0)


def read_prompts(path: str | Path) -> Any:
    """A prompts file's JSON document (one line when it cannot be read)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise MammoInputError(f"--prompts {path}: cannot be read ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MammoInputError(f"--prompts {path.name}: not a JSON file ({exc})") from None


@functools.cache
def shipped_prompts() -> dict[str, Any]:
    """The shipped ``prompts.json``, read once per process (the viewer's Find asks at every query)."""
    return read_prompts(DEFAULT_PROMPTS)


def load_prompts(path: str | Path | None, target: str, classes: Sequence[str]) -> dict[str, list[str]]:
    """``{class: [sentences]}`` for ``target`` from a prompts file (default: the shipped one); a file
    that does not cover every class of the labels is one line."""
    path = Path(path) if path is not None else DEFAULT_PROMPTS
    document = read_prompts(path) if path != DEFAULT_PROMPTS else shipped_prompts()
    table = document.get(target) if isinstance(document, dict) else None
    if not isinstance(table, dict):
        known = sorted(k for k, v in document.items() if isinstance(v, dict)) if isinstance(document, dict) else []
        raise MammoInputError(f"--prompts {path.name} has no prompts for --target {target!r} (it has: "
                              f"{', '.join(known) or 'none'}); write {{\"{target}\": {{CLASS: [sentences]}}}}")
    prompts = {}
    for name in classes:
        sentences = table.get(name)
        if isinstance(sentences, str):
            sentences = [sentences]
        if not isinstance(sentences, list) or not sentences or not all(isinstance(s, str) and s.strip()
                                                                       for s in sentences):
            raise MammoInputError(f"--prompts {path.name}: {target} class {name!r} needs a non-empty list of "
                                  f"sentences (the labels have classes {', '.join(classes)})")
        prompts[name] = sentences
    return prompts


def class_embeddings(clip: Any, prompts: Mapping[str, Sequence[str]]) -> np.ndarray:
    """(K, E) normalised mean sentence embedding of each class, in ``prompts`` order."""
    rows = [clip.text_embeddings(list(sentences)).mean(axis=0) for sentences in prompts.values()]
    rows = np.stack(rows)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True).clip(1e-12)


def zero_shot_probabilities(clip: Any, features: np.ndarray, prompts: Mapping[str, Sequence[str]]) -> np.ndarray:
    """(N, K) zero-shot probabilities of images given by their encoder features (N, 2D)."""
    return clip.probabilities(clip.embed_features(features), class_embeddings(clip, prompts))


def _subsample(y: np.ndarray, train: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A stratified ``fraction`` of the ``train`` rows, at least one of every class they hold."""
    chosen = []
    for c in np.unique(y[train]):
        rows = train[y[train] == c]
        chosen.append(rng.choice(rows, size=max(1, round(fraction * len(rows))), replace=False))
    return np.sort(np.concatenate(chosen))


def label_efficiency(feature_sets: Mapping[str, np.ndarray], y: np.ndarray, groups: Sequence[str],
                     fractions: Sequence[float] = FRACTIONS, repeats: int = 5, test_fraction: float = 0.3,
                     seed: int = 0) -> dict[str, Any]:
    """Test AUROC (mean and spread over ``repeats`` grouped splits) of a probe fitted on each share of
    the training labels, for each named feature set (same rows)."""
    from threadpoolctl import threadpool_limits

    from training.evaluate.metrics import classification_metrics, grouped_split
    from training.evaluate.probe import fit_probe

    groups = np.asarray(groups)
    scores: dict[str, dict[float, list[float]]] = {name: {f: [] for f in fractions} for name in feature_sets}
    sizes: dict[float, list[int]] = {f: [] for f in fractions}
    n_classes = len(np.unique(y))
    with threadpool_limits(1):
        for r in range(repeats):
            train, test = grouped_split(y, groups, test_fraction, seed + r)
            if len(np.unique(y[train])) < n_classes or len(np.unique(y[test])) < 2:
                continue  # a split that lost a class says nothing about the curve
            rng = np.random.default_rng([seed, r])
            for fraction in fractions:
                rows = _subsample(y, train, fraction, rng)
                sizes[fraction].append(len(rows))
                for name, x in feature_sets.items():
                    model, _ = fit_probe(x[rows], y[rows], groups[rows], seed)
                    proba = np.zeros((len(test), n_classes))
                    proba[:, model.classes_] = model.predict_proba(x[test])
                    auroc = classification_metrics(y[test], proba)["auroc"]
                    if auroc is not None:
                        scores[name][fraction].append(auroc)
    if not any(sizes.values()):
        raise MammoInputError("the labels are too few for a grouped train/test split holding every class")
    return {"fractions": list(fractions), "repeats": repeats, "test_fraction": test_fraction,
            "train_images": {str(f): float(np.mean(s)) if s else None for f, s in sizes.items()},
            "auroc": {name: {str(f): _summary(v) for f, v in by.items()} for name, by in scores.items()}}


def _summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": round(float(np.mean(values)), 4), "sd": round(float(np.std(values)), 4), "n": len(values)}


def run_zeroshot(labels: str | Path, target: str, checkpoint: str | None = None, data: str | Path | None = None,
                 prompts: str | Path | None = None, group: str | None = None, resolution: int | None = None,
                 curve: bool = False, repeats: int = 5, seed: int = 0, cache: str | Path | bool | None = True,
                 device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """`mammodino zeroshot`: prompt-similarity classification of a labels CSV's images, and with
    ``curve`` the label-efficiency curve of CLIP against the image encoder's own features."""
    from training.evaluate.features import extract_features
    from training.evaluate.metrics import classification_metrics
    from training.evaluate.probe import resolve_device
    from training.labels import read_labels
    from training.ssl.clip import load_clip

    start = time.perf_counter()
    labelled = read_labels(labels, target, group=group, data=data)
    chosen = load_prompts(prompts, target, labelled.classes)
    clip = load_clip(checkpoint, resolve_device(device))
    features = extract_features(clip.encoder, labelled.paths, resolution, cache=cache, progress=progress)
    proba = zero_shot_probabilities(clip, features.features, chosen)
    y = labelled.y
    metrics = classification_metrics(y, proba)
    report: dict[str, Any] = {
        "target": target, "labels": str(labelled.csv), "classes": labelled.classes, "n": len(y),
        "counts": {c: int((y == i).sum()) for i, c in enumerate(labelled.classes)},
        **{k: None if v is None else round(float(v), 4) for k, v in metrics.items()},
        "chance": {"auroc": 0.5, "balanced_accuracy": round(1 / len(labelled.classes), 4)},
        "prompts": chosen, "prompts_file": str(Path(prompts) if prompts else DEFAULT_PROMPTS),
        "model": clip.describe(), "dropped_rows": labelled.dropped}
    if curve:
        x_clip = clip.embed_features(features.features)
        report["label_efficiency"] = label_efficiency({"clip": x_clip, "image_encoder": features.features}, y,
                                                      labelled.groups, repeats=repeats, seed=seed)
        if group is None:
            report.setdefault("notes", []).append("no --group: each image is its own group in the curve's splits")
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report

