"""The argparse pieces every `mammodino` command shares: the parser that exits 2 with one line, the
``--json``/``--quiet`` options and the frozen-encoder options. Its own module so that the command
modules of the wings (``ssl/commands.py``, ``evaluate/commands.py``) and ``cli.py``, which registers
them, use one copy without importing each other. Light imports only: ``mammodino info`` loads it."""

from __future__ import annotations

import argparse
from typing import Any


class Parser(argparse.ArgumentParser):
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


ENCODER_HELP = ("encoder: a .safetensors checkpoint or run folder, random:ARCH[/PATCH] (the random-init baseline), "
                "a DINOv2/RAD-DINO weights file (default: the demo encoder)")


def encoder_options(parser: argparse.ArgumentParser, checkpoint_help: str = ENCODER_HELP) -> None:
    """Options of the commands that compute frozen features (probe, embed, zeroshot)."""
    parser.add_argument("--checkpoint", help=checkpoint_help)
    parser.add_argument("--resolution", type=int, help="long side of the breast region in pixels (default: the encoder's)")
    parser.add_argument("--slices", type=int, default=8, help="DBT: mean of up to this many evenly spaced slices (default 8)")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--cache", help="feature cache folder (default $MAMMODINO_CACHE or ~/.cache/mammodino/features)")
    cache.add_argument("--no-cache", action="store_true", help="compute every feature, store nothing")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto")
    output_options(parser, quiet=True)


def feature_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"checkpoint": args.checkpoint, "resolution": args.resolution, "max_slices": args.slices,
            "cache": False if args.no_cache else (args.cache or True),
            "device": None if args.device == "auto" else args.device, "progress": not args.quiet}
