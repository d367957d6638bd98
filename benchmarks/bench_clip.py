"""What an image-report (CLIP) model knows, on phantoms it never saw, against named baselines:

* zero-shot classification (``training.evaluate.zeroshot``) of ``--targets`` (default density,
  lesion, lesion_type): AUROC and balanced accuracy against chance (0.5 and 1/classes);
* the label-efficiency curve (Mammo-CLIP, Ghosh et al. 2024): linear probes on 1%, 10% and 100% of
  the labels, CLIP embeddings against the image encoder's own features (the MammoDINO features the
  CLIP model was built on), mean test AUROC over patient-grouped splits;
* the pointing game (``training.evaluate.attribute_maps.pointing_game``): the share of lesion images
  whose attribute-map peak falls on the lesion, against the encoder's last-layer attention and a
  random peak (exact expectation).

    .venv/bin/python benchmarks/bench_clip.py --labels /path/to/phantom/bench/labels.csv
    .venv/bin/python benchmarks/bench_clip.py --checkpoint RUN_OR_FILE --labels CSV --json

The phantom benchmark set: ``mammodino phantom --kind exam --n 60 --seed 41 --out bench`` (four views
per exam), or the corpus's ``bench.csv`` (``mammodino corpus``). Without ``--checkpoint``: the shipped
demo CLIP model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.errors import MammoInputError  # noqa: E402


def print_report(report: dict) -> None:
    print(f"CLIP model {report['checkpoint']} on {report['labels']}")
    print(f"{'target':<12} {'n':>4} {'AUROC':>7} {'bal.acc':>8} {'chance':>7}   probe AUROC 1% / 10% / 100%: "
          f"CLIP | image encoder")
    for target, r in report["zero_shot"].items():
        curve = r["label_efficiency"]["auroc"]
        cells = [" / ".join("n/a" if by[f]["mean"] is None else f"{by[f]['mean']:.3f}" for f in ("0.01", "0.1", "1.0"))
                 for by in (curve["clip"], curve["image_encoder"])]
        print(f"{target:<12} {r['n']:>4} {r['auroc']:>7.3f} {r['balanced_accuracy']:>8.3f} "
              f"{r['chance']['balanced_accuracy']:>7.3f}   {cells[0]} | {cells[1]}")
    p = report["pointing_game"]
    print(f"pointing game ({p['images']} lesion images): CLIP map {p['clip']:.3f}, attention {p['attention']:.3f}, "
          f"random {p['random']:.3f}")
    for kind, r in p["by_type"].items():
        print(f"  {kind:<5} {r['images']:>3} images: CLIP {r['clip']:.3f}, attention {r['attention']:.3f}, "
              f"random {r['random']:.3f}")
    print(f"{report['seconds']} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="CLIP file or `mammodino clip` run folder (default: the demo)")
    parser.add_argument("--labels", required=True, help="phantom labels CSV (density, lesion, lesion_type, lesion_mask)")
    parser.add_argument("--targets", default="density,lesion,lesion_type", help="comma-separated targets")
    parser.add_argument("--group", default="patient_id", help="patient column for the curve's splits")
    parser.add_argument("--repeats", type=int, default=5, help="grouped splits the curve averages (default 5)")
    parser.add_argument("--max-images", type=int, help="at most this many lesion images in the pointing game")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        from training.evaluate.attribute_maps import evaluate_clip

        report = evaluate_clip(args.checkpoint, args.labels, args.targets.split(","), args.repeats, args.group,
                               args.max_images)
    except MammoInputError as exc:
        print(f"bench_clip: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
