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

from .errors import MammoInputError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line too."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def cmd_info(args: argparse.Namespace) -> dict[str, Any]:
    from .display import voi_names
    from .io import open_image

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
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")


def cmd_tissue(args: argparse.Namespace) -> dict[str, Any]:
    import time

    from .io import open_image
    from .tissue import segment_tissue, segment_volume

    image = open_image(args.path)
    meta = image.meta
    if args.frame is not None and not meta.is_volume and args.frame != 0:
        raise MammoInputError(f"--frame {args.frame}: {args.path} is a 2D image (frame 0 only)")
    if meta.is_volume and args.frame is None and args.out:
        raise MammoInputError("--out writes one 2D mask: add --frame I to pick a slice of this DBT volume")
    n = image.data.shape[0] if meta.is_volume else 1
    if args.frame is not None and not 0 <= args.frame < n:
        raise MammoInputError(f"--frame {args.frame}: the image has frames 0..{n - 1}")
    spacing = tuple(meta.spacing_mm[-2:]) if meta.spacing_mm else None
    options = dict(spacing_mm=spacing, photometric=meta.photometric, view=meta.view)
    start = time.perf_counter()
    if meta.is_volume and args.frame is None:
        result = segment_volume(image.data, **options)  # decodes one slice at a time
    else:
        pixels = image.frame(args.frame or 0)
        start = time.perf_counter()  # time the segmentation, not the decode
        result = segment_tissue(pixels, **options)
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
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")


def cmd_sample(args: argparse.Namespace) -> dict[str, Any]:
    from pathlib import Path

    from .io import open_image
    from .sampler import SamplerConfig, sample_images

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
    parser.add_argument("--config", help="JSON file of sampler settings (training.sampler.SamplerConfig fields)")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object (the QA records)")


def cmd_phantom(args: argparse.Namespace) -> dict[str, Any]:
    from .phantom.writer import generate, parse_shape

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
    parser.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")


def cmd_pretrain(args: argparse.Namespace) -> dict[str, Any]:
    from .configs import load_config
    from .pretrain import TrainingStopped, pretrain

    if args.max_steps is not None and args.max_steps < 0:
        raise MammoInputError(f"--max-steps {args.max_steps}: must be >= 0")
    config = load_config(args.config, args.set or [])
    try:
        report = pretrain(config, args.data, args.out, args.max_steps, args.resume,
                          command=_pretrain_command(args), progress=not args.quiet)
    except TrainingStopped as exc:
        print(f"mammodino pretrain: stopped: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    if report["rank"] != 0:  # under torchrun only rank 0 reports: one JSON object, one message
        raise SystemExit(0)
    if report["terminated"]:
        print(f"mammodino pretrain: SIGTERM: saved step {report['step']} to {report['checkpoint']}; "
              f"continue with --resume", file=sys.stderr)
    return report


def _pretrain_command(args: argparse.Namespace) -> list[str]:
    """The command line as a checkpoint records it (from the parsed arguments, so calls of main() too)."""
    command = ["mammodino", "pretrain", "--config", str(args.config)]
    command += [part for item in args.set or [] for part in ("--set", item)]
    command += ["--data", str(args.data), "--out", str(args.out)]
    command += ["--max-steps", str(args.max_steps)] if args.max_steps is not None else []
    return command + (["--resume"] if args.resume else [])


def args_pretrain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a preset (cpu-tiny, vits14, vitb14) or a JSON config file")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a setting, e.g. schedule.base_lr=1e-3 (repeatable)")
    parser.add_argument("--max-steps", type=int, help="stop after this step (default: schedule.total_steps)")
    parser.add_argument("--data", required=True, help="a folder of DICOM files or a labels CSV with a path column")
    parser.add_argument("--out", required=True, help="run folder: metrics.jsonl and checkpoints/")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")


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
}


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
