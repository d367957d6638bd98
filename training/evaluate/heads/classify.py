"""Fine-tuning a task head on an encoder: ``mammodino finetune``.

A categorical column of a labels CSV (density A-D, BI-RADS, lesion 0/1, lesion type...) becomes a
:class:`training.evaluate.encoder.TaskHead` named after the column, saved with the encoder so that
:meth:`Encoder.run` gives ``Output.predictions[column]`` over the named classes. ``--target
lesion_mask`` (masks) or ``--target lesions`` (boxes) trains the lesion heatmap instead
(:mod:`training.evaluate.heads.localise`).

* ``linear``: the backbone is frozen. Features (class token + mean patch token, the probes' features)
  are computed once per image, then the head is trained with AdamW on them. AdamW rather than
  scikit-learn's logistic regression because it gives the per-epoch curve the jobs widget plots and a
  validation loss to stop on, and because the same loop trains the patch head and the full fine-tune
  (the probe, :mod:`training.evaluate.probe`, is where cross-validated logistic regression lives).
* ``full``: the backbone is trained too, with layer-wise learning-rate decay (BEiT / MAE fine-tuning:
  block ``i`` of ``L`` at ``backbone_lr_mult * decay ** (L + 1 - (i + 1))`` of the head's lr) and
  horizontal flips (a left breast mirrored is a plausible right one).

Both weight the cross-entropy by inverse class frequency (scikit-learn's "balanced":
``n / (k * n_c)``), split train/validation by patient (no patient on both sides), stop when the
validation loss has not improved for ``patience`` epochs and keep the best epoch. The head's
standardisation buffers are the training features' mean and standard deviation.

A run folder holds ``metrics.jsonl`` (one line per epoch: step, epoch, loss, val_loss,
val_balanced_accuracy, val_auroc, lr, images_per_s) and ``checkpoints/last.safetensors`` written
atomically by :func:`training.evaluate.encoder.save_encoder`. SIGTERM ends the run after the current batch and
saves the best epoch so far.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from training.checkpoint import provenance
from training.evaluate.encoder import (Encoder, Output, Prepared, TaskHead, image_features, load_encoder,
    save_encoder)
from training.errors import MammoInputError
from training.labels import LabelledSet, read_labels, read_rows

LOCALISATION_TARGETS = ("lesion_mask", "lesions")  # masks / boxes: the lesion heatmap, not a classifier
DEFAULT_LR = {"linear": 1e-2, "full": 1e-3}


@dataclass(frozen=True)
class FinetuneConfig:
    """How a head is trained. ``lr`` None: 1e-2 (linear) or 1e-3 (full, the head's; the backbone's is
    ``backbone_lr_mult`` times that with ``layerwise_decay`` per block below the top).
    ``batch_size`` counts images (the patch head takes the patches of that many images a step)."""

    mode: Literal["linear", "full"] = "linear"
    epochs: int = 100
    batch_size: int = 32
    lr: float | None = None
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    patience: int = 10
    resolution: int | None = None
    device: str = "auto"
    seed: int = 0
    backbone_lr_mult: float = 0.1
    layerwise_decay: float = 0.75  # MAE's fine-tuning value for ViT-B
    lesion_threshold: float = 0.25

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in ("linear", "full"):
            problems.append(f"--mode {self.mode!r}: linear or full")
        if self.epochs < 1:
            problems.append(f"--epochs {self.epochs}: at least 1")
        if self.batch_size < 1:
            problems.append(f"--batch-size {self.batch_size}: at least 1")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"--lr {self.lr}: a positive number")
        if not 0 < self.val_fraction < 1:
            problems.append(f"--val-fraction {self.val_fraction}: between 0 and 1 (exclusive)")
        if self.patience < 1:
            problems.append(f"--patience {self.patience}: at least 1")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"--device {self.device}: auto, cpu or cuda")
        if not 0 < self.lesion_threshold <= 1:
            problems.append(f"--lesion-threshold {self.lesion_threshold}: in (0, 1]")
        if problems:
            raise MammoInputError("; ".join(problems))

    @property
    def head_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]


class Cancelled(Exception):
    """The run was asked to stop (SIGTERM or a GUI) before a head had been trained."""


# --- pieces a test can check -----------------------------------------------------------------------

def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse-frequency weights ``n / (k * n_c)`` (scikit-learn's "balanced"): every class weighs as
    much in the loss as the others together would if they were as frequent. Every class must occur."""
    counts = np.bincount(np.asarray(y), minlength=n_classes).astype(np.float64)
    if (counts == 0).any():
        raise MammoInputError(f"the training split has no example of class {int(np.flatnonzero(counts == 0)[0])}")
    return len(y) / (n_classes * counts)


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


def standardise(head: TaskHead, features: Tensor) -> None:
    """Set the head's ``mean``/``scale`` from training features (a constant feature keeps scale 1)."""
    mean = features.mean(0)
    std = features.std(0)
    head.mean.copy_(mean)
    head.scale.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))


def weighted_loss(logits: Tensor, y: Tensor, weights: Tensor) -> Tensor:
    """Class-weighted cross-entropy, the weighted mean over the batch."""
    return F.cross_entropy(logits, y, weight=weights, reduction="sum") / weights[y].sum()


# --- the run ---------------------------------------------------------------------------------------

class RunFolder:
    """``RUN/metrics.jsonl`` and ``RUN/checkpoints/last.safetensors`` of one fine-tuning run."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.metrics = self.out / "metrics.jsonl"
        self.checkpoint = self.out / "checkpoints" / "last.safetensors"
        if self.metrics.exists() or self.checkpoint.exists():
            raise MammoInputError(f"--out {self.out} already holds a run; choose a new folder")
        if self.out.exists() and not self.out.is_dir():
            raise MammoInputError(f"--out {self.out} is a file, not a folder")

    def log(self, metrics: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")


class EarlyStopping:
    """Keeps the state of the epoch with the lowest validation loss; ``stop`` once ``patience``
    epochs have passed without a lower one."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best_loss = math.inf
        self.best_epoch = -1
        self.best_metrics: dict[str, Any] = {}
        self.state: dict[str, Any] | None = None
        self.waited = 0

    def update(self, epoch: int, val_loss: float, metrics: dict[str, Any], state: Callable[[], dict]) -> None:
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch, self.best_metrics = val_loss, epoch, dict(metrics)
            self.state = state()
            self.waited = 0
        else:
            self.waited += 1

    @property
    def stop(self) -> bool:
        return self.waited >= self.patience


def epochs(train_epoch: Callable[[], tuple[float, int, int]], evaluate: Callable[[], dict[str, Any]],
           state: Callable[[], dict], config: FinetuneConfig, folder: RunFolder, lr: float,
           should_stop: Callable[[], bool], bar: Any = None) -> Iterator[tuple[dict[str, Any], EarlyStopping]]:
    """The epoch loop every mode shares: ``train_epoch()`` -> (mean loss, optimiser steps, images),
    ``evaluate()`` -> validation metrics with ``val_loss``; one metrics line per epoch, early stopping.
    Yields each epoch's metrics with the stopper (which holds the best state)."""
    stopper = EarlyStopping(config.patience)
    step = 0
    for epoch in range(config.epochs):
        tick = time.perf_counter()
        loss, steps, images = train_epoch()
        seconds = time.perf_counter() - tick
        step += steps
        val = evaluate()
        metrics = {"step": step, "epoch": epoch, "loss": loss, **val, "lr": lr,
                   "images_per_s": images / max(seconds, 1e-9)}
        folder.log(metrics)
        stopper.update(epoch, val["val_loss"], metrics, state)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", val=f"{val['val_loss']:.3f}")
        yield metrics, stopper
        if stopper.stop or should_stop():
            return


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise MammoInputError("--device cuda: no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def encode(encoder: Encoder, paths: Sequence[Path], resolution: int | None, should_stop: Callable[[], bool],
           bar: Any = None, chunk: int = 16) -> Iterator[tuple[Prepared, Output]]:
    """Each image prepared (``resolution`` or the encoder's; DBT: the middle slice) and run through
    the frozen encoder, in order; same-shaped images of a chunk share a batch."""
    from training.dicom.io import open_image

    for start in range(0, len(paths), chunk):
        if should_stop():
            raise Cancelled
        prepared = [encoder.prepare_image(open_image(p), resolution=resolution) for p in paths[start:start + chunk]]
        order = sorted(range(len(prepared)), key=lambda i: prepared[i].pixels.shape)
        outputs = encoder.run([prepared[i] for i in order], attention="none")
        by_index = dict(zip(order, outputs))
        for i, item in enumerate(prepared):
            yield item, by_index[i]
        if bar is not None:
            bar.update(len(prepared))


def finetune(checkpoint: str | Path | None, labels: str | Path, target: str, out: str | Path,
             config: FinetuneConfig = FinetuneConfig(), data: str | Path | None = None,
             group: str | None = None, command: Sequence[str] | None = None, progress: bool = True,
             should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train the head for ``target`` (a classifier; or the lesion heatmap for ``lesion_mask`` /
    ``lesions``) on ``checkpoint``'s encoder and save it in ``out``. SIGTERM (or ``should_stop()``)
    ends the run after the current batch, saving the best epoch so far. Returns the report."""
    terminated: list[bool] = []
    stop = lambda: bool(terminated) or bool(should_stop and should_stop())  # noqa: E731
    installed = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: terminated.append(True)) if installed else None
    try:
        return _finetune(checkpoint, labels, target, out, config, data, group, command, progress, stop)
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _finetune(checkpoint, labels, target, out, config, data, group, command, progress, stop) -> dict[str, Any]:
    from tqdm import tqdm

    started = time.perf_counter()
    folder = RunFolder(out)
    rows = read_rows(labels)
    if group is None and "patient_id" in rows[0]:
        group = "patient_id"  # never let a patient's views fall on both sides by default
    localise = target in LOCALISATION_TARGETS
    labelled = read_labels(labels, target, group, data, min_classes=1 if localise else 2)
    device = _device(config.device)
    torch.manual_seed(config.seed)
    encoder = load_encoder(checkpoint, device)
    if config.resolution is not None:
        if config.resolution < encoder.patch_size:
            raise MammoInputError(f"--resolution {config.resolution} is smaller than one patch "
                                  f"({encoder.patch_size} px)")
        encoder.resolution = config.resolution  # the head is trained, and so must run, at this size
    if localise:
        if config.mode != "linear":
            raise MammoInputError("--mode full: the lesion heatmap head is trained on a frozen backbone "
                                  "(use --mode linear)")
        from training.evaluate.heads.localise import train_localisation

        base = Path(data) if data is not None else Path(labels).parent
        trained = train_localisation(encoder, labelled, config, folder, stop, progress, base)
    else:
        trained = _train_classifier(encoder, labelled, config, folder, stop, progress, tqdm)
    report = {"status": "cancelled" if trained["cancelled"] else "done", "out": str(folder.out),
              "checkpoint": None, "task": trained["name"], "kind": "localisation" if localise else "classification",
              "target": target, "classes": trained["classes"], "mode": config.mode, "group": group,
              **{k: v for k, v in trained.items() if k not in ("head", "backbone", "cancelled", "name", "classes")}}
    if trained["head"] is not None:
        report["checkpoint"] = str(_save(encoder, trained, labelled, config, folder, report, command))
    report["wall_s"] = round(time.perf_counter() - started, 2)
    report["encoder"] = encoder.describe()
    return report


def _save(encoder: Encoder, trained: dict[str, Any], labelled: LabelledSet, config: FinetuneConfig,
          folder: RunFolder, report: dict[str, Any], command: Sequence[str] | None) -> Path:
    """The encoder with the new head (replacing one of the same name) as ``RUN/checkpoints/last``."""
    name = trained["name"]
    if trained["backbone"] is not None:
        encoder.backbone.load_state_dict(trained["backbone"])
    encoder.heads[name] = trained["head"].to(encoder.device)
    encoder.backbone.eval()
    encoder.heads.eval()
    task = {key: report[key] for key in ("kind", "target", "classes", "mode", "status", "best_epoch",
                                        "epochs_run", "validation", "n_train", "n_val", "class_weights")
            if key in report}
    task["config"] = asdict(config)
    old = encoder.meta
    tasks = {**(old.get("tasks") or {}), name: task}
    tasks = {k: v for k, v in tasks.items() if k in encoder.heads}  # heads dropped by a full fine-tune
    meta = {**provenance(list(command) if command is not None else None,
                         {"labels": str(labelled.csv), "rows": len(labelled), "target": labelled.target}),
            "task": name, "tasks": tasks,
            "base": {"source": encoder.source, "git_commit": old.get("git_commit"), "command": old.get("command")}}
    return save_encoder(folder.checkpoint, encoder, meta)


def _train_classifier(encoder: Encoder, labelled: LabelledSet, config: FinetuneConfig, folder: RunFolder,
                      stop: Callable[[], bool], progress: bool, tqdm: Any) -> dict[str, Any]:
    y = labelled.y
    n_classes = len(labelled.classes)
    if n_classes > max(2, len(labelled) // 2):
        raise MammoInputError(f"--target {labelled.target!r} has {n_classes} different values in {len(labelled)} rows: "
                              f"a classifier needs a categorical column (density, birads, lesion, lesion_type...)")
    train, val = grouped_split(y, labelled.groups, config.val_fraction, config.seed)
    missing = sorted(set(range(n_classes)) - set(y[train].tolist()))
    if missing:
        raise MammoInputError(f"--target {labelled.target!r}: class {labelled.classes[missing[0]]!r} has too few "
                              f"patients to appear in the training split")
    weights = class_weights(y[train], n_classes)
    result: dict[str, Any] = {"name": labelled.target, "classes": labelled.classes, "head": None, "backbone": None,
                              "cancelled": False, "n_train": int(len(train)), "n_val": int(len(val)),
                              "patients_train": len(set(np.asarray(labelled.groups)[train])),
                              "patients_val": len(set(np.asarray(labelled.groups)[val])),
                              "class_weights": dict(zip(labelled.classes, map(float, weights)))}
    device = encoder.device
    w = torch.as_tensor(weights, dtype=torch.float32, device=device)
    yt = torch.as_tensor(y, device=device)
    head = TaskHead(2 * encoder.embed_dim, labelled.classes, on="image").to(device)
    keep_pixels = config.mode == "full"
    prepared: list[Prepared] = []
    features = []
    tick = time.perf_counter()
    try:
        with tqdm(total=len(labelled), desc="features", unit="img", file=sys.stderr, disable=not progress,
                  dynamic_ncols=True) as bar:
            for item, output in encode(encoder, labelled.paths, None, stop, bar):
                features.append(output.features)
                if keep_pixels:
                    prepared.append(item)
    except Cancelled:
        return {**result, "cancelled": True}
    result["features_s"] = round(time.perf_counter() - tick, 2)
    x = torch.as_tensor(np.stack(features), dtype=torch.float32, device=device)
    standardise(head, x[train])
    generator = torch.Generator().manual_seed(config.seed)

    def evaluate_logits(logits: Tensor) -> dict[str, Any]:
        proba = logits.softmax(-1).cpu().numpy()
        scores = classification_metrics(y[val], proba)
        return {"val_loss": float(weighted_loss(logits, yt[val], w)),
                "val_balanced_accuracy": scores["balanced_accuracy"], "val_auroc": scores["auroc"]}

    if config.mode == "linear":
        optimizer = torch.optim.AdamW(head.parameters(), lr=config.head_lr, weight_decay=config.weight_decay)
        train_epoch = _linear_epoch(head, x, yt, w, train, optimizer, config.batch_size, generator, stop)

        @torch.no_grad()
        def evaluate() -> dict[str, Any]:
            return evaluate_logits(head(x[val]))

        state = lambda: {"head": copy.deepcopy(head.state_dict())}  # noqa: E731
    else:
        backbone = encoder.backbone
        groups = _backbone_groups(backbone, config)
        optimizer = torch.optim.AdamW([{"params": list(head.parameters()), "lr": config.head_lr}, *groups],
                                      lr=config.head_lr, weight_decay=config.weight_decay)
        train_epoch = _full_epoch(backbone, head, prepared, yt, w, train, optimizer, config.batch_size, generator, stop)

        @torch.no_grad()
        def evaluate() -> dict[str, Any]:
            backbone.eval()
            return evaluate_logits(_logits(backbone, head, [prepared[i] for i in val], flips=None))

        state = lambda: {"head": copy.deepcopy(head.state_dict()),  # noqa: E731
                         "backbone": {k: v.detach().clone() for k, v in backbone.state_dict().items()}}
        result["dropped_heads"] = sorted(n for n in encoder.heads if n != labelled.target)
        for name in result["dropped_heads"]:  # trained on the old backbone's features: no longer valid
            del encoder.heads[name]
    return _run_epochs(result, head, train_epoch, evaluate, state, config, folder, stop, progress, tqdm)


def _run_epochs(result: dict[str, Any], head: TaskHead, train_epoch, evaluate, state, config: FinetuneConfig,
                folder: RunFolder, stop: Callable[[], bool], progress: bool, tqdm: Any) -> dict[str, Any]:
    """Run the epochs, then put the best epoch's weights in the result."""
    stopper = None
    run = 0
    with tqdm(total=config.epochs, desc="epochs", unit="epoch", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        for _, stopper in epochs(train_epoch, evaluate, state, config, folder, config.head_lr, stop, bar):
            run += 1
    if stopper is None or stopper.state is None:  # stopped inside the first epoch
        return {**result, "cancelled": True, "epochs_run": 0}
    head.load_state_dict(stopper.state["head"])
    cancelled = stop()
    return {**result, "head": head.eval(), "backbone": stopper.state.get("backbone"), "cancelled": cancelled,
            "epochs_run": run, "best_epoch": stopper.best_epoch,
            "stopped_early": not cancelled and run < config.epochs,
            "validation": {k[len("val_"):]: v for k, v in stopper.best_metrics.items() if k.startswith("val_")}}


def _linear_epoch(head: TaskHead, x: Tensor, y: Tensor, w: Tensor, train: np.ndarray,
                  optimizer: torch.optim.Optimizer, batch_size: int, generator: torch.Generator,
                  stop: Callable[[], bool]) -> Callable[[], tuple[float, int, int]]:
    index = torch.as_tensor(train)

    def train_epoch() -> tuple[float, int, int]:
        head.train()
        order = index[torch.randperm(len(index), generator=generator)]
        total, steps = 0.0, 0
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size].to(x.device)
            loss = weighted_loss(head(x[batch]), y[batch], w)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            steps += 1
        head.eval()
        return total / len(order), steps, len(order)

    return train_epoch


def _backbone_groups(backbone: torch.nn.Module, config: FinetuneConfig) -> list[dict[str, Any]]:
    """AdamW groups for the backbone: layer-wise decayed lr below the head's, no decay on norms/biases."""
    from training.ssl.schedules import param_groups

    groups = param_groups(backbone.named_parameters(), backbone.config.dims[1], config.layerwise_decay, 1.0)
    for group in groups:
        group["lr"] = config.head_lr * config.backbone_lr_mult * group["lr_multiplier"]
        group["weight_decay"] = config.weight_decay * group["wd_multiplier"]
    return groups


def _logits(backbone: torch.nn.Module, head: TaskHead, items: Sequence[Prepared],
            flips: Tensor | None) -> Tensor:
    """Head logits of prepared images (same-shaped ones batched), rows in the order of ``items``;
    ``flips`` (N,) bool mirrors those images left-right."""
    device = head.mean.device
    out: list[Tensor | None] = [None] * len(items)
    shapes: dict[tuple[int, int], list[int]] = {}
    for i, item in enumerate(items):
        shapes.setdefault(item.pixels.shape, []).append(i)
    for rows in shapes.values():
        pixels = torch.from_numpy(np.stack([items[i].pixels for i in rows])[:, None]).to(device)
        if flips is not None:
            flip = flips[rows].to(device)[:, None, None, None]
            pixels = torch.where(flip, pixels.flip(-1), pixels)
        tokens = backbone.forward_tokens(pixels)
        logits = head(image_features(tokens.cls, tokens.patches))
        for k, i in enumerate(rows):
            out[i] = logits[k]
    return torch.stack(out)  # type: ignore[arg-type]


def _full_epoch(backbone: torch.nn.Module, head: TaskHead, prepared: list[Prepared], y: Tensor, w: Tensor,
                train: np.ndarray, optimizer: torch.optim.Optimizer, batch_size: int, generator: torch.Generator,
                stop: Callable[[], bool]) -> Callable[[], tuple[float, int, int]]:
    index = torch.as_tensor(train)

    def train_epoch() -> tuple[float, int, int]:
        backbone.train()
        head.train()
        order = index[torch.randperm(len(index), generator=generator)]
        total, steps, seen = 0.0, 0, 0
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            flips = torch.rand(len(batch), generator=generator) < 0.5
            logits = _logits(backbone, head, [prepared[i] for i in batch.tolist()], flips)
            loss = weighted_loss(logits, y[batch.to(y.device)], w)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(backbone.parameters()) + list(head.parameters()), 1.0)
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            steps += 1
            seen += len(batch)
            if stop():  # SIGTERM: end the epoch here, it is evaluated and the best one saved
                break
        backbone.eval()
        head.eval()
        return total / max(seen, 1), steps, seen

    return train_epoch
