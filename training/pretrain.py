"""The MammoDINO pretraining loop: student/teacher, losses, AdamW with schedules, metrics and checkpoints.

A run lives in one folder ``RUN``:

* ``RUN/metrics.jsonl``: one JSON object per logged step (``step`` counts completed optimiser steps;
  ``epoch``; every loss term; ``lr``, ``weight_decay``, ``momentum``, ``teacher_temp``,
  ``teacher_entropy``, ``teacher_marginal_entropy``, ``grad_norm``, ``images_per_s``; ``skipped`` and
  ``skipped_images``: draws of and images without tissue since this process started).
* ``RUN/checkpoints/step_XXXXXXX.safetensors`` (the last ``keep_checkpoints``) and ``last.safetensors``
  (a hard link to the newest), written atomically by :func:`training.checkpoint.save_checkpoint`, holding
  student, teacher, loss centres, optimiser state, torch RNG state, and as JSON metadata the config,
  data, command, git commit, step, Python/NumPy RNG states and the last metrics.

Exact resume: every scheduled value is a function of the step, the batch of step ``s`` is a function of
``s`` (:mod:`training.data`), and the RNG states are restored, so a run stopped at a checkpoint (SIGKILL
after it, or SIGTERM) and resumed ends with the weights of an uninterrupted run. SIGTERM finishes the
current step, saves a checkpoint and returns. Guards stop the run, without saving, when the loss is not
finite or when the teacher's marginal entropy (of its batch-mean target) stays under a floor for several
steps: every sample points at the same few prototypes, the known DINO collapse.

:func:`pretrain_steps` is a generator (one dict per step) so a GUI worker can drive it and cancel it;
:func:`pretrain` runs it to the end with a tqdm progress bar on stderr.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .checkpoint import (load_checkpoint, load_optimizer_state, optimizer_state, prefixed, provenance,
                         read_metadata, save_checkpoint, unprefixed)
from .configs import PretrainConfig
from .data import PretrainDataset, loader
from .errors import MammoInputError
from .losses import MammoDINOLoss
from .models import StudentTeacher
from .schedules import apply_schedule, clip_gradients, param_groups, values_at

LOSS_TERMS = ("total", "dino", "ibot", "koleo", "dbt")


@dataclass(frozen=True)
class Guard:
    """When to stop a run that went wrong: ``entropy_floor`` is a fraction of log K (uniform use of the K
    prototypes); the teacher's marginal entropy must stay under it for ``patience`` steps in a row."""

    entropy_floor: float = 0.05
    patience: int = 20


class TrainingStopped(Exception):
    """The loop stopped because of a guard; the message is one line that says why and what was kept."""


@dataclass
class Run:
    """Everything a running pretraining job holds."""

    config: PretrainConfig
    out: Path
    model: StudentTeacher
    loss: MammoDINOLoss
    optimizer: torch.optim.Optimizer
    dataset: PretrainDataset
    step: int
    meta: dict[str, Any]

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"


def build_run(config: PretrainConfig, data: str | Path, out: str | Path, resume: bool = False,
              command: Sequence[str] | None = None) -> Run:
    """Model, loss, optimiser and data for ``config``; with ``resume``, restored from ``out``'s last
    checkpoint (whose config must equal ``config``)."""
    out = Path(out)
    last = out / "checkpoints" / "last.safetensors"
    if resume and not last.is_file():
        raise MammoInputError(f"--resume: {out} holds no checkpoint (checkpoints/last.safetensors)")
    if not resume and last.exists():
        raise MammoInputError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")
    torch.manual_seed(config.train.seed)
    dataset = PretrainDataset(data, config.sampler, seed=config.train.seed, naive=config.train.naive_sampler)
    model = StudentTeacher(config.model)
    loss = MammoDINOLoss(config.loss, config.model.dino_head.n_prototypes, config.model.ibot_prototypes)
    groups = param_groups(model.student.named_parameters(), config.model.dims[1],
                          config.schedule.layerwise_decay, config.schedule.patch_embed_lr_mult)
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=config.schedule.adamw_betas)
    meta = provenance(list(command) if command is not None else None, dataset.describe())
    run = Run(config, out, model, loss, optimizer, dataset, 0, meta)
    if resume:
        _restore(run, last)
    return run


def _restore(run: Run, path: Path) -> None:
    tensors, meta = load_checkpoint(path)
    if meta.get("config") != run.config.to_dict():
        raise MammoInputError(f"--resume: the config differs from the run's ({path}); resume with the same "
                              f"--config and --set, or start a new --out")
    run.model.load_state_dict(unprefixed("model", tensors))
    run.loss.load_state_dict(unprefixed("loss", tensors))
    load_optimizer_state(run.optimizer, tensors, meta["optimizer"])
    run.step = int(meta["step"])
    torch.set_rng_state(tensors["rng.torch"])
    np.random.set_state(("MT19937", tensors["rng.numpy"].numpy().astype(np.uint32), *meta["rng"]["numpy"]))
    random.setstate((meta["rng"]["python"][0], tuple(meta["rng"]["python"][1]), meta["rng"]["python"][2]))
    # Lines logged after this checkpoint (by a run killed later) are replayed by the resumed run.
    metrics = run.out / "metrics.jsonl"
    if metrics.is_file():
        lines = [line for line in metrics.read_text(encoding="utf-8").splitlines()
                 if line.strip() and json.loads(line).get("step", 0) <= run.step]
        metrics.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def save(run: Run, metrics: dict[str, Any] | None) -> Path:
    """A checkpoint of the run at its current step; keeps the newest ``keep_checkpoints`` and ``last``."""
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_meta = optimizer_state(run.optimizer)
    np_state = np.random.get_state()
    py_state = random.getstate()
    tensors = {**prefixed("model", run.model.state_dict()), **prefixed("loss", run.loss.state_dict()),
               **opt_tensors, "rng.torch": torch.get_rng_state(),
               "rng.numpy": torch.from_numpy(np_state[1].astype(np.int64))}
    meta = {**run.meta, "config": run.config.to_dict(), "model": run.config.model.to_dict(),
            "step": run.step, "metrics": metrics, "optimizer": opt_meta,
            "rng": {"numpy": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
                    "python": [py_state[0], list(py_state[1]), py_state[2]]}}
    path = save_checkpoint(run.checkpoints / f"step_{run.step:07d}.safetensors", tensors, meta)
    link = run.checkpoints / ".last.tmp"
    link.unlink(missing_ok=True)
    os.link(path, link)
    os.replace(link, run.checkpoints / "last.safetensors")  # atomic: last always names a whole file
    steps = sorted(run.checkpoints.glob("step_*.safetensors"))
    for old in steps[:-run.config.train.keep_checkpoints]:
        old.unlink()
    return path


def _kept(run: Run) -> str:
    """What a stopped run leaves behind, in words."""
    last = run.checkpoints / "last.safetensors"
    if not last.exists():
        return "no checkpoint had been saved yet"
    return f"the last good checkpoint (step {read_metadata(last).get('step')}) is kept: {last}"


def pretrain_steps(run: Run, max_steps: int | None = None, guard: Guard = Guard(),
                   should_stop: Any = None) -> Iterator[dict[str, Any]]:
    """Train from ``run.step`` to ``max_steps`` (default: the schedule's ``total_steps``), yielding each
    step's metrics. ``should_stop()`` (e.g. a SIGTERM flag or a GUI cancel button) is checked after each
    step: the run then saves a checkpoint and ends. Raises :class:`TrainingStopped` from a guard."""
    c = run.config
    end = c.schedule.total_steps if max_steps is None else max_steps
    n_global = c.sampler.n_global
    parts = {"backbone": run.model.student.backbone, "dino_head": run.model.student.dino_head}
    if run.model.student.ibot_head is not None:
        parts["ibot_head"] = run.model.student.ibot_head
    metrics_file = run.out / "metrics.jsonl"
    run.out.mkdir(parents=True, exist_ok=True)
    log_k = math.log(c.model.dino_head.n_prototypes)
    low_entropy = 0
    last_metrics: dict[str, Any] | None = None
    skipped: set[int] = set()
    draws = 0
    run.model.train()
    batches = loader(run.dataset, c.train.batch_size, run.step, end, c.train.num_workers)
    tick = time.perf_counter()
    for batch in batches:
        skipped.update(batch["skipped"])
        draws += len(batch["skipped"])
        step = run.step
        values = values_at(c.schedule, step, c.train.batch_size)
        if batch["n_images"] == 0:  # every image of this batch lacked tissue
            run.step += 1
            if run.step == end:
                save(run, last_metrics)
            continue
        apply_schedule(run.optimizer, values)
        masks = batch["masks"] if batch["masks"].any() else None
        student = run.model.forward_student(batch["global"], batch["local"], masks)
        teacher = run.model.forward_teacher(batch["global"], masks)
        losses = run.loss(student, teacher, n_global, values.teacher_temp, masks,
                          batch["dbt_pairs"], batch["dbt_volumes"])
        scalars = {name: float(value.detach()) for name, value in losses.items()}
        if not math.isfinite(scalars["total"]):  # checked before the update: the weights stay good
            raise TrainingStopped(f"the loss became {scalars['total']} at step {step + 1}; {_kept(run)}")
        run.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        norms = clip_gradients(parts, c.schedule.clip_grad)
        run.optimizer.step()
        run.model.update_teacher(values.momentum)
        run.step += 1
        collapsed = scalars["teacher_marginal_entropy"] < guard.entropy_floor * log_k
        low_entropy = low_entropy + 1 if collapsed else 0
        if low_entropy >= guard.patience:
            raise TrainingStopped(
                f"collapse: the teacher's marginal entropy stayed under {guard.entropy_floor:g} x log K for "
                f"{guard.patience} steps (step {run.step}); {_kept(run)}; try a lower lr or "
                f"loss.centering=sinkhorn_knopp")
        now = time.perf_counter()
        metrics = {"step": run.step, "epoch": (step * c.train.batch_size) // len(run.dataset),
                   **{name: scalars[name] for name in LOSS_TERMS},
                   "lr": values.lr, "weight_decay": values.weight_decay, "momentum": values.momentum,
                   "teacher_temp": values.teacher_temp, "teacher_entropy": scalars["teacher_entropy"],
                   "teacher_marginal_entropy": scalars["teacher_marginal_entropy"],
                   "grad_norm": norms.get("backbone", 0.0), "images_per_s": batch["n_images"] / (now - tick),
                   "skipped": draws, "skipped_images": len(skipped)}
        tick = now
        last_metrics = metrics
        if run.step % c.train.log_every == 0 or run.step == 1 or run.step == end:
            with open(metrics_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
        stopping = bool(should_stop and should_stop())
        if run.step % c.train.checkpoint_every == 0 or run.step == end or stopping:
            metrics["checkpoint"] = str(save(run, metrics))
        yield metrics
        if stopping:
            return
    if last_metrics is None and not run.checkpoints.joinpath("last.safetensors").exists():
        save(run, None)


def pretrain(config: PretrainConfig, data: str | Path, out: str | Path, max_steps: int | None = None,
             resume: bool = False, command: Sequence[str] | None = None, progress: bool = True,
             guard: Guard = Guard()) -> dict[str, Any]:
    """Run (or resume) a pretraining job to ``max_steps``; SIGTERM saves a checkpoint and ends it cleanly.
    Returns a summary: steps done, last metrics, checkpoint, whether it was stopped by SIGTERM."""
    from tqdm import tqdm

    terminated: list[bool] = []
    installed = _in_main_thread()  # a SIGTERM while the data opens still ends at a checkpoint
    previous = signal.signal(signal.SIGTERM, lambda *_: terminated.append(True)) if installed else None
    last: dict[str, Any] = {}
    try:
        run = build_run(config, data, out, resume, command)
        end = config.schedule.total_steps if max_steps is None else max_steps
        if end < run.step:
            raise MammoInputError(f"--max-steps {end} is behind the run's step {run.step}")
        start = run.step
        with tqdm(total=end, initial=start, file=sys.stderr, disable=not progress, unit="step",
                  dynamic_ncols=True) as bar:
            for last in pretrain_steps(run, end, guard, should_stop=lambda: bool(terminated)):
                bar.update(1)
                bar.set_postfix(loss=f"{last['total']:.3f}", H=f"{last['teacher_entropy']:.2f}")
    finally:
        if installed:  # None: the old handler was not set from Python
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    if last.get("skipped"):
        print(f"mammodino pretrain: warning: {last['skipped_images']} images have no breast tissue; skipped "
              f"{last['skipped']} times", file=sys.stderr)
    return {"out": str(Path(out)), "start_step": start, "step": run.step, "total_steps": config.schedule.total_steps,
            "terminated": bool(terminated), "checkpoint": str(run.checkpoints / "last.safetensors"),
            "metrics": {k: v for k, v in last.items() if k != "checkpoint"}, "data": run.dataset.describe()}


def _in_main_thread() -> bool:
    """Signal handlers can only be installed from the main thread (a GUI worker thread cannot)."""
    import threading

    return threading.current_thread() is threading.main_thread()
