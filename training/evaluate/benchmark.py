"""The project's benchmark of one encoder, the figures a model card and the ablation report: linear
probes on the phantom benchmark (density, lesion, lesion type) and on the real held-out split (DDSM
density quartile, normal vs abnormal), and the learning-curve measures (same-breast view retrieval,
attention in tissue over the uniform share, lesion patch AUROC; :mod:`training.evaluate.learning_curve`) on the
real views and the phantom benchmark, plus attention on the real CBIS-DDSM views alone. Everything is read
from a ``mammodino corpus`` folder and computed at one resolution (448 px: 28 patches of 16 px on the
long side), for any encoder spec ``load_encoder`` takes, so a trained encoder and its random-init
baseline are measured the same way.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from training.errors import MammoInputError

RESOLUTION = 448  # 28 patches of 16 px on the long side: the finer maps the high-resolution stage trains for
CHANCE = {"phantom_density_bal_acc": 0.25, "real_density_bal_acc": 0.25, "phantom_density_auroc": 0.5,
          "phantom_lesion_auroc": 0.5, "phantom_lesion_type_auroc": 0.5, "phantom_lesion_patch_auroc": 0.5,
          "real_density_auroc": 0.5, "real_abnormal_auroc": 0.5, "cbis_attention_ratio": 1.0,
          "real_attention_ratio": 1.0, "phantom_attention_ratio": 1.0, "heldout_attention_ratio": 1.0}
LABELS = {  # evaluation key -> what the card calls it
    "phantom_density_bal_acc": "density balanced accuracy, phantom benchmark",
    "phantom_density_auroc": "density AUROC (macro), phantom benchmark",
    "phantom_lesion_auroc": "lesion present AUROC, phantom benchmark",
    "phantom_lesion_type_auroc": "lesion type AUROC (macro), phantom benchmark",
    "phantom_lesion_patch_auroc": "lesion patch AUROC, phantom benchmark (linear patch head, held-out patients)",
    "real_density_bal_acc": "density (quartile) balanced accuracy, real held-out DDSM",
    "real_density_auroc": "density (quartile) AUROC (macro), real held-out DDSM",
    "real_abnormal_auroc": "normal vs abnormal AUROC, real held-out DDSM",
    "real_view_top1": "same-breast view retrieval top-1, real views",
    "real_view_topk": "same-breast view retrieval top-k, real views",
    "real_view_mean_rank": "same-breast view: the partner's mean rank, real views (lower is better)",
    "phantom_view_top1": "same-breast view retrieval top-1, phantom benchmark",
    "phantom_view_topk": "same-breast view retrieval top-k, phantom benchmark",
    "phantom_view_mean_rank": "same-breast view: the partner's mean rank, phantom benchmark (lower is better)",
    "cbis_attention_ratio": "attention in tissue / uniform share, real CBIS-DDSM views",
    "real_attention_ratio": "attention in tissue / uniform share, all real views",
    "heldout_attention_ratio": "attention in tissue / uniform share, real held-out views (never pretrained on)",
    "phantom_attention_ratio": "attention in tissue / uniform share, phantom benchmark",
}


def subset(csv_path: Path, out: Path, keep) -> Path:
    """The rows of ``csv_path`` that ``keep(row)`` accepts, written to ``out`` with paths still relative to
    the original CSV's folder (rewritten relative to ``out``)."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, [row for row in reader if keep(row)]
    for row in rows:
        row["path"] = os.path.relpath(csv_path.parent / row["path"], out.parent)
        for column in ("lesion_mask", "breast_mask", "glandular_mask", "tissue_map"):
            if row.get(column):
                row[column] = os.path.relpath(csv_path.parent / row[column], out.parent)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    return out


def probe_rows(csv_path: Path, target: str, out: Path) -> tuple[Path, list[str]]:
    """``csv_path`` without the rows of ``target`` classes seen in fewer than two patients (a grouped
    cross-validation cannot hold them out; e.g. density D in a small phantom benchmark), and those classes."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.DictReader(f) if row.get(target, "").strip()]
    patients: dict[str, set[str]] = {}
    for row in rows:
        patients.setdefault(row[target], set()).add(row.get("patient_id", row["path"]))
    rare = sorted(value for value, who in patients.items() if len(who) < 2)
    if not rare:
        return csv_path, []
    out.parent.mkdir(parents=True, exist_ok=True)
    return subset(csv_path, out, lambda row: row.get(target, "").strip() not in rare), rare


def probes(spec: Any, csv_path: Path, targets: dict[str, str], cache: Path, boot: int) -> dict[str, Any]:
    """``{key: metric}`` of linear probes of ``spec`` for each ``{target: prefix}``."""
    from training.evaluate.probe import run_probe

    out: dict[str, Any] = {}
    for target, prefix in targets.items():
        labelled, rare = probe_rows(csv_path, target, cache.parent / f"{csv_path.stem}.{target}.csv")
        if rare:
            out[f"{prefix}_left_out"] = rare
        try:
            report = run_probe(labelled, target, checkpoint=spec, group="patient_id", resolution=RESOLUTION,
                               cache=cache, progress=False, n_boot=boot)
        except MammoInputError as exc:  # too few patients per class (a smoke run's corpus): say so, go on
            out[f"{prefix}_error"] = str(exc)
            continue
        out[f"{prefix}_bal_acc"] = report["balanced_accuracy"]
        out[f"{prefix}_bal_acc_chance"] = report["chance"]["balanced_accuracy"]  # 1 / the classes probed
        out[f"{prefix}_auroc"] = report["auroc"]
        out[f"{prefix}_n"] = report["n"]
    return out


def measures(spec: Any, corpus: Path, work: Path, boot: int = 1000, max_images: int = 240) -> dict[str, Any]:
    """Every benchmark figure of one encoder (a spec for ``load_encoder``) on the ``corpus`` folder;
    ``work`` holds the subset CSVs and the feature cache."""
    from training.evaluate.encoder import load_encoder
    from training.evaluate.learning_curve import evaluate as curve_measures
    from training.evaluate.probe import resolve_device

    work.mkdir(parents=True, exist_ok=True)
    encoder = load_encoder(spec, resolve_device(None))  # the GPU when there is one, as the probes use
    encoder.resolution = RESOLUTION
    heldout = subset(corpus / "heldout.csv", work / "heldout_ddsm.csv", lambda r: r["collection"] == "ddsm_tissue66")
    cbis = subset(corpus / "real.csv", work / "real_cbis.csv", lambda r: r["collection"] == "cbis_ddsm")
    cache = work / "features"
    out: dict[str, Any] = {}
    out.update(probes(spec, corpus / "bench.csv", {"density": "phantom_density", "lesion": "phantom_lesion",
                                                   "lesion_type": "phantom_lesion_type"}, cache, boot))
    out.update(probes(spec, heldout, {"density": "real_density", "abnormal": "real_abnormal"}, cache, boot))
    curve = curve_measures(encoder, corpus / "real.csv", corpus / "bench.csv", RESOLUTION, max_images=max_images,
                           boot=boot)
    e = curve["eval"]
    for key in ("real_view_top1", "real_view_topk", "real_view_mean_rank", "phantom_view_top1",
                "phantom_view_topk", "phantom_view_mean_rank", "phantom_lesion_patch_auroc"):
        out[key] = e.get(key)
        out[f"{key}_chance"] = e.get(f"{key}_chance")
    for prefix in ("real_view", "phantom_view"):
        out[f"{prefix}_queries"] = e.get(f"{prefix}_queries")
    out["phantom_lesion_patch_auroc"] = with_ci(e, "phantom_lesion_patch_auroc")
    out["real_attention_ratio"] = with_ci(e, "attention_ratio_real")
    out["phantom_attention_ratio"] = with_ci(e, "attention_ratio_phantom")
    only_cbis = curve_measures(encoder, cbis, None, RESOLUTION, max_images=max_images, boot=boot)["eval"]
    out["cbis_attention_ratio"] = with_ci(only_cbis, "attention_ratio_real")
    unseen = curve_measures(encoder, corpus / "heldout.csv", None, RESOLUTION, max_images=max_images, boot=boot)["eval"]
    out["heldout_attention_ratio"] = with_ci(unseen, "attention_ratio_real")
    out["cbis_attention_in_tissue"] = only_cbis.get("attention_in_tissue_real")
    out["cbis_tissue_share"] = only_cbis.get("tissue_share_real")
    return out


def with_ci(measures: dict[str, Any], key: str) -> Any:
    """``measures[key]`` as ``{"value", "ci95"}`` when its bootstrap interval was measured, else as is."""
    ci = measures.get(f"{key}_ci95")
    return measures.get(key) if ci is None or measures.get(key) is None else {"value": measures[key], "ci95": ci}


def chance_levels(figures: dict[str, Any]) -> dict[str, Any]:
    """Chance of every figure: the measured chance levels the curve reports, and the fixed ones."""
    chance = {k[: -len("_chance")]: v for k, v in figures.items() if k.endswith("_chance")}
    return {**CHANCE, **chance}  # a measured chance level (e.g. of the classes probed) wins
