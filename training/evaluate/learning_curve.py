"""The learning curve of a pretraining run: cheap measures of the EMA teacher every few hundred steps,
so a researcher sees whether the encoder learns before spending GPU-weeks on it.

Two labels CSVs (paths relative to the CSV): a *real* set (columns ``path, patient_id, laterality,
view``; e.g. four-view CBIS-DDSM exams) and a *phantom* benchmark as ``mammodino phantom`` writes it
(``density, lesion, lesion_type, lesion_mask, patient_id, laterality, view``). Each image is read and
pre-processed once (:func:`training.evaluate.encoder.prepare`: tissue box, the run's intensity percentiles,
``resolution`` px on the long side) and kept in memory; each evaluation is then one forward pass with
last-layer attention per image (the teacher's backbone wrapped in an :class:`~training.evaluate.encoder.Encoder`,
eval mode, no gradients), and every measure is computed from those outputs:

* **Same-breast view retrieval** (label-free): for each 2D view, is the other view of the same breast
  (CC <-> MLO: same patient and laterality, another view) among its ``k`` nearest neighbours, by cosine
  similarity of the probe features (class token + mean patch token), among all other views of the set?
  Views without a partner are candidates, not queries; the same view of the same breast again (a
  duplicate, e.g. a MONOCHROME1 twin) is neither (it would be trivially near); DBT volumes are left out.
  Reported: top-1 and top-k hit rates and the partner's mean rank (ties count half), with their chance
  levels for a ranking at random (N candidates, m partners: m/N, 1 - C(N-m, k)/C(N, k), (N+1)/(m+1)),
  averaged over the queries. On the real set and, as a larger second measure, on the phantoms.
* **Attention in tissue / uniform**: the share of the last layer's class-token attention (mean over
  heads) inside the tissue mask (:func:`training.evaluate.infer.attention_in_tissue`) divided by the tissue's
  share of the input (what uniform attention gives, ``InferenceResult.tissue_share``); 1 is chance.
* **Phantom probes**: density (balanced accuracy, macro AUROC), lesion and lesion type (AUROC) by
  :mod:`training.evaluate.probe`'s patient-grouped cross-validated logistic regression, without bootstrap
  intervals; classes seen in fewer than two patients are left out (noted).
* **Lesion patch AUROC**: a linear patch head (standardised logistic regression, balanced class
  weights) on frozen patch tokens against the phantoms' lesion masks (:mod:`training.evaluate.heads.localise`'s
  patch targets and AUROC), trained and scored on a patient-grouped split.

Nothing here touches the training run's random state (torch's generator is forked, NumPy and Python
states are restored, every draw uses a private generator), so a run with the monitor on resumes
exactly and ends with the same weights as one without it.

:func:`evaluate` scores any encoder (a checkpoint, ``random:...``, the demo) with the same numbers;
:class:`Monitor` is what :func:`training.ssl.pretrain.pretrain_steps` calls every ``monitor.every`` steps.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from training.ssl.cache import file_digest
from training.errors import MammoInputError

if TYPE_CHECKING:  # torch loads with the first evaluation, not with the CLI's parser
    import torch

    from training.evaluate.encoder import Encoder, Output, Prepared

DEFAULT_RESOLUTION = 448
DEFAULT_K = 5
DEFAULT_MAX_IMAGES = 120
VIEW_COLUMNS = ("path", "patient_id", "laterality", "view")
PROBE_TARGETS = ("density", "lesion", "lesion_type")
# One C per decade over DINOv2's range, every other one: the 45-value sweep of a probe report would
# dominate an evaluation that must stay under a minute on 2 cores.
MONITOR_C_GRID = tuple(float(c) for c in 10.0 ** np.arange(-6, 6, 2))
PATCH_VAL_FRACTION = 0.3
MAX_PATCHES = 20_000  # background patches the patch head trains on (all lesion patches are kept)


# --- the images ------------------------------------------------------------------------------------

@dataclass
class MonitorImage:
    """One row of a monitor CSV; ``prepared`` (and, for phantoms with masks, ``targets``: patch targets
    1 lesion / 0 background / -1 left out) once :meth:`MonitorSet.prepare` has run."""

    path: Path
    patient: str
    laterality: str
    view: str
    row: dict[str, str]
    prepared: Prepared | None = None
    targets: np.ndarray | None = None

    @property
    def volume(self) -> bool:
        return self.prepared is not None and self.prepared.frame is not None


@dataclass
class MonitorSet:
    """The images of one monitor CSV (``name`` "real" or "phantom"), at most ``max_images`` of them
    (whole patients, chosen by a seeded shuffle), with the CSV's SHA-256 for the record."""

    name: str
    csv: Path
    sha256: str
    images: list[MonitorImage]
    rows: int
    prepared_with: tuple | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, csv_path: str | Path, name: str, max_images: int = DEFAULT_MAX_IMAGES,
             option: str | None = None) -> "MonitorSet":
        """Rows of ``csv_path`` (one line naming ``option`` for a missing file, column or image)."""
        from training.labels import read_rows

        option = option or f"--monitor-{name}"
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise MammoInputError(f"{option} {csv_path}: no such file (a labels CSV with columns "
                                  f"{', '.join(VIEW_COLUMNS)})")
        rows = read_rows(csv_path)
        missing = [c for c in VIEW_COLUMNS if c not in rows[0]]
        if missing:
            raise MammoInputError(f"{option} {csv_path.name}: needs the columns {', '.join(missing)} "
                                  f"(it has {', '.join(sorted(rows[0]))})")
        rows = [r for r in rows if (r.get("path") or "").strip()]
        images = [MonitorImage(csv_path.parent / r["path"].strip(), r["patient_id"].strip() or f"row{i}",
                               r["laterality"].strip().upper(), r["view"].strip().upper(), r)
                  for i, r in enumerate(rows)]
        absent = [im.path for im in images if not im.path.exists()]
        if absent:
            raise MammoInputError(f"{option} {csv_path.name}: {len(absent)} of {len(images)} paths do not exist, "
                                  f"e.g. {absent[0]} (paths are relative to the CSV)")
        notes = []
        if max_images and len(images) > max_images:
            patients = sorted({im.patient for im in images})
            np.random.default_rng(0).shuffle(patients)
            kept: set[str] = set()
            count = 0
            for patient in patients:
                size = sum(im.patient == patient for im in images)
                if kept and count + size > max_images:
                    continue
                kept.add(patient)
                count += size
            notes.append(f"{name}: {count} of {len(images)} images used ({len(kept)} patients; "
                         f"monitor.max_images {max_images})")
            images = [im for im in images if im.patient in kept]
        return cls(name, csv_path, file_digest(csv_path), images, len(rows), notes=notes)

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.csv.resolve()), "sha256": self.sha256, "rows": self.rows,
                "images": len(self.images), "patients": len({im.patient for im in self.images})}

    def prepare(self, resolution: int, patch: int, percentiles: Sequence[float]) -> float:
        """Read and pre-process every image once (again only if the settings change); seconds taken."""
        settings = (int(resolution), int(patch), tuple(float(p) for p in percentiles))
        if self.prepared_with == settings:
            return 0.0
        from training.evaluate.encoder import prepare_image
        from training.dicom.io import open_image

        tick = time.perf_counter()
        masks = "lesion_mask" in (self.images[0].row if self.images else {})
        for image in self.images:
            image.prepared = prepare_image(open_image(image.path), None, resolution, patch, percentiles)
            image.targets = None
            if masks and (image.row.get("lesion_mask") or "").strip():
                from training.evaluate.heads.localise import lesion_regions, patch_targets

                regions = lesion_regions(image.row, "lesion_mask", self.csv.parent, image.prepared)
                image.targets = patch_targets(regions, image.prepared)[0]
        self.prepared_with = settings
        return time.perf_counter() - tick


# --- the measures ----------------------------------------------------------------------------------

def view_retrieval(features: np.ndarray, patients: Sequence[str], lateralities: Sequence[str],
                   views: Sequence[str], k: int = DEFAULT_K) -> dict[str, Any]:
    """Same-breast view retrieval (see the module docstring): ``top1``, ``topk``, ``mean_rank`` and their
    ``*_chance`` levels, ``queries`` and ``candidates`` (mean per query); None values when no view has
    a partner. An empty laterality or view makes a view a candidate only."""
    from training.evaluate.retrieval import normalise

    x = normalise(np.asarray(features, dtype=np.float64)).astype(np.float64)
    patients, sides, views = (np.asarray(v, dtype=object) for v in (patients, lateralities, views))
    n = len(x)
    if not n == len(patients) == len(sides) == len(views):
        raise ValueError("features, patients, lateralities and views must have one row each")
    similarity = x @ x.T
    known = (sides != "") & (views != "")  # a view without laterality or view name has no partner
    breast = (patients[:, None] == patients[None, :]) & (sides[:, None] == sides[None, :]) \
        & known[:, None] & known[None, :]
    same_view = views[:, None] == views[None, :]
    partner = breast & ~same_view
    candidate = ~(breast & same_view) & ~np.eye(n, dtype=bool)  # nor the same view of the same breast again
    hits1, hitsk, ranks, chance1, chancek, chance_rank, sizes = [], [], [], [], [], [], []
    for i in range(n):
        if not partner[i].any():
            continue
        scores, is_partner = similarity[i, candidate[i]], partner[i, candidate[i]]
        best = scores[is_partner].max()
        others = scores[~is_partner]
        rank = 1 + (others > best).sum() + 0.5 * (others == best).sum()
        n_cand, m = len(scores), int(is_partner.sum())
        ranks.append(rank)
        hits1.append(rank <= 1)
        hitsk.append(rank <= k)
        chance1.append(m / n_cand)
        chancek.append(1 - _comb_ratio(n_cand - m, n_cand, min(k, n_cand)))
        chance_rank.append((n_cand + 1) / (m + 1))
        sizes.append(n_cand)
    if not ranks:
        return {"top1": None, "topk": None, "mean_rank": None, "top1_chance": None, "topk_chance": None,
                "mean_rank_chance": None, "queries": 0, "candidates": None, "k": k}
    return {"top1": float(np.mean(hits1)), "topk": float(np.mean(hitsk)), "mean_rank": float(np.mean(ranks)),
            "top1_chance": float(np.mean(chance1)), "topk_chance": float(np.mean(chancek)),
            "mean_rank_chance": float(np.mean(chance_rank)), "queries": len(ranks),
            "candidates": float(np.mean(sizes)), "k": k}


def _comb_ratio(a: int, b: int, k: int) -> float:
    """C(a, k) / C(b, k) for a <= b (0 when a < k): the chance that k draws from b miss all b - a."""
    return math.comb(a, k) / math.comb(b, k) if a >= k else 0.0


def bootstrap_ci(n: int, statistic: Callable[[np.ndarray], float | None], boot: int,
                 seed: int = 0) -> list[float] | None:
    """Percentile 95% interval of ``statistic(indices)`` over ``boot`` resamplings (with replacement) of
    ``n`` items; None when no draw gives a value (``statistic`` may return None)."""
    rng = np.random.default_rng(seed)
    values = [v for v in (statistic(rng.integers(0, n, n)) for _ in range(boot)) if v is not None]
    if not values:
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return [round(float(low), 4), round(float(high), 4)]


def attention_share(outputs: Sequence[Output], prepared: Sequence[Prepared], boot: int = 0) -> dict[str, Any]:
    """Mean attention in tissue, mean tissue share (uniform attention) and mean of their per-image
    ratio, as :func:`training.evaluate.infer.result_of` defines them (last layer, mean over heads); with ``boot``
    draws also ``ratio_ci95``, a bootstrap interval over the images."""
    from training.evaluate.infer import attention_in_tissue

    inside, uniform, ratios = [], [], []
    for output, item in zip(outputs, prepared):
        if output.attention is None:  # an encoder without attention (a CNN student)
            continue
        mean = output.attention.mean(0)
        share = float(np.mean(item.tissue))
        inside.append(attention_in_tissue(mean, item.tissue))
        uniform.append(share)
        if share > 0:
            ratios.append(inside[-1] / share)
    if not inside:
        return {"attention_in_tissue": None, "tissue_share": None, "ratio": None}
    share = {"attention_in_tissue": float(np.mean(inside)), "tissue_share": float(np.mean(uniform)),
             "ratio": float(np.mean(ratios)) if ratios else None}
    if boot and ratios:
        per_image = np.asarray(ratios)
        share["ratio_ci95"] = bootstrap_ci(len(per_image), lambda idx: float(per_image[idx].mean()), boot)
    return share


def phantom_probe(features: np.ndarray, images: Sequence[MonitorImage], target: str, seed: int = 0,
                  grid: Sequence[float] = MONITOR_C_GRID) -> tuple[dict[str, Any], list[str]]:
    """Out-of-fold AUROC and balanced accuracy of ``target`` (patient-grouped folds, no bootstrap), their
    chance levels, and notes. Classes in fewer than two patients are left out; too few: ``{}``."""
    from training.evaluate.metrics import classification_metrics, grouped_folds
    from training.evaluate.probe import out_of_fold_probabilities

    labelled = {i: im.row[target].strip() for i, im in enumerate(images) if (im.row.get(target) or "").strip()}
    patients_of: dict[str, set[str]] = {}
    for i, label in labelled.items():
        patients_of.setdefault(label, set()).add(images[i].patient)
    rare = sorted(c for c, p in patients_of.items() if len(p) < 2)
    notes = [f"{target}: class {c!r} left out (in fewer than 2 patients)" for c in rare]
    keep = [i for i, label in labelled.items() if label not in rare]
    classes = sorted({labelled[i] for i in keep})
    if len(classes) < 2:
        return {}, [f"{target}: fewer than two classes in 2+ patients each; not probed"]
    y = np.array([classes.index(labelled[i]) for i in keep])
    groups = [images[i].patient for i in keep]
    x = np.asarray(features, dtype=np.float64)[keep]
    splits, fold_notes = grouped_folds(y, groups, 5, seed, classes)
    proba, _ = out_of_fold_probabilities(x, y, groups, splits, len(classes), seed, grid)
    scores = classification_metrics(y, proba)
    return {"auroc": scores["auroc"], "auroc_chance": 0.5, "bal_acc": scores["balanced_accuracy"],
            "bal_acc_chance": 1 / len(classes), "n": len(y)}, notes + [f"{target}: {n}" for n in fold_notes]


def lesion_patch_auroc(outputs: Sequence[Output], images: Sequence[MonitorImage], seed: int = 0,
                       boot: int = 0) -> tuple[float | None, list[float] | None, list[str]]:
    """Patch-level lesion AUROC of a linear patch head fitted on the patch tokens of one patient-grouped
    part of the phantoms and scored on the other (:func:`training.evaluate.heads.localise.patch_auroc`), its
    bootstrap 95% interval over the held-out images when ``boot`` > 0 (else None), and notes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    from training.evaluate.metrics import grouped_split
    from training.evaluate.heads.localise import patch_auroc

    usable = [i for i, im in enumerate(images) if im.targets is not None]
    if len(usable) < 2 or not any((images[i].targets == 1).any() for i in usable):
        return None, None, ["lesion patch AUROC: no lesion masks with lesions"]
    strata = np.array([(images[i].row.get("lesion") or "0").strip() for i in usable])
    groups = [images[i].patient for i in usable]
    if len(set(groups)) < 2:
        return None, None, ["lesion patch AUROC: one patient; a held-out split needs two"]
    train, val = grouped_split(strata, groups, PATCH_VAL_FRACTION, seed)
    train, val = [usable[i] for i in train], [usable[i] for i in val]
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in train:
        t = images[i].targets.reshape(-1)
        keep = t >= 0
        xs.append(outputs[i].patches.reshape(-1, outputs[i].patches.shape[-1])[keep])
        ys.append(t[keep])
    x, y = np.concatenate(xs), np.concatenate(ys)
    if len(np.unique(y)) < 2:
        return None, None, ["lesion patch AUROC: the training part holds no lesion patch"]
    background = np.flatnonzero(y == 0)
    if len(background) > MAX_PATCHES:
        chosen = np.sort(np.concatenate([np.flatnonzero(y == 1), rng.choice(background, MAX_PATCHES, replace=False)]))
        x, y = x[chosen], y[chosen]
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs stopping at max_iter is fine for a monitor
        head = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=200))
        head.fit(x, y)
        maps = [head.decision_function(outputs[i].patches.reshape(-1, outputs[i].patches.shape[-1]))
                .reshape(images[i].targets.shape) for i in val]
    targets, tissue = [images[i].targets for i in val], [images[i].prepared.tissue for i in val]
    auroc = patch_auroc(maps, targets, tissue)
    if auroc is None:
        return None, None, ["lesion patch AUROC: the held-out part holds one kind of patch"]
    ci = bootstrap_ci(len(val), lambda idx: patch_auroc([maps[i] for i in idx], [targets[i] for i in idx],
                                                        [tissue[i] for i in idx]), boot) if boot else None
    return auroc, ci, []


# --- one evaluation --------------------------------------------------------------------------------

def run_outputs(encoder: Encoder, images: Sequence[MonitorImage]) -> list[Output]:
    """One forward pass with last-layer attention per image (same-shaped images batched), in order."""
    order = sorted(range(len(images)), key=lambda i: images[i].prepared.pixels.shape)
    outputs = encoder.run([images[i].prepared for i in order], attention="last")
    by_index = dict(zip(order, outputs))
    return [by_index[i] for i in range(len(images))]


def measure(encoder: Encoder, sets: Sequence[MonitorSet], k: int = DEFAULT_K, seed: int = 0,
            boot: int = 0) -> tuple[dict, list]:
    """The flat measures (JSON-ready: numbers or None) of ``encoder`` on prepared monitor ``sets`` and
    notes. Names: ``{real,phantom}_view_{top1,topk,mean_rank}`` (+ ``_chance``), ``..._queries``;
    ``attention_in_tissue_{set}``, ``tissue_share_{set}``, ``attention_ratio_{set}`` (+ ``_chance`` 1);
    ``phantom_{density,lesion,lesion_type}_auroc``, ``phantom_density_bal_acc`` (+ ``_chance``);
    ``phantom_lesion_patch_auroc`` (+ ``_chance``); with ``boot`` bootstrap draws also ``_ci95`` of the
    attention ratios and the lesion patch AUROC (over images)."""
    result: dict[str, Any] = {"k": k}
    notes: list[str] = []
    for s in sets:
        notes += s.notes
        if not s.images:
            continue
        outputs = run_outputs(encoder, s.images)
        features = np.stack([o.features for o in outputs])
        flat = [i for i, im in enumerate(s.images) if not im.volume]
        views = view_retrieval(features[flat], [s.images[i].patient for i in flat],
                               [s.images[i].laterality for i in flat], [s.images[i].view for i in flat], k)
        for key in ("top1", "topk", "mean_rank"):
            result[f"{s.name}_view_{key}"] = views[key]
            result[f"{s.name}_view_{key}_chance"] = views[f"{key}_chance"]
        result[f"{s.name}_view_queries"] = views["queries"]
        share = attention_share(outputs, [im.prepared for im in s.images], boot)
        if "ratio_ci95" in share:
            result[f"attention_ratio_{s.name}_ci95"] = share["ratio_ci95"]
        result[f"attention_in_tissue_{s.name}"] = share["attention_in_tissue"]
        result[f"tissue_share_{s.name}"] = share["tissue_share"]
        result[f"attention_ratio_{s.name}"] = share["ratio"]
        result[f"attention_ratio_{s.name}_chance"] = 1.0
        result[f"{s.name}_images"] = len(s.images)
        if s.name != "phantom":
            continue
        for target in PROBE_TARGETS:
            if target not in s.images[0].row:
                continue
            try:
                scores, target_notes = phantom_probe(features, s.images, target, seed)
            except MammoInputError as exc:  # e.g. a class in too few patients for the folds
                scores, target_notes = {}, [f"{target}: {exc}"]
            notes += target_notes
            keys = ("auroc", "bal_acc") if target == "density" else ("auroc",)  # lesion accuracy: see AUROC
            for key in keys if scores else ():
                result[f"phantom_{target}_{key}"] = scores[key]
                result[f"phantom_{target}_{key}_chance"] = scores[f"{key}_chance"]
        if "lesion_mask" in s.images[0].row:
            auroc, ci, patch_notes = lesion_patch_auroc(outputs, s.images, seed, boot)
            if ci is not None:
                result["phantom_lesion_patch_auroc_ci95"] = ci
            result["phantom_lesion_patch_auroc"] = auroc
            result["phantom_lesion_patch_auroc_chance"] = 0.5
            notes += patch_notes
    return {key: _round(value) for key, value in result.items()}, notes


def _round(value: Any) -> Any:
    return round(float(value), 5) if isinstance(value, (float, np.floating)) else value


class Monitor:
    """The learning-curve monitor of a pretraining run: the CSVs are read (and checked) when it is made,
    the images pre-processed at the first evaluation (kept in memory), and each call measures a live
    backbone without touching the run's random state or leaving it in eval mode."""

    def __init__(self, real: str | Path | None, phantom: str | Path | None, resolution: int = DEFAULT_RESOLUTION,
                 k: int = DEFAULT_K, max_images: int = DEFAULT_MAX_IMAGES, percentiles: Sequence[float] = (0.5, 99.5),
                 every: int = 0, options: tuple[str, str] = ("--monitor-real", "--monitor-phantom")):
        if real is None and phantom is None:
            raise MammoInputError(f"the learning-curve monitor needs {options[0]} and/or {options[1]} (labels CSVs)")
        if k < 1:
            raise MammoInputError(f"monitor k {k}: ask for at least one neighbour")
        self.sets = [MonitorSet.read(path, name, max_images, option)
                     for path, name, option in ((real, "real", options[0]), (phantom, "phantom", options[1]))
                     if path is not None]
        self.resolution, self.k, self.every = int(resolution), int(k), int(every)
        self.percentiles = tuple(percentiles)
        self.max_images = max_images
        self.boot = 0  # bootstrap draws for intervals (the benchmark's; a run's curve goes without)

    def due(self, step: int, end: int) -> bool:
        """Whether step ``step`` (completed steps) of a run ending at ``end`` is evaluated."""
        return self.every > 0 and step > 0 and (step % self.every == 0 or step == end)

    def inputs(self) -> dict[str, Any]:
        """What a checkpoint records: each CSV with its SHA-256, and the settings."""
        return {**{s.name: s.describe() for s in self.sets}, "resolution": self.resolution, "k": self.k,
                "every": self.every, "max_images": self.max_images}

    def __call__(self, backbone: torch.nn.Module, step: int | None = None) -> dict[str, Any]:
        """One evaluation of ``backbone`` (e.g. the live EMA teacher's): ``{"eval": {...}, "notes": [...],
        "eval_s": seconds, "prepare_s": seconds}``."""
        import torch

        from training.evaluate.encoder import Encoder

        tick = time.perf_counter()
        prepare_s = sum(s.prepare(self.resolution, backbone.config.patch_size, self.percentiles) for s in self.sets)
        was_training = [m.training for m in backbone.modules()]
        device = next(backbone.parameters()).device
        numpy_state, python_state = np.random.get_state(), random.getstate()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                encoder = Encoder(backbone, resolution=self.resolution, percentiles=self.percentiles,
                                  source="teacher" if step is None else f"teacher, step {step}")
                values, notes = measure(encoder, self.sets, self.k, boot=self.boot)
        finally:
            for module, mode in zip(backbone.modules(), was_training):
                module.training = mode
            np.random.set_state(numpy_state)
            random.setstate(python_state)
        return {"eval": values, "notes": notes, "eval_s": round(time.perf_counter() - tick, 2),
                "prepare_s": round(prepare_s, 2)}


def evaluate(encoder_or_spec: Encoder | str | Path | None, real_csv: str | Path | None = None,
             phantom_csv: str | Path | None = None, resolution: int = DEFAULT_RESOLUTION, k: int = DEFAULT_K,
             max_images: int = DEFAULT_MAX_IMAGES, device: str | None = None, boot: int = 0) -> dict[str, Any]:
    """The learning-curve measures of any encoder (an :class:`Encoder`, or a spec for
    :func:`training.evaluate.encoder.load_encoder`: a checkpoint or run folder, ``random:cpu-tiny``, None for the
    demo) on the real and phantom CSVs, as a pretraining run's eval line holds them (with ``boot``
    bootstrap draws, also intervals), plus the encoder, the inputs and the time taken."""
    from training.evaluate.encoder import Encoder, load_encoder
    from training.evaluate.probe import resolve_device

    monitor = Monitor(real_csv, phantom_csv, resolution, k, max_images, options=("--real", "--phantom"))
    encoder = encoder_or_spec if isinstance(encoder_or_spec, Encoder) else \
        load_encoder(encoder_or_spec, resolve_device(device))
    monitor.percentiles, monitor.boot = encoder.percentiles, boot
    report = monitor(encoder.backbone)
    return {**report, "encoder": {**encoder.describe(), "resolution": monitor.resolution},
            "inputs": monitor.inputs()}
