"""`mammodino clip`: train an image-report model (:mod:`training.ssl.clip`) on a labels CSV.

Each image's text is its report: a ``report`` column when the CSV has one, otherwise sentences written
from its attributes by :mod:`training.ssl.reports` (``report_seeds`` phrasings per image, one drawn per
step, so the text side sees the same facts in other words). The loss is
:func:`training.ssl.losses.clip_loss`: symmetric InfoNCE with the views of one breast (``patient_id`` +
``laterality``) as extra positives. The tokenizer is learnt from the reports at the start of a run.

The image encoder is any encoder the project loads (default: the shipped MammoDINO demo). Frozen (the
default), its class token and mean patch token are computed once per image and the text tower, the two
image maps and the temperature are trained on them: minutes on a CPU. ``train_image`` also fine-tunes
the image backbone (a GPU job; one image at a time through the backbone, so images of any aspect keep
their shape). The run folder is the pretraining one: ``metrics.jsonl``, ``checkpoints/step_*.safetensors``
and ``last.safetensors`` (each a whole CLIP file with its optimiser and random state), ``--resume``
continues exactly, and SIGTERM (or a GUI's stop) saves a checkpoint and ends.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from training.checkpoint import load_optimizer_state, load_tensors, optimizer_state, provenance, read_metadata
from training.errors import MammoInputError
from training.labels import read_rows
from training.progress import sigterm_flag
from training.runs import RunFolder
from training.ssl.clip import Clip, ClipHead, clip_metadata, clip_tensors, head_from
from training.ssl.losses import clip_loss
from training.ssl.schedules import cosine
from training.ssl.text import TextConfig, tokenize, train_tokenizer


@dataclass(frozen=True)
class ClipConfig:
    """How an image-report model is trained (``mammodino clip`` options of the same names)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 5e-4
    min_lr: float = 1e-5
    warmup_steps: int = 50
    weight_decay: float = 0.05
    temperature: float = 0.07
    train_image: bool = False
    image_lr_mult: float = 0.1
    resolution: int | None = None
    vocab_size: int = 1000
    width: int = 256
    depth: int = 4
    heads: int = 4
    max_length: int = 64
    embed_dim: int = 256
    report_seeds: int = 8
    save_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        for name in ("steps", "batch_size", "vocab_size", "width", "depth", "heads", "max_length", "embed_dim",
                     "report_seeds", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} {getattr(self, name)}: at least 1")
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                problems.append(f"--{name} {value}: a positive number")
        if self.min_lr < 0 or self.weight_decay < 0 or self.image_lr_mult < 0 or self.warmup_steps < 0:
            problems.append("--min-lr, --weight-decay, --image-lr-mult and --warmup-steps must not be negative")
        if self.width % self.heads:
            problems.append(f"--width {self.width} must be a multiple of --heads {self.heads}")
        if self.batch_size < 2:
            problems.append(f"--batch-size {self.batch_size}: at least 2 (a contrastive batch needs negatives)")
        if problems:
            raise MammoInputError("; ".join(problems))

    def text_config(self, vocab_size: int) -> TextConfig:
        return TextConfig(vocab_size=vocab_size, width=self.width, depth=self.depth, heads=self.heads,
                          max_length=self.max_length, embed_dim=self.embed_dim)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ClipConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class Pairs:
    """Images and their texts: ``paths`` resolved, ``keys`` as the CSV names them, ``texts[i]`` the
    report variants of image i, ``breasts`` an id per image (views of one breast share it)."""

    paths: list[Path]
    keys: list[str]
    texts: list[list[str]]
    breasts: list[int]

    def __len__(self) -> int:
        return len(self.paths)


def read_pairs(csv: str | Path, variants: int = 8, templates: str | Path | None = None) -> Pairs:
    """The image-report pairs of a labels CSV (see the module docstring); one line for any mistake."""
    from training.ssl.reports import reports_for_csv

    csv = Path(csv)
    rows = read_rows(csv, option="--data")
    keys = [row["path"] for row in rows]
    if "report" in rows[0] and templates is None:
        texts = [[row["report"].strip()] for row in rows]
        empty = [k for k, t in zip(keys, texts) if not t[0]]
        if empty:
            raise MammoInputError(f"{csv.name}: the report of {empty[0]} is empty ({len(empty)} rows in all)")
    else:
        by_seed = [{r["path"]: r["report"] for r in reports_for_csv(csv, templates, seed=s)} for s in range(variants)]
        texts = [[variant[key] for variant in by_seed] for key in keys]
        empty = [k for k, t in zip(keys, texts) if not t[0]]
        if empty:
            raise MammoInputError(f"{csv.name}: the templates say nothing about {empty[0]}")
    paths = [csv.parent / key for key in keys]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise MammoInputError(f"{csv.name}: {missing[0]} does not exist ({len(missing)} of {len(paths)} paths)")
    names: dict[str, int] = {}
    breasts = []
    for i, row in enumerate(rows):
        patient, side = (row.get("patient_id") or "").strip(), (row.get("laterality") or "").strip()
        key = f"{patient}/{side}" if patient and side else f"#{i}"
        breasts.append(names.setdefault(key, len(names)))
    if len(paths) < 2:
        raise MammoInputError(f"{csv.name}: image-report training needs at least two images")
    return Pairs(paths, keys, texts, breasts)


@dataclass
class ClipRun:
    """What a running job holds: the image encoder, the head, its optimiser and random stream, the
    per-image inputs (tokens of the frozen encoder, or prepared images) and the step reached."""

    config: ClipConfig
    folder: RunFolder
    clip: Clip
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    pairs: Pairs
    inputs: Any
    step: int
    meta: dict[str, Any]


def _encode_inputs(clip: Clip, pairs: Pairs, config: ClipConfig, stop: Callable[[], bool], progress: bool) -> Any:
    """Frozen: the class token and mean patch token of every image, (N, D) each, from the probes'
    feature cache (a DBT volume: its slice mean). Trained image side: the prepared images (run through
    the backbone at every step; a DBT volume: its middle slice). None when stopped meanwhile."""
    from training.dicom.io import open_image
    from training.evaluate.features import extract_features

    encoder = clip.encoder
    if not config.train_image:
        features = extract_features(encoder, pairs.paths, config.resolution, progress=progress).features
        cls, mean = torch.from_numpy(features).to(clip.device).chunk(2, dim=1)
        return cls.contiguous(), mean.contiguous()
    from tqdm import tqdm

    prepared = []
    for path in tqdm(pairs.paths, desc="images", unit="image", file=sys.stderr, disable=not progress):
        if stop():
            return None
        prepared.append(encoder.prepare_image(open_image(path), resolution=config.resolution))
    return prepared


def _parameter_groups(clip: Clip, config: ClipConfig) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in clip.head.named_parameters():
        (no_decay if param.ndim < 2 or name == "log_scale" or name.endswith("positions") else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay, "lr_mult": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0}]
    backbone = list(clip.encoder.backbone.parameters())
    for param in backbone:
        param.requires_grad_(config.train_image)
    if config.train_image:
        groups.append({"params": backbone, "weight_decay": config.weight_decay, "lr_mult": config.image_lr_mult})
    return groups


def _data_digest(pairs: Pairs) -> str:
    digest = hashlib.sha256()
    for key, texts in zip(pairs.keys, pairs.texts):
        digest.update(json.dumps([key, texts]).encode())
    return digest.hexdigest()


def build_clip_run(data: str | Path, out: str | Path, config: ClipConfig, checkpoint: str | None = None,
                   resume: bool = False, templates: str | Path | None = None, device: str = "cpu",
                   command: Sequence[str] | None = None) -> ClipRun:
    """A new run in a fresh ``out`` (image encoder ``checkpoint``, default the demo), or the run in
    ``out`` at its last checkpoint (``resume``: with the config it was started with)."""
    from training.evaluate.encoder import encoder_from_state, load_encoder

    folder = RunFolder(out)
    if resume:
        last = folder.last_checkpoint
        if not last.is_file():
            raise MammoInputError(f"--resume: {folder.path} has no checkpoints/last.safetensors to resume from")
        meta = read_metadata(last)
        if "clip_train" not in meta:
            raise MammoInputError(f"--resume: {last} is not a `mammodino clip` checkpoint")
        config = ClipConfig.from_dict(meta["clip_train"])  # the run's own; --max-steps may go further
        pairs = read_pairs(data, config.report_seeds, templates)
        if _data_digest(pairs) != meta.get("data_digest"):
            raise MammoInputError(f"--resume: {data} is not the data this run was trained on (its images or "
                                  f"reports differ); start a new run")
        tensors, _ = load_tensors(last)
        head, tokenizer = head_from(meta, tensors, last)
        clip = Clip(encoder_from_state(meta, tensors, last), head, tokenizer, source=str(last)).to(device)
        step = int(meta["step"])
    else:
        folder = RunFolder.fresh(out)
        pairs = read_pairs(data, config.report_seeds, templates)
        encoder = load_encoder(checkpoint).to(device)
        tokenizer = train_tokenizer((t for variants in pairs.texts for t in variants), config.vocab_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            head = ClipHead(encoder.embed_dim, config.text_config(tokenizer.get_vocab_size()), config.temperature)
        clip = Clip(encoder, head, tokenizer, source=str(folder.path)).to(device)
        meta = {"provenance": provenance(list(command) if command else None, str(data)),
                "image_encoder": encoder.source, "data_digest": _data_digest(pairs)}
        step = 0
    optimizer = torch.optim.AdamW(_parameter_groups(clip, config), lr=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    if resume:
        load_optimizer_state(optimizer, tensors, meta["optimizer"])
        generator.set_state(tensors["rng.generator"])
        folder.keep_metrics_through(step)  # lines logged after the checkpoint are logged again
    meta = {k: v for k, v in meta.items() if k in ("provenance", "image_encoder", "data_digest")}
    return ClipRun(config, folder, clip, optimizer, generator, pairs, None, step, meta)


def save_clip_run(run: ClipRun, metrics: dict[str, Any] | None) -> Path:
    """The run at its step as a CLIP file with optimiser and random state; ``last`` points at it."""
    from training.evaluate.encoder import save_encoder

    opt_tensors, opt_meta = optimizer_state(run.optimizer)
    extra = {**clip_tensors(run.clip.head), **opt_tensors, "rng.generator": run.generator.get_state()}
    meta = {**run.meta, "step": run.step, "metrics": metrics, "optimizer": opt_meta,
            "clip_train": asdict(run.config),
            "clip": clip_metadata(run.clip.head, run.clip.tokenizer, {"image_encoder": run.meta.get("image_encoder")})}
    path = save_encoder(run.folder.step_checkpoint(run.step), run.clip.encoder, meta, extra=extra)
    run.folder.link_last(path)
    for old in run.folder.step_checkpoints()[:-run.config.keep_checkpoints]:
        old.unlink()
    return path


def _image_batch(run: ClipRun, index: torch.Tensor) -> torch.Tensor:
    head = run.clip.head
    if not run.config.train_image:
        cls, mean = run.inputs
        return head.image_embedding(cls[index], mean[index])
    backbone = run.clip.encoder.backbone
    embeddings = []
    for i in index.tolist():  # one image at a time: each keeps its own aspect ratio
        pixels = torch.from_numpy(run.inputs[i].pixels)[None, None].to(run.clip.device)
        if torch.rand((), generator=run.generator) < 0.5:
            pixels = pixels.flip(-1)
        tokens = backbone.forward_tokens(pixels)
        embeddings.append(head.image_embedding(tokens.cls, tokens.patches.mean(1)))
    return torch.cat(embeddings)


def clip_steps(run: ClipRun, end: int, should_stop: Callable[[], bool]):
    """Train from ``run.step`` to ``end``, yielding each step's metrics; checkpoints every ``save_every``
    steps, at the end, and when ``should_stop()`` says so after a step."""
    config, head = run.config, run.clip.head
    n = len(run.pairs)
    breasts = torch.tensor(run.pairs.breasts, device=run.clip.device)
    batch = min(config.batch_size, n)
    head.train()
    run.clip.encoder.backbone.train(config.train_image)
    metrics: dict[str, Any] = {}
    while run.step < end:
        tick = time.perf_counter()
        lr = cosine(run.step, config.lr, config.min_lr, config.steps, config.warmup_steps)
        for group in run.optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        index = torch.randperm(n, generator=run.generator)[:batch]
        variants = torch.randint(len(run.pairs.texts[0]), (batch,), generator=run.generator)
        texts = [run.pairs.texts[i][v % len(run.pairs.texts[i])] for i, v in zip(index.tolist(), variants.tolist())]
        ids, padding = tokenize(run.clip.tokenizer, texts, head.text_config.max_length)
        images = _image_batch(run, index.to(run.clip.device))
        words = head.text_embedding(ids.to(run.clip.device), padding.to(run.clip.device))
        ids_b = breasts[index.to(run.clip.device)]
        loss = clip_loss(images, words, 1.0 / head.scale, ids_b)
        if not torch.isfinite(loss):
            raise MammoInputError(f"step {run.step}: the loss is not finite; lower --lr (the last good "
                                  f"checkpoint is kept)")
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.step += 1
        with torch.no_grad():
            sims = torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(words, dim=-1).T
            hit = ids_b[sims.argmax(1)] == ids_b  # the best text is one of the image's own breast
        seconds = time.perf_counter() - tick
        metrics = {"step": run.step, "epoch": run.step * batch / n, "loss": float(loss.detach()), "lr": lr,
                   "temperature": float(1.0 / head.scale.detach()), "batch_top1": float(hit.float().mean()),
                   "images_per_s": batch / max(seconds, 1e-9)}
        run.folder.append_metrics(metrics)
        stop = should_stop()
        if stop or run.step % config.save_every == 0 or run.step == end:
            save_clip_run(run, metrics)
        yield metrics
        if stop:
            return


def train_clip(data: str | Path, out: str | Path, config: ClipConfig = ClipConfig(), checkpoint: str | None = None,
               resume: bool = False, max_steps: int | None = None, templates: str | Path | None = None,
               device: str = "auto", command: Sequence[str] | None = None, progress: bool = True,
               should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run (or resume) `mammodino clip` to ``max_steps`` (default ``config.steps``); returns a summary."""
    from tqdm import tqdm

    from training.evaluate.heads.loop import torch_device

    with sigterm_flag() as terminated:
        stop = lambda: terminated() or bool(should_stop and should_stop())  # noqa: E731
        run = build_clip_run(data, out, config, checkpoint, resume, templates, torch_device(device), command)
        end = run.config.steps if max_steps is None else max_steps
        if end < run.step:
            raise MammoInputError(f"--max-steps {end} is behind the run's step {run.step}")
        start = run.step
        run.inputs = _encode_inputs(run.clip, run.pairs, run.config, stop, progress)
        last: dict[str, Any] = {}
        if run.inputs is not None:
            with tqdm(total=end, initial=start, unit="step", file=sys.stderr, disable=not progress,
                      dynamic_ncols=True) as bar:
                for last in clip_steps(run, end, stop):
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.3f}")
    return {"out": str(run.folder.path), "start_step": start, "step": run.step, "total_steps": run.config.steps,
            "terminated": terminated(), "images": len(run.pairs), "image_encoder": run.meta.get("image_encoder"),
            "vocabulary": run.clip.tokenizer.get_vocab_size(), "train_image": run.config.train_image,
            "checkpoint": str(run.folder.last_checkpoint) if run.folder.last_checkpoint.exists() else None,
            "metrics": last}
