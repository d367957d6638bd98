"""Classification metrics and patient-grouped splits, one definition for probes, heads and the learning curve."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from training.errors import MammoInputError


# --- patient-grouped splits ------------------------------------------------------------------------

def stratified_group_folds(y: np.ndarray, groups: Sequence[str], n_splits: int,
                           seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs (each sorted) of a shuffled ``StratifiedGroupKFold``: no group (patient) on
    both sides of a fold, classes spread as evenly as the groups allow. The one splitter: the functions
    below (and the probe's inner folds) only choose ``n_splits``."""
    from sklearn.model_selection import StratifiedGroupKFold

    # scikit-learn refuses more folds than the most frequent class has rows (a traceback for a small
    # labels file): that many folds at most, which only changes calls that would have failed.
    largest = int(np.unique(np.asarray(y), return_counts=True)[1].max()) if len(y) else 0
    if largest < 2:
        raise MammoInputError(f"{len(y)} labelled images with no class seen twice: too few to split")
    n_splits = min(n_splits, largest)
    with warnings.catch_warnings():  # "least populated class has fewer members than n_splits": expected
        warnings.simplefilter("ignore", UserWarning)
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(y)), np.asarray(y), np.asarray(groups)))


def grouped_folds(y: np.ndarray, groups: Sequence[str], n_splits: int = 5, seed: int = 0,
                  classes: Sequence[str] | None = None) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[str]]:
    """Patient-grouped stratified (train, test) index pairs for cross-validation, and notes. ``n_splits``
    is lowered to the number of groups of the rarest class when that is smaller (each fold can then hold
    one of them); a class seen in fewer than two groups cannot be cross-validated and raises one line."""
    y = np.asarray(y)
    groups = np.asarray(groups)
    if n_splits < 2:
        raise MammoInputError(f"--folds {n_splits}: cross-validation needs at least 2 folds")
    names = list(classes) if classes is not None else [str(c) for c in np.unique(y)]
    per_class = {names[i]: len(set(groups[y == c])) for i, c in enumerate(np.unique(y))}
    rarest, count = min(per_class.items(), key=lambda item: item[1])
    if count < 2:
        raise MammoInputError(f"class {rarest!r} occurs in only {count} patient group(s); a grouped "
                              f"cross-validation needs at least 2 (add data or merge classes)")
    notes = []
    if count < n_splits:
        notes.append(f"{n_splits} folds asked, {count} used: class {rarest!r} occurs in only {count} "
                     f"patient groups")
        n_splits = count
    return stratified_group_folds(y, groups, n_splits, seed), notes


def grouped_split(y: np.ndarray, groups: Sequence[str], val_fraction: float = 0.2,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices with no group (patient) on both sides: the first of the grouped
    folds, ``round(1 / val_fraction)`` of them (at most one per group). Unlike :func:`grouped_folds`
    a class may sit in one group only (it then falls on one side)."""
    n_groups = len(set(groups))
    if n_groups < 2:
        raise MammoInputError(f"all {len(y)} rows belong to one patient: a validation split needs at least two")
    return stratified_group_folds(y, groups, min(max(2, round(1 / val_fraction)), n_groups), seed)[0]


# --- metrics ---------------------------------------------------------------------------------------

def classification_metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, float | None]:
    """Metrics of class indices ``y`` (N,) against probabilities ``proba`` (N, k), one column per class:

    * ``auroc``: binary, of the last column; multi-class, the macro mean of one-vs-rest AUROCs over the
      classes present in ``y`` (all of them, scikit-learn's ``multi_class="ovr"``, when every class
      occurs); None when ``y`` holds one class (undefined, e.g. a small validation split);
    * ``balanced_accuracy`` and ``macro_f1`` (over all k classes; a class never predicted scores 0)
      of the arg-max prediction."""
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    y = np.asarray(y)
    predicted = proba.argmax(axis=1)
    present = np.unique(y)
    if len(present) < 2:
        auroc = None
    elif proba.shape[1] == 2:
        auroc = float(roc_auc_score(y, proba[:, 1]))
    else:
        auroc = float(np.mean([roc_auc_score(y == c, proba[:, c]) for c in present]))
    with warnings.catch_warnings():  # a class never predicted, or absent: recall/F1 0, not a warning
        warnings.simplefilter("ignore")
        balanced = float(balanced_accuracy_score(y, predicted))
    macro_f1 = f1_score(y, predicted, average="macro", labels=np.arange(proba.shape[1]), zero_division=0)
    return {"auroc": auroc, "balanced_accuracy": balanced, "macro_f1": float(macro_f1)}
