"""The MammoDINO pretraining loop: student/teacher, losses, AdamW with schedules, metrics and checkpoints.

A run lives in one folder ``RUN``:

* ``RUN/metrics.jsonl``: one JSON object per logged step (``step`` counts completed optimiser steps;
  ``epoch``; every loss term; ``lr``, ``weight_decay``, ``momentum``, ``teacher_temp``,
  ``teacher_entropy``, ``teacher_marginal_entropy``, ``grad_norm``, ``images_per_s``; ``data_wait_s``
  (seconds the loop waited for this step's batch) and ``step_s`` (the whole step, wait included);
  ``skipped`` and ``skipped_images``: draws of and images without tissue since this process started;
  ``unreadable`` and ``unreadable_images``: the same for images that failed to decode).
* ``RUN/checkpoints/step_<7-digit step>.safetensors`` (the last ``keep_checkpoints``) and ``last.safetensors``
  (a hard link to the newest), written atomically by :func:`training.checkpoint.save_checkpoint`, holding
  student, teacher, loss centres, optimiser state, torch RNG state, and as JSON metadata the config,
  data, command, git commit, step, Python/NumPy RNG states and the last metrics.
* With a learning-curve monitor (:mod:`training.evaluate.learning_curve`, ``monitor.every`` and its CSVs), an
  eval line ``{"step", "kind": "eval", "eval": {...}, "notes", "eval_s", "prepare_s"}`` after the
  metrics line of every step it measures (no loss terms: readers of the losses skip it).

Exact resume: every scheduled value is a function of the step, the batch of step ``s`` is a function of
``s`` (:mod:`training.ssl.data`), and the RNG states are restored, so a run stopped at a checkpoint (SIGKILL
after it, or SIGTERM) and resumed ends with the weights of an uninterrupted run. SIGTERM finishes the
current step, saves a checkpoint and returns. Guards stop the run, without saving, when the loss is not
finite or when the teacher's marginal entropy (of its batch-mean target) stays under a floor for several
steps: every sample points at the same few prototypes, the known DINO collapse.

Distributed: the same command runs under ``torchrun --nproc_per_node N`` (and multi-node); see
:mod:`training.ssl.distributed`. ``train.batch_size`` is the global batch; each process trains its share with
the student in DDP, the teacher centres and Sinkhorn-Knopp sum over every process (the loss's ``reduce``
hook), KoLeo and the DBT InfoNCE see the whole batch's gathered embeddings, so the losses and the update
are those of one process on the same batch (floating-point tolerance). Every process builds and resumes
the run from ``RUN`` (shared by the nodes), updates its EMA teacher identically and handles SIGTERM at the
same step; rank 0 alone writes metrics, checkpoints (with every process's :func:`replica_digest`) and the
progress bar. Left approximate: ``teacher_marginal_entropy`` is the share-weighted mean of each
process's value (a lower bound: the collapse guard fires no later), and drop-path draws differ from a
single process's (each process draws for its share).

Options: ``init_weights`` starts both backbones from a local DINOv2 / RAD-DINO / timm ``.safetensors``
file (recorded, with its SHA-256, as ``init_weights`` in every checkpoint; a resumed run keeps it);
``cache`` says where frames and tissue masks come from (:mod:`training.ssl.cache`): by default a cache in
:func:`training.ssl.cache.default_cache_dir`, built or updated first, so draws do not decode DICOM again;
a folder; or False to decode every draw. A resumed run reads its data the way it recorded;
``device`` is "auto" (CUDA when available), "cpu" or "cuda".

:func:`train_step` is one optimiser step (forward, losses, backward, clipping, AdamW, EMA), the same
function in the loop and in ``benchmarks/bench_pretrain_step.py``. :func:`pretrain_steps` is a generator
(one dict per step) so a GUI worker can drive it and cancel it; :func:`pretrain` runs it to the end with
a tqdm progress bar on stderr.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from training.ssl import distributed
from training.ssl.cache import file_digest
from training.checkpoint import (load_checkpoint, load_optimizer_state, optimizer_state, prefixed, provenance,
    read_metadata, save_checkpoint, unprefixed)
from training.ssl.presets import PretrainConfig
from training.ssl.data import PretrainDataset, StepBatches, collate, worker_options
from training.errors import MammoInputError
from training.progress import sigterm_flag
from training.runs import RunFolder
from training.ssl.losses import MammoDINOLoss
from training.ssl.models import StudentTeacher
from training.ssl.schedules import param_groups
from training.ssl.step import NonFiniteLoss, train_step


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
    def folder(self) -> RunFolder:
        return RunFolder(self.out)


def build_training(config: PretrainConfig, device: str | torch.device = "cpu"
                   ) -> tuple[StudentTeacher, MammoDINOLoss, torch.optim.Optimizer]:
    """The student/teacher pair and the loss on ``device``, and AdamW over the student's layer-wise
    parameter groups (learning rates and weight decay are set by :func:`train_step` each step)."""
    model = StudentTeacher(config.model).to(device)
    loss = MammoDINOLoss(config.loss, config.model.dino_head.n_prototypes, config.model.ibot_prototypes).to(device)
    groups = param_groups(model.student.named_parameters(), config.model.dims[1],
                          config.schedule.layerwise_decay, config.schedule.patch_embed_lr_mult)
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=config.schedule.adamw_betas)
    return model, loss, optimizer


def build_run(config: PretrainConfig, data: str | Path, out: str | Path, resume: bool = False,
              command: Sequence[str] | None = None, device: str | torch.device = "cpu",
              init_weights: str | Path | None = None, cache: str | Path | bool | None = None,
              progress: bool = False, init_from: str | Path | None = None) -> Run:
    """Model, loss, optimiser and data for ``config``, the model and loss on ``device``; with ``resume``,
    restored from ``out``'s last checkpoint (whose config must equal ``config``). Under torchrun every
    process builds (and restores) the same run.

    ``init_weights``: a local DINOv2 / RAD-DINO / timm ``.safetensors`` backbone both student and teacher
    start from (:meth:`StudentTeacher.load_backbone`; recorded in the checkpoints' ``init_weights``).
    ``init_from``: a MammoDINO pretraining checkpoint or run folder of the same model whose student,
    teacher and loss centres this run starts from, with its own schedule, crops and data (a second
    stage, e.g. the short high-resolution stage; recorded as ``init_from``).
    ``cache``: where the data is read through (:func:`_cache_plan`): None (the default) a preprocessing
    cache (:mod:`training.ssl.cache`) in the default folder, or the way a resumed run recorded; a folder;
    False to decode every draw. The cache is built or brought up to date here (by rank 0, or each node's
    first process for the default folder, in ``train.num_workers`` local processes; ``mammodino cache``
    for more, or a cluster) and then read instead of the DICOM files."""
    out = Path(out)
    last = RunFolder(out).last_checkpoint
    if resume and not last.is_file():
        raise MammoInputError(f"--resume: {out} holds no checkpoint (checkpoints/last.safetensors)")
    if not resume and last.exists():
        raise MammoInputError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")
    if init_weights is not None and not Path(init_weights).is_file():
        raise MammoInputError(f"--init-weights {init_weights}: no such file")
    if init_weights is not None and init_from is not None:
        raise MammoInputError("--init-weights and --from both say where the weights start: give one")
    start_from = _stage_checkpoint(init_from, config) if init_from is not None and not resume else None
    torch.manual_seed(config.train.seed)
    dataset = PretrainDataset(data, config.sampler, seed=config.train.seed, naive=config.train.naive_sampler)
    folder, automatic, settings = _cache_plan(cache, last if resume else None)
    if folder is not None:
        from training.ssl.cache import FrameCache, build_cache

        # The default folder is per machine (~/.cache): each node's first process builds its own. A
        # folder given by --cache is shared by the nodes (like --out), so rank 0 alone builds it.
        builder = int(os.environ.get("LOCAL_RANK", 0)) == 0 if automatic else distributed.is_main()
        if builder:  # as many processes as the run gives its DataLoader
            report = build_cache(dataset.images, folder, settings, workers=max(1, config.train.num_workers),
                                 progress=progress, fixed_settings=not automatic)
            if progress and report["built"]:
                print(f"mammodino pretrain: preprocessing cache {folder}: built {report['built']} of "
                      f"{report['images']} images in {report['seconds']} s (--no-cache decodes instead)",
                      file=sys.stderr)
        distributed.barrier()  # the other processes read what rank 0 wrote
        dataset.use_cache(FrameCache(folder, settings, automatic=automatic))
    model, loss, optimizer = build_training(config, device)
    meta = provenance(list(command) if command is not None else None, dataset.describe())
    from training.ssl.throughput import device_name

    meta["device"] = device_name(device)
    if start_from is not None:
        tensors, earlier = load_checkpoint(start_from)
        state = unprefixed("model", tensors)
        if not any(k.startswith("student.") for k in state):  # an exported state: the teacher alone
            state.update({"student." + k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")})
        model.load_state_dict(state)
        loss.load_state_dict(unprefixed("loss", tensors))
        meta["init_from"] = {"path": str(start_from.resolve()), "sha256": file_digest(start_from),
                             "step": earlier["step"], "config": earlier.get("config", {}).get("name"),
                             "command": earlier.get("command")}
    if init_weights is not None and not resume:
        report = model.load_backbone(init_weights)
        meta["init_weights"] = {"path": str(Path(init_weights).resolve()), "sha256": file_digest(init_weights),
                                **report}
    run = Run(config, out, model, loss, optimizer, dataset, 0, meta)
    if resume:
        _restore(run, last, init_weights)
    return run


def _cache_plan(cache: str | Path | bool | None, resumed: Path | None) -> tuple[Path | None, bool, Any]:
    """Where the run reads its data through: (cache folder or None to decode, whether it is the automatic
    default folder, the cache settings or None for the folder's own). ``cache`` None (or True): the
    default folder with the default settings, or for a resumed run (``resumed``: its checkpoint) what the
    run recorded (no cache, its folder, or the default folder with its settings), so resuming without
    options reads the same batches; False: decode; a path: that folder."""
    from training.ssl.cache import CacheSettings, default_cache_dir

    if cache is False:
        return None, False, None
    if cache is None or cache is True:
        if resumed is None:
            return default_cache_dir(), True, CacheSettings()
        recorded = (read_metadata(resumed).get("data") or {}).get("cache")
        if not recorded:
            return None, False, None  # it decoded its files (or predates the cache)
        if recorded.get("automatic"):
            return default_cache_dir(), True, CacheSettings.from_dict(recorded["settings"])
        return Path(recorded["folder"]), False, None
    return Path(cache), False, None


def _stage_checkpoint(init_from: str | Path, config: PretrainConfig) -> Path:
    """The checkpoint ``--from`` names (a file, or a run folder's ``checkpoints/last.safetensors``), checked
    to be a MammoDINO pretraining checkpoint of the same network as ``config``."""
    path = Path(init_from)
    if path.is_dir():
        path = RunFolder(path).last_checkpoint
    if not path.is_file():
        raise MammoInputError(f"--from {init_from}: no pretraining checkpoint there (a .safetensors file or a "
                              f"run folder with checkpoints/last.safetensors)")
    meta = read_metadata(path)
    if "step" not in meta or "model" not in meta:
        raise MammoInputError(f"--from {init_from}: not a MammoDINO pretraining checkpoint")
    if meta["model"] != config.model.to_dict():
        raise MammoInputError(f"--from {init_from}: its model differs from --config's; a later stage keeps the "
                              f"network (change crops, schedule or data, not model.*)")
    return path


def export_state(checkpoint: str | Path, out: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """A small file to continue a run from on another machine: the student, teacher and loss centres of a
    pretraining checkpoint (or run folder) in ``dtype``, without optimiser or RNG state, with the run's
    config, step, data and command as metadata. ``mammodino pretrain --from OUT`` starts a new stage from
    it, student and teacher both from the teacher (not an exact resume: AdamW's moments start again)."""
    path = Path(checkpoint)
    if path.is_dir():
        path = RunFolder(path).last_checkpoint
    tensors, meta = load_checkpoint(path)
    # The teacher alone: a new stage starts its student from it (the EMA is the better network), so the
    # file is half the size of both.
    kept = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()
            if k.startswith(("model.teacher.", "loss."))}
    info = {k: meta.get(k) for k in ("config", "model", "step", "data", "command", "git_commit", "init_from",
                                     "device", "created", "versions")}
    info["kind"] = "pretraining-state"
    info["exported_from"] = {"path": str(path.resolve()), "sha256": file_digest(path)}
    return save_checkpoint(out, kept, info)


def _restore(run: Run, path: Path, init_weights: str | Path | None = None) -> None:
    tensors, meta = load_checkpoint(path)
    training_part = lambda config: {k: v for k, v in (config or {}).items() if k != "monitor"}  # noqa: E731
    if training_part(meta.get("config")) != training_part(run.config.to_dict()):  # the monitor changes no weight
        raise MammoInputError(f"--resume: the config differs from the run's ({path}); resume with the same "
                              f"--config and --set, or start a new --out")
    then = (meta.get("data") or {}).get("cache") or {}
    now = run.dataset.cache.describe() if run.dataset.cache is not None else {}
    if then.get("settings") != now.get("settings"):  # another resolution would change the batches
        how = f"through a cache built with {then['settings']}" if then else "without a cache (--no-cache)"
        raise MammoInputError(f"--resume: the run read its data {how}; resume it the same way (leave out "
                              f"--cache and --no-cache to follow the run)")
    if then.get("preprocessing") != now.get("preprocessing"):
        raise MammoInputError(f"--resume: the run's preprocessing cache was made by another version "
                              f"({then.get('preprocessing') or 'format 1'}); its batches cannot be repeated: "
                              f"start a new --out")
    if meta.get("init_from"):
        run.meta["init_from"] = meta["init_from"]  # a resumed second stage still says where it began
    started = meta.get("init_weights")
    if init_weights is not None and (started or {}).get("path") != str(Path(init_weights).resolve()):
        raise MammoInputError(f"--resume: the run started from {started['path'] if started else 'random weights'}, "
                              f"not --init-weights {init_weights}; leave --init-weights out to resume")
    if started:
        run.meta["init_weights"] = started
    run.model.load_state_dict(unprefixed("model", tensors))
    run.loss.load_state_dict(unprefixed("loss", tensors))
    load_optimizer_state(run.optimizer, tensors, meta["optimizer"])
    run.step = int(meta["step"])
    torch.set_rng_state(tensors["rng.torch"])
    np.random.set_state(("MT19937", tensors["rng.numpy"].numpy().astype(np.uint32), *meta["rng"]["numpy"]))
    random.setstate((meta["rng"]["python"][0], tuple(meta["rng"]["python"][1]), meta["rng"]["python"][2]))
    if distributed.is_main():  # lines logged after this checkpoint (by a run killed later) are logged again
        run.folder.keep_metrics_through(run.step)


def save(run: Run, metrics: dict[str, Any] | None, replicas: list[str] | None = None) -> Path:
    """A checkpoint of the run at its current step; keeps the newest ``keep_checkpoints`` and ``last``.
    ``replicas``: each process's :func:`replica_digest` (recorded as ``replica_digests``)."""
    folder = run.folder
    folder.checkpoints.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_meta = optimizer_state(run.optimizer)
    np_state = np.random.get_state()
    py_state = random.getstate()
    tensors = {**prefixed("model", run.model.state_dict()), **prefixed("loss", run.loss.state_dict()),
               **opt_tensors, "rng.torch": torch.get_rng_state(),
               "rng.numpy": torch.from_numpy(np_state[1].astype(np.int64))}
    meta = {**run.meta, "config": run.config.to_dict(), "model": run.config.model.to_dict(),
            "step": run.step, "metrics": metrics, "optimizer": opt_meta, "replica_digests": replicas,
            "rng": {"numpy": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
                    "python": [py_state[0], list(py_state[1]), py_state[2]]}}
    path = save_checkpoint(folder.step_checkpoint(run.step), tensors, meta)
    folder.link_last(path)
    for old in folder.step_checkpoints()[:-run.config.train.keep_checkpoints]:
        old.unlink()
    return path


def replica_digest(run: Run) -> str:
    """SHA-256 of this process's student, teacher and loss centres: equal on every process of a
    healthy data-parallel run (DDP keeps the replicas in step; nothing checks it but this)."""
    digest = hashlib.sha256()
    for state in (run.model.state_dict(), run.loss.state_dict()):
        for name, tensor in state.items():
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _kept(run: Run) -> str:
    """What a stopped run leaves behind, in words."""
    last = run.folder.last_checkpoint
    if not last.exists():
        return "no checkpoint had been saved yet"
    return f"the last good checkpoint (step {read_metadata(last).get('step')}) is kept: {last}"


def pretrain_steps(run: Run, max_steps: int | None = None, guard: Guard = Guard(),
                   should_stop: Any = None, monitor: Any = None) -> Iterator[dict[str, Any]]:
    """Train from ``run.step`` to ``max_steps`` (default: the schedule's ``total_steps``), yielding each
    step's metrics. ``should_stop()`` (e.g. a SIGTERM flag or a GUI cancel button) is checked after each
    step: the run then saves a checkpoint and ends. Raises :class:`TrainingStopped` from a guard.
    ``monitor``: a :class:`training.evaluate.learning_curve.Monitor`; on the steps it is due (not when stopping),
    rank 0 measures the EMA teacher and appends ``{"step", "kind": "eval", "eval": {...}, "notes",
    "eval_s", "prepare_s"}`` to metrics.jsonl (the yielded metrics get its ``eval``) while the other
    processes wait.

    Under torchrun (:mod:`training.ssl.distributed`) every process runs this on its share of each global
    batch with the student in DDP; the metrics (and so every decision: skip, guards, stop) are those of
    the global batch on every process, and only rank 0 writes ``metrics.jsonl`` and checkpoints."""
    c = run.config
    device = next(run.model.parameters()).device  # where build_run put the model
    ctx = distributed.setup(device.type)
    main_process = ctx.rank == 0
    end = c.schedule.total_steps if max_steps is None else max_steps
    folder = run.folder
    folder.path.mkdir(parents=True, exist_ok=True)
    log_k = math.log(c.model.dino_head.n_prototypes)
    low_entropy = 0
    last_metrics: dict[str, Any] | None = None
    skipped: set[int] = set()
    draws = 0
    unreadable: set[int] = set()
    unreadable_draws = 0
    waited = 0.0  # seconds the loop waited for data since the last step it trained
    run.model.train()
    student = _data_parallel(run.model.student, ctx, device)
    batches = _batches(run, end, ctx, device)
    tick = time.perf_counter()
    for batch, wait in _timed(batches):
        step = run.step
        waited += wait
        # What every process must agree on: the global image count, an empty share, iBOT masks anywhere.
        local_masks = batch["n_images"] > 0 and bool(batch["masks"].any())
        shares = distributed.gather_objects((batch["n_images"], local_masks, batch["skipped"], batch["unreadable"]))
        for _, _, indices, failed in shares:
            skipped.update(indices)
            draws += len(indices)
            unreadable.update(failed)
            unreadable_draws += len(failed)
        if min(n for n, *_ in shares) == 0:  # a share without tissue: every process skips the step
            run.step += 1
            if run.step == end and main_process:
                save(run, last_metrics)
            continue
        sizes = [n for n, *_ in shares]
        try:
            result = train_step(run.model, run.loss, run.optimizer, c, batch, step, student=student, sizes=sizes,
                                masked=any(m for _, m, *_ in shares), stop=bool(should_stop and should_stop()))
        except NonFiniteLoss as exc:
            raise TrainingStopped(f"{exc} at step {step + 1}; {_kept(run)}") from None
        scalars, values = result.scalars, result.values
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
                   "grad_norm": result.grad_norm, "images_per_s": sum(sizes) / (now - tick),
                   "data_wait_s": waited, "step_s": now - tick,
                   "skipped": draws, "skipped_images": len(skipped),
                   "unreadable": unreadable_draws, "unreadable_images": len(unreadable)}
        tick, waited = now, 0.0
        last_metrics = metrics
        if main_process and (run.step % c.train.log_every == 0 or run.step == 1 or run.step == end):
            folder.append_metrics(metrics)
        if monitor is not None and monitor.due(run.step, end) and not result.stop:
            # Before the checkpoint: a run killed while evaluating resumes before this step and measures it again.
            if main_process:
                line = {"step": run.step, "kind": "eval", **monitor(run.model.teacher.backbone, run.step)}
                folder.append_metrics(line)
                metrics["eval"] = line["eval"]
            distributed.barrier()  # the other processes wait for rank 0's evaluation
            tick = time.perf_counter()  # the evaluation is no part of the next step's time
        if run.step % c.train.checkpoint_every == 0 or run.step == end or result.stop:
            replicas = distributed.gather_objects(replica_digest(run))
            if len(set(replicas)) > 1:
                raise TrainingStopped(f"the {ctx.world_size} processes' weights differ at step {run.step}; "
                                      f"{_kept(run)}")
            if main_process:
                metrics["checkpoint"] = str(save(run, metrics, replicas))
        yield metrics
        if result.stop:  # any process asked: all stop after this same step
            return
    if main_process and last_metrics is None and not folder.last_checkpoint.exists():
        save(run, None)


def _data_parallel(student: torch.nn.Module, ctx: distributed.Context, device: torch.device) -> torch.nn.Module:
    """The student wrapped in DDP under torchrun, itself in a single process. Unused parameters are
    expected: the mask token (and a separate iBOT head) get no gradient in a step without masks."""
    if ctx.world_size == 1:
        return student
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(student, device_ids=device_ids, find_unused_parameters=True)


def _batches(run: Run, end: int, ctx: distributed.Context, device: torch.device) -> torch.utils.data.DataLoader:
    """This process's share of the batches of steps ``run.step..end - 1`` (the whole batches in a single
    process), prepared ahead by persistent single-threaded workers (:func:`training.ssl.data.worker_options`).
    Its own generator: making it never draws from torch's global RNG (exact resume)."""
    c = run.config.train
    steps = StepBatches(run.dataset, c.batch_size, run.step, end)
    return torch.utils.data.DataLoader(
        run.dataset, batch_sampler=distributed.ShardedBatches(steps, ctx.rank, ctx.world_size),
        collate_fn=collate, num_workers=c.num_workers, generator=torch.Generator().manual_seed(0),
        pin_memory=device.type == "cuda", **worker_options(c.num_workers))


def _timed(batches: Any) -> Iterator[tuple[dict[str, Any], float]]:
    """Each batch with the seconds the loop waited for it: the data path's share of a step, measured."""
    iterator = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        yield batch, time.perf_counter() - start


def pretrain(config: PretrainConfig, data: str | Path, out: str | Path, max_steps: int | None = None,
             resume: bool = False, command: Sequence[str] | None = None, progress: bool = True,
             guard: Guard = Guard(), device: str = "auto", init_weights: str | Path | None = None,
             cache: str | Path | bool | None = None, monitor_real: str | Path | None = None,
             monitor_phantom: str | Path | None = None, init_from: str | Path | None = None,
             time_limit: float | None = None) -> dict[str, Any]:
    """Run (or resume) a pretraining job to ``max_steps``; SIGTERM saves a checkpoint and ends it cleanly,
    and so does ``time_limit`` (seconds from this call: a job with a fixed wall-clock slot, such as a
    scheduler's allocation or a lent GPU, ends at a checkpoint instead of being killed).
    ``device``: "auto" (CUDA when available), "cpu" or "cuda"; ``init_weights``, ``init_from`` and
    ``cache``: see :func:`build_run`; ``monitor_real``/``monitor_phantom``: the learning curve's labels CSVs (see
    :func:`learning_curve_monitor`). Returns a summary: steps done, last metrics, checkpoint, whether it
    was stopped by SIGTERM or the time limit."""
    from tqdm import tqdm

    if time_limit is not None and time_limit <= 0:
        raise MammoInputError(f"--time-limit {time_limit:g}: give the seconds the run may take (> 0)")
    deadline = None if time_limit is None else time.monotonic() + time_limit
    timed_out = False

    def should_stop() -> bool:  # train_step agrees on the stop across processes
        nonlocal timed_out
        timed_out = timed_out or (deadline is not None and time.monotonic() > deadline)
        return terminated() or timed_out

    ctx = distributed.setup(device)  # under torchrun: join the process group (left again at the end)
    last: dict[str, Any] = {}
    with sigterm_flag() as terminated:  # a SIGTERM while the data opens still ends at a checkpoint
        try:
            if config.train.batch_size < ctx.world_size:
                raise MammoInputError(f"train.batch_size {config.train.batch_size} is smaller than the "
                                      f"{ctx.world_size} processes: each needs at least one image a step")
            monitor = learning_curve_monitor(config, monitor_real, monitor_phantom)  # CSV mistakes before any work
            run = build_run(config, data, out, resume, command, ctx.device, init_weights, cache,
                            progress=progress and ctx.rank == 0, init_from=init_from)
            if monitor is not None:
                run.meta["monitor"] = monitor.inputs()  # the CSVs and their SHA-256, in every checkpoint
            distributed.barrier()  # every process has checked --out before rank 0 writes into it
            end = config.schedule.total_steps if max_steps is None else max_steps
            if end < run.step:
                raise MammoInputError(f"--max-steps {end} is behind the run's step {run.step}")
            start = run.step
            show = progress and ctx.rank == 0  # one bar, rank 0's
            with tqdm(total=end, initial=start, file=sys.stderr, disable=not show, unit="step",
                      dynamic_ncols=True) as bar:
                for last in pretrain_steps(run, end, guard, should_stop=should_stop, monitor=monitor):
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['total']:.3f}", H=f"{last['teacher_entropy']:.2f}")
        finally:
            distributed.cleanup()
    if last.get("skipped") and ctx.rank == 0:
        print(f"mammodino pretrain: warning: {last['skipped_images']} images have no breast tissue; skipped "
              f"{last['skipped']} times", file=sys.stderr)
    return {"out": str(Path(out)), "rank": ctx.rank, "world_size": ctx.world_size, "device": str(ctx.device),
            "init_weights": run.meta.get("init_weights"), "start_step": start,
            "step": run.step, "total_steps": config.schedule.total_steps,
            "terminated": terminated(), "time_limited": timed_out and not terminated(),
            "checkpoint": str(run.folder.last_checkpoint),
            "metrics": {k: v for k, v in last.items() if k != "checkpoint"}, "data": run.dataset.describe()}


def learning_curve_monitor(config: PretrainConfig, real: str | Path | None,
                           phantom: str | Path | None) -> Any:
    """The run's :class:`training.evaluate.learning_curve.Monitor`: None when no CSV is given (a preset's
    ``monitor.every`` then only says how often a run with CSVs would measure); a CSV without
    ``monitor.every`` is one line."""
    m = config.monitor
    if real is None and phantom is None:
        return None
    if not m.every:
        raise MammoInputError("--monitor-real/--monitor-phantom: say how often to evaluate, e.g. "
                              "--set monitor.every=200 (steps)")
    from training.evaluate.learning_curve import Monitor

    return Monitor(real, phantom, m.resolution, m.k, m.max_images, config.sampler.intensity_percentiles, m.every)
