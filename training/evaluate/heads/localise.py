"""Lesion localisation: a heatmap head on patch tokens, trained and scored against lesion masks or boxes.

``mammodino finetune --target lesion_mask`` (the labels CSV's mask column: a PNG per 2D image, an
NPZ per volume, as ``mammodino phantom`` writes; every non-zero value is a lesion, value k lesion k)
or ``--target lesions`` (the JSON column of lesions with a ``box`` [r0, c0, r1, c1], image pixels,
half-open) trains ``TaskHead(D, ["background", "lesion"], on="patch")`` on the frozen backbone's
patch tokens and saves it as the head ``lesion_heatmap``: :meth:`Encoder.run` then gives
``Output.heatmaps["lesion_heatmap"]``, the probability of a lesion in each patch.

Patch targets. Each patch's lesion fraction is the exact area of the lesion pixels it covers
(the patch grid of :class:`training.evaluate.encoder.Prepared` laid on the image, fractional pixels
weighted by overlap). A patch is a lesion patch when that fraction reaches ``threshold`` (default
0.25), and so is the patch each lesion covers most, so that a calcification cluster a few pixels
large still has one; lesion-free patches are background; patches touched by a lesion below the
threshold are left out of training and of the patch AUROC (they are neither).

Scores on held-out patients:

* patch-level AUROC over lesion patches and background patches inside the breast (tissue fraction
  >= 0.5: the air around the breast would make background trivially easy);
* FROC (free-response ROC; Bunch, Hamilton, Sanderson & Simmons 1978, "A free-response approach to
  the measurement and characterization of radiographic-observer performance"; scoring rules as in
  Chakraborty & Berbaum 2004): detections are the heatmap's local maxima (3 x 3 neighbourhood) with
  their value as confidence. A detection on a patch that a lesion touches localises that lesion; a
  lesion counts once, with its most confident detection, and further detections on it are neither
  hits nor false positives; a detection touching no lesion is a false positive. Sweeping the
  threshold over every confidence gives sensitivity (lesions localised / lesions) against false
  positives per image; the sensitivity at ``r`` FP/image is the highest reached with at most ``r``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from training.evaluate.encoder import Encoder, Prepared, TaskHead
from training.errors import MammoInputError
from training.evaluate.heads.loop import (Cancelled, FinetuneConfig, linear_epoch, run_epochs,
    class_weights, encode, standardise, weighted_loss)
from training.runs import RunFolder
from training.evaluate.metrics import grouped_split
from training.labels import LabelledSet

HEAD_NAME = "lesion_heatmap"
CLASSES = ("background", "lesion")
FROC_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # false positives per image (LUNA16's CPM points)
MIN_TISSUE = 0.5


# --- patch targets ---------------------------------------------------------------------------------

def _overlap(start: float, length: float, n: int, size: int) -> np.ndarray:
    """(n, size): the fraction of patch i (``n`` patches evenly over [start, start + length)) that
    pixel j (covering [j, j + 1)) fills."""
    edges = start + np.arange(n + 1) * (length / n)
    pixels = np.arange(size)
    covered = np.minimum(edges[1:, None], pixels[None] + 1) - np.maximum(edges[:-1, None], pixels[None])
    return np.clip(covered, 0, None) / (length / n)


def patch_fraction(mask: np.ndarray, prepared: Prepared) -> np.ndarray:
    """(h, w) fraction of each patch of ``prepared`` that ``mask`` (image grid, bool or weights)
    covers: exact area weighting, so a lesion's fractions sum to its area in patches."""
    mask = np.asarray(mask, dtype=np.float64)
    if mask.shape != tuple(prepared.image_shape):
        raise MammoInputError(f"a lesion mask of shape {mask.shape} does not match its image {prepared.image_shape}")
    r0, c0, r1, c1 = prepared.box
    h, w = prepared.grid
    rows = _overlap(r0, r1 - r0, h, mask.shape[0])
    cols = _overlap(c0, c1 - c0, w, mask.shape[1])
    return (rows @ mask @ cols.T).astype(np.float32)


def patch_targets(regions: Sequence[np.ndarray], prepared: Prepared,
                  threshold: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Targets (h, w) int8 (1 lesion, 0 background, -1 left out) and per-lesion touch maps (k, h, w)
    bool of lesion ``regions`` (boolean image masks, one per lesion)."""
    h, w = prepared.grid
    if not regions:
        return np.zeros((h, w), np.int8), np.zeros((0, h, w), bool)
    fractions = np.stack([patch_fraction(r, prepared) for r in regions])
    union = patch_fraction(np.any(np.stack(regions), axis=0), prepared)
    targets = np.where(union > 0, -1, 0).astype(np.int8)
    targets[union >= threshold] = 1
    for fraction in fractions:  # every lesion keeps at least the patch it covers most
        if fraction.max() > 0:
            targets[np.unravel_index(np.argmax(fraction), fraction.shape)] = 1
    return targets, fractions > 0


def lesion_regions(row: dict[str, str], column: str, base: Path, prepared: Prepared) -> list[np.ndarray]:
    """One boolean image mask per lesion of a labels row: from its mask file (``lesion_mask``: value k
    is lesion k) or its boxes (``lesions``), on the frame ``prepared`` shows (DBT: that slice)."""
    shape = tuple(prepared.image_shape)
    if column == "lesion_mask":
        from training.phantom.dataset import load_mask

        path = base / row[column].strip()
        if not path.is_file():
            raise MammoInputError(f"lesion mask {path}: no such file (paths are relative to the CSV or --data)")
        try:
            mask = load_mask(path)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the same user problem
            raise MammoInputError(f"lesion mask {path.name}: unreadable ({exc})") from None
        if mask.ndim == 3 and mask.shape[-1] in (3, 4) and mask.shape[:2] == shape:
            mask = mask[..., :3].max(axis=-1)  # an RGB picture of a mask (e.g. CDD-CESM's JPEGs)
        elif mask.ndim == 3 and prepared.frame is not None:
            mask = mask[prepared.frame]
        if path.suffix.lower() in (".jpg", ".jpeg"):
            # Lossy files blur a 0/255 mask into many values: threshold, then one lesion per blob.
            from scipy import ndimage

            mask, _ = ndimage.label(mask > 127)
        if mask.shape != shape:
            raise MammoInputError(f"lesion mask {path.name}: shape {mask.shape} does not match its image {shape}")
        return [mask == value for value in np.unique(mask) if value != 0]
    try:
        lesions = json.loads(row[column])
    except json.JSONDecodeError:
        raise MammoInputError(f"--target lesions: {row[column][:40]!r} is not a JSON list of lesions") from None
    regions = []
    for lesion in lesions if isinstance(lesions, list) else []:
        box = lesion.get("box") if isinstance(lesion, dict) else None
        if not (isinstance(box, list) and len(box) == 4):
            raise MammoInputError("--target lesions: every lesion needs a 'box' [row0, col0, row1, col1]")
        span = lesion.get("slice_range")
        if prepared.frame is not None and span and not span[0] <= prepared.frame <= span[1]:
            continue  # not in the slice the head sees
        region = np.zeros(shape, bool)
        r0, c0, r1, c1 = (int(v) for v in box)
        region[max(r0, 0):r1, max(c0, 0):c1] = True
        regions.append(region)
    return regions


# --- scores ----------------------------------------------------------------------------------------

def scored_patches(targets: np.ndarray, tissue: np.ndarray, min_tissue: float = MIN_TISSUE) -> np.ndarray:
    """The patches the AUROC scores: lesion patches, and background patches inside the breast."""
    return (targets == 1) | ((targets == 0) & (np.asarray(tissue) >= min_tissue))


def patch_auroc(heatmaps: Sequence[np.ndarray], targets: Sequence[np.ndarray], tissue: Sequence[np.ndarray],
                min_tissue: float = MIN_TISSUE) -> float | None:
    """Patch-level AUROC of lesion patches against breast background patches (None with one kind)."""
    from sklearn.metrics import roc_auc_score

    keep = [scored_patches(t, s, min_tissue) for t, s in zip(targets, tissue)]
    scores = np.concatenate([np.asarray(h)[k] for h, k in zip(heatmaps, keep)])
    labels = np.concatenate([np.asarray(t)[k] for t, k in zip(targets, keep)])
    if labels.size == 0 or labels.min() == labels.max():
        return None
    return float(roc_auc_score(labels, scores))


def local_maxima(heatmap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the patches no 3 x 3 neighbour exceeds (every patch of a flat top is one)."""
    from scipy import ndimage

    heatmap = np.asarray(heatmap, dtype=np.float64)
    peaks = heatmap >= ndimage.maximum_filter(heatmap, size=3, mode="constant", cval=-np.inf)
    return np.nonzero(peaks)


def froc(heatmaps: Sequence[np.ndarray], touches: Sequence[np.ndarray],
         rates: Sequence[float] = FROC_RATES) -> dict[str, Any]:
    """FROC of ``heatmaps`` (h, w) against ``touches`` (k, h, w): which patches each lesion touches.
    Returns sensitivity at each rate of false positives per image (``sensitivity_at_fp``, keys as
    ``"1"``, ``"0.25"``), ``sensitivity_at_1_fp``/``_2_fp``, ``n_lesions``, ``n_images``."""
    lesion_best: list[float] = []
    false: list[np.ndarray] = []
    for heat, touch in zip(heatmaps, touches):
        heat = np.asarray(heat, dtype=np.float64)
        rows, cols = local_maxima(heat)
        scores = heat[rows, cols]
        on = np.asarray(touch, bool)[:, rows, cols]  # (k, detections)
        lesion_best.extend(float(scores[hit].max()) if hit.any() else -math.inf for hit in on)
        false.append(scores[~on.any(0)] if on.size else scores)
    n_images, n_lesions = len(heatmaps), len(lesion_best)
    if n_lesions == 0 or n_images == 0:
        return {"sensitivity_at_fp": {_key(r): None for r in rates}, "sensitivity_at_1_fp": None,
                "sensitivity_at_2_fp": None, "n_lesions": n_lesions, "n_images": n_images}
    hits = np.sort(np.asarray(lesion_best))
    fps = np.sort(np.concatenate(false)) if false else np.zeros(0)
    thresholds = np.unique(np.concatenate([hits[np.isfinite(hits)], fps]))[::-1]
    # at threshold t: lesions whose best detection >= t, false positives >= t
    sensitivity = np.concatenate([[0.0], (n_lesions - np.searchsorted(hits, thresholds, "left")) / n_lesions])
    per_image = np.concatenate([[0.0], (len(fps) - np.searchsorted(fps, thresholds, "left")) / n_images])
    at = {_key(r): float(sensitivity[per_image <= r].max()) for r in rates}
    return {"sensitivity_at_fp": at, "sensitivity_at_1_fp": at.get("1", _at(sensitivity, per_image, 1.0)),
            "sensitivity_at_2_fp": at.get("2", _at(sensitivity, per_image, 2.0)),
            "n_lesions": n_lesions, "n_images": n_images}


def _key(rate: float) -> str:
    return f"{rate:g}"


def _at(sensitivity: np.ndarray, per_image: np.ndarray, rate: float) -> float:
    return float(sensitivity[per_image <= rate].max())


# --- training --------------------------------------------------------------------------------------

def train_localisation(encoder: Encoder, labelled: LabelledSet, config: FinetuneConfig, folder: RunFolder,
                       stop: Callable[[], bool], progress: bool, base: Path) -> dict[str, Any]:
    """Encode every image once (frozen backbone), derive patch targets, train the patch head with
    class-weighted cross-entropy and early stopping on held-out patients, and score it there."""
    from tqdm import tqdm

    column = labelled.target
    strata = [row.get("lesion", "") for row in labelled.rows]  # lesions on both sides when the CSV says which
    train, val = grouped_split(np.asarray(strata), labelled.groups, config.val_fraction, config.seed)
    result: dict[str, Any] = {"name": HEAD_NAME, "classes": list(CLASSES), "head": None, "backbone": None,
                              "cancelled": False, "source": "masks" if column == "lesion_mask" else "boxes",
                              "lesion_threshold": config.lesion_threshold, "n_train": int(len(train)),
                              "n_val": int(len(val)),
                              "patients_train": len(set(np.asarray(labelled.groups)[train])),
                              "patients_val": len(set(np.asarray(labelled.groups)[val]))}
    features, targets, touches, tissue = [], [], [], []
    tick = time.perf_counter()
    try:
        with tqdm(total=len(labelled), desc="features", unit="img", file=sys.stderr, disable=not progress,
                  dynamic_ncols=True) as bar:
            for row, (item, output) in zip(labelled.rows, encode(encoder, labelled.paths, None, stop, bar)):
                target, touch = patch_targets(lesion_regions(row, column, base, item), item, config.lesion_threshold)
                features.append(torch.from_numpy(output.patches.reshape(-1, output.patches.shape[-1])))
                targets.append(target)
                touches.append(touch)
                tissue.append(item.tissue)
    except Cancelled:
        return {**result, "cancelled": True}
    result["features_s"] = round(time.perf_counter() - tick, 2)
    if not any((targets[i] == 1).any() for i in train):
        raise MammoInputError(f"--target {column}: no lesion in the training split (rows with lesions are needed)")
    device = encoder.device

    def stacked(indices: np.ndarray) -> tuple[Tensor, Tensor]:
        x = torch.cat([features[i] for i in indices]).float()
        y = torch.as_tensor(np.concatenate([targets[i].reshape(-1) for i in indices]).astype(np.int64))
        keep = y >= 0
        return x[keep].to(device), y[keep].to(device)

    x_train, y_train = stacked(train)
    x_val, y_val = stacked(val)
    weights = class_weights(y_train.cpu().numpy(), 2)
    result["class_weights"] = dict(zip(CLASSES, map(float, weights)))
    result["train_patches"] = {"lesion": int((y_train == 1).sum()), "background": int((y_train == 0).sum())}
    w = torch.as_tensor(weights, dtype=torch.float32, device=device)
    head = TaskHead(encoder.embed_dim, CLASSES, on="patch").to(device)
    standardise(head, x_train)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.head_lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    patches_per_image = max(1, len(y_train) // max(len(train), 1))
    batch = config.batch_size * patches_per_image

    patch_epoch = linear_epoch(head, x_train, y_train, w, np.arange(len(y_train)), optimizer, batch, generator, stop)

    def train_epoch() -> tuple[float, int, int]:
        loss, steps, _ = patch_epoch()
        return loss, steps, len(train)  # images, not patches, for images/s

    @torch.no_grad()
    def evaluate() -> dict[str, Any]:
        from sklearn.metrics import balanced_accuracy_score

        logits = head(x_val)
        maps = _heatmaps(head, [features[i] for i in val], [targets[i].shape for i in val])
        y = y_val.cpu().numpy()
        return {"val_loss": float(weighted_loss(logits, y_val, w)),
                "val_balanced_accuracy": float(balanced_accuracy_score(y, logits.argmax(-1).cpu().numpy())),
                "val_auroc": patch_auroc(maps, [targets[i] for i in val], [tissue[i] for i in val])}

    state = lambda: {"head": {k: v.detach().clone() for k, v in head.state_dict().items()}}  # noqa: E731
    trained = run_epochs(result, head, train_epoch, evaluate, state, config, folder, stop, progress, tqdm)
    if trained["head"] is not None:
        with torch.no_grad():
            maps = _heatmaps(head, [features[i] for i in val], [targets[i].shape for i in val])
        trained["validation"]["froc"] = froc(maps, [touches[i] for i in val])
    return trained


def _heatmaps(head: TaskHead, features: Sequence[Tensor], shapes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Lesion probability maps (h, w) of images' patch features, as :meth:`Encoder.run` computes them."""
    device = head.mean.device
    return [head(f.float().to(device)).softmax(-1)[:, -1].reshape(shape).cpu().numpy()
            for f, shape in zip(features, shapes)]
