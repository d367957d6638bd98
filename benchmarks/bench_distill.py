"""A distilled student against its teacher: forward time on the same images, and linear-probe figures.

The teacher is the shipped demo encoder (``training/weights/mammodino-demo.safetensors``: ViT-tiny/16,
depth 6, 4 registers, 448 px). ``mammodino distill`` (:func:`training.ssl.distill.distill`, VersaMammo
stage 2) trains the student (``--student``, default ``mobilenetv3_small_100``) at 224 px on a phantom
training set (``--train`` FFDM phantoms, density/lesion/lesion_type/birads heads plus feature
distillation); a second phantom set (``--probe``, other seed, other patients) is only probed.

* **Forward time**: ``backbone.forward_tokens`` under ``torch.no_grad`` of every probe image, one image
  a call, each model on its own prepared input (``prepare_image_sizes``: the same tissue box, the
  teacher at its 448 px, the student at 224 px), interleaved, median of ``--repeats``; CPU time
  (``time.process_time``) of single-threaded torch (``--threads``), wall clock beside it. Goal: the
  student >= 3x faster than the teacher. ``--also`` times more timm students (random weights: the
  cost does not depend on them) to choose from.
* **Probe**: :func:`training.evaluate.probe.evaluate_probe` (patient-grouped 5-fold cross-validated
  logistic regression, DINOv2's protocol) on each encoder's features (class token + mean patch token,
  :func:`training.evaluate.features.extract_features`) of the probe set, for lesion (AUROC) and density
  (macro one-vs-rest AUROC): the teacher, the distilled student, and the student's own random starting
  weights (seed 0, as ``distill`` starts it: what distillation added).

    .venv/bin/python benchmarks/bench_distill.py                   # ~8 min on 2 cores (phantoms made once)
    .venv/bin/python benchmarks/bench_distill.py --train 24 --probe 24 --epochs 3   # quick look
    .venv/bin/python benchmarks/bench_distill.py --json            # one JSON object
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench_infer import median_times  # noqa: E402
from training.dicom.io import open_image  # noqa: E402
from training.evaluate.encoder import DEMO_CHECKPOINT, Encoder, load_encoder, prepare_image_sizes  # noqa: E402
from training.evaluate.features import extract_features  # noqa: E402
from training.errors import MammoInputError  # noqa: E402
from training.evaluate.probe import evaluate_probe  # noqa: E402
from training.labels import read_labels  # noqa: E402
from training.ssl.distill import DistillConfig, distill  # noqa: E402
from training.ssl.student import build_student  # noqa: E402

GOAL = 3.0
TARGETS = ("lesion", "density")


def phantoms(folder: Path, n: int, seed: int, shape: tuple[int, int]) -> Path:
    """``n`` FFDM phantoms with labels (made once, kept in ``folder``)."""
    from training.phantom.dataset import generate

    if not (folder / "labels.csv").is_file():
        generate(folder, "ffdm", n, seed=seed, lesion="any", shape=shape, progress=False)
    return folder / "labels.csv"


def forward_times(encoders: dict[str, Encoder], paths: list[Path], repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds per image of each encoder's plain forward pass on its own prepared inputs."""
    teacher = encoders["teacher"]
    sizes = [(e.resolution, e.patch_size) for e in encoders.values()]
    prepared = [prepare_image_sizes(open_image(p), None, sizes, teacher.percentiles) for p in paths]
    inputs = {name: [torch.from_numpy(item[k].pixels[None, None]) for item in prepared]
              for k, name in enumerate(encoders)}

    def forward(name: str):
        @torch.no_grad()
        def run() -> None:
            for pixels in inputs[name]:
                encoders[name].backbone.forward_tokens(pixels)
        return run

    times = median_times({name: forward(name) for name in encoders}, repeats)
    return {clock: {name: s / len(paths) for name, s in t.items()} for clock, t in times.items()}


def probe(encoder: Encoder, labels: Path) -> dict[str, Any]:
    """Probe AUROC (with its interval) and balanced accuracy of each target, features computed once."""
    sets = {target: read_labels(labels, target, group="patient_id") for target in TARGETS}
    paths = list(dict.fromkeys(p for labelled in sets.values() for p in labelled.paths))
    features = extract_features(encoder, paths, cache=False, progress=False).features
    row = {p: i for i, p in enumerate(paths)}
    out = {}
    for target, labelled in sets.items():
        x = features[[row[p] for p in labelled.paths]]
        try:
            report = evaluate_probe(x, labelled.y, labelled.groups, labelled.classes, folds=5, n_boot=200)
        except MammoInputError as exc:  # too few patients of a class for grouped folds: a larger --probe
            out[target] = {"auroc": float("nan"), "ci95": [float("nan")] * 2, "balanced_accuracy": None,
                           "note": str(exc)}
            continue
        out[target] = {"auroc": report["auroc"]["value"], "ci95": report["auroc"]["ci95"],
                       "balanced_accuracy": report["balanced_accuracy"]["value"]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="mobilenetv3_small_100")
    parser.add_argument("--also", nargs="*", default=["mobilenetv3_large_100", "efficientnet_b0", "resnet18"],
                        help="more timm students to time (random weights)")
    parser.add_argument("--train", type=int, default=128, help="phantoms to distil on")
    parser.add_argument("--probe", type=int, default=64, help="phantoms to probe (other seed)")
    parser.add_argument("--shape", default="384x312", help="phantom ROWSxCOLS")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timed", type=int, default=16, help="probe images in the forward-time loop")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: CPU time then measures the work alone)")
    parser.add_argument("--workdir", default="/tmp/mammodino_bench_distill")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    shape = tuple(int(v) for v in args.shape.split("x"))
    train = phantoms(workdir / f"train_{args.train}_{args.shape}", args.train, 101, shape)
    probed = phantoms(workdir / f"probe_{args.probe}_{args.shape}", args.probe, 202, shape)
    load_before = os.getloadavg()
    torch.set_num_threads(args.threads)
    run = workdir / f"run_{args.student}_{args.train}_{args.epochs}"
    if not (run / "checkpoints" / "last.safetensors").is_file():
        config = DistillConfig(student=args.student, epochs=args.epochs, device="cpu")
        report = distill(DEMO_CHECKPOINT, train, run, config, progress=not args.json)
    else:
        report = {"reused": str(run)}
    teacher = load_encoder(DEMO_CHECKPOINT)
    student = load_encoder(run)
    torch.manual_seed(DistillConfig().seed)  # as distill seeds it: the student's own starting weights
    random = Encoder(build_student(args.student), resolution=student.resolution, percentiles=teacher.percentiles)

    timed = read_labels(probed, TARGETS[0]).paths[:args.timed]
    encoders = {"teacher": teacher, args.student: student,
                **{name: Encoder(build_student(name), resolution=224) for name in args.also}}
    times = forward_times(encoders, timed, args.repeats)
    probes = {"teacher": probe(teacher, probed), f"{args.student} distilled": probe(student, probed),
              f"{args.student} random": probe(random, probed)}
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "torch": torch.__version__, "timing_threads": args.threads,
              "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
              "distill": {k: v for k, v in report.items() if k in ("step", "wall_s", "teacher_s", "metrics", "reused")},
              "ms_per_image": {clock: {n: round(1000 * s, 2) for n, s in t.items()} for clock, t in times.items()},
              "x_faster": {clock: {n: round(t["teacher"] / s, 2) for n, s in t.items() if n != "teacher"}
                           for clock, t in times.items()},
              "inputs": {n: f"{e.resolution} px, stride {e.patch_size}" for n, e in encoders.items()},
              "probe": probes, "train_images": args.train, "probe_images": args.probe, "shape": args.shape}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"machine: {result['machine']}, torch {result['torch']}; timing with {args.threads} thread(s); load "
          f"average {result['load_average_before_after'][0]} before, {result['load_average_before_after'][1]} after")
    print(f"distillation: {result['distill']}")
    print(f"\nforward pass per image ({len(timed)} probe images, each model on its own input), CPU time [wall]:")
    for name, encoder in encoders.items():
        cpu, wall = result["ms_per_image"]["cpu"][name], result["ms_per_image"]["wall"][name]
        ratio = "" if name == "teacher" else (f"  {result['x_faster']['cpu'][name]:.2f}x faster "
                                              f"[{result['x_faster']['wall'][name]:.2f}x]")
        print(f"  {name:<24} {result['inputs'][name]:<20} {cpu:8.2f} ms [{wall:.2f}]{ratio}")
    print(f"\nlinear probe AUROC on {args.probe} held-out phantoms (5 patient-grouped folds, 95% bootstrap CI):")
    print(f"  {'encoder':<34}" + "".join(f"{t:<26}" for t in TARGETS))
    for name, scores in probes.items():
        cells = "".join(f"{s['auroc']:.3f} ({s['ci95'][0]:.2f}-{s['ci95'][1]:.2f})".ljust(26) for s in scores.values())
        print(f"  {name:<34}{cells}")
    ratio = result["x_faster"]["cpu"][args.student]
    print(f"\n{'PASS' if ratio >= GOAL else 'FAIL'}  {args.student} >= {GOAL:g}x faster than the teacher: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
