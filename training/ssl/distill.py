"""Distillation into a small student: VersaMammo's stage 2 (arXiv 2509.20271), ``mammodino distill``.

VersaMammo trains a self-supervised teacher first, then the final model (an EfficientNet-B5) by
supervised multi-task learning plus knowledge distillation from that teacher. Here:

* **Teacher**: any encoder :func:`training.evaluate.encoder.load_encoder` loads (a MammoDINO checkpoint
  or run, an encoder file, the demo), frozen, at its own resolution. Its outputs do not change, so they
  are computed once per image (and once for its mirror image, the one augmentation), before the first
  step: epochs never run the teacher again.
* **Student**: any timm architecture with random weights (:mod:`training.ssl.student`), at its own,
  lower resolution (default 224 px, VersaMammo's low-resolution input). Both see the image through
  :func:`training.evaluate.encoder.prepare_image_sizes`: the same frame, tissue box and intensity
  window (the teacher's percentiles), each at its own size.
* **Loss** = ``supervised_weight`` x the sum over targets of the cross-entropy of a linear head per
  target of the labels CSV (density, lesion, lesion_type, birads: those it has; blank labels ignored)
  + ``cls_weight`` x the cosine distance between a learnt linear projection of the student's pooled
  feature and the teacher's class token + ``patch_weight`` x the mean cosine distance between the
  projected student patch tokens and the teacher's patch tokens resampled (bilinear, antialiased when
  shrinking) to the student's grid. Both see the same tissue box, so the grids cover the same breast.
* Horizontal flips (probability ``flip``): the student sees the mirror image and its targets are the
  teacher's outputs on the mirror image.

A run folder (:class:`training.runs.RunFolder`) holds ``metrics.jsonl`` (per step: step, epoch, total,
``cls_distill_loss``, ``patch_distill_loss``, ``<target>_loss`` (null in a batch without that label),
lr, images_per_s) and ``checkpoints/last.safetensors``: an encoder file (kind "encoder", its model the
student's timm name, its image heads the targets' :class:`~training.evaluate.encoder.TaskHead`), so the
student loads everywhere an encoder loads, mid-run too. Until the last step it also holds the training
state (projections, AdamW state) for ``--resume``, which continues exactly: weights are restored, the
learning rate is a function of the step and each epoch's order and flips a function of (seed, epoch).
SIGTERM ends the run after the current step with a checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.checkpoint import (load_optimizer_state, load_tensors, optimizer_state, prefixed, provenance,
    read_metadata, unprefixed)
from training.config import from_dict, to_dict
from training.errors import MammoInputError
from training.evaluate.encoder import (Encoder, Prepared, TaskHead, image_features, load_encoder,
    prepare_image_sizes, save_encoder)
from training.labels import data_paths, read_labels, read_rows
from training.runs import RunFolder
from training.ssl.student import TimmBackbone, build_student, check_name

TARGETS = ("density", "lesion", "lesion_type", "birads")  # the labels-CSV columns a student learns
SAME_RUN = ("device", "checkpoint_every")  # options a resumed run may change: they change no weight


@dataclass(frozen=True)
class DistillConfig:
    """How a student is distilled. ``teacher_resolution`` None: the teacher's own; ``warmup_epochs`` of
    linear warm-up, then a cosine to ``lr * 0.01``; ``checkpoint_every`` steps (0: each epoch's end)."""

    student: str = "mobilenetv3_small_100"
    resolution: int = 224
    teacher_resolution: int | None = None
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    supervised_weight: float = 1.0
    cls_weight: float = 1.0
    patch_weight: float = 1.0
    flip: float = 0.5
    seed: int = 0
    checkpoint_every: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        problems = [f"--{name.replace('_', '-')} {getattr(self, name)}: {rule}" for name, rule, ok in (
            ("resolution", "at least 32 px", self.resolution >= 32),
            ("epochs", "at least 1", self.epochs >= 1),
            ("batch_size", "at least 1", self.batch_size >= 1),
            ("lr", "a positive number", self.lr > 0 and math.isfinite(self.lr)),
            ("weight_decay", ">= 0", self.weight_decay >= 0),
            ("warmup_epochs", ">= 0", self.warmup_epochs >= 0),
            ("supervised_weight", ">= 0", self.supervised_weight >= 0),
            ("cls_weight", ">= 0", self.cls_weight >= 0),
            ("patch_weight", ">= 0", self.patch_weight >= 0),
            ("flip", "a probability in [0, 1]", 0 <= self.flip <= 1),
            ("checkpoint_every", ">= 0 steps", self.checkpoint_every >= 0),
            ("device", "auto, cpu or cuda", self.device in ("auto", "cpu", "cuda"))) if not ok]
        if self.teacher_resolution is not None and self.teacher_resolution < 16:
            problems.append(f"--teacher-resolution {self.teacher_resolution}: at least 16 px")
        if problems:
            raise MammoInputError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DistillConfig":
        return from_dict(cls, values, "distill")


# --- the loss --------------------------------------------------------------------------------------

class Projector(nn.Module):
    """Learnt linear maps from the student's feature width to the teacher's: one for the pooled feature,
    one for the patch tokens (FitNets-style hints, Romero et al. 2015)."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.cls = nn.Linear(student_dim, teacher_dim)
        self.patch = nn.Linear(student_dim, teacher_dim)


def cosine_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """``1 - cos`` between matching rows of (..., D) tensors, averaged over everything but D."""
    return (1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-6)).mean()


def distill_losses(projector: Projector, cls: Tensor, patches: Tensor, teacher_cls: Tensor,
                   teacher_patches: Tensor) -> tuple[Tensor, Tensor]:
    """(class-token term, patch term) for student ``cls`` (B, Ds) and ``patches`` (B, N, Ds) against the
    teacher's ``teacher_cls`` (B, Dt) and ``teacher_patches`` (B, N, Dt) on the student's grid."""
    return (cosine_distance(projector.cls(cls), teacher_cls),
            cosine_distance(projector.patch(patches), teacher_patches))


def to_grid(patches: np.ndarray, grid: tuple[int, int]) -> Tensor:
    """A (h, w, D) patch map resampled bilinearly to ``grid`` (antialiased where it shrinks, so each
    student cell gets the mean of the teacher patches it covers) -> (grid rows * cols, D)."""
    x = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32)).permute(2, 0, 1)[None]
    shrink = grid[0] < x.shape[-2] or grid[1] < x.shape[-1]
    y = F.interpolate(x, size=tuple(grid), mode="bilinear", align_corners=False, antialias=shrink)
    return y[0].flatten(1).T.contiguous()


# --- data: labels, inputs and the teacher's outputs, once ------------------------------------------

@dataclass
class Sample:
    """One image: the student's input (H, W), its labels (one per target, -1 blank) and the teacher's
    class token (2, Dt) and patches (2, N, Dt) on the student's grid, [as stored, mirrored]."""

    pixels: np.ndarray
    labels: np.ndarray
    teacher_cls: Tensor
    teacher_patches: Tensor


def read_targets(labels: str | Path) -> tuple[list[Path], dict[str, list[str]], np.ndarray]:
    """Every image of the labels CSV, the targets it has ({name: classes}) and the labels (N, targets),
    -1 where blank. A CSV without any target of two or more classes is one line."""
    rows = read_rows(labels)
    present = [t for t in TARGETS if t in rows[0] and len({(r[t] or "").strip() for r in rows} - {""}) >= 2]
    if not present:
        raise MammoInputError(f"--labels {Path(labels).name}: no target to learn; it needs a column among "
                              f"{', '.join(TARGETS)} with two or more classes (it has {', '.join(sorted(rows[0]))})")
    paths = data_paths(labels)
    index = {path: i for i, path in enumerate(paths)}
    y = np.full((len(paths), len(present)), -1, dtype=np.int64)
    classes = {}
    for j, target in enumerate(present):
        labelled = read_labels(labels, target)
        classes[target] = labelled.classes
        for path, k in zip(labelled.paths, labelled.y):
            y[index[path], j] = k
    return paths, classes, y


def _mirrored(item: Prepared) -> Prepared:
    return dataclasses.replace(item, pixels=np.ascontiguousarray(item.pixels[:, ::-1]))


def teacher_samples(teacher: Encoder, stride: int, paths: Sequence[Path], y: np.ndarray, config: DistillConfig,
                    should_stop: Callable[[], bool], bar: Any = None, chunk: int = 16) -> list[Sample] | None:
    """Each image prepared for teacher and student and run through the frozen teacher (as stored and
    mirrored); None when ``should_stop()`` said stop first."""
    from training.dicom.io import open_image

    sizes = [(config.teacher_resolution or teacher.resolution, teacher.patch_size), (config.resolution, stride)]
    samples: list[Sample] = []
    for start in range(0, len(paths), chunk):
        if should_stop():
            return None
        pairs = [prepare_image_sizes(open_image(path), None, sizes, teacher.percentiles)
                 for path in paths[start:start + chunk]]
        order = sorted(range(len(pairs)), key=lambda i: pairs[i][0].pixels.shape)  # same shapes share a batch
        seen = [pairs[i][0] for i in order]
        outputs = dict(zip(order, zip(teacher.run(seen, attention="none"),
                                      teacher.run([_mirrored(p) for p in seen], attention="none"))))
        for i, (_, student_input) in enumerate(pairs):
            views = outputs[i]
            samples.append(Sample(
                pixels=student_input.pixels, labels=y[start + i],
                teacher_cls=torch.from_numpy(np.stack([v.cls for v in views])).float(),
                teacher_patches=torch.stack([to_grid(v.patches, student_input.grid) for v in views])))
        if bar is not None:
            bar.update(len(pairs))
    return samples


# --- the run ---------------------------------------------------------------------------------------

@dataclass
class Run:
    """A distillation run: the student, its projections and heads, AdamW, the samples and the step."""

    config: DistillConfig
    folder: RunFolder
    student: TimmBackbone
    projector: Projector
    heads: nn.ModuleDict
    optimizer: torch.optim.Optimizer
    samples: list[Sample]
    targets: dict[str, list[str]]
    percentiles: tuple[float, ...]
    step: int
    meta: dict[str, Any]

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.samples) / self.config.batch_size)

    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch

    def lr_at(self, step: int) -> float:
        from training.ssl.schedules import cosine

        c = self.config
        return cosine(step, c.lr, c.lr * 0.01, self.total_steps, round(c.warmup_epochs * self.steps_per_epoch))

    def encoder(self) -> Encoder:
        """The student as an encoder (backbone and heads in eval mode until the next step)."""
        return Encoder(self.student, dict(self.heads.items()), self.meta, source=str(self.folder.last_checkpoint),
                       resolution=self.config.resolution, percentiles=self.percentiles)


def build_run(config: DistillConfig, teacher: Encoder, labels: str | Path, out: str | Path, resume: bool,
              command: Sequence[str] | None, progress: bool, should_stop: Callable[[], bool]) -> Run | None:
    """Student, projections, heads and AdamW (restored from ``out`` with ``resume``) and the teacher's
    outputs for every image; None when stopped while the teacher ran."""
    from tqdm import tqdm

    from training.evaluate.features import encoder_identity
    from training.evaluate.heads.loop import torch_device
    from training.ssl.cache import file_digest
    from training.ssl.schedules import param_groups

    folder = RunFolder(out) if resume else RunFolder.fresh(out)
    if resume and not folder.last_checkpoint.is_file():
        raise MammoInputError(f"--resume: {out} holds no checkpoint (checkpoints/last.safetensors)")
    device = torch_device(config.device)
    paths, targets, y = read_targets(labels)
    torch.manual_seed(config.seed)
    student = build_student(config.student).to(device)
    projector = Projector(student.config.embed_dim, teacher.embed_dim).to(device)
    heads = nn.ModuleDict({name: TaskHead(2 * student.config.embed_dim, classes, on="image")
                           for name, classes in targets.items()}).to(device)
    parts = nn.ModuleDict({"student": student, "projector": projector, "heads": heads})
    optimizer = torch.optim.AdamW(param_groups(parts.named_parameters(), 0, 1.0, 1.0), lr=config.lr)
    meta = {**provenance(list(command) if command is not None else None,
                         {"labels": str(labels), "sha256": file_digest(labels), "images": len(paths)}),
            "teacher": {"source": teacher.source, "identity": encoder_identity(teacher), **teacher.describe()},
            "tasks": {name: {"kind": "classification", "target": name, "classes": classes, "mode": "distill"}
                      for name, classes in targets.items()}}
    run = Run(config, folder, student, projector, heads, optimizer, [], targets, teacher.percentiles, 0, meta)
    if resume:
        _restore(run)
    with tqdm(total=len(paths), desc="teacher", unit="img", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        started = time.perf_counter()
        samples = teacher_samples(teacher, student.config.patch_size, paths, y, config, should_stop, bar)
    if samples is None:
        return None
    run.samples = samples
    run.meta["teacher_s"] = round(time.perf_counter() - started, 2)
    return run


def _restore(run: Run) -> None:
    """``run`` as its last checkpoint left it; the same config (but ``SAME_RUN``), teacher and labels."""
    path = run.folder.last_checkpoint
    meta = read_metadata(path)
    state = meta.get("distill")
    if not state:
        raise MammoInputError(f"--resume: {path} is not a distillation checkpoint")
    same = lambda config: {k: v for k, v in config.items() if k not in SAME_RUN}  # noqa: E731
    if same(state["config"]) != same(run.config.to_dict()):
        raise MammoInputError(f"--resume: the options differ from the run's ({path}); resume with the same ones "
                              f"or start a new --out")
    if "optimizer" not in state:
        raise MammoInputError(f"--resume: the run in {run.folder.path} is finished (step {state['step']})")
    if meta["teacher"]["identity"] != run.meta["teacher"]["identity"]:
        raise MammoInputError(f"--resume: --teacher is not the encoder the run started with ({meta['teacher']['source']})")
    if meta["data"]["sha256"] != run.meta["data"]["sha256"]:
        raise MammoInputError(f"--resume: --labels is not the CSV the run started with ({meta['data']['labels']})")
    tensors, _ = load_tensors(path)
    run.student.load_state_dict(unprefixed("backbone", tensors))
    run.projector.load_state_dict(unprefixed("projector", tensors))
    for name, head in run.heads.items():
        head.load_state_dict(unprefixed(f"heads.{name}", tensors))
    load_optimizer_state(run.optimizer, tensors, state["optimizer"])
    run.step = int(state["step"])
    run.folder.keep_metrics_through(run.step)


def save(run: Run, metrics: dict[str, Any] | None) -> Path:
    """The student as an encoder file in ``last.safetensors``, with the training state until the end."""
    final = run.step >= run.total_steps
    state: dict[str, Any] = {"config": run.config.to_dict(), "step": run.step, "total_steps": run.total_steps,
                             "metrics": metrics}
    extra: dict[str, Tensor] = {}
    if not final:
        opt_tensors, state["optimizer"] = optimizer_state(run.optimizer)
        extra = {**prefixed("projector", run.projector.state_dict()), **opt_tensors}
    return save_encoder(run.folder.last_checkpoint, run.encoder(), {**run.meta, "distill": state}, extra=extra)


def epoch_plan(config: DistillConfig, epoch: int, n: int) -> tuple[Tensor, Tensor]:
    """The order of the ``n`` images in ``epoch`` and which are mirrored: a function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator), torch.rand(n, generator=generator) < config.flip


def batch_losses(run: Run, indices: Sequence[int], flips: Sequence[bool]) -> dict[str, Tensor | None]:
    """Every loss term of one batch (same-shaped inputs run together); a target without a label in the
    batch gives None."""
    device = run.projector.cls.weight.device
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, i in enumerate(indices):
        groups.setdefault(run.samples[i].pixels.shape, []).append(k)
    cls_terms, patch_terms, logits, labels, sizes = [], [], {name: [] for name in run.heads}, [], []
    for members in groups.values():
        chosen = [run.samples[indices[k]] for k in members]
        mirror = [int(flips[k]) for k in members]
        pixels = torch.from_numpy(np.stack([s.pixels for s in chosen])[:, None]).to(device)
        pixels = torch.where(torch.tensor(mirror, device=device).bool()[:, None, None, None], pixels.flip(-1), pixels)
        tokens = run.student.forward_tokens(pixels)
        teacher_cls = torch.stack([s.teacher_cls[m] for s, m in zip(chosen, mirror)]).to(device)
        teacher_patches = torch.stack([s.teacher_patches[m] for s, m in zip(chosen, mirror)]).to(device)
        cls_term, patch_term = distill_losses(run.projector, tokens.cls, tokens.patches, teacher_cls, teacher_patches)
        cls_terms.append(cls_term)
        patch_terms.append(patch_term)
        sizes.append(len(members))
        features = image_features(tokens.cls, tokens.patches)
        for name, head in run.heads.items():
            logits[name].append(head(features))
        labels.append(torch.from_numpy(np.stack([s.labels for s in chosen])).to(device))
    weights = torch.tensor(sizes, dtype=torch.float32, device=device) / sum(sizes)
    terms: dict[str, Tensor | None] = {"cls_distill_loss": (torch.stack(cls_terms) * weights).sum(),
                                       "patch_distill_loss": (torch.stack(patch_terms) * weights).sum()}
    y = torch.cat(labels)
    for j, name in enumerate(run.heads):
        known = y[:, j] >= 0
        terms[f"{name}_loss"] = F.cross_entropy(torch.cat(logits[name])[known], y[known, j]) if known.any() else None
    return terms


def distill_steps(run: Run, end: int, should_stop: Callable[[], bool]) -> Iterator[dict[str, Any]]:
    """Train from ``run.step`` to ``end``, yielding each step's metrics (also appended to metrics.jsonl);
    checkpoints every ``checkpoint_every`` steps (or epoch), at ``end`` and when ``should_stop()``."""
    from training.ssl.schedules import ScheduleValues, apply_schedule

    c = run.config
    n, per_epoch = len(run.samples), run.steps_per_epoch
    every = c.checkpoint_every or per_epoch
    weights = {"cls_distill_loss": c.cls_weight, "patch_distill_loss": c.patch_weight}
    plan: tuple[int, Tensor, Tensor] | None = None
    while run.step < end:
        tick = time.perf_counter()
        epoch, position = divmod(run.step, per_epoch)
        if plan is None or plan[0] != epoch:
            plan = (epoch, *epoch_plan(c, epoch, n))
        rows = plan[1][position * c.batch_size:(position + 1) * c.batch_size]
        lr = run.lr_at(run.step)
        apply_schedule(run.optimizer, ScheduleValues(lr, lr, c.weight_decay, 0.0, 0.0))
        run.student.train()
        run.heads.train()
        terms = batch_losses(run, rows.tolist(), plan[2][rows].tolist())
        total = sum(weights.get(name, c.supervised_weight) * value
                    for name, value in terms.items() if value is not None)
        if not math.isfinite(float(total.detach())):
            raise MammoInputError(f"the loss is not finite at step {run.step + 1}; the last checkpoint is kept; "
                                  f"lower --lr")
        run.optimizer.zero_grad(set_to_none=True)
        total.backward()
        nn.utils.clip_grad_norm_([p for group in run.optimizer.param_groups for p in group["params"]], 3.0)
        run.optimizer.step()
        run.step += 1
        metrics = {"step": run.step, "epoch": epoch, "total": float(total.detach()),
                   **{name: None if value is None else float(value.detach()) for name, value in terms.items()},
                   "lr": lr, "images_per_s": len(rows) / (time.perf_counter() - tick)}
        run.folder.append_metrics(metrics)
        stop = should_stop()
        if run.step % every == 0 or run.step == end or stop:
            metrics["checkpoint"] = str(save(run, metrics))
        yield metrics
        if stop:
            return


def distill(teacher: str | Path, labels: str | Path, out: str | Path, config: DistillConfig = DistillConfig(),
            resume: bool = False, max_steps: int | None = None, command: Sequence[str] | None = None,
            progress: bool = True, should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Distil ``teacher`` (an encoder) into ``config.student`` on the images of ``labels`` in run folder
    ``out`` (or resume it) up to ``max_steps`` (default: every epoch). SIGTERM or ``should_stop()`` ends
    the run after the current step with a checkpoint. Returns the report."""
    from tqdm import tqdm

    from training.evaluate.heads.loop import torch_device
    from training.progress import sigterm_flag

    started = time.perf_counter()
    check_name(config.student)  # before the teacher loads
    try:
        frozen = load_encoder(teacher, torch_device(config.device))
    except MammoInputError as exc:
        raise MammoInputError(f"--teacher must be an encoder: {exc}") from None
    last: dict[str, Any] = {}
    with sigterm_flag() as terminated:
        stop = lambda: terminated() or bool(should_stop and should_stop())  # noqa: E731
        run = build_run(config, frozen, labels, out, resume, command, progress, stop)
        if run is None:
            return {"status": "cancelled", "out": str(out), "checkpoint": None, "step": 0, "terminated": terminated()}
        end = run.total_steps if max_steps is None else min(max_steps, run.total_steps)
        if end < run.step:
            raise MammoInputError(f"--max-steps {max_steps} is behind the run's step {run.step}")
        start = run.step
        with tqdm(total=end, initial=start, unit="step", file=sys.stderr, disable=not progress,
                  dynamic_ncols=True) as bar:
            for last in distill_steps(run, end, stop):
                bar.update(1)
                bar.set_postfix(loss=f"{last['total']:.3f}")
    return {"status": "cancelled" if stop() else "done", "out": str(run.folder.path),
            "checkpoint": last.get("checkpoint"), "student": run.student.config.to_dict(),
            "teacher": run.meta["teacher"], "targets": run.targets, "images": len(run.samples),
            "labelled": {name: int((np.stack([s.labels for s in run.samples])[:, j] >= 0).sum())
                         for j, name in enumerate(run.targets)},
            "start_step": start, "step": run.step, "total_steps": run.total_steps, "terminated": terminated(),
            "teacher_s": run.meta["teacher_s"], "metrics": {k: v for k, v in last.items() if k != "checkpoint"},
            "wall_s": round(time.perf_counter() - started, 2)}
