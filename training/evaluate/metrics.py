"""Classification metrics and patient-grouped splits, one definition for probes and heads."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from training.errors import MammoInputError


def grouped_split(y: np.ndarray, groups: Sequence[str], val_fraction: float = 0.2,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices with no group (patient) on both sides, stratified by class as far
    as the groups allow: the first fold of a shuffled ``StratifiedGroupKFold`` with
    ``round(1 / val_fraction)`` folds."""
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(y)
    n_groups = len(set(groups))
    n_splits = max(2, round(1 / val_fraction))
    if n_groups < 2:
        raise MammoInputError(f"all {len(y)} rows belong to one patient: a validation split needs at least two")
    n_splits = min(n_splits, n_groups)
    with warnings.catch_warnings():  # "least populated class has fewer members than n_splits": expected
        warnings.simplefilter("ignore", UserWarning)
        folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        train, val = next(folds.split(np.zeros(len(y)), y, groups))
    return np.sort(train), np.sort(val)


def classification_metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, float | None]:
    """Balanced accuracy and AUROC (binary: of the last class; multi-class: macro one-vs-rest over
    the classes present) of probabilities (N, k); None where undefined (one class present)."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    y = np.asarray(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        balanced = float(balanced_accuracy_score(y, proba.argmax(1)))
        present = np.unique(y)
        if len(present) < 2:
            auroc = None
        elif proba.shape[1] == 2:
            auroc = float(roc_auc_score(y, proba[:, 1]))
        else:
            scores = [roc_auc_score(y == c, proba[:, c]) for c in present]
            auroc = float(np.mean(scores))
    return {"balanced_accuracy": balanced, "auroc": auroc}
