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

from training.arguments import Parser, output_options
from training.errors import MammoInputError
from training.evaluate.commands import (args_embed, args_finetune, args_infer, args_probe, args_zeroshot, cmd_embed,
                                        cmd_finetune, cmd_infer, cmd_probe, cmd_zeroshot)
from training.ssl.commands import (args_cache, args_clip, args_corpus, args_distill, args_monitor, args_pretrain,
                                   cmd_cache, cmd_clip, cmd_corpus, cmd_distill, cmd_monitor, cmd_pretrain)


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


# name -> (run, add_arguments, one-line help). The pretraining and evaluation commands live beside their
# wing (ssl/commands.py, evaluate/commands.py). Each command imports what it needs inside `run`, so
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
    "distill": (cmd_distill, args_distill, "distil a teacher encoder into a small timm student with supervised heads"),
    "clip": (cmd_clip, args_clip,
             "image-report (Mammo-CLIP) training: a text tower on an encoder, reports from a labels CSV; run in --out"),
    "finetune": (cmd_finetune, args_finetune,
                 "train a named classification head (or the lesion heatmap) on an encoder; checkpoint in --out"),
    "infer": (cmd_infer, args_infer,
              "attention maps, feature PCA and predictions of an encoder on one image: PNG, NPY and JSON in --out"),
    "probe": (cmd_probe, args_probe,
              "linear probe of frozen features: patient-grouped cross-validated AUROC, balanced accuracy, macro-F1"),
    "zeroshot": (cmd_zeroshot, args_zeroshot,
                 "zero-shot classification by prompt similarity (AUROC, balanced accuracy); --curve: probes on 1, 10, 100 "
                 "percent of the labels"),
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
    parser = Parser(prog="mammodino", description="MammoDINO: mammography I/O and self-supervised encoders")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
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
