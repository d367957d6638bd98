"""The `mammodino` commands of the pretraining wing: pretrain, monitor, cache, corpus, distill. Each is a
``cmd_X``/``args_X`` pair registered in ``training/cli.py``'s ``COMMANDS``; heavy imports stay inside
the functions (``mammodino info`` imports this module too)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from training.arguments import output_options
from training.errors import MammoInputError


def cmd_pretrain(args: argparse.Namespace) -> dict[str, Any]:
    from training.ssl.presets import load_config
    from training.ssl.pretrain import TrainingStopped, pretrain

    if args.max_steps is not None and args.max_steps < 0:
        raise MammoInputError(f"--max-steps {args.max_steps}: must be >= 0")
    config = load_config(args.config, args.set or [])
    try:
        report = pretrain(config, args.data, args.out, args.max_steps, args.resume,
                          command=_pretrain_command(args), progress=not args.quiet, device=args.device,
                          init_weights=args.init_weights, cache=False if args.no_cache else args.cache,
                          monitor_real=args.monitor_real, monitor_phantom=args.monitor_phantom,
                          init_from=args.init_from, time_limit=args.time_limit)
    except TrainingStopped as exc:
        print(f"mammodino pretrain: stopped: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    if report["rank"] != 0:  # under torchrun only rank 0 reports: one JSON object, one message
        raise SystemExit(0)
    if report["terminated"]:
        print(f"mammodino pretrain: SIGTERM: saved step {report['step']} to {report['checkpoint']}; "
              f"continue with --resume", file=sys.stderr)
    elif report["time_limited"]:
        print(f"mammodino pretrain: --time-limit {args.time_limit:g} s reached: saved step {report['step']} of "
              f"{report['total_steps']} to {report['checkpoint']}; continue with --resume", file=sys.stderr)
    return report


def _pretrain_command(args: argparse.Namespace) -> list[str]:
    """The command line as a checkpoint records it (from the parsed arguments, so calls of main() too)."""
    command = ["mammodino", "pretrain", "--config", str(args.config)]
    command += [part for item in args.set or [] for part in ("--set", item)]
    command += ["--data", str(args.data), "--out", str(args.out)]
    command += ["--max-steps", str(args.max_steps)] if args.max_steps is not None else []
    for flag, value in (("--init-weights", args.init_weights), ("--from", args.init_from), ("--cache", args.cache),
                        ("--device", args.device),
                        ("--monitor-real", args.monitor_real), ("--monitor-phantom", args.monitor_phantom)):
        command += [flag, str(value)] if value is not None else []
    command += ["--no-cache"] if args.no_cache else []
    return command + (["--resume"] if args.resume else [])


def args_pretrain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a preset (cpu-tiny, vits14, vitb14) or a JSON config file")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a setting, e.g. schedule.base_lr=1e-3 (repeatable)")
    parser.add_argument("--max-steps", type=int, help="stop after this step (default: schedule.total_steps)")
    parser.add_argument("--time-limit", type=float, metavar="SECONDS",
                        help="stop at a checkpoint once this many seconds have passed (a fixed wall-clock slot); "
                             "--resume continues")
    parser.add_argument("--data", required=True, help="a folder of DICOM files or a labels CSV with a path column")
    parser.add_argument("--out", required=True, help="run folder: metrics.jsonl and checkpoints/")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--init-weights", metavar="FILE",
                        help="start the backbone from a local DINOv2/RAD-DINO/timm .safetensors file (no download)")
    parser.add_argument("--from", dest="init_from", metavar="RUN_OR_CKPT",
                        help="start student, teacher and centres from an earlier stage's checkpoint (same model; "
                        "e.g. the high-resolution stage: --config cpu-small-hires --from runs/stage1)")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--cache", metavar="DIR", help="preprocessing cache folder: built or updated first, then "
                       "read instead of decoding DICOM on every draw (default: $MAMMODINO_CACHE/frames or "
                       "~/.cache/mammodino/frames; --resume follows the run)")
    cache.add_argument("--no-cache", action="store_true", help="decode and segment every draw (no preprocessing cache)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when available (default)")
    parser.add_argument("--monitor-real", metavar="CSV", help="learning curve: real views (path, patient_id, "
                        "laterality, view), measured every monitor.every steps (--set monitor.every=N)")
    parser.add_argument("--monitor-phantom", metavar="CSV", help="learning curve: a phantom benchmark labels.csv "
                        "(mammodino phantom), measured every monitor.every steps")
    output_options(parser, quiet=True)


def cmd_monitor(args: argparse.Namespace) -> dict[str, Any]:
    from training.evaluate.learning_curve import evaluate

    if args.real is None and args.phantom is None:
        raise MammoInputError("name the data: --real CSV and/or --phantom CSV")
    report = evaluate(args.checkpoint, args.real, args.phantom, resolution=args.resolution, k=args.k,
                      max_images=args.max_images, device=None if args.device == "auto" else args.device)
    if args.json:
        return report
    return {**report["eval"], "encoder": report["encoder"]["source"], "notes": "; ".join(report["notes"]) or "none",
            "eval_s": report["eval_s"], "prepare_s": report["prepare_s"]}


def args_monitor(parser: argparse.ArgumentParser) -> None:
    from training.evaluate.learning_curve import DEFAULT_K, DEFAULT_MAX_IMAGES, DEFAULT_RESOLUTION

    parser.add_argument("--checkpoint", help="encoder: a .safetensors checkpoint or run folder, random:PRESET "
                        "(e.g. random:cpu-tiny, the untrained baseline), a DINOv2 file (default: the demo encoder)")
    parser.add_argument("--real", metavar="CSV", help="real views: path, patient_id, laterality, view")
    parser.add_argument("--phantom", metavar="CSV", help="a phantom benchmark labels.csv (mammodino phantom)")
    parser.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION,
                        help=f"long side in pixels (default {DEFAULT_RESOLUTION}, as monitor.resolution)")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help=f"view retrieval top-k (default {DEFAULT_K})")
    parser.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES,
                        help=f"at most this many images of each CSV, whole patients (default {DEFAULT_MAX_IMAGES})")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto")
    output_options(parser)


def cmd_cache(args: argparse.Namespace) -> dict[str, Any]:
    from training.ssl.cache import CacheSettings, build_cache

    if args.workers is not None and args.workers < 1:
        raise MammoInputError(f"--workers {args.workers}: must be >= 1")
    settings = None
    if args.long_side is not None or args.spacing_mm is not None:
        settings = CacheSettings(long_side=None if args.long_side == 0 else args.long_side or 1024,
                                 spacing_mm=args.spacing_mm)
    return build_cache(args.data, args.out, settings, workers=args.workers, scheduler=args.scheduler,
                       progress=not args.quiet)


def args_cache(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="a folder of DICOM files or a labels CSV with a path column")
    parser.add_argument("--out", required=True, help="cache folder (new, or one to bring up to date)")
    parser.add_argument("--long-side", type=int, help="downsample to at most this many pixels on the long side "
                        "(default 1024; 0: no limit); fixed when the folder is first built")
    parser.add_argument("--spacing-mm", type=float, help="downsample to at least this pixel spacing (default: none)")
    parser.add_argument("--workers", type=int, help="local processes (default: one per CPU)")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="a dask.distributed scheduler, e.g. tcp://host:8786 (needs the distributed package)")
    output_options(parser, quiet=True)


def cmd_corpus(args: argparse.Namespace) -> dict[str, Any]:
    from training.ssl.corpus import build_corpus
    from training.phantom.dataset import parse_shape

    shape = None if args.shape in ("full", "none") else parse_shape(args.shape)
    return build_corpus(args.out, args.data_root, phantoms=args.phantoms, dbt_phantoms=args.dbt_phantoms,
                        bench_phantoms=args.bench_phantoms, shape=shape, heldout_fraction=args.heldout_fraction,
                        seed=args.seed, workers=args.workers, quiet=args.quiet)


def args_corpus(parser: argparse.ArgumentParser) -> None:
    from training.ssl.corpus import (DEFAULT_BENCH_PHANTOMS, DEFAULT_DBT_PHANTOMS, DEFAULT_FRACTION,
        DEFAULT_PHANTOMS, DEFAULT_SHAPE)

    parser.add_argument("--out", required=True, help="corpus folder: corpus/pretrain/heldout/bench/real.csv, "
                        "corpus.json, corpus.log, phantoms/")
    parser.add_argument("--data-root", help="folder of real collections (default: $MAMMODINO_DATA, else "
                        "../shared/data beside the project)")
    parser.add_argument("--phantoms", type=int, default=DEFAULT_PHANTOMS,
                        help=f"four-view FFDM phantom exams for pretraining (default {DEFAULT_PHANTOMS})")
    parser.add_argument("--dbt-phantoms", type=int, default=DEFAULT_DBT_PHANTOMS,
                        help=f"DBT phantom volumes for pretraining (default {DEFAULT_DBT_PHANTOMS})")
    parser.add_argument("--bench-phantoms", type=int, default=DEFAULT_BENCH_PHANTOMS,
                        help=f"four-view phantom exams of the benchmark split (default {DEFAULT_BENCH_PHANTOMS})")
    parser.add_argument("--shape", default="x".join(map(str, DEFAULT_SHAPE)),
                        help="ROWSxCOLS of the phantoms, or 'full' for the simulator's full size "
                             f"(default {'x'.join(map(str, DEFAULT_SHAPE))})")
    parser.add_argument("--heldout-fraction", type=float, default=DEFAULT_FRACTION,
                        help=f"share of the patients of split collections held out (default {DEFAULT_FRACTION})")
    parser.add_argument("--seed", type=int, default=0, help="split seed; phantoms use seed, seed+1 (DBT), seed+2 (bench)")
    parser.add_argument("--workers", type=int, default=1, help="phantom processes (default 1: leaves the other cores free)")
    output_options(parser, quiet="no progress bar and no skipped-file lines on stderr")


def cmd_distill(args: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import fields

    from training.ssl.distill import DistillConfig, distill

    if args.max_steps is not None and args.max_steps < 0:
        raise MammoInputError(f"--max-steps {args.max_steps}: must be >= 0")
    given = {f.name: getattr(args, f.name) for f in fields(DistillConfig) if getattr(args, f.name) is not None}
    command = ["mammodino", "distill"] + [part for key, value in sorted(vars(args).items())
                                          if value not in (None, False) and key not in ("command", "json", "quiet")
                                          for part in (f"--{key.replace('_', '-')}", str(value))]
    report = distill(args.teacher, args.labels, args.out, DistillConfig(**given), resume=args.resume,
                     max_steps=args.max_steps, command=command, progress=not args.quiet)
    if report["terminated"]:
        saved = f"saved step {report['step']} to {report['checkpoint']}; continue with --resume" \
            if report["checkpoint"] else "stopped before the first step; nothing saved"
        print(f"mammodino distill: SIGTERM: {saved}", file=sys.stderr)
    return report


def args_distill(parser: argparse.ArgumentParser) -> None:
    """Defaults live in :class:`training.ssl.distill.DistillConfig` (None here: not given)."""
    parser.add_argument("--teacher", required=True, help="the frozen teacher: an encoder (a MammoDINO checkpoint or "
                        "run folder, an encoder file, 'demo', random:ARCH)")
    parser.add_argument("--student", help="a timm model name, built with random weights (default "
                        "mobilenetv3_small_100; e.g. efficientnet_b0, resnet18, vit_tiny_patch16_224)")
    parser.add_argument("--labels", required=True, help="labels CSV (paths relative to it): a head per column among "
                        "density, lesion, lesion_type, birads; every image is distilled, labelled or not")
    parser.add_argument("--out", required=True, help="run folder: metrics.jsonl and checkpoints/last.safetensors "
                        "(an encoder file)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out (same options)")
    parser.add_argument("--max-steps", type=int, help="stop after this step (default: every epoch)")
    parser.add_argument("--resolution", type=int, help="the student's input, long side in pixels (default 224)")
    parser.add_argument("--teacher-resolution", type=int, help="the teacher's input (default: the teacher's own)")
    parser.add_argument("--epochs", type=int, help="passes over the images (default 30)")
    parser.add_argument("--batch-size", type=int, help="images per step (default 16)")
    parser.add_argument("--lr", type=float, help="AdamW peak learning rate (default 1e-3; cosine to 1%%)")
    parser.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.05)")
    parser.add_argument("--warmup-epochs", type=float, help="linear learning-rate warm-up (default 1)")
    parser.add_argument("--supervised-weight", type=float, help="weight of each head's cross-entropy (default 1)")
    parser.add_argument("--cls-weight", type=float, help="weight of the pooled-feature-to-class-token cosine "
                        "distance (default 1)")
    parser.add_argument("--patch-weight", type=float, help="weight of the patch-token cosine distance (default 1)")
    parser.add_argument("--flip", type=float, help="probability of a mirrored image (default 0.5)")
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: each epoch)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto")
    parser.add_argument("--seed", type=int, help="initialisation, order and flips (default 0)")
    output_options(parser, quiet=True)


def cmd_clip(args: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import fields

    from training.ssl.clip_train import ClipConfig, train_clip

    values = {f.name: getattr(args, f.name) for f in fields(ClipConfig) if getattr(args, f.name, None) is not None}
    config = ClipConfig(**values)
    command = ["mammodino", "clip", *sys.argv[2:]] if sys.argv[1:2] == ["clip"] else None
    report = train_clip(args.data, args.out, config, checkpoint=args.checkpoint, resume=args.resume,
                        max_steps=args.max_steps, templates=args.templates, device=args.device, command=command,
                        progress=not args.quiet)
    if report["terminated"]:
        print(f"mammodino clip: SIGTERM: saved step {report['step']} to {report['checkpoint']}", file=sys.stderr)
    return report


# ClipConfig's defaults, spelled out so that building the parser imports no torch (tests/test_clip.py
# checks that they agree).
CLIP_DEFAULTS = {"steps": 1000, "batch_size": 64, "lr": 5e-4, "warmup_steps": 50, "temperature": 0.07,
                 "report_seeds": 8, "vocab_size": 1000, "width": 256, "depth": 4, "embed_dim": 256, "save_every": 100}


def args_clip(parser: argparse.ArgumentParser) -> None:
    d = argparse.Namespace(**CLIP_DEFAULTS)
    parser.add_argument("--data", required=True, help="labels CSV of the images; their reports are its `report` "
                        "column, else written from its attributes by the report templates")
    parser.add_argument("--out", required=True, help="run folder: metrics.jsonl and checkpoints/ (a new folder, or "
                        "the run's own with --resume)")
    parser.add_argument("--checkpoint", help="image encoder to start from: any encoder the project loads (default: "
                        "the MammoDINO demo encoder)")
    parser.add_argument("--templates", help="report template name or JSON file (default: the one whose columns the "
                        "CSV has; see README 'Reports from attributes')")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--max-steps", type=int, help="stop at this step (default: --steps; may go past it on --resume)")
    parser.add_argument("--steps", type=int, help=f"schedule length in steps (default {d.steps})")
    parser.add_argument("--batch-size", type=int, help=f"image-report pairs per step (default {d.batch_size})")
    parser.add_argument("--lr", type=float, help=f"peak learning rate, cosine after warm-up (default {d.lr:g})")
    parser.add_argument("--warmup-steps", type=int, help=f"default {d.warmup_steps}")
    parser.add_argument("--temperature", type=float, help=f"initial InfoNCE temperature, then learnt (default {d.temperature})")
    parser.add_argument("--train-image", action="store_const", const=True, help="fine-tune the image backbone too "
                        "(a GPU job); default: frozen, its features computed once")
    parser.add_argument("--report-seeds", type=int, help=f"phrasings written per image (default {d.report_seeds})")
    parser.add_argument("--vocab-size", type=int, help=f"WordPiece vocabulary learnt from the reports (default {d.vocab_size})")
    parser.add_argument("--width", type=int, help=f"text encoder width (default {d.width})")
    parser.add_argument("--depth", type=int, help=f"text encoder blocks (default {d.depth})")
    parser.add_argument("--embed-dim", type=int, help=f"shared embedding size (default {d.embed_dim})")
    parser.add_argument("--save-every", type=int, help=f"checkpoint every N steps (default {d.save_every})")
    parser.add_argument("--seed", type=int, help="initialisation and batch order seed (default 0)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto")
    output_options(parser, quiet=True)
