"""Turn a finished `mammodino clip` run into the shipped demo CLIP model and its model card, with the
project's own commands only:

    .venv/bin/python scripts/make_clip_demo.py --run WORK/clip --bench WORK/bench/labels.csv \\
        --out training/weights/mammodino-clip-demo.safetensors

1. The run's last checkpoint: the frozen image encoder, the text tower and the tokenizer (no optimiser).
2. The evaluation on the phantom benchmark, which the run never saw (``training.evaluate.attribute_maps.evaluate_clip``):
   zero-shot density, lesion and lesion type against chance; linear probes on 1%, 10% and 100% of the
   labels, CLIP embeddings against the image encoder's own features; the pointing game of the attribute
   maps against attention and a random peak.
3. fp16 safetensors with all of it as JSON metadata, and the card written from that metadata
   (``training.evaluate.model_card.clip_card``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.checkpoint import read_metadata  # noqa: E402
from training.evaluate.encoder import save_encoder  # noqa: E402
from training.evaluate.model_card import clip_card  # noqa: E402
from training.evaluate.attribute_maps import evaluate_clip  # noqa: E402
from training.runs import RunFolder  # noqa: E402
from training.ssl.clip import clip_metadata, clip_tensors, load_clip  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="the `mammodino clip` run folder")
    parser.add_argument("--bench", required=True, help="phantom benchmark labels CSV (never trained on)")
    parser.add_argument("--out", type=Path, required=True, help="the shipped .safetensors file")
    parser.add_argument("--name", default="mammodino-clip-demo")
    parser.add_argument("--repeats", type=int, default=5, help="splits of the label-efficiency curve")
    args = parser.parse_args()
    last = RunFolder(args.run).last_checkpoint
    run_meta = read_metadata(last)
    clip = load_clip(args.run)
    evaluation = evaluate_clip(str(args.run), args.bench, repeats=args.repeats)
    rows = [json.loads(line) for line in RunFolder(args.run).metrics.read_text().splitlines() if line.strip()]
    train = run_meta["clip_train"]
    meta = {
        "name": args.name,
        "description": "An image-report model (Mammo-CLIP style) trained by this project: a text tower learnt "
                       "on reports written from phantom attributes, over the frozen MammoDINO demo encoder.",
        "parameters": {"image": sum(p.numel() for p in clip.encoder.backbone.parameters()),
                       "text": sum(p.numel() for p in clip.head.parameters())},
        "training": {"command": run_meta["provenance"]["command"], "data": run_meta["provenance"]["data"],
                     "git_commit": run_meta["provenance"]["git_commit"], "config": train, "steps": run_meta["step"],
                     "loss_first_last": [rows[0]["loss"], rows[-1]["loss"]], "image_encoder": run_meta["image_encoder"],
                     "images_per_s": sorted(r["images_per_s"] for r in rows)[len(rows) // 2]},
        "evaluation": evaluation,
        "limitations": [
            "Its reports are sentences written from phantom ground truth (training/ssl/report_templates/phantom.json): "
            "it knows the templates' vocabulary (density, mass, calcifications, shape, size, quadrant, depth, side, "
            "view) and nothing a real radiology report says beyond it.",
            "It was trained and evaluated on simulated phantoms only; on real mammograms its zero-shot answers are "
            "untested and should not be trusted.",
            "The image encoder is the small demo encoder, frozen: the text side can only use what its features hold.",
        ],
        "remake": " ".join(["python", *sys.argv]),
        "clip": clip_metadata(clip.head, clip.tokenizer, {"image_encoder": run_meta["image_encoder"],
                                                          "vocabulary": clip.tokenizer.get_vocab_size()}),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_encoder(args.out, clip.encoder, meta, dtype=torch.float16, extra=clip_tensors(clip.head))
    card = args.out.with_suffix(".md")
    card.write_text(clip_card(read_metadata(args.out), args.out), encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) and {card}", file=sys.stderr)


if __name__ == "__main__":
    main()
