"""Make the shipped demo encoder (``training/weights/mammodino-demo.safetensors``) and its model card
from the ablation's full-MammoDINO run, with the project's own commands only:

    .venv/bin/python scripts/ablation.py --work runs/ablation              # trains arm (d) among others
    .venv/bin/python scripts/make_demo_encoder.py --work runs/ablation

1. The EMA teacher's backbone of ``WORK/runs/full`` (cpu-tiny-sized ViT, 150 steps on 240 FFDM + 40
   DBT phantoms + the 8 real CBIS-DDSM views).
2. Linear heads fitted on the *training* phantoms' labels with ``mammodino finetune``'s code: density
   (A-D), lesion present (0/1) and the lesion heatmap from the phantom lesion masks.
3. Linear probes of the backbone and of the random-init baseline on the held-out benchmark phantoms.
4. Everything saved as fp16 safetensors with its provenance (training command and config, data,
   thinned metrics log, head validation metrics, probe results) in the JSON metadata, and the model
   card ``training/weights/README.md`` written from that metadata.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.checkpoint import read_metadata  # noqa: E402
from training.encoder import DEMO_CHECKPOINT, load_encoder, save_encoder  # noqa: E402
from training.finetune import FinetuneConfig, finetune  # noqa: E402
from training.probe import run_probe  # noqa: E402

RESOLUTION = 224  # as the ablation: the scale cpu-tiny's crops were trained at
PROBE_TARGETS = ("density", "lesion", "lesion_type")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="the ablation's work folder")
    parser.add_argument("--out", type=Path, default=DEMO_CHECKPOINT)
    parser.add_argument("--card-only", action="store_true", help="rewrite the model card from --out's metadata")
    args = parser.parse_args()
    if args.card_only:
        (args.out.parent / "README.md").write_text(model_card(read_metadata(args.out), args.out))
        return
    work = args.work.resolve()
    run = work / "runs" / "full"
    pretrain_ckpt = run / "checkpoints" / "last.safetensors"
    train_labels = work / "data" / "ffdm_train" / "labels.csv"
    bench_labels = work / "data" / "bench" / "labels.csv"
    heads_dir = work / "demo_heads"
    shutil.rmtree(heads_dir, ignore_errors=True)  # the heads are refitted from scratch each time

    config = FinetuneConfig(mode="linear", resolution=RESOLUTION, epochs=200, patience=20)
    checkpoint: Path = pretrain_ckpt
    head_reports = {}
    for target in ("density", "lesion", "lesion_mask"):
        out = heads_dir / target
        report = finetune(checkpoint, train_labels, target, out, config, group="patient_id", progress=False)
        head_reports[target] = {k: report[k] for k in ("validation", "best_epoch", "classes", "n_train", "n_val")
                                if k in report}
        checkpoint = out / "checkpoints" / "last.safetensors"
        print(f"head {target}: {json.dumps(head_reports[target])[:300]}", file=sys.stderr)

    probes = {}
    for name, spec in (("demo", pretrain_ckpt), ("random_init", f"random:{ROOT / 'scripts' / 'ablation_config.json'}")):
        probes[name] = {}
        for target in PROBE_TARGETS:
            result = run_probe(bench_labels, target, checkpoint=spec, group="patient_id", resolution=RESOLUTION,
                               cache=True, progress=False)
            probes[name][target] = {k: result[k] for k in ("auroc", "balanced_accuracy", "macro_f1", "n", "classes")}
        print(f"probe {name}: {json.dumps(probes[name])[:300]}", file=sys.stderr)

    pre_meta = read_metadata(pretrain_ckpt)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    thinned = [row for row in rows if row["step"] % 25 == 0 or row is rows[-1]]
    encoder = load_encoder(checkpoint)
    encoder.resolution = RESOLUTION
    meta = {
        "name": "mammodino-demo",
        "description": "cpu-tiny-sized MammoDINO encoder (ViT-tiny/16, 6 blocks) trained by this project's own "
                       "pipeline on phantoms and 8 real CBIS-DDSM views; a demonstration, not a clinical model",
        "training": {"command": pre_meta.get("command"), "config": pre_meta.get("config"), "data": pre_meta.get("data"),
                     "git_commit": pre_meta.get("git_commit"), "steps": pre_meta.get("step"), "metrics": thinned},
        "heads_trained_on": str(train_labels.relative_to(work)),
        "head_validation": head_reports,
        "probe_benchmark": {"labels": str(bench_labels.relative_to(work)), "resolution": RESOLUTION,
                            "results": probes},
        "attention_in_tissue": (json.loads((work / "ablation.json").read_text())["d"]["attention_in_tissue"]
                                if (work / "ablation.json").is_file() else None),
        "remake": "python scripts/ablation.py --work runs/ablation && python scripts/make_demo_encoder.py --work runs/ablation",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_encoder(args.out, encoder, meta, dtype=torch.float16)
    (args.out.parent / "README.md").write_text(model_card(meta, args.out))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)


def model_card(meta: dict, path: Path) -> str:
    def cell(m: dict) -> str:
        return f"{m['value']:.3f} [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}]"

    probes = meta["probe_benchmark"]["results"]
    rows = "\n".join(
        f"| {target} | {cell(probes['random_init'][target]['auroc'])} | {cell(probes['demo'][target]['auroc'])} | "
        f"{cell(probes['random_init'][target]['balanced_accuracy'])} | {cell(probes['demo'][target]['balanced_accuracy'])} |"
        for target in PROBE_TARGETS)
    heads = "\n".join(_head_row(name, info.get("validation", {})) for name, info in meta["head_validation"].items())
    t = meta["training"]
    a = meta.get("attention_in_tissue")
    attention = "not measured." if not a else (
        f"on the 8 real CBIS-DDSM views, {a['cbis']['attention']:.0%} of the last layer's class-token attention "
        f"falls inside the breast-tissue mask, where uniform attention would put {a['cbis']['uniform']:.0%} (the "
        f"tissue's share of its bounding box); on 40 benchmark phantoms {a['phantom']['attention']:.0%} against "
        f"{a['phantom']['uniform']:.0%}. "
        + ("It attends to tissue no more than chance yet." if a['cbis']['attention'] <= a['cbis']['uniform'] + 0.02
           else "It attends to tissue more than chance."))
    last = t["metrics"][-1]
    return f"""# Model card: mammodino-demo

`{path.name}`: fp16 safetensors, {path.stat().st_size / 1e6:.1f} MB; metadata (JSON) holds everything below.
Loaded by default by `mammodino infer`, `mammodino probe` and the napari Inference widget.

**What it is.** {meta['description']}. Pretrained for {t['steps']} steps of 16 images with DINO + iBOT +
KoLeo + the DBT adjacent-slice loss and the tissue-aware sampler (arm (d) of the README's ablation).
Input: the breast-tissue bounding box, tissue-percentile windowing, {meta['probe_benchmark']['resolution']} px
on the long side (14 patches of 16 px).

**How weak it is.** Trained on 2 CPU cores for minutes, on simulated images plus 8 real views; the
DINO loss barely left its starting value (last logged step {last['step']}: DINO {last['dino']:.3f},
iBOT {last['ibot']:.3f}, DBT {last['dbt']:.3f}, teacher entropy {last['teacher_entropy']:.3f} nats of
ln(1024) = 6.931). It exists so that the viewer shows a real trained encoder's attention on first
launch and so that every command has a default; its numbers are for comparison with random weights
only. Not for any clinical use.

**Linear probe on the held-out phantom benchmark** (240 FFDM phantoms, other seed; patient-grouped
5-fold logistic regression, bootstrap 95% intervals; `mammodino probe`):

| target | AUROC random init | AUROC demo | bal. acc. random init | bal. acc. demo |
|---|---|---|---|---|
{rows}

**Task heads** (linear, fitted on the training phantoms' labels with `mammodino finetune --mode linear`;
validation on the 48 held-out patients of that set):

| head (finetune --target) | validation AUROC | balanced accuracy | FROC sensitivity at 1 / 2 FP per image |
|---|---|---|---|
{heads}

**Attention** (the ablation's measure, arm (d)): {attention}

**Remake:** `{meta['remake']}`.
"""


def _head_row(name: str, v: dict) -> str:
    froc = v.get("froc")
    sens = f"{froc['sensitivity_at_1_fp']:.2f} / {froc['sensitivity_at_2_fp']:.2f}" if froc else ""
    return f"| {name} | {v.get('auroc', float('nan')):.3f} | {v.get('balanced_accuracy', float('nan')):.3f} | {sens} |"


if __name__ == "__main__":
    main()
