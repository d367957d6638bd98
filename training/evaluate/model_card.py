"""Model cards written from an encoder file's own metadata, so a card can never claim what the file
does not record: :func:`model_card` turns the metadata that ``scripts/make_encoder.py`` stores (training
stages, data, throughput, learning curve, evaluation against a random-init encoder of the same
architecture, task heads) into Markdown. Every figure in the card is read from that metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# (metadata key, label, chance key or None) of the learning-curve measures shown in the card's curve.
CURVE = (
    ("phantom_density_bal_acc", "density bal. acc. (phantoms)"),
    ("phantom_lesion_patch_auroc", "lesion patch AUROC (phantoms)"),
    ("attention_ratio_real", "attention in tissue / uniform (real)"),
    ("real_view_topk", "same-breast view in top k (real)"),
    ("phantom_view_topk", "same-breast view in top k (phantoms)"),
)

# The targets: (row label, evaluation key, margin over random init or None, absolute goal or None);
# "clearly above chance" is a goal of "2x chance" (twice the measured chance level), or for a rank, where
# lower is better, of "chance / 2".
TARGETS = (
    ("density balanced accuracy, phantom benchmark", "phantom_density_bal_acc", 0.08, None),
    ("density balanced accuracy, real held-out", "real_density_bal_acc", 0.08, None),
    ("lesion patch AUROC, phantom benchmark", "phantom_lesion_patch_auroc", 0.08, None),
    ("same-breast view in top k, real views", "real_view_topk", None, "2x chance"),
    ("same-breast view: the partner's mean rank, real views", "real_view_mean_rank", None, "chance / 2"),
    ("same-breast view in top k, phantom benchmark", "phantom_view_topk", None, "2x chance"),
    ("attention in tissue / uniform, real CBIS-DDSM views", "cbis_attention_ratio", None, 1.3),
)


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, dict):
        low, high = value.get("ci95") or (None, None)
        text = _num(value.get("value"), digits)
        return text if low is None else f"{text} [{low:.2f}, {high:.2f}]"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _value(entry: Any) -> float | None:
    return entry.get("value") if isinstance(entry, dict) else entry


def method(config: dict[str, Any]) -> str:
    """What a pretraining config trains, in words: the losses and how crops and masks are placed."""
    weight = (config.get("loss") or {}).get("dbt_weight", 0) or 0
    naive = (config.get("train") or {}).get("naive_sampler", False)
    losses = "DINO + iBOT + KoLeo" + (f" + the DBT adjacent-slice loss (weight {weight:g})" if weight else "")
    crops = "crops and masks placed anywhere in the image, as plain DINOv2" if naive else \
        "tissue-aware crops and masks (MammoDINO)"
    return f"{losses} ({crops})"


def evaluation_rows(evaluation: dict[str, Any]) -> list[tuple[str, Any, Any, Any]]:
    """(label, trained, random init, chance) rows of the evaluation table, in a fixed order."""
    trained, random = evaluation["trained"], evaluation["random_init"]
    chance = evaluation.get("chance", {})
    labels = evaluation["labels"]
    return [(labels[key], trained.get(key), random.get(key), chance.get(key)) for key in labels]


def targets(evaluation: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """Each target of the card: (what, goal, what was measured, met or None when not measured)."""
    trained, random = evaluation["trained"], evaluation["random_init"]
    rows = []
    for label, key, margin, goal in TARGETS:
        value, base = _value(trained.get(key)), _value(random.get(key))
        if margin is not None:
            want = f"random init + {margin:.2f}"
            met = None if value is None or base is None else value - base >= margin
            seen = "n/a" if met is None else f"{value:.3f} vs {base:.3f} ({value - base:+.3f})"
        elif goal in ("2x chance", "chance / 2"):
            chance = evaluation.get("chance", {}).get(key)
            if goal == "2x chance":
                want = f">= 2 x chance ({_num(chance)})"
                met = None if value is None or chance is None else value >= 2 * chance
            else:
                want = f"<= chance / 2 ({_num(chance)} / 2)"
                met = None if value is None or chance is None else value <= chance / 2
            queries = trained.get(key[: key.index("_view_")] + "_view_queries") if "_view_" in key else None
            seen = "n/a" if value is None else \
                f"{value:.3f} (random init {_num(base)}){f'; {queries} queries' if queries else ''}"
        else:
            want = f">= {goal}"
            met = None if value is None else value >= goal
            seen = "n/a" if value is None else f"{value:.3f} (random init {_num(base)})"
        rows.append((label, want, seen, met))
    return rows


def model_card(meta: dict[str, Any], path: str | Path) -> str:
    """The Markdown model card of the encoder file ``path`` whose metadata is ``meta``."""
    path = Path(path)
    model = meta["model"]
    stages = meta["training"]["stages"]
    evaluation = meta["evaluation"]
    throughput = meta.get("throughput") or {}
    depth = model.get("depth") or ""
    size_mb = path.stat().st_size / 1e6 if path.exists() else float("nan")
    lines = [
        f"# Model card: {meta['name']}",
        "",
        f"`{path.name}`: fp16 safetensors, {size_mb:.1f} MB, {meta.get('parameters', 0) / 1e6:.1f} M parameters; "
        f"its JSON metadata holds everything below (this card is generated from it by `training/evaluate/model_card.py`).",
        "",
        f"**What it is.** {meta['description']} ViT-{model['arch']}/{model['patch_size']}"
        f"{f' ({depth} blocks)' if depth else ''} with {model.get('reg_tokens', 0)} register tokens, pretrained "
        f"with {method(stages[-1]['config'])}, by recipe `{meta['recipe']}`. Input: the breast-tissue bounding box, tissue-percentile windowing, "
        f"{meta['preprocess']['resolution']} px on the long side "
        f"({meta['preprocess']['resolution'] // model['patch_size']} patches of {model['patch_size']} px). "
        f"Not for clinical use.",
        "",
        "**Training.**",
        "",
        "| stage | steps | images per step | crops (global / local px) | command |",
        "|---|---|---|---|---|",
    ]
    for stage in stages:
        c = stage["config"]
        lines.append(f"| {stage['name']} | {stage['steps']} | {c['train']['batch_size']} | "
                     f"{c['sampler']['n_global']} x {c['sampler']['global_size']} / {c['sampler']['n_local']} x "
                     f"{c['sampler']['local_size']} | `{' '.join(stage['command'] or [])}` |")
    data = meta["training"].get("corpus") or {}
    if data:
        parts = ", ".join(f"{name} {info['images']}" for name, info in data.get("collections", {}).items())
        lines += ["", f"Data (`mammodino corpus`): {parts} images; the real held-out split "
                      f"({data.get('heldout_images', 'n/a')} images) and the phantom benchmark were never "
                      f"pretrained on."]
    if throughput:
        mfu = throughput.get("mfu")
        lines += ["", f"Throughput of the first stage on {throughput.get('device', 'n/a')}: "
                      f"{_num(throughput.get('images_per_s'), 1)} images/s (median of logged steps), data loading "
                      f"{_num(throughput.get('data_wait_share'), 3)} of the step, "
                      f"{_num((throughput.get('flops_per_image') or 0) / 1e9, 2)} GFLOP per image, model-FLOPs "
                      f"utilisation {'n/a (no known peak for this device)' if mfu is None else f'{mfu:.1%}'}; "
                      f"{_num(throughput.get('hours'), 2)} h of training in all."]
    curve = meta["training"].get("learning_curve") or []
    if curve:
        lines += ["", "**Learning curve** (written by the run into `metrics.jsonl`; measured on the EMA teacher):", "",
                  "| stage | step | " + " | ".join(label for _, label in CURVE) + " |",
                  "|---|---|" + "---|" * len(CURVE)]
        for point in curve:
            lines.append(f"| {point.get('stage', '')} | {point['step']} | "
                         + " | ".join(_num(point.get(key)) for key, _ in CURVE) + " |")
    lines += ["", f"**Evaluation against a random-init encoder of the same architecture** "
                  f"({evaluation.get('random_spec', 'random weights')}) at {evaluation['resolution']} px "
                  f"({evaluation['protocol']}):", "",
              "| measure | this encoder | random init | chance |", "|---|---|---|---|"]
    for label, trained, random, chance in evaluation_rows(evaluation):
        lines.append(f"| {label} | {_num(trained)} | {_num(random)} | {_num(chance)} |")
    left_out = {k[: -len("_left_out")]: v for k, v in evaluation["trained"].items() if k.endswith("_left_out")}
    if left_out:
        lines += ["", "Probes leave out classes seen in fewer than two patients (a patient-grouped cross-validation "
                      "cannot hold them out): " + "; ".join(f"{k}: {', '.join(v)}" for k, v in left_out.items()) + "."]
    lines += ["", "**Targets** (issue 12 of this project):", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    for label, want, seen, met in targets(evaluation):
        lines.append(f"| {label} | {want} | {seen} | {'n/a' if met is None else ('yes' if met else 'no')} |")
    heads = meta.get("head_validation") or {}
    if heads:
        lines += ["", f"**Task heads** (linear, `mammodino finetune --mode linear` on {meta.get('heads_trained_on')}; "
                      f"validation on held-out patients of that set):", "",
                  "| head | validation AUROC | balanced accuracy | FROC sensitivity at 1 / 2 FP per image |",
                  "|---|---|---|---|"]
        for name, info in heads.items():
            if "error" in info:
                lines.append(f"| {name} | not fitted: {info['error']} | | |")
                continue
            v = info.get("validation", {})
            froc = v.get("froc")
            sens = f"{froc['sensitivity_at_1_fp']:.2f} / {froc['sensitivity_at_2_fp']:.2f}" if froc else ""
            lines.append(f"| {name} | {_num(v.get('auroc'))} | {_num(v.get('balanced_accuracy'))} | {sens} |")
    if meta.get("limitations"):
        lines += ["", "**Limitations.** " + " ".join(meta["limitations"])]
    lines += ["", f"**Remake:** `{meta['remake']}`.", ""]
    return "\n".join(lines)


def clip_card(meta: dict[str, Any], path: str | Path) -> str:
    """The Markdown model card of a shipped CLIP file (``scripts/make_clip_demo.py``) from its metadata."""
    path = Path(path)
    train, evaluation = meta["training"], meta["evaluation"]
    text = meta["clip"]["text"]
    size_mb = path.stat().st_size / 1e6 if path.exists() else float("nan")
    params = meta["parameters"]
    lines = [
        f"# Model card: {meta['name']}", "",
        f"`{path.name}`: fp16 safetensors, {size_mb:.1f} MB, {params['image'] / 1e6:.1f} M image + "
        f"{params['text'] / 1e6:.1f} M text parameters; its JSON metadata holds everything below (this card is "
        f"generated from it by `training/evaluate/model_card.py`).", "",
        f"**What it is.** {meta['description']} Image side: `{Path(str(train['image_encoder'])).name}` (frozen). "
        f"Text side: a {text['depth']}-block, {text['width']}-wide transformer over a "
        f"{meta['clip'].get('vocabulary') or 'learnt'} WordPiece vocabulary built from the reports, embeddings of "
        f"{text['embed_dim']}. Loss: symmetric InfoNCE with the views of one breast as extra positives. "
        f"Not for clinical use.", "",
        "**Training.**", "",
        f"{train['steps']} steps of {train['config']['batch_size']} image-report pairs; loss "
        f"{train['loss_first_last'][0]:.3f} -> {train['loss_first_last'][1]:.3f}; "
        f"{train['images_per_s']:.0f} pairs/s (median step, 2-core CPU, frozen image features). Command: "
        f"`{' '.join(train['command'] or [])}`.", "",
        f"**Zero-shot on the phantom benchmark** (`{Path(evaluation['labels']).name}`, never trained on; "
        "prompts: `training/evaluate/prompts.json`), and linear probes on 1% / 10% / 100% of the labels "
        "(mean test AUROC over patient-grouped splits):", "",
        "| target | images | zero-shot AUROC | zero-shot bal. acc. | chance bal. acc. | probe, CLIP embeddings | "
        "probe, image-encoder features |",
        "|---|---|---|---|---|---|---|",
    ]
    for target, r in evaluation["zero_shot"].items():
        curve = r["label_efficiency"]["auroc"]
        cells = [" / ".join(_num(by[f]["mean"]) for f in ("0.01", "0.1", "1.0")) for by in (curve["clip"],
                                                                                         curve["image_encoder"])]
        lines.append(f"| {target} | {r['n']} | {_num(r['auroc'])} | {_num(r['balanced_accuracy'])} | "
                     f"{_num(r['chance']['balanced_accuracy'])} | {cells[0]} | {cells[1]} |")
    p = evaluation["pointing_game"]
    lines += ["", f"**Attribute maps: the pointing game** ({p['images']} lesion images; a hit when the map's peak "
                  f"over the breast falls on a patch holding lesion pixels; sentences {p['sentences']}):", "",
              f"| lesions | images | attribute map (against \"{p.get('reference')}\") | the sentence's own map | "
              "last-layer attention | random peak |", "|---|---|---|---|---|---|",
              f"| all | {p['images']} | {_num(p['clip'])} | {_num(p.get('clip_without_reference'))} | "
              f"{_num(p['attention'])} | {_num(p['random'])} |"]
    for kind, r in p["by_type"].items():
        lines.append(f"| {kind} | {r['images']} | {_num(r['clip'])} | {_num(r.get('clip_without_reference'))} | "
                     f"{_num(r['attention'])} | {_num(r['random'])} |")
    lines += ["", "**What it does not know.**", ""] + [f"- {item}" for item in meta["limitations"]]
    lines += ["", f"Remake: `{meta['remake']}`", ""]
    return "\n".join(lines)
