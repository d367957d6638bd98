"""The `mammodino` commands of the evaluation wing: finetune, infer, probe, embed. Each is a
``cmd_X``/``args_X`` pair registered in ``training/cli.py``'s ``COMMANDS``; heavy imports stay inside
the functions (``mammodino info`` imports this module too)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from training.arguments import encoder_options, feature_options, output_options


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

    found = None
    if args.find is not None:  # first: a CLIP-less model or an empty sentence stops before any work
        from training.evaluate.attribute_maps import find_command

        found = find_command(args.path, args.find, args.out, args.checkpoint, args.frame, args.resolution)
    report = infer_command(args.path, args.checkpoint, args.out, frame=args.frame, all_slices=args.all_slices,
                           resolution=args.resolution, rollout=args.rollout)
    if found is not None:
        report["find"] = found
        report["files"]["find"] = found["file"]
    if args.json:
        return report
    summary = {"path": report["path"], "encoder": report["encoder"]["source"], "predictions": report["predictions"],
               "attention_in_tissue": report["attention_in_tissue"], "tissue_share": report["tissue_share"],
               "files": f"{len(report['files'])} in {report['out']}", "time_s": report["time_s"]}
    if found is not None:
        summary["find"] = f"{found['sentence']!r}: similarity {found['similarity']}, {found['probabilities']}"
    return summary


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
    parser.add_argument("--find", metavar="SENTENCE", help="also where a sentence is (e.g. 'spiculated mass'): its "
                        "attribute map as find.npy and zero-shot probabilities; needs a CLIP model as --checkpoint "
                        "(default: the demo CLIP model)")
    output_options(parser)


def cmd_probe(args: argparse.Namespace) -> dict[str, Any]:
    from training.evaluate.probe import run_probe

    report = run_probe(args.labels, args.target, data=args.data, group=args.group, folds=args.folds, seed=args.seed,
                       n_boot=args.boot, **feature_options(args))
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
    encoder_options(parser)


def cmd_embed(args: argparse.Namespace) -> dict[str, Any]:
    from training.evaluate.retrieval import run_embed

    report = run_embed(args.data, args.out, labels=args.labels, targets=args.target or [], group=args.group,
                       query=args.query, k=args.k, **feature_options(args))
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
    encoder_options(parser)


def cmd_zeroshot(args: argparse.Namespace) -> dict[str, Any]:
    from training.evaluate.zeroshot import run_zeroshot

    options = feature_options(args)
    options.pop("max_slices")
    report = run_zeroshot(args.labels, args.target, data=args.data, prompts=args.prompts, group=args.group,
                          curve=args.curve, repeats=args.repeats, seed=args.seed, **options)
    if args.json:
        return report
    summary = {key: report[key] for key in ("target", "n", "classes", "counts", "auroc", "balanced_accuracy")}
    if "label_efficiency" in report:
        for name, by in report["label_efficiency"]["auroc"].items():
            summary[f"probe AUROC, {name}"] = ", ".join(
                f"{float(f):.0%}: {v['mean']:.3f}" if v["mean"] is not None else f"{float(f):.0%}: n/a"
                for f, v in by.items())
    return {**summary, "model": report["model"]["source"], "seconds": report["seconds"]}


def args_zeroshot(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", required=True, help="labels CSV (path column relative to the CSV or --data)")
    parser.add_argument("--target", required=True, help="the column to classify (density, lesion, lesion_type, ...)")
    parser.add_argument("--data", help="folder the CSV's paths are relative to (default: the CSV's folder)")
    parser.add_argument("--prompts", help="JSON {TARGET: {CLASS: [sentences]}} (default: the shipped prompts.json)")
    parser.add_argument("--group", help="column that keeps a patient on one side of the curve's splits, e.g. patient_id")
    parser.add_argument("--curve", action="store_true", help="also the label-efficiency curve: linear probes on 1%%, "
                        "10%% and 100%% of the labels, CLIP embeddings against the image encoder's features")
    parser.add_argument("--repeats", type=int, default=5, help="grouped train/test splits the curve averages (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="the curve's split seed")
    encoder_options(parser, "an image-report model: a `mammodino clip` checkpoint or run folder (default: the "
                            "demo CLIP model)")
