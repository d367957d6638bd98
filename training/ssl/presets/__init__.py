"""Pretraining presets as data files, and the loader that turns a preset (or any JSON file) plus
``key=value`` overrides into one checked :class:`PretrainConfig`.

Presets (``training/ssl/presets/<name>.json``):

* ``cpu-tiny``: ViT-tiny/16 (6 blocks), 2 global crops of 96 px and 4 locals of 48 px, small heads;
  learns on a laptop CPU (2 cores) in minutes. A smoke test and a teaching aid, not a useful encoder.
  Layer scale starts at 0.1, not DINOv2's 1e-5: with 1e-5 every block's output is scaled away, the
  class token is the same for every image, Sinkhorn-Knopp turns identical teacher rows into uniform
  targets and the student only learns to be uniform (teacher entropy log K = 6.931 for all of a
  60-step run on 240 phantoms); with 0.1 the targets depend on the image from step 1 (6.66 at step 60).
  DINOv2's 1e-5 suits its 125k-step runs; the other presets keep it.
* ``cpu-small`` then ``cpu-small-hires``: the CPU recipe (about 2 hours on 2 cores). ViT-tiny/16 with
  6 blocks and 4 registers (Darcet et al. 2024), position embeddings stored for 224 px; 5000 steps of
  16 images with 2 x 96 px + 6 x 48 px crops, then a short high-resolution stage (``mammodino pretrain
  --from STAGE1``: 800 steps at 192/80 px, as DINOv3 ends its training) so that 448 px inputs (28
  patches on the long side) give sound maps. No layer scale, 256 prototypes, a running-centre softmax
  and a constant teacher temperature of 0.04: with cpu-tiny's settings the teacher's targets went
  uniform on mammograms (README, "Recipes that learn"). Photometric jitter is milder than DINOv2's,
  because X-ray intensity carries density. The demo encoder is this network with the plain DINOv2
  sampler (``scripts/train_release_encoder.sh --recipe demo``).
* ``vits16-release`` then ``vits16-release-hires``: the same recipe for one H100/H200 (ViT-S/16 with 6
  blocks, so the fp16 encoder stays under 25 MB; bf16, 256 images a step, 14 data workers; 800 steps,
  which fit a 165 s slot at the 1682 images/s measured on an H200), ``scripts/train_release_encoder.sh``.
* ``vits14``, ``vitb14``: ViT-S/14 and ViT-B/14 with DINOv2's defaults (heads, losses, schedules,
  crops 224/98 px) and small-batch settings for one GPU (64 images per step, learning rate by
  DINOv2's square-root rule, Sinkhorn-Knopp centring, which DINOv2 uses for its own long runs).

A file holds up to six sections, ``model``, ``loss``, ``schedule``, ``sampler``, ``train``, ``monitor``;
anything missing takes the defaults of :class:`training.ssl.models.ModelConfig` etc.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from training.config import apply_overrides, from_dict, to_dict
from training.errors import MammoInputError
from training.ssl.losses import LossConfig
from training.ssl.models import ModelConfig
from training.sampler.sampler import SamplerConfig
from training.ssl.schedules import ScheduleConfig

PRESETS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class TrainConfig:
    """The run itself (the training loop reads these)."""

    batch_size: int = 64                 # images per step, all processes together
    seed: int = 0
    num_workers: int = 2                 # DataLoader workers per process
    precision: Literal["fp32", "bf16"] = "fp32"   # bf16 autocast on GPUs
    naive_sampler: bool = False          # plain DINOv2 crops (ablation), instead of tissue-aware ones
    log_every: int = 10                  # steps between metrics.jsonl lines
    checkpoint_every: int = 500          # steps between checkpoints
    keep_checkpoints: int = 2            # how many recent checkpoints to keep

    def __post_init__(self) -> None:
        for name in ("batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise MammoInputError(f"train config: {name} must be >= 1")
        if self.seed < 0 or self.num_workers < 0:
            raise MammoInputError("train config: seed and num_workers must be >= 0")


@dataclass(frozen=True)
class MonitorConfig:
    """The learning curve (:mod:`training.evaluate.learning_curve`): the EMA teacher is measured every ``every``
    steps (0: off) and at the end, on the CSVs given by ``--monitor-real``/``--monitor-phantom``, at
    ``resolution`` px on the long side, with view retrieval scored at ``k`` neighbours, on at most
    ``max_images`` images of each CSV (whole patients). It changes no weight, so a run may be resumed
    with other monitor settings."""

    every: int = 0
    resolution: int = 448
    k: int = 5
    max_images: int = 120

    def __post_init__(self) -> None:
        if self.every < 0 or self.k < 1 or self.max_images < 1 or self.resolution < 16:
            raise MammoInputError("monitor config: every >= 0 (0 = off), k >= 1, max_images >= 1 and "
                                  "resolution >= 16 px")


@dataclass(frozen=True)
class PretrainConfig:
    """Everything a pretraining run needs, as data."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    name: str = "custom"

    def __post_init__(self) -> None:
        m, s = self.model, self.sampler
        problems = []
        if s.patch_size != m.patch_size:
            problems.append(f"sampler.patch_size {s.patch_size} differs from model.patch_size {m.patch_size}")
        for name in ("global_size", "local_size"):
            size = getattr(s, name)
            if size % m.patch_size:
                problems.append(f"sampler.{name} {size} is not a multiple of model.patch_size {m.patch_size}")
        if s.n_global < 1 or s.n_global + s.n_local < 2:
            problems.append("the DINO loss needs at least one global crop and two views in all")
        if problems:
            raise MammoInputError("config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PretrainConfig":
        return from_dict(cls, values, "config")


def preset_names() -> list[str]:
    """The presets shipped in ``training/configs``."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> PretrainConfig:
    """A preset name (``cpu-tiny``) or a JSON file path, with ``section.key=value`` overrides applied."""
    path = Path(name_or_path)
    if not path.suffix and (PRESETS_DIR / f"{name_or_path}.json").is_file():
        path = PRESETS_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise MammoInputError(f"config {str(name_or_path)!r} is neither a preset ({', '.join(preset_names())}) "
                              f"nor a JSON file")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MammoInputError(f"config {path.name}: not valid JSON ({exc})") from None
    if not isinstance(values, dict):
        raise MammoInputError(f"config {path.name}: expected a JSON object of sections")
    values.setdefault("name", path.stem)
    return PretrainConfig.from_dict(apply_overrides(values, overrides))
