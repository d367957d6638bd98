"""One pretraining step: student and teacher forward, the MammoDINO loss, backward, clipping,
the optimiser and the teacher's EMA update."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from training.ssl import distributed
from training.ssl.presets import PretrainConfig
from training.ssl.losses import MammoDINOLoss
from training.ssl.models import StudentTeacher
from training.ssl.schedules import ScheduleValues, apply_schedule, clip_gradients, values_at


@dataclass
class StepResult:
    """What one optimiser step reports: the global batch's loss terms and teacher entropies
    (``scalars``), the scheduled values it used, the student backbone's gradient norm before clipping,
    and whether any process asked to stop after it."""

    scalars: dict[str, float]
    values: ScheduleValues
    grad_norm: float
    stop: bool


class NonFiniteLoss(ArithmeticError):
    """The step's loss is NaN or infinite; raised before the update, so the weights stay good."""

    def __init__(self, value: float):
        super().__init__(f"the loss became {value}")
        self.value = value


def train_step(model: StudentTeacher, loss: MammoDINOLoss, optimizer: torch.optim.Optimizer,
               config: PretrainConfig, batch: dict[str, Any], step: int, *, student: torch.nn.Module | None = None,
               sizes: Sequence[int] | None = None, masked: bool | None = None, stop: bool = False) -> StepResult:
    """One MammoDINO optimiser step on ``batch`` (a :func:`training.ssl.data.collate` batch, this process's
    share of global step ``step``): schedules applied, student and teacher forward (bf16 autocast with
    ``train.precision``), losses, backward, per-part gradient clipping, AdamW step, EMA teacher update.
    What :func:`pretrain_steps` runs each step, and what the benchmark times.

    In a single process only ``batch`` and ``step`` matter. Under torchrun: ``student`` is the DDP-
    wrapped student, ``sizes`` every process's number of images, ``masked`` whether any process has iBOT
    masks (then every process passes its masks, so DDP sees the same parameters used), ``stop`` this
    process's wish to stop (any process's is returned in :attr:`StepResult.stop`). Raises
    :class:`NonFiniteLoss` before updating anything."""
    c = config
    device = next(model.parameters()).device
    values = values_at(c.schedule, step, c.train.batch_size)
    sizes = list(sizes) if sizes is not None else [batch["n_images"]]
    share = batch["n_images"] / sum(sizes)  # this process's fraction of the global batch
    apply_schedule(optimizer, values)
    images = {k: batch[k].to(device, non_blocking=True) for k in ("global", "local", "masks")}
    if masked is None:
        masked = bool(images["masks"].any())
    masks = images["masks"] if masked else None
    n_global = c.sampler.n_global
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=c.train.precision == "bf16"):
        out = (student or model.student)(images["global"], images["local"], masks, mask_inputs=True)
        teacher = model.forward_teacher(images["global"], masks)
    local = loss.share_terms(out, teacher, n_global, values.teacher_temp, masks, reduce=distributed.reduce)
    whole = _whole_batch_terms(loss, out, batch, n_global, sizes)
    # dino, ibot and the entropies are means over this share: weighted by it, they sum to the whole
    # batch's; koleo and dbt were computed on the whole batch's gathered embeddings.
    shared = torch.stack([local["dino"].detach().float() * share, local["ibot"].detach().float() * share,
                          local["teacher_entropy"].float() * share,
                          local["teacher_marginal_entropy"].float() * share,
                          torch.tensor(float(stop), device=device)])
    shared = distributed.reduce(shared, "sum").tolist()
    scalars = {"dino": shared[0], "ibot": shared[1], "teacher_entropy": shared[2],
               "teacher_marginal_entropy": shared[3], "koleo": float(whole["koleo"].detach()),
               "dbt": float(whole["dbt"].detach())}
    w = c.loss
    scalars["total"] = (w.dino_weight * scalars["dino"] + w.ibot_weight * scalars["ibot"]
                        + w.koleo_weight * scalars["koleo"] + w.dbt_weight * scalars["dbt"])
    if not math.isfinite(scalars["total"]):  # checked before the update: the weights stay good
        raise NonFiniteLoss(scalars["total"])
    # DDP averages the processes' gradients: the share-weighted terms times W average to the whole
    # batch's mean; the gathered terms are the same on every process (see distributed.gather_rows).
    objective = (len(sizes) * share * (w.dino_weight * local["dino"] + w.ibot_weight * local["ibot"])
                 + w.koleo_weight * whole["koleo"] + w.dbt_weight * whole["dbt"])
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    parts = {"backbone": model.student.backbone, "dino_head": model.student.dino_head}
    if model.student.ibot_head is not None:
        parts["ibot_head"] = model.student.ibot_head
    norms = clip_gradients(parts, c.schedule.clip_grad)
    optimizer.step()
    model.update_teacher(values.momentum)
    return StepResult(scalars, values, norms.get("backbone", 0.0), shared[4] > 0)


def _whole_batch_terms(loss: MammoDINOLoss, student: dict[str, torch.Tensor], batch: dict[str, Any],
                       n_global: int, sizes: list[int]) -> dict[str, torch.Tensor]:
    """KoLeo and the DBT InfoNCE over the whole global batch: every process gathers the embeddings
    of all (rows in the single-process order) and computes what a single process would.
    ``sizes``: every process's number of images."""
    c = loss.config
    cls = student["global_cls"]
    n_local = cls.shape[0] // n_global
    offset, n_all = sum(sizes[:distributed.rank()]), sum(sizes)

    def whole(rows: torch.Tensor) -> torch.Tensor:  # (G*B_r, D) view-major -> (G*B, D) view-major
        gathered = distributed.gather_rows(rows.reshape(n_global, n_local, -1).transpose(0, 1))
        return gathered.transpose(0, 1).reshape(n_global * n_all, -1)

    dbt = c.dbt_weight > 0
    cls_all = whole(cls) if c.koleo_weight > 0 or (dbt and c.dbt_embedding == "cls") else cls
    patch_all = whole(student["global_patch_mean"]) if dbt and c.dbt_embedding != "cls" else None
    pairs = volumes = None
    if dbt:
        local_pairs = batch["dbt_pairs"].to(cls.device)
        rows = local_pairs // n_local * n_all + offset + local_pairs % n_local  # local rows -> global ones
        pairs = distributed.gather_rows(rows)
        volumes = distributed.gather_rows(batch["dbt_volumes"].to(cls.device))
    return loss.batch_terms(cls_all, patch_all, n_global, pairs, volumes)
