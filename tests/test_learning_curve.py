"""The learning curve (training.evaluate.learning_curve): view retrieval on constructed features (perfect, worst,
collapsed, and chance levels checked against random rankings), attention over uniform, the measures
of a tiny encoder on the sample data, the CBIS-DDSM views and a small phantom benchmark, a monitored
pretraining run (eval lines, the same weights as without the monitor, exact resume), the CLI, and the
reading of eval lines from metrics.jsonl."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from training.checkpoint import load_checkpoint, read_metadata, unprefixed
from training.cli import main
from training.ssl.presets import load_config
from training.evaluate.encoder import Output, Prepared, random_encoder
from training.runs import JsonlReader, eval_curves, loss_terms
from training.evaluate.learning_curve import Monitor, attention_share, evaluate, view_retrieval
from training.ssl.pretrain import pretrain

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_data" / "labels.csv"
MICRO = [
    "model.embed_dim=48", "model.depth=2", "model.num_heads=3", "model.patch_size=8", "model.img_size=32",
    "model.dino_head.n_prototypes=64", "model.dino_head.hidden_dim=64", "model.dino_head.bottleneck_dim=32",
    "sampler.patch_size=8", "sampler.global_size=32", "sampler.local_size=16", "sampler.n_local=2",
    "train.batch_size=4", "train.num_workers=0", "train.log_every=1", "train.checkpoint_every=2",
    "schedule.total_steps=40", "schedule.warmup_steps=4", "schedule.lr_scaling=none", "schedule.base_lr=0.002",
    "monitor.resolution=64",
]


# --- view retrieval on constructed features --------------------------------------------------------

def breasts(n_patients: int = 3):
    """Four views per patient (R/L x CC/MLO) and one view without a partner (patient X, L CC)."""
    rows = [(f"P{p}", side, view) for p in range(n_patients) for side in "RL" for view in ("CC", "MLO")]
    return rows + [("X", "L", "CC")]


def unit_rows(rows, rng, spread: float = 0.05) -> np.ndarray:
    """Features whose views of one breast lie close together and far from every other breast."""
    centres = {}
    out = []
    for patient, side, _ in rows:
        centre = centres.setdefault((patient, side), rng.normal(size=32))
        out.append(centre + spread * rng.normal(size=32))
    return np.array(out)


def test_retrieval_finds_every_partner_first_when_the_features_put_it_nearest():
    rows = breasts()
    features = unit_rows(rows, np.random.default_rng(0))
    result = view_retrieval(features, *zip(*rows), k=3)
    # 12 paired views are queries; the unpaired one only a candidate: N = 12 candidates, m = 1 partner
    assert result["queries"] == 12 and result["candidates"] == 12
    assert result["top1"] == result["topk"] == 1.0 and result["mean_rank"] == 1.0
    assert result["top1_chance"] == pytest.approx(1 / 12)
    assert result["topk_chance"] == pytest.approx(3 / 12)  # 1 - C(11, 3) / C(12, 3)
    assert result["mean_rank_chance"] == pytest.approx(6.5)  # (N + 1) / (m + 1)


def test_retrieval_ranks_a_partner_last_when_it_is_the_farthest_and_at_chance_when_features_collapse():
    rows = [("P", "R", "CC"), ("P", "R", "MLO"), ("Q", "R", "CC"), ("Q", "R", "MLO"), ("Z", "L", "CC")]
    away = np.array([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0], [0, 0, 1.0]])
    result = view_retrieval(away, *zip(*rows), k=2)
    assert result["queries"] == 4 and result["top1"] == 0.0 and result["topk"] == 0.0
    assert result["mean_rank"] == 4.0  # last of the 4 candidates
    same = view_retrieval(np.ones((5, 3)), *zip(*rows), k=2)  # a collapsed encoder: every score ties
    assert same["top1"] == 0.0 and same["mean_rank"] == same["mean_rank_chance"] == 2.5


def test_the_same_view_again_is_no_candidate_and_two_partners_change_the_chance_levels():
    rows = breasts(2) + [("P0", "R", "CC")]  # P0's right CC twice (e.g. its MONOCHROME1 twin)
    features = unit_rows(rows, np.random.default_rng(1))
    features[-1] = features[0]  # identical to the first: it must not push the MLO partner down
    result = view_retrieval(features, *zip(*rows), k=2)
    assert result["queries"] == 9 and result["top1"] == 1.0
    n = len(rows) - 1
    # P0 R CC and its twin: N = n - 1 (the other is excluded), m = 1; P0 R MLO: N = n, m = 2; others N = n, m = 1
    top1 = [1 / (n - 1)] * 2 + [2 / n] + [1 / n] * 6
    topk = [2 / (n - 1)] * 2 + [1 - math.comb(n - 2, 2) / math.comb(n, 2)] + [2 / n] * 6
    rank = [n / 2] * 2 + [(n + 1) / 3] + [(n + 1) / 2] * 6
    assert result["top1_chance"] == pytest.approx(np.mean(top1))
    assert result["topk_chance"] == pytest.approx(np.mean(topk))
    assert result["mean_rank_chance"] == pytest.approx(np.mean(rank))


def test_the_chance_levels_are_what_random_features_score():
    rows = breasts(2) + [("P0", "R", "CC")]  # queries with one and with two partners
    rng = np.random.default_rng(2)
    draws = [view_retrieval(rng.normal(size=(len(rows), 8)), *zip(*rows), k=3) for _ in range(600)]
    for key, tolerance in (("top1", 0.02), ("topk", 0.03), ("mean_rank", 0.2)):
        assert np.mean([d[key] for d in draws]) == pytest.approx(draws[0][f"{key}_chance"], abs=tolerance), key


def test_no_partner_anywhere_gives_no_queries():
    result = view_retrieval(np.eye(3), ["A", "B", "C"], ["L", "L", "L"], ["CC", "CC", "MLO"])
    assert result["queries"] == 0 and result["top1"] is None


# --- attention over uniform ------------------------------------------------------------------------

def test_uniform_attention_scores_one_and_attention_only_on_tissue_scores_one_over_the_share():
    tissue = np.zeros((4, 4), np.float32)
    tissue[:, :2] = 1.0  # half of the patches are tissue
    prepared = Prepared(np.zeros((32, 32), np.float32), (0, 0, 32, 32), (4, 4), (8.0, 8.0), tissue, (32, 32))
    uniform = Output(np.zeros(4), np.zeros((4, 4, 4)), attention=np.full((2, 4, 4), 1 / 16))
    on_tissue = Output(np.zeros(4), np.zeros((4, 4, 4)), attention=np.stack([tissue / tissue.sum()] * 2))
    assert attention_share([uniform], [prepared]) == {"attention_in_tissue": 0.5, "tissue_share": 0.5, "ratio": 1.0}
    assert attention_share([on_tissue], [prepared])["ratio"] == pytest.approx(2.0)
    # The benchmark's interval over images spans the images' ratios: all uniform -> [1, 1]; mixed -> [1, 2].
    assert attention_share([uniform] * 3, [prepared] * 3, boot=200)["ratio_ci95"] == [1.0, 1.0]
    low, high = attention_share([uniform, on_tissue] * 4, [prepared] * 8, boot=500)["ratio_ci95"]
    assert 1.0 <= low < 1.5 < high <= 2.0


# --- the measures of an encoder ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_csv(cbis_cases, tmp_path_factory) -> Path:
    """The 8 CBIS-DDSM views as a real-views CSV (paths relative to it)."""
    path = tmp_path_factory.mktemp("real") / "real.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "patient_id", "laterality", "view"])
        for case in cbis_cases:
            for key, view in case.items():
                writer.writerow([os.path.relpath(view, path.parent), Path(view).parent.name, key[0].upper(),
                                 key[1:].upper()])
    return path


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """Eight small four-view phantom exams (seed 1: densities A, B, C in 2+ patients each, masses in two)."""
    from training.phantom.dataset import generate

    out = tmp_path_factory.mktemp("bench") / "bench"
    generate(out, "exam", 8, 1, shape=(128, 104), workers=1, progress=False)
    return out / "labels.csv"


def test_a_tiny_encoder_on_the_sample_data_and_cbis_gives_measures_in_range_with_the_right_chance_levels(real_csv):
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    report = evaluate("random:cpu-tiny", real_csv, SAMPLES, resolution=96, k=5)
    values = report["eval"]
    # nothing random in the caller changed (a training run's resume depends on it)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))
    # real: 8 views of 2 patients; each has one partner among the 7 others
    assert values["real_view_queries"] == 8 and values["real_images"] == 8
    assert values["real_view_top1_chance"] == pytest.approx(1 / 7, abs=1e-4)
    assert values["real_view_topk_chance"] == pytest.approx(5 / 7, abs=1e-4)
    assert values["real_view_mean_rank_chance"] == 4.0
    # sample data: 5 FFDM views of one patient (RCC twice), the 3 DBT rows take no part in retrieval
    assert values["phantom_view_queries"] == 5 and values["phantom_images"] == 8
    assert values["phantom_view_top1_chance"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 4 + 2 / 4 + 1 / 4) / 5, abs=1e-4)
    for name in ("real", "phantom"):
        assert 0 <= values[f"{name}_view_top1"] <= values[f"{name}_view_topk"] <= 1
        assert 1 <= values[f"{name}_view_mean_rank"] <= 7
        assert 0 < values[f"attention_in_tissue_{name}"] <= 1 and 0 < values[f"tissue_share_{name}"] <= 1
        assert 0 < values[f"attention_ratio_{name}"] and values[f"attention_ratio_{name}_chance"] == 1.0
    # one virtual patient: no grouped probe, no held-out patch split; said so
    assert not any(key.startswith(("phantom_density", "phantom_lesion_auroc")) for key in values)
    assert values["phantom_lesion_patch_auroc"] is None
    assert any("fewer than two classes" in note for note in report["notes"])
    assert report["inputs"]["real"]["sha256"] == hashlib.sha256(real_csv.read_bytes()).hexdigest()
    assert report["encoder"]["source"] == "random:cpu-tiny" and report["eval_s"] > 0


def test_the_phantom_probes_and_the_lesion_patch_auroc_on_a_small_benchmark(bench):
    encoder = random_encoder("cpu-tiny")
    monitor = Monitor(None, bench, resolution=64, every=1)
    first = monitor(encoder.backbone)
    values = first["eval"]
    assert values["phantom_images"] == 32 and values["phantom_view_queries"] == 32
    for key, chance in (("phantom_density_auroc", 0.5), ("phantom_density_bal_acc", 1 / 3),
                        ("phantom_lesion_auroc", 0.5), ("phantom_lesion_type_auroc", 0.5),
                        ("phantom_lesion_patch_auroc", 0.5)):
        assert 0 <= values[key] <= 1 and values[f"{key}_chance"] == pytest.approx(chance, abs=1e-4), key
    assert first["prepare_s"] > 0
    again = monitor(encoder.backbone)  # the images were prepared once; the measures are deterministic
    assert again["prepare_s"] == 0 and again["eval"] == values
    encoder.backbone.train()
    monitor(encoder.backbone)
    assert all(m.training for m in encoder.backbone.modules())  # a training backbone is left training


def test_bad_monitor_inputs_are_one_line(tmp_path, capsys):
    no_view = tmp_path / "no_view.csv"
    no_view.write_text("path,patient_id,laterality\nexam/RCC.dcm,P,R\n")
    missing = tmp_path / "missing.csv"
    missing.write_text("path,patient_id,laterality,view\nnope.dcm,P,R,CC\n")
    for args, message in ((["--phantom", str(no_view)], "needs the columns view"),
                          (["--real", str(missing)], "1 of 1 paths do not exist"),
                          (["--real", str(tmp_path / "absent.csv")], "no such file"),
                          ([], "name the data")):
        code = main(["monitor", "--checkpoint", "random:cpu-tiny", *args, "--json"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_the_monitor_command_prints_one_json_object(capsys):
    code = main(["monitor", "--checkpoint", "random:tiny/16", "--phantom", str(SAMPLES), "--resolution", "64",
                 "--json"])
    out = capsys.readouterr().out.strip()
    assert code == 0 and len(out.splitlines()) == 1
    report = json.loads(out)
    assert report["eval"]["phantom_view_queries"] == 5 and report["encoder"]["resolution"] == 64


# --- a monitored pretraining run ---------------------------------------------------------------------

def weights(run: Path) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(run / "checkpoints" / "last.safetensors")
    return unprefixed("model", tensors)


def test_a_monitored_run_writes_eval_lines_changes_no_weight_and_resumes_exactly(bench, tmp_path):
    on = load_config("cpu-tiny", MICRO + ["monitor.every=2"])
    off = load_config("cpu-tiny", MICRO)
    options = dict(cache=False, progress=False)
    report = pretrain(on, bench, tmp_path / "on", max_steps=3, monitor_phantom=bench, **options)
    pretrain(off, bench, tmp_path / "off", max_steps=3, **options)
    lines = [json.loads(line) for line in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m.get("kind")) for m in lines] == [(1, None), (2, None), (2, "eval"), (3, None), (3, "eval")]
    evals = [m for m in lines if m.get("kind") == "eval"]
    assert all(m["eval_s"] > 0 and 0 <= m["eval"]["phantom_density_auroc"] <= 1 for m in evals)
    assert report["metrics"]["eval"] == evals[-1]["eval"]  # the final report carries the last measures
    meta = read_metadata(tmp_path / "on" / "checkpoints" / "last.safetensors")
    assert meta["monitor"]["phantom"]["sha256"] == hashlib.sha256(bench.read_bytes()).hexdigest()
    assert meta["monitor"]["every"] == 2 and "real" not in meta["monitor"]
    # the monitor draws nothing from the run's generators: the same weights as without it
    straight, quiet = weights(tmp_path / "on"), weights(tmp_path / "off")
    for name in straight:
        assert torch.equal(straight[name], quiet[name]), name
    # stopped at step 2 and resumed with the monitor: the weights of the uninterrupted run, every line once
    pretrain(on, bench, tmp_path / "split", max_steps=2, monitor_phantom=bench, **options)
    pretrain(on, bench, tmp_path / "split", max_steps=3, resume=True, monitor_phantom=bench, **options)
    resumed = weights(tmp_path / "split")
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    again = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m.get("kind")) for m in again] == [(m["step"], m.get("kind")) for m in lines]
    assert [m["eval"] for m in again if m.get("kind") == "eval"] == [m["eval"] for m in evals]
    # the monitor's settings are no part of what resuming checks: continue without it
    pretrain(off, bench, tmp_path / "split", max_steps=4, resume=True, **options)


def test_a_preset_that_measures_every_n_steps_trains_without_a_curve_when_given_no_data(tmp_path):
    code = main(["pretrain", "--config", "cpu-tiny", "--data", str(SAMPLES), "--out", str(tmp_path / "run"),
                 "--max-steps", "1", "--no-cache", "--quiet", "--set", "monitor.every=1"])
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert code == 0 and lines and not any(line.get("kind") == "eval" for line in lines)


@pytest.mark.parametrize("extra, message", [
    (["--monitor-phantom", "{samples}"], "--set monitor.every="),
    (["--set", "monitor.every=2", "--monitor-real", "{samples}.missing"], "--monitor-real"),
    (["--set", "monitor.every=-1", "--monitor-real", "{samples}"], "monitor config"),
])
def test_pretrain_monitor_mistakes_exit_2_with_one_line(tmp_path, capsys, extra, message):
    extra = [a.format(samples=SAMPLES) for a in extra]
    code = main(["pretrain", "--config", "cpu-tiny", "--data", str(SAMPLES), "--out", str(tmp_path / "run"),
                 "--max-steps", "1", "--no-cache", "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# --- reading eval lines ------------------------------------------------------------------------------

def test_eval_lines_are_read_incrementally_kept_apart_from_the_losses_and_made_into_curves(tmp_path):
    path = tmp_path / "metrics.jsonl"
    train = lambda step: {"step": step, "total": 9.0 - step, "dino": 5.0, "images_per_s": 3.0}  # noqa: E731
    evaluation = lambda step, top1: {"step": step, "kind": "eval", "eval_s": 1.5, "eval": {  # noqa: E731
        "real_view_top1": top1, "real_view_top1_chance": 0.125, "real_view_mean_rank": 3.0,
        "real_view_mean_rank_chance": 4.0, "phantom_lesion_patch_auroc": None,
        "phantom_lesion_patch_auroc_chance": 0.5, "real_view_queries": 8}}
    reader = JsonlReader(path)
    path.write_text(json.dumps(train(1)) + "\n" + json.dumps(train(2)) + "\n")
    assert len(reader.read()) == 2
    with open(path, "a") as f:  # the eval line of step 2 arrives in the next poll: no step back
        f.write(json.dumps(evaluation(2, 0.25)) + "\n")
    assert [r.get("kind") for r in reader.read()] == ["eval"] and len(reader.rows) == 3
    with open(path, "a") as f:
        f.write(json.dumps(train(3)) + "\n" + json.dumps(evaluation(3, 0.5)) + "\n")
    assert len(reader.read()) == 2 and len(reader.rows) == 5
    assert loss_terms(reader.rows) == ["total", "dino"]
    curves = eval_curves(reader.rows)
    assert list(curves) == ["real_view_top1", "phantom_lesion_patch_auroc"]  # measures with a chance level
    assert curves["real_view_top1"] == {"steps": [2, 3], "values": [0.25, 0.5], "chance": 0.125}
    assert curves["phantom_lesion_patch_auroc"] == {"steps": [], "values": [], "chance": 0.5}
    # a resumed run rewrote the file up to its checkpoint (step 2, with its eval line) and went on
    path.write_text("".join(json.dumps(r) + "\n" for r in (train(1), train(2), evaluation(2, 0.25))))
    reader.read()
    with open(path, "a") as f:
        f.write(json.dumps(train(3)) + "\n")
    reader.read()
    assert [(r["step"], r.get("kind")) for r in reader.rows] == [(1, None), (2, None), (2, "eval"), (3, None)]


def test_a_view_without_laterality_or_view_name_is_only_a_candidate():
    rows = [("P", "R", "CC"), ("P", "R", "MLO"), ("P", "", "CC"), ("P", "R", "")]
    features = np.array([[1.0, 0], [0.9, 0.1], [1.0, 0.01], [1.0, 0.02]])
    result = view_retrieval(features, *zip(*rows), k=1)
    assert result["queries"] == 2 and result["candidates"] == 3 and result["top1"] == 0.0
