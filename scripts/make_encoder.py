"""Turn a finished MammoDINO pretraining (one or more stages) into a shipped encoder file and its model
card, with the project's own commands only. The demo encoder and the GPU release encoder are both made
this way (``scripts/train_release_encoder.sh`` calls it last):

    .venv/bin/python scripts/make_encoder.py --stages WORK/stage1 WORK/stage2 --corpus WORK/corpus \\
        --out training/weights/mammodino-demo.safetensors --name mammodino-demo

1. The EMA teacher's backbone of the last stage's last checkpoint (what DINOv2 evaluates).
2. Linear task heads fitted on the corpus's *training* phantoms (``mammodino finetune --mode linear``):
   density (A-D), lesion (0/1) and the lesion heatmap from the phantom lesion masks.
3. The evaluation, for this encoder and for a random-init encoder of the same architecture, at the
   encoder's resolution: linear probes (``mammodino probe``: patient-grouped 5-fold logistic regression,
   bootstrap 95% intervals) on the phantom benchmark (density, lesion, lesion type) and on the real
   held-out split (DDSM density quartile, normal vs abnormal); the learning-curve measures
   (``training.evaluate.learning_curve``: same-breast view retrieval, attention in tissue over the uniform share,
   lesion patch AUROC) on the real views and the phantom benchmark, and attention on the real CBIS-DDSM
   views alone.
4. Throughput of the first stage: median images/s, the share of the step spent waiting for data, model
   FLOPs per image and model-FLOPs utilisation (``training.ssl.throughput``; None on a CPU).
5. fp16 safetensors with all of it as JSON metadata, and the model card written from that metadata
   (``training.evaluate.model_card``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.checkpoint import read_metadata  # noqa: E402
from training.ssl.presets import PretrainConfig  # noqa: E402
from training.evaluate.encoder import load_encoder, save_encoder  # noqa: E402
from training.errors import MammoInputError  # noqa: E402
from training.evaluate.heads.loop import FinetuneConfig  # noqa: E402
from training.evaluate.heads.classify import finetune  # noqa: E402
from training.evaluate.benchmark import LABELS, RESOLUTION, chance_levels, measures, subset  # noqa: E402
from training.evaluate.model_card import CURVE, model_card  # noqa: E402
from training.runs import RunFolder  # noqa: E402
from training.ssl.pretrain import export_state  # noqa: E402
from training.ssl.throughput import flops_per_image, mfu, peak_flops_of  # noqa: E402

HEADS = ("density", "lesion", "lesion_mask")


def stage_record(run: Path) -> dict[str, Any]:
    folder = RunFolder(run)
    meta = read_metadata(folder.last_checkpoint)
    rows = [json.loads(line) for line in folder.metrics.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("kind") != "eval"]
    evals = [{"step": r["step"], **r["eval"]} for r in rows if r.get("kind") == "eval"]
    every = max(1, len(train) // 40)
    return {"name": run.name, "run": str(run), "command": meta.get("command"), "config": meta["config"],
            "steps": meta["step"], "data": meta.get("data"), "git_commit": meta.get("git_commit"),
            "init_from": meta.get("init_from"), "device": meta.get("device"), "created": meta.get("created"),
            "metrics": train[::every] + train[-1:], "eval": evals, "all_metrics": train}


def throughput(stage: dict[str, Any], hardware: str | None) -> dict[str, Any]:
    rows = stage.pop("all_metrics")
    steady = [r for r in rows if r["step"] > 1]  # step 1 pays for start-up
    config = PretrainConfig.from_dict(stage["config"])
    per_image = flops_per_image(config)
    rate = statistics.median(r["images_per_s"] for r in steady) if steady else None
    waited = sum(r.get("data_wait_s", 0.0) for r in steady)
    spent = sum(r.get("step_s", 0.0) for r in steady)
    device = hardware or stage.get("device") or "unrecorded"
    peak = peak_flops_of(str(device), config.train.precision)  # from the recorded name: MFU anywhere
    return {"device": device, "images_per_s": rate, "data_wait_share": waited / spent if spent else None,
            "flops_per_image": per_image, "model_tflops_per_s": per_image * rate / 1e12 if rate else None,
            "mfu": mfu(per_image, rate or 0.0, peak), "precision": config.train.precision}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=Path, nargs="+", required=True, help="the run folders, in order")
    parser.add_argument("--corpus", type=Path, required=True, help="the `mammodino corpus` folder the runs used")
    parser.add_argument("--out", type=Path, required=True, help="the encoder file to write (.safetensors)")
    parser.add_argument("--card", type=Path, help="the model card (default: README.md next to --out)")
    parser.add_argument("--name", default="mammodino-encoder")
    parser.add_argument("--recipe", default="custom", help="the recipe's name, for the card")
    parser.add_argument("--description", default="A MammoDINO encoder trained by this project's own pipeline.")
    parser.add_argument("--hardware", help="what the first stage ran on, when its checkpoint does not say")
    parser.add_argument("--hours", type=float, help="wall-clock hours of training, when known")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap draws of the probes")
    parser.add_argument("--max-images", type=int, default=240, help="images per CSV for the curve measures")
    parser.add_argument("--epochs", type=int, default=200, help="head training epochs")
    parser.add_argument("--remake", help="the command line that remakes this file, for the card")
    parser.add_argument("--state", type=Path, help="also write the last stage's teacher and centres (fp16) here, "
                        "to continue training on another machine with `mammodino pretrain --from STATE`")
    args = parser.parse_args()
    card = args.card or args.out.parent / "README.md"
    stages = [stage_record(run.resolve()) for run in args.stages]
    corpus = args.corpus.resolve()
    last = RunFolder(args.stages[-1].resolve()).last_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        heads_csv = subset(corpus / "pretrain.csv", work / "heads.csv",
                           lambda r: r["source"] == "phantom" and r["kind"] == "ffdm")
        config = FinetuneConfig(mode="linear", resolution=RESOLUTION, epochs=args.epochs, patience=20)
        checkpoint, head_reports = last, {}
        for target in HEADS:
            out = work / "heads" / target
            try:
                report = finetune(checkpoint, heads_csv, target, out, config, group="patient_id", progress=False)
            except MammoInputError as exc:  # too few patients per class (a smoke corpus): no such head, say why
                head_reports[target] = {"error": str(exc)}
                print(f"head {target}: not fitted: {exc}", file=sys.stderr)
                continue
            head_reports[target] = {k: report[k] for k in ("validation", "best_epoch", "classes", "n_train", "n_val")
                                    if k in report}
            checkpoint = RunFolder(out).last_checkpoint
            print(f"head {target}: {json.dumps(head_reports[target])[:200]}", file=sys.stderr)
        random_spec = f"random:{work / 'model.json'}"
        (work / "model.json").write_text(json.dumps(stages[-1]["config"]))  # the same network, random weights
        trained = measures(last, corpus, work, args.boot, args.max_images)
        print(f"trained: {json.dumps(trained)[:300]}", file=sys.stderr)
        random = measures(random_spec, corpus, work, args.boot, args.max_images)
        print(f"random: {json.dumps(random)[:300]}", file=sys.stderr)
        encoder = load_encoder(checkpoint)
    encoder.resolution = RESOLUTION
    speed = throughput(stages[0], args.hardware)
    if args.hours is not None:
        speed["hours"] = args.hours
    for stage in stages[1:]:
        stage.pop("all_metrics")
    corpus_info = json.loads((corpus / "corpus.json").read_text())
    chance = chance_levels(trained)
    curve, offset = [], 0  # one curve over the stages: a later stage's steps continue the earlier's
    for stage in stages:
        curve += [{"stage": stage["name"], "step": offset + point["step"], **{key: point.get(key) for key, _ in CURVE}}
                  for point in stage["eval"]]
        offset += stage["steps"]
    meta = {
        "name": args.name, "description": args.description, "recipe": args.recipe,
        "parameters": sum(p.numel() for p in encoder.backbone.parameters()),
        "training": {**{k: stages[-1][k] for k in ("command", "config", "steps", "data", "git_commit", "metrics")},
                     "stages": stages, "learning_curve": curve,
                     "corpus": {"collections": corpus_info.get("collections", {}),
                                "heldout_images": corpus_info.get("splits", {}).get("heldout", {}).get("images")}},
        "throughput": speed,
        "heads_trained_on": "the corpus's training phantoms (FFDM)", "head_validation": head_reports,
        "evaluation": {"resolution": RESOLUTION, "trained": trained, "random_init": random, "chance": chance,
                       "labels": LABELS, "random_spec": "the same network with random weights (seed 0): exactly the weights pretraining started from",
                       "protocol": "linear probes: patient-grouped 5-fold logistic regression with bootstrap 95% "
                                   "intervals; retrieval, attention and lesion patch AUROC: training.evaluate.learning_curve, "
                                   "attention and lesion patch AUROC with bootstrap 95% intervals over images"},
        "limitations": [
            "The real data are 84 films and low-energy views (DDSM, CBIS-DDSM, CDD-CESM, one NEMA film); the "
            "held-out DDSM split is 33 images, so its intervals are wide.",
            "DDSM density here is the quartile of the measured fibroglandular share, a proxy for BI-RADS density.",
            "Most pretraining images are simulated phantoms; real FFDM from other vendors is unseen.",
        ],
        "remake": args.remake or " ".join(sys.argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_encoder(args.out, encoder, meta, dtype=torch.float16)
    card.write_text(model_card(read_metadata(args.out), args.out), encoding="utf-8")
    if args.state is not None:
        export_state(last, args.state)
        print(f"wrote {args.state} ({args.state.stat().st_size / 1e6:.1f} MB): continue with --from", file=sys.stderr)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) and {card}", file=sys.stderr)


if __name__ == "__main__":
    main()
