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


# name -> (run, add_arguments, one-line help). Each command imports what it needs inside `run`, so
# that `mammodino info` never pays for torch or scikit-image.
COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], dict[str, Any]],
                          Callable[[argparse.ArgumentParser], None], str]] = {
    "info": (cmd_info, args_info,
             "print what a DICOM file or series folder holds (kind, shape, spacing, view, windows)"),
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
