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
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from training.checkpoint import provenance
from training.evaluate.encoder import (Encoder, Prepared, TaskHead, image_features, load_encoder,
    save_encoder)
from training.errors import MammoInputError
from training.labels import LabelledSet, read_labels, read_rows
from training.evaluate.heads.loop import (Cancelled, FinetuneConfig, class_weights, encode, linear_epoch,
    run_epochs, standardise, torch_device, weighted_loss)
from training.evaluate.metrics import classification_metrics, grouped_split
from training.progress import sigterm_flag
from training.runs import RunFolder


LOCALISATION_TARGETS = ("lesion_mask", "lesions")  # masks / boxes: the lesion heatmap, not a classifier


def finetune(checkpoint: str | Path | None, labels: str | Path, target: str, out: str | Path,
             config: FinetuneConfig = FinetuneConfig(), data: str | Path | None = None,
             group: str | None = None, command: Sequence[str] | None = None, progress: bool = True,
             should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train the head for ``target`` (a classifier; or the lesion heatmap for ``lesion_mask`` /
    ``lesions``) on ``checkpoint``'s encoder and save it in ``out``. SIGTERM (or ``should_stop()``)
    ends the run after the current batch, saving the best epoch so far. Returns the report."""
    with sigterm_flag() as terminated:
        stop = lambda: terminated() or bool(should_stop and should_stop())  # noqa: E731
        return _finetune(checkpoint, labels, target, out, config, data, group, command, progress, stop)


def _finetune(checkpoint, labels, target, out, config, data, group, command, progress, stop) -> dict[str, Any]:
    from tqdm import tqdm

    started = time.perf_counter()
    folder = RunFolder.fresh(out)
    rows = read_rows(labels)
    if group is None and "patient_id" in rows[0]:
        group = "patient_id"  # never let a patient's views fall on both sides by default
    localise = target in LOCALISATION_TARGETS
    labelled = read_labels(labels, target, group, data, min_classes=1 if localise else 2)
    device = torch_device(config.device)
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
    report = {"status": "cancelled" if trained["cancelled"] else "done", "out": str(folder.path),
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
    return save_encoder(folder.last_checkpoint, encoder, meta)


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
        train_epoch = linear_epoch(head, x, yt, w, train, optimizer, config.batch_size, generator, stop)

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
    return run_epochs(result, head, train_epoch, evaluate, state, config, folder, stop, progress, tqdm)


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
