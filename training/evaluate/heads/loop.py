"""The epoch loop every task head shares: configuration, class weights, early stopping, the
linear-probe epoch on cached features, and encoding images once."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from training.evaluate.encoder import Encoder, Output, Prepared, TaskHead
from training.errors import MammoInputError
from training.runs import RunFolder


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


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse-frequency weights ``n / (k * n_c)`` (scikit-learn's "balanced"): every class weighs as
    much in the loss as the others together would if they were as frequent. Every class must occur."""
    counts = np.bincount(np.asarray(y), minlength=n_classes).astype(np.float64)
    if (counts == 0).any():
        raise MammoInputError(f"the training split has no example of class {int(np.flatnonzero(counts == 0)[0])}")
    return len(y) / (n_classes * counts)


def standardise(head: TaskHead, features: Tensor) -> None:
    """Set the head's ``mean``/``scale`` from training features (a constant feature keeps scale 1)."""
    mean = features.mean(0)
    std = features.std(0)
    head.mean.copy_(mean)
    head.scale.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))


def weighted_loss(logits: Tensor, y: Tensor, weights: Tensor) -> Tensor:
    """Class-weighted cross-entropy, the weighted mean over the batch."""
    return F.cross_entropy(logits, y, weight=weights, reduction="sum") / weights[y].sum()


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
        folder.append_metrics(metrics)
        stopper.update(epoch, val["val_loss"], metrics, state)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", val=f"{val['val_loss']:.3f}")
        yield metrics, stopper
        if stopper.stop or should_stop():
            return


def torch_device(name: str) -> torch.device:
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


def run_epochs(result: dict[str, Any], head: TaskHead, train_epoch, evaluate, state, config: FinetuneConfig,
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


def linear_epoch(head: TaskHead, x: Tensor, y: Tensor, w: Tensor, train: np.ndarray,
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
