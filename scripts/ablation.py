"""The MammoDINO ablation on this project's own data, end to end, from one command:

    .venv/bin/python scripts/ablation.py --work runs/ablation                 # corpus, training, evaluation
    .venv/bin/python scripts/ablation.py --work runs/ablation --stages eval   # re-evaluate only

Same data, model and budget for every arm: the ``cpu-small`` recipe's first stage (ViT-tiny/16, 6 blocks,
4 registers) for ``--steps`` steps of 16 images (default 1000, the schedule compressed to that length) on
the corpus's pretraining split (``mammodino corpus``: the real pretraining films plus simulated FFDM and
DBT phantoms):
  (a) random init                  the same network with the weights every arm starts from
  (b) plain DINOv2                 naive crops and masks, no DBT loss
  (c) + tissue-aware sampler       no DBT loss
  (d) + DBT adjacent-slice loss    full MammoDINO

Evaluation (``training.evaluate.benchmark``, at 448 px): linear probes with bootstrap 95% intervals on the phantom
benchmark (density, lesion, lesion type) and the real held-out DDSM films (density quartile, normal vs
abnormal); lesion patch AUROC; same-breast view retrieval; attention in tissue over the uniform share on
the real CBIS-DDSM views. Writes ``WORK/ablation.json`` and prints the README table, with the pairs of
arms whose intervals do not overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.evaluate.benchmark import measures  # noqa: E402
from training.checkpoint import read_metadata  # noqa: E402
from training.runs import RunFolder  # noqa: E402

MAMMODINO = [sys.executable, "-m", "training"]
ARMS = {
    "a": ("random init", None),
    "b": ("plain DINOv2 (naive sampler, no DBT loss)", ["--set", "loss.dbt_weight=0", "--set", "train.naive_sampler=true"]),
    "c": ("+ tissue-aware sampler", ["--set", "loss.dbt_weight=0"]),
    "d": ("+ DBT adjacent-slice loss (MammoDINO)", []),
}
RUN_NAMES = {"b": "naive", "c": "tissue", "d": "full"}
COLUMNS = (  # (key, header): the table's figures
    ("phantom_density_bal_acc", "density bal. acc. (phantoms)"),
    ("real_density_bal_acc", "density bal. acc. (real held-out)"),
    ("real_abnormal_auroc", "normal vs abnormal AUROC (real held-out)"),
    ("phantom_lesion_auroc", "lesion AUROC (phantoms)"),
    ("phantom_lesion_patch_auroc", "lesion patch AUROC (phantoms)"),
    ("phantom_view_topk", "same-breast view top-5 (phantoms)"),
    ("real_view_mean_rank", "same-breast view: partner's mean rank (real; lower is better)"),
    ("cbis_attention_ratio", "attention in tissue / uniform (CBIS)"),
    ("heldout_attention_ratio", "attention in tissue / uniform (real held-out)"),
)


def run(command: list[str]) -> str:
    print("$", " ".join(map(str, command)), file=sys.stderr, flush=True)
    # One torch thread per process: on a shared or busy CPU, torch's default threads oversubscribe it.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(command, cwd=ROOT, text=True, capture_output=True, env=env)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(map(str, command))}\n{done.stderr[-2000:]}")
    return done.stdout


def schedule(steps: int) -> list[str]:
    """The recipe's first stage compressed to ``steps`` (warm-up and frozen prototypes scaled alike)."""
    return ["--set", f"schedule.total_steps={steps}", "--set", f"schedule.warmup_steps={max(1, steps * 3 // 50)}",
            "--set", f"schedule.freeze_last_layer_steps={max(1, steps // 50)}", "--set", "monitor.every=0"]


def train(work: Path, corpus: Path, steps: int) -> None:
    for arm in ("d", "c", "b"):
        out = work / "runs" / RUN_NAMES[arm]
        last = RunFolder(out).last_checkpoint
        resume = []
        if last.is_file():
            if read_metadata(last)["step"] >= steps:
                continue
            resume = ["--resume"]  # an interrupted arm continues exactly where it stopped
        run([*MAMMODINO, "pretrain", "--config", "cpu-small", *schedule(steps), "--data", str(corpus / "pretrain.csv"),
             "--out", str(out), *ARMS[arm][1], *resume, "--quiet", "--json"])


def encoder_spec(work: Path, arm: str) -> str:
    if arm == "a":
        return "random:cpu-small"  # seed 0: exactly the weights the trained arms start from
    return str(RunFolder(work / "runs" / RUN_NAMES[arm]).last_checkpoint)


def evaluate(work: Path, corpus: Path) -> dict:
    results = {}
    for arm, (label, _) in ARMS.items():
        figures = measures(encoder_spec(work, arm), corpus, work / "eval")
        results[arm] = {"arm": label, "encoder": encoder_spec(work, arm), "figures": figures}
        print(f"{arm}: done", file=sys.stderr, flush=True)
    (work / "ablation.json").write_text(json.dumps(results, indent=1))
    return results


def cell(value) -> str:
    if isinstance(value, dict):
        low, high = value["ci95"]
        return f"{value['value']:.3f} [{low:.2f}, {high:.2f}]"
    return "n/a" if value is None else f"{value:.3f}"


def separated(results: dict) -> list[str]:
    """The figures where two arms' bootstrap 95% intervals do not overlap."""
    found = []
    for key, header in COLUMNS:
        arms = [(arm, entry["figures"].get(key)) for arm, entry in results.items()]
        arms = [(arm, value) for arm, value in arms if isinstance(value, dict)]
        for i, (first, a) in enumerate(arms):
            for second, b in arms[i + 1:]:
                if a["ci95"][1] < b["ci95"][0] or b["ci95"][1] < a["ci95"][0]:
                    better = first if a["value"] > b["value"] else second
                    found.append(f"{header}: ({first}) vs ({second}), ({better}) higher")
    return found


def table(results: dict) -> str:
    lines = ["| arm | " + " | ".join(header for _, header in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for arm, entry in results.items():
        lines.append(f"| ({arm}) {entry['arm']} | " + " | ".join(cell(entry["figures"].get(key)) for key, _ in COLUMNS)
                     + " |")
    apart = separated(results)
    lines += ["", "Intervals that do not overlap: " + ("; ".join(apart) if apart else "none.")]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for runs and results")
    parser.add_argument("--corpus", type=Path, help="a mammodino corpus folder (default: WORK/corpus, built if absent)")
    parser.add_argument("--steps", type=int, default=1000, help="pretraining steps per arm")
    parser.add_argument("--stages", default="corpus,train,eval", help="comma-separated: corpus, train, eval")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    corpus = (args.corpus or work / "corpus").resolve()
    stages = set(args.stages.split(","))
    if "corpus" in stages and not (corpus / "pretrain.csv").is_file():
        run([*MAMMODINO, "corpus", "--out", str(corpus), "--quiet", "--json"])
    if "train" in stages:
        train(work, corpus, args.steps)
    if "eval" in stages:
        print(table(evaluate(work, corpus)))


if __name__ == "__main__":
    main()
