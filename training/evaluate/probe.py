"""Linear probe of frozen features: how much of a label an encoder's features hold.

The protocol follows DINOv2's logistic-regression evaluation (``dinov2/eval/log_regression.py``):
an L2-regularised logistic regression on frozen features whose inverse regularisation C is swept
over a log grid (DINOv2: ``10 ** linspace(-6, 5, 45)`` picked on held-out training data, then refit
on all of it). Medical label sets are small, so instead of one split:

* outer folds: ``StratifiedGroupKFold`` by patient, so one patient's views never sit on both sides;
  every row gets an out-of-fold probability and the metrics are computed once on all of them;
* inner folds (patient-grouped too) pick C on each outer training set by log loss, which is smooth
  where accuracy on a few dozen images is a staircase full of ties; features are standardised with
  the outer training rows' mean and deviation (a scaler in the pipeline), never the test rows';
* metrics: AUROC (binary) or macro one-vs-rest AUROC, balanced accuracy and macro-F1, each with a
  percentile bootstrap 95% interval over rows (seeded; draws lacking a class are skipped).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from training.errors import MammoInputError
from training.evaluate.metrics import classification_metrics, grouped_folds, stratified_group_folds

# DINOv2 sweeps 45 values over 10^-6..10^5; 12 over the same range keep one value per decade,
# which is as fine as a few hundred rows can tell apart.
C_GRID = tuple(float(c) for c in 10.0 ** np.linspace(-6, 5, 12))
INNER_FOLDS = 3
METRICS = ("auroc", "balanced_accuracy", "macro_f1")


# --- the probe -------------------------------------------------------------------------------------

def fit_probe(x: np.ndarray, y: np.ndarray, groups: Sequence[str], seed: int = 0,
              grid: Sequence[float] = C_GRID) -> tuple[Any, float]:
    """A fitted standardise + logistic-regression pipeline and its C, chosen by patient-grouped inner
    cross-validation on (x, y) (C = 1 when the rarest class has too few groups for two folds).
    ``LogisticRegressionCV`` walks the C grid with warm starts: half the time of a grid search that
    refits from scratch; its inner folds see the scaler of all of (x, y), which moves no outer-fold
    row."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    groups = np.asarray(groups)
    inner = min([INNER_FOLDS] + [len(set(groups[y == c])) for c in np.unique(y)])
    with warnings.catch_warnings():
        # Large C on separable features stops at max_iter; the sweep judges those fits like any other.
        warnings.simplefilter("ignore", ConvergenceWarning)
        if inner < 2:
            return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(x, y), 1.0
        splits = stratified_group_folds(y, groups, inner, seed)
        search = LogisticRegressionCV(Cs=list(grid), cv=splits, scoring="neg_log_loss", l1_ratios=(0.0,),
                                      max_iter=1000, use_legacy_attributes=False)
        model = make_pipeline(StandardScaler(), search).fit(x, y)
    return model, float(np.ravel(model[-1].C_)[0])


def out_of_fold_probabilities(x: np.ndarray, y: np.ndarray, groups: Sequence[str],
                              splits: list[tuple[np.ndarray, np.ndarray]], n_classes: int, seed: int = 0,
                              grid: Sequence[float] = C_GRID) -> tuple[np.ndarray, list[float]]:
    """(N, n_classes) probabilities of each row from the probe fitted without its fold, and each
    fold's C. A class absent from a training fold gets probability 0 in that fold."""
    from threadpoolctl import threadpool_limits

    groups = np.asarray(groups)
    proba = np.zeros((len(y), n_classes))
    chosen = []
    # One BLAS thread: these matrices are small, and on a busy machine threads that wait on each
    # other made each fit 10x slower than a single thread.
    with threadpool_limits(1):
        for fold, (train, test) in enumerate(splits):
            if len(np.unique(y[train])) < 2:
                raise MammoInputError(f"fold {fold + 1}: its training rows hold one class; use fewer --folds")
            model, c = fit_probe(x[train], y[train], groups[train], seed, grid)
            proba[np.ix_(test, model.classes_)] = model.predict_proba(x[test])
            chosen.append(c)
    return proba, chosen


# --- metrics ---------------------------------------------------------------------------------------

def weighted_metrics(y: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`training.evaluate.metrics.classification_metrics` of B weighted copies of the rows at once: ``weights`` (B, N)
    are how many times each row is drawn, so row b equals the metrics of ``np.repeat(rows,
    weights[b])``. A bootstrap of 1000 draws then costs a few array operations instead of 3000
    scikit-learn calls (each of which spends most of its time validating its input)."""
    weights = np.asarray(weights, dtype=np.float64)
    n_classes = proba.shape[1]
    onehot = np.eye(n_classes, dtype=bool)[y]  # (N, K)
    predicted = np.eye(n_classes, dtype=bool)[proba.argmax(axis=1)]
    support = weights @ onehot  # (B, K)
    hits = weights @ (onehot & predicted)
    recall = hits / np.where(support > 0, support, np.nan)
    false_pos = weights @ (~onehot & predicted)
    f1_denominator = 2 * hits + false_pos + (support - hits)
    f1 = np.divide(2 * hits, f1_denominator, out=np.zeros_like(hits), where=f1_denominator > 0)
    if n_classes == 2:
        auroc = _weighted_auroc(onehot[:, 1], proba[:, 1], weights)
    else:
        auroc = np.mean([_weighted_auroc(onehot[:, k], proba[:, k], weights) for k in range(n_classes)], axis=0)
    return {"auroc": auroc, "balanced_accuracy": np.nanmean(recall, axis=1), "macro_f1": f1.mean(axis=1)}


def _weighted_auroc(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC as the Mann-Whitney statistic (the area under the empirical ROC curve, ties counting
    one half) with row weights (B, N): for each positive, the weight of negatives scored below it."""
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])  # tie groups
    w = weights[:, order]
    pos = np.add.reduceat(w * positive[order], starts, axis=1)
    neg = np.add.reduceat(w * ~positive[order], starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    return (pos * (below + 0.5 * neg)).sum(axis=1) / np.where(pairs > 0, pairs, np.nan)


def bootstrap_intervals(y: np.ndarray, proba: np.ndarray, n_boot: int = 1000, seed: int = 0,
                        level: float = 0.95) -> tuple[dict[str, list[float]], int]:
    """Percentile bootstrap intervals of the classification metrics over rows resampled with
    replacement (``n_boot`` draws from ``seed``; a draw is the multinomial count of each row), and how
    many draws counted: a draw that misses a class has no AUROC and is skipped."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    n_classes = proba.shape[1]
    draws: dict[str, list[np.ndarray]] = {name: [] for name in METRICS}
    for first in range(0, n_boot, 250):  # chunks keep memory at 250 x N weights
        weights = rng.multinomial(len(y), np.full(len(y), 1 / len(y)), size=min(250, n_boot - first))
        weights = weights[(weights @ np.eye(n_classes)[y] > 0).all(axis=1)]
        for name, values in weighted_metrics(y, proba, weights).items():
            draws[name].append(values)
    values = {name: np.concatenate(parts) if parts else np.empty(0) for name, parts in draws.items()}
    used = len(values["auroc"])
    tail = 100 * (1 - level) / 2
    intervals = {name: [float(q) for q in np.percentile(v, [tail, 100 - tail])] if used else [None, None]
                 for name, v in values.items()}
    return intervals, used


def evaluate_probe(x: np.ndarray, y: np.ndarray, groups: Sequence[str], classes: Sequence[str],
                   folds: int = 5, seed: int = 0, n_boot: int = 1000,
                   grid: Sequence[float] = C_GRID) -> dict[str, Any]:
    """The cross-validated probe of features ``x`` (N, F) for class indices ``y``: the metrics with
    their intervals, folds, per-class counts, chosen C per fold and notes (JSON-ready)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    classes = [str(c) for c in classes]
    if len(x) != len(y) or len(y) != len(groups):
        raise ValueError("features, labels and groups must have one row each")
    splits, notes = grouped_folds(y, groups, folds, seed, classes)
    proba, chosen = out_of_fold_probabilities(x, y, groups, splits, len(classes), seed, grid)
    point = classification_metrics(y, proba)
    intervals, used = bootstrap_intervals(y, proba, n_boot, seed)
    if used < 0.9 * n_boot:
        notes.append(f"only {used} of {n_boot} bootstrap draws held every class; the intervals are rough")
    report: dict[str, Any] = {name: {"value": round(point[name], 4), "ci95": [_round(v) for v in intervals[name]]}
                              for name in METRICS}
    if len(classes) > 2:
        from sklearn.metrics import roc_auc_score

        report["auroc_per_class"] = {c: round(float(roc_auc_score(y == i, proba[:, i])), 4)
                                     for i, c in enumerate(classes)}
    counts = np.bincount(y, minlength=len(classes))
    report.update({
        "n": int(len(y)), "classes": classes, "counts": dict(zip(classes, map(int, counts))),
        "groups": int(len(set(groups))), "folds": len(splits),
        "fold_sizes": [int(len(test)) for _, test in splits], "C": chosen,
        "chance": {"auroc": 0.5, "balanced_accuracy": round(1 / len(classes), 4)},
        "bootstrap": {"draws": n_boot, "used": used, "seed": seed, "unit": "image"},
        "notes": notes})
    return report


# --- the command -----------------------------------------------------------------------------------

def run_probe(labels: str | Path, target: str, checkpoint: str | None = None, data: str | Path | None = None,
              group: str | None = None, resolution: int | None = None, max_slices: int = 8, folds: int = 5,
              seed: int = 0, n_boot: int = 1000, cache: str | Path | bool | None = True, device: str | None = None,
              progress: bool = True) -> dict[str, Any]:
    """``mammodino probe``: read the labels, compute (or reuse) the features, cross-validate."""
    from training.evaluate.encoder import load_encoder
    from training.evaluate.features import extract_features
    from training.labels import read_labels

    start = time.perf_counter()
    if n_boot < 0:
        raise MammoInputError(f"--boot {n_boot}: the number of bootstrap draws is >= 0")
    labelled = read_labels(labels, target, group=group, data=data)
    encoder = load_encoder(checkpoint, resolve_device(device))
    features = extract_features(encoder, labelled.paths, resolution, max_slices, cache, progress)
    report = {"target": target, "labels": str(labelled.csv), "group": group}
    report.update(evaluate_probe(features.features, labelled.y, labelled.groups, labelled.classes, folds, seed,
                                 n_boot))
    report.update({"dropped_rows": labelled.dropped, "encoder": encoder.describe(),
                   "features": features.summary(), "seed": seed, "seconds": round(time.perf_counter() - start, 2)})
    if group is None:
        report["notes"].append("no --group: each image is its own group (views of one patient may be split)")
    return report


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def resolve_device(device: str | None) -> str:
    """``None``: the GPU when there is one, else the CPU; ``cuda`` without a GPU is one clear line."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MammoInputError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    return device
