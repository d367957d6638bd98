"""`mammodino <command>`: the command line of the core library.

Contract (DESIGN.md): every reporting command takes --json and then prints exactly one JSON object
on stdout; bad input exits with status 2 and one line on stderr that says what is wrong, no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any, Callable

from training.errors import MammoInputError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line too."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")



JSON_HELP = "print exactly one JSON object"
QUIET_HELP = "no progress bar on stderr"


def output_options(parser: argparse.ArgumentParser, quiet: bool | str = False, json_help: str = JSON_HELP) -> None:
    """The options every reporting command shares: ``--json`` (one JSON object on stdout, the DESIGN
    contract) and, for commands with a progress bar, ``--quiet``."""
    if quiet:
        parser.add_argument("--quiet", action="store_true", help=QUIET_HELP if quiet is True else quiet)
    parser.add_argument("--json", action="store_true", help=json_help)


def cmd_info(args: argparse.Namespace) -> dict[str, Any]:
    from training.dicom.display import voi_names
    from training.dicom.io import open_image

    image = open_image(args.path)
    report = image.meta.to_json()
    report["voi_choices"] = voi_names(image.meta)
    report["chunks"] = [len(c) for c in image.data.chunks]
    return report


def _print_human(report: dict[str, Any]) -> None:
    width = max(len(k) for k in report)
    for key, value in report.items():
        if key == "windows":
            value = "; ".join(f"{w['center']:g}/{w['width']:g} {w['function']}"
                              + (f" ({w['explanation']})" if w["explanation"] else "") for w in value) or "none"
        elif key == "frame_windows" and value is not None:
            value = f"{len(value)} frames with their own windows"
        print(f"{key:<{width}}  {value}")


def args_info(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a DICOM file (any extension) or a folder holding one series")
    output_options(parser)


def cmd_tissue(args: argparse.Namespace) -> dict[str, Any]:
    import time

    from training.dicom.io import open_image
    from training.tissue import tissue_of

    image = open_image(args.path)
    meta = image.meta
    if args.frame is not None:  # checked, negative counting from the end
        args.frame = image.frame_index(args.frame, label="--frame")
    if meta.is_volume and args.frame is None and args.out:
        raise MammoInputError("--out writes one 2D mask: add --frame I to pick a slice of this DBT volume")
    # The same entry point as the viewer and the sampler (chest-wall side from PatientOrientation).
    start = time.perf_counter()
    if meta.is_volume and args.frame is None:
        result = tissue_of(image)  # decodes one slice at a time
    else:
        pixels = image.frame(args.frame or 0)
        start = time.perf_counter()  # time the segmentation, not the decode
        result = tissue_of(image, args.frame or 0, pixels=pixels)
    report = {"path": str(args.path), **result.to_json(), "frame": args.frame,
              "time_ms": round((time.perf_counter() - start) * 1000, 1)}
    if args.out:
        from PIL import Image  # a matplotlib dependency

        try:
            Image.fromarray(result.mask.view("uint8") * 255).save(args.out, format="PNG")
        except OSError as exc:
            raise MammoInputError(f"--out {args.out}: cannot write the mask ({exc})") from None
        report["out"] = str(args.out)
    return report


def args_tissue(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a DICOM file or a folder holding one series")
    parser.add_argument("--out", help="write the mask as an 8-bit PNG (255 = tissue)")
    parser.add_argument("--frame", type=int, help="slice of a DBT volume (default: every slice, stats only)")
    output_options(parser)


def cmd_sample(args: argparse.Namespace) -> dict[str, Any]:
    from pathlib import Path

    from training.dicom.io import open_image
    from training.sampler.sampler import SamplerConfig, sample_images

    if not 1 <= args.n <= 1000:
        raise MammoInputError(f"--n {args.n}: draw between 1 and 1000 samples")
    if args.seed < 0:
        raise MammoInputError(f"--seed {args.seed}: seeds are non-negative integers")
    config = None
    if args.config:
        try:
            values = json.loads(Path(args.config).read_text())
        except (OSError, ValueError) as exc:
            raise MammoInputError(f"--config {args.config}: not a readable JSON file ({exc})") from None
        if not isinstance(values, dict):
            raise MammoInputError(f"--config {args.config}: expected a JSON object of sampler settings")
        config = SamplerConfig.from_dict(values)
    image = open_image(args.path)
    samples = sample_images(image, range(args.seed, args.seed + args.n), naive=args.naive, config=config,
                            frame=args.frame)
    records = [s.record() for s in samples]
    crops = [{"sample": i, "seed": r["seed"], **c} for i, r in enumerate(records) for c in r["crops"]]
    report = {"path": str(args.path), "kind": image.meta.kind, "image_shape": records[0]["image_shape"],
              "sampler": records[0]["sampler"], "threshold": records[0]["threshold"],
              "patch_threshold": records[0]["patch_threshold"], "seed": args.seed, "n": args.n,
              "fallbacks": sum(r["fallbacks"] for r in records), "crops": crops,
              "samples": [{k: v for k, v in r.items() if k != "crops"} for r in records],
              "config": samples[0].config.to_dict()}
    if args.json:
        return report
    fractions = [c["tissue_fraction"] for c in crops]  # people get a summary, --json the records
    return {"path": report["path"], "sampler": report["sampler"], "threshold": report["threshold"],
            "samples": args.n, "crops": len(crops), "fallbacks": report["fallbacks"],
            "slices": [r["slices"] for r in records] if records[0]["slices"] else None,
            "mean_tissue_fraction": round(sum(fractions) / len(fractions), 3),
            "crops_under_half_tissue": sum(f < 0.5 for f in fractions)}


def args_sample(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a DICOM file or a folder holding one series")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first sample (the k-th uses seed + k)")
    parser.add_argument("--naive", action="store_true", help="plain DINOv2 sampling (no tissue constraint)")
    parser.add_argument("--n", type=int, default=1, help="number of samples (default 1)")
    parser.add_argument("--frame", type=int, help="DBT: anchor slice of the pairs (default: drawn from the seed)")
    parser.add_argument("--config", help="JSON file of sampler settings (training.sampler.sampler.SamplerConfig fields)")
    output_options(parser, json_help="print exactly one JSON object (the QA records)")


def cmd_phantom(args: argparse.Namespace) -> dict[str, Any]:
    from training.phantom.dataset import generate, parse_shape

    shape = parse_shape(args.shape) if args.shape else None
    return generate(args.out, args.kind, args.n, args.seed, density=args.density, lesion=args.lesion,
                    shape=shape, workers=args.workers, progress=not args.quiet, overwrite=args.overwrite)


def args_phantom(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output folder (new or empty): one folder per virtual patient + labels.csv")
    parser.add_argument("--kind", choices=["ffdm", "dbt", "exam"], default="ffdm",
                        help="one FFDM view, one DBT volume or a four-view FFDM exam per item (default ffdm)")
    parser.add_argument("--n", type=int, default=1, help="number of items (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed: item i depends on (seed, i) only")
    parser.add_argument("--density", choices=["A", "B", "C", "D"], help="ACR density (default: drawn per item)")
    parser.add_argument("--lesion", choices=["none", "mass", "calc", "any"], default="any",
                        help="lesion per image or exam (default any: drawn per item, none included)")
    parser.add_argument("--shape", help="ROWSxCOLS of each image, e.g. 1024x832 (default: full size)")
    parser.add_argument("--workers", type=int, help="parallel processes (default: one per CPU, at most N)")
    parser.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty")
    output_options(parser, quiet=True)


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


def cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    from training.evaluate.heads.loop import FinetuneConfig
    from training.evaluate.heads.classify import finetune

    config = FinetuneConfig(mode=args.mode, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            val_fraction=args.val_fraction, patience=args.patience, resolution=args.resolution,
                            device=args.device, seed=args.seed, lesion_threshold=args.lesion_threshold)
    command = ["mammodino", "finetune"] + [part for key, value in sorted(vars(args).items())
                                           if value is not None and key not in ("command", "json", "quiet")
                                           for part in (f"--{key.replace('_', '-')}", str(value))]
    report = finetune(args.checkpoint, args.labels, args.target, args.out, config, data=args.data, group=args.group,
                      command=command, progress=not args.quiet)
    if report["status"] == "cancelled":
        saved = f"saved the best epoch to {report['checkpoint']}" if report["checkpoint"] else "nothing trained yet"
        print(f"mammodino finetune: SIGTERM: {saved}", file=sys.stderr)
    return report


def args_finetune(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="encoder: a .safetensors checkpoint or run folder, random:ARCH[/PATCH] "
                        "(default: the demo encoder)")
    parser.add_argument("--labels", required=True, help="labels CSV (path column relative to the CSV)")
    parser.add_argument("--target", required=True, help="a categorical column (density, birads, lesion, "
                        "lesion_type...); lesion_mask (masks) or lesions (boxes) train the lesion heatmap head")
    parser.add_argument("--out", required=True, help="new run folder: metrics.jsonl and checkpoints/last.safetensors")
    parser.add_argument("--data", help="folder the CSV's paths are relative to (default: the CSV's folder)")
    parser.add_argument("--group", help="column that keeps a patient on one side of the split (default: patient_id "
                        "when the CSV has it)")
    parser.add_argument("--mode", choices=["linear", "full"], default="linear",
                        help="linear: frozen backbone (default); full: the backbone is trained too")
    parser.add_argument("--epochs", type=int, default=100, help="most epochs (default 100)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    parser.add_argument("--lr", type=float, help="head learning rate (default 1e-2 linear, 1e-3 full)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="patients held out for validation (default 0.2)")
    parser.add_argument("--patience", type=int, default=10,
                        help="stop after this many epochs without a lower validation loss (default 10)")
    parser.add_argument("--resolution", type=int, help="long side in pixels (default: the encoder's)")
    parser.add_argument("--lesion-threshold", type=float, default=0.25,
                        help="lesion heatmap: lesion fraction that makes a patch a lesion patch (default 0.25)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto")
    parser.add_argument("--seed", type=int, default=0, help="split, initialisation and shuffling seed")
    output_options(parser, quiet=True)


def cmd_infer(args: argparse.Namespace) -> dict[str, Any]:
    from training.evaluate.export import infer_command

    report = infer_command(args.path, args.checkpoint, args.out, frame=args.frame, all_slices=args.all_slices,
                           resolution=args.resolution, rollout=args.rollout)
    if args.json:
        return report
    return {"path": report["path"], "encoder": report["encoder"]["source"], "predictions": report["predictions"],
            "attention_in_tissue": report["attention_in_tissue"], "tissue_share": report["tissue_share"],
            "files": f"{len(report['files'])} in {report['out']}", "time_s": report["time_s"]}


def args_infer(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a DICOM file or a folder holding one series")
    parser.add_argument("--checkpoint", help="encoder: a .safetensors checkpoint or run folder, random:ARCH[/PATCH] "
                        "(default: the demo encoder)")
    parser.add_argument("--out", required=True, help="folder for the PNG overlays, NPY maps and predictions.json")
    slices = parser.add_mutually_exclusive_group()
    slices.add_argument("--frame", type=int, help="slice of a DBT volume (default: the middle one)")
    slices.add_argument("--all-slices", action="store_true", help="every slice of a DBT volume (files prefixed sliceNNN_)")
    parser.add_argument("--resolution", type=int, help="long side of the encoder's input in pixels (default: the encoder's)")
    parser.add_argument("--rollout", action="store_true", help="attention rollout over all layers (default: the last layer)")
    output_options(parser)


def _encoder_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the commands that compute frozen features (probe, embed)."""
    parser.add_argument("--checkpoint", help="encoder: a .safetensors checkpoint or run folder, random:ARCH[/PATCH] "
                        "(the random-init baseline), a DINOv2/RAD-DINO weights file (default: the demo encoder)")
    parser.add_argument("--resolution", type=int, help="long side of the breast region in pixels (default: the encoder's)")
    parser.add_argument("--slices", type=int, default=8, help="DBT: mean of up to this many evenly spaced slices (default 8)")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--cache", help="feature cache folder (default $MAMMODINO_CACHE or ~/.cache/mammodino/features)")
    cache.add_argument("--no-cache", action="store_true", help="compute every feature, store nothing")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto")
    output_options(parser, quiet=True)


def _feature_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"checkpoint": args.checkpoint, "resolution": args.resolution, "max_slices": args.slices,
            "cache": False if args.no_cache else (args.cache or True),
            "device": None if args.device == "auto" else args.device, "progress": not args.quiet}


def cmd_probe(args: argparse.Namespace) -> dict[str, Any]:
    from training.evaluate.probe import run_probe

    report = run_probe(args.labels, args.target, data=args.data, group=args.group, folds=args.folds, seed=args.seed,
                       n_boot=args.boot, **_feature_options(args))
    if args.json:
        return report
    summary = {key: report[key] for key in ("target", "n", "classes", "counts", "folds")}
    for name in ("auroc", "balanced_accuracy", "macro_f1"):
        low, high = report[name]["ci95"]
        summary[name] = f"{report[name]['value']:.3f} (95% CI {low:.3f}-{high:.3f})" if low is not None else \
            f"{report[name]['value']:.3f}"
    return {**summary, "encoder": report["encoder"]["source"], "seconds": report["seconds"],
            "notes": "; ".join(report["notes"]) or "none"}


def args_probe(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", required=True, help="labels CSV (path column relative to the CSV or --data)")
    parser.add_argument("--target", required=True, help="the column to predict (density, lesion, lesion_type, birads...)")
    parser.add_argument("--data", help="folder the CSV's paths are relative to (default: the CSV's folder)")
    parser.add_argument("--group", help="column that keeps a patient in one fold, e.g. patient_id (default: none)")
    parser.add_argument("--folds", type=int, default=5, help="outer cross-validation folds (default 5; fewer when a "
                        "class has fewer patients)")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap draws for the 95%% intervals (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="folds and bootstrap seed")
    _encoder_arguments(parser)


def cmd_embed(args: argparse.Namespace) -> dict[str, Any]:
    from training.evaluate.retrieval import run_embed

    report = run_embed(args.data, args.out, labels=args.labels, targets=args.target or [], group=args.group,
                       query=args.query, k=args.k, **_feature_options(args))
    if args.json:
        return report
    summary = {key: report[key] for key in ("out", "n", "dim")}
    summary["encoder"] = report["encoder"]["source"]
    for target, result in report.get("precision_at_k", {}).items():
        summary[f"precision@{result['k']} {target}"] = f"{result['value']:.3f} (chance {result['chance']:.3f})"
    for item in report.get("query", {}).get("neighbours", []):
        summary[f"neighbour {item['rank']}"] = f"{item['path']} (cosine distance {item['distance']:.4f})"
    return summary


def args_embed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="a folder (every image in it) or a labels CSV (its rows)")
    parser.add_argument("--out", required=True, help="embeddings file (.npz: vectors, paths, encoder)")
    parser.add_argument("--query", help="an image: list its --k most similar cases in --data")
    parser.add_argument("--k", type=int, default=5, help="neighbours for --query and precision@k (default 5)")
    parser.add_argument("--labels", help="labels CSV whose paths are relative to the --data folder")
    parser.add_argument("--target", action="append", help="label column for precision@k (repeatable)")
    parser.add_argument("--group", help="column whose equal values (a patient) are never counted as neighbours")
    _encoder_arguments(parser)


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


# name -> (run, add_arguments, one-line help). Each command imports what it needs inside `run`, so
# that `mammodino info` never pays for torch or scikit-image.
COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], dict[str, Any]],
                          Callable[[argparse.ArgumentParser], None], str]] = {
    "info": (cmd_info, args_info,
             "print what a DICOM file or series folder holds (kind, shape, spacing, view, windows)"),
    "tissue": (cmd_tissue, args_tissue,
               "segment the breast tissue: fraction, area, bounding box, chest-wall side; --out mask.png"),
    "sample": (cmd_sample, args_sample,
               "draw tissue-aware (or --naive) multi-crop samples; --json prints their QA records"),
    "phantom": (cmd_phantom, args_phantom,
                "simulate FFDM images, DBT volumes or four-view exams as DICOM with masks and labels.csv"),
    "pretrain": (cmd_pretrain, args_pretrain,
                 "MammoDINO self-supervised pretraining: metrics.jsonl and safetensors checkpoints in --out"),
    "monitor": (cmd_monitor, args_monitor,
                "learning-curve measures of an encoder: same-breast view retrieval, attention in tissue, "
                "phantom probes"),
    "cache": (cmd_cache, args_cache,
              "build or update a pretraining preprocessing cache (downsampled arrays + tissue masks) with dask"),
    "finetune": (cmd_finetune, args_finetune,
                 "train a named classification head (or the lesion heatmap) on an encoder; checkpoint in --out"),
    "infer": (cmd_infer, args_infer,
              "attention maps, feature PCA and predictions of an encoder on one image: PNG, NPY and JSON in --out"),
    "probe": (cmd_probe, args_probe,
              "linear probe of frozen features: patient-grouped cross-validated AUROC, balanced accuracy, macro-F1"),
    "embed": (cmd_embed, args_embed,
              "embeddings of a folder or labels CSV (.npz); similar cases of --query; precision@k per --target"),
    "corpus": (cmd_corpus, args_corpus,
               "manifest CSVs over every real collection + phantoms: pretrain/held-out/bench splits by patient"),
}


class _OptionRecorder:
    """Takes a command's ``add_argument`` calls in place of a parser, to list its options through
    the same functions that build the parser (argparse keeps its own list private)."""

    def __init__(self) -> None:
        self.options: set[str] = {"-h", "--help"}

    def add_argument(self, *flags: str, **_: Any) -> None:
        self.options.update(flag for flag in flags if flag.startswith("-"))

    def add_mutually_exclusive_group(self, **_: Any) -> "_OptionRecorder":
        return self


def command_options(name: str) -> frozenset[str]:
    """The options ``mammodino NAME`` accepts (the jobs widget offers only these)."""
    if name not in COMMANDS:
        raise MammoInputError(f"this installation has no `mammodino {name}` command")
    recorder = _OptionRecorder()
    COMMANDS[name][1](recorder)  # type: ignore[arg-type]
    return frozenset(recorder.options)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mammodino", description="MammoDINO: mammography I/O and self-supervised encoders")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (_, add_arguments, help_text) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = COMMANDS[args.command][0]
    # pydicom warns (several lines each) about every malformed value it meets; held here so that bad
    # input still gives exactly one line on stderr, and shown one line each when the command succeeds.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            report = command(args)
        except MammoInputError as exc:
            print(f"mammodino {args.command}: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
    for message in dict.fromkeys(" ".join(str(w.message).split()) for w in caught):
        print(f"mammodino {args.command}: warning: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps(report, default=str))
    else:
        _print_human(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
