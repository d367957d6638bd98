"""Training schedules as pure functions of the step, layer-wise learning-rate decay groups for a ViT,
and gradient clipping.

Every value is computed from (config, step) alone, never accumulated, so a resumed run sees exactly the
values an uninterrupted one would. Shapes follow DINOv2's ``CosineScheduler`` (Oquab et al. 2023):

* learning rate: linear warm-up from 0 to the peak over ``warmup_steps``, then a half cosine down to
  ``min_lr`` at ``total_steps`` (and ``min_lr`` after). The peak is ``base_lr`` scaled by the batch
  size: DINOv2's ``sqrt_wrt_1024`` rule, lr = base_lr * sqrt(batch / 1024) (its default, with
  base_lr 0.004), or DINO's linear rule, lr = base_lr * batch / 256 (Caron et al. 2021, base 5e-4);
* last-layer learning rate: the same, but 0 for the first ``freeze_last_layer_steps`` (DINO/DINOv2
  freeze the prototypes at first: it stabilises the start);
* weight decay: cosine from ``weight_decay`` (0.04) to ``weight_decay_end`` (0.4);
* teacher momentum: cosine from 0.992 to 1.0 over the whole run;
* teacher temperature: linear warm-up 0.04 -> 0.07 over ``teacher_temp_warmup_steps``, then constant.

Parameter groups (DINOv2's ``get_params_groups_with_decay``): block ``i`` of an ``L``-block ViT has layer
id i + 1, the embeddings (patch, position, class/register/mask tokens) 0, everything else (final norm,
heads) L + 1; its lr multiplier is ``layerwise_decay ** (L + 1 - id)``, times ``patch_embed_lr_mult``
for the patch embedding. No weight decay for biases, norms, layer-scale gammas, the prototypes' gain,
nor (as timm's ``no_weight_decay``) the tokens and position embedding.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping

import torch
from torch import nn

from training.config import from_dict, to_dict
from training.errors import MammoInputError


@dataclass(frozen=True)
class ScheduleConfig:
    """Optimisation schedule. Defaults are DINOv2's ``ssl_default_config.yaml`` converted to steps with
    its 1250-iteration "epoch": 100 epochs, warm-up 10, teacher-temperature warm-up 30, frozen last
    layer 1."""

    total_steps: int = 125_000
    base_lr: float = 0.004
    lr_scaling: Literal["sqrt_wrt_1024", "linear_wrt_256", "none"] = "sqrt_wrt_1024"
    min_lr: float = 1e-6
    warmup_steps: int = 12_500
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.992
    momentum_teacher_end: float = 1.0
    teacher_temp: float = 0.07
    teacher_temp_warmup: float = 0.04
    teacher_temp_warmup_steps: int = 37_500
    freeze_last_layer_steps: int = 1_250
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0               # max gradient norm per student part; 0: no clipping
    adamw_betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        problems = []
        if self.total_steps < 1:
            problems.append("total_steps must be >= 1")
        for name in ("warmup_steps", "teacher_temp_warmup_steps", "freeze_last_layer_steps"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        for name in ("base_lr", "min_lr", "weight_decay", "weight_decay_end", "clip_grad"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        for name in ("momentum_teacher", "momentum_teacher_end"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1]")
        if self.teacher_temp <= 0 or self.teacher_temp_warmup <= 0:
            problems.append("teacher temperatures must be > 0")
        if not 0 < self.layerwise_decay <= 1 or self.patch_embed_lr_mult < 0:
            problems.append("layerwise_decay must be in (0, 1] and patch_embed_lr_mult >= 0")
        if not all(0 <= b < 1 for b in self.adamw_betas):
            problems.append("adamw_betas must be in [0, 1)")
        if problems:
            raise MammoInputError("schedule config: " + "; ".join(problems))

    def peak_lr(self, batch_size: int) -> float:
        """``base_lr`` scaled to the global batch size (images per step, all processes)."""
        if self.lr_scaling == "sqrt_wrt_1024":
            return self.base_lr * math.sqrt(batch_size / 1024)
        if self.lr_scaling == "linear_wrt_256":
            return self.base_lr * batch_size / 256
        return self.base_lr

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ScheduleConfig":
        return from_dict(cls, values, "schedule")


def cosine(step: int, start: float, end: float, total_steps: int, warmup_steps: int = 0,
           warmup_start: float = 0.0) -> float:
    """``warmup_start`` -> ``start`` linearly over ``warmup_steps``, then a half cosine ``start`` -> ``end``
    reaching ``end`` at ``total_steps`` (and staying there)."""
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / warmup_steps
    if step >= total_steps:
        return end
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_warmup(step: int, start: float, end: float, warmup_steps: int) -> float:
    """``start`` -> ``end`` linearly over ``warmup_steps``, then ``end``."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


@dataclass(frozen=True)
class ScheduleValues:
    lr: float
    last_layer_lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float


def values_at(config: ScheduleConfig, step: int, batch_size: int) -> ScheduleValues:
    """Every scheduled value at ``step`` (0-based) for a global batch of ``batch_size`` images."""
    c = config
    lr = cosine(step, c.peak_lr(batch_size), c.min_lr, c.total_steps, c.warmup_steps)
    return ScheduleValues(
        lr=lr,
        last_layer_lr=0.0 if step < c.freeze_last_layer_steps else lr,
        weight_decay=cosine(step, c.weight_decay, c.weight_decay_end, c.total_steps),
        momentum=cosine(step, c.momentum_teacher, c.momentum_teacher_end, c.total_steps),
        teacher_temp=linear_warmup(step, c.teacher_temp_warmup, c.teacher_temp, c.teacher_temp_warmup_steps),
    )


# --- parameter groups ------------------------------------------------------------------------------

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBEDDINGS = ("patch_embed", "pos_embed", "cls_token", "reg_token", "mask_token")
_NO_DECAY_TOKENS = ("pos_embed", "cls_token", "reg_token", "mask_token")


def layer_id(name: str, n_blocks: int) -> int:
    """0 for the embeddings, i + 1 for block i, n_blocks + 1 for the rest (final norm, heads)."""
    match = _BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    leaf = name.split("backbone.", 1)[-1]
    if leaf.startswith(_EMBEDDINGS):
        return 0
    return n_blocks + 1


def _decays(name: str, param: nn.Parameter) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return not (name.endswith(".bias") or "norm" in name or leaf == "gamma" or name.endswith("last_layer_g")
                or name.split("backbone.", 1)[-1] in _NO_DECAY_TOKENS or param.ndim == 0)


def param_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], n_blocks: int, layerwise_decay: float = 0.9,
                 patch_embed_lr_mult: float = 0.2) -> list[dict[str, Any]]:
    """Optimizer groups, one per (lr multiplier, weight-decay multiplier, last layer) with the names of
    their parameters. Frozen parameters (``requires_grad=False``) are left out. Set each group's
    ``lr``/``weight_decay`` every step with :func:`apply_schedule`."""
    groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        lr_mult = layerwise_decay ** (n_blocks + 1 - layer_id(name, n_blocks))
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        wd_mult = 1.0 if _decays(name, param) else 0.0
        last = "last_layer" in name
        key = (lr_mult, wd_mult, last)
        group = groups.setdefault(key, {"params": [], "names": [], "lr_multiplier": lr_mult,
                                        "wd_multiplier": wd_mult, "last_layer": last})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def apply_schedule(optimizer: torch.optim.Optimizer, values: ScheduleValues) -> None:
    """Set every group's ``lr`` and ``weight_decay`` from the scheduled values and its multipliers."""
    for group in optimizer.param_groups:
        lr = values.last_layer_lr if group.get("last_layer") else values.lr
        group["lr"] = lr * group.get("lr_multiplier", 1.0)
        group["weight_decay"] = values.weight_decay * group.get("wd_multiplier", 1.0)


def clip_gradients(parts: Mapping[str, nn.Module], max_norm: float) -> dict[str, float]:
    """Clip the gradient norm of each part separately (DINOv2 clips backbone and heads apart) to
    ``max_norm`` (0: measure only); returns each part's norm before clipping."""
    norms = {}
    for name, module in parts.items():
        params = [p for p in module.parameters() if p.grad is not None]
        if not params:
            continue
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        norms[name] = float(norm)
    return norms
