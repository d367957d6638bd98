"""`mammodino finetune` on 20 small phantom mammograms with a random tiny ViT: a named head that
inference shows, metrics per epoch, class weights, patient-grouped splits, early stopping, SIGTERM,
the lesion heatmap head, and one-line errors for bad labels."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import phantom_labels, terminated_when, write_csv
from training.errors import MammoInputError
from training.checkpoint import read_metadata
from training.cli import main
from training.evaluate.encoder import load_encoder
from training.evaluate.heads.loop import EarlyStopping, FinetuneConfig, class_weights, epochs
from training.runs import RunFolder
from training.evaluate.metrics import grouped_split
from training.dicom.io import open_image

REPO = Path(__file__).resolve().parents[1]
FAST = ["--checkpoint", "random:tiny/16", "--resolution", "64", "--quiet", "--json"]
METRIC_KEYS = {"step", "epoch", "loss", "val_loss", "val_balanced_accuracy", "val_auroc", "lr", "images_per_s"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    """20 FFDM phantoms 128 x 104 (one patient each), every lesion kind and density among them."""
    return phantom_labels(tmp_path_factory.mktemp("finetune") / "phantoms", 20)


def finetune(capsys, *args: str) -> tuple[int, dict | None, str]:
    code = main(["finetune", *args])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if code == 0 else None, captured.err


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_linear_head_is_saved_with_its_classes_and_inference_names_them(phantoms, tmp_path, capsys):
    run = tmp_path / "run"
    code, report, err = finetune(capsys, "--labels", str(phantoms), "--target", "lesion_type", "--out", str(run),
                                 "--epochs", "40", *FAST)
    assert code == 0, err
    assert report["status"] == "done" and report["classes"] == ["calc", "mass", "none"]
    lines = read_metrics(run)
    assert len(lines) == report["epochs_run"] and all(METRIC_KEYS <= set(m) for m in lines)
    assert [m["epoch"] for m in lines] == list(range(len(lines)))
    best = min(lines, key=lambda m: m["val_loss"])
    assert report["best_epoch"] == best["epoch"] and report["validation"]["loss"] == best["val_loss"]

    meta = read_metadata(run / "checkpoints" / "last.safetensors")
    assert meta["task"] == "lesion_type" and meta["heads"]["lesion_type"]["classes"] == ["calc", "mass", "none"]
    assert meta["tasks"]["lesion_type"]["mode"] == "linear" and meta["command"][1] == "finetune"
    assert "git_commit" in meta and meta["data"]["target"] == "lesion_type"
    assert meta["tasks"]["lesion_type"]["validation"]["balanced_accuracy"] == report["validation"]["balanced_accuracy"]

    encoder = load_encoder(run)
    assert encoder.resolution == 64
    row = next(csv.DictReader(open(phantoms)))
    output = encoder.run(encoder.prepare_image(open_image(phantoms.parent / row["path"])), attention="none")[0]
    probabilities = output.predictions["lesion_type"]
    assert list(probabilities) == ["calc", "mass", "none"]
    assert math.isclose(sum(probabilities.values()), 1.0, rel_tol=1e-5)

    # a second task on the fine-tuned checkpoint keeps the first head
    code, second, err = finetune(capsys, "--labels", str(phantoms), "--target", "density", "--out",
                                 str(tmp_path / "run2"), "--checkpoint", str(run), "--epochs", "5", "--quiet", "--json")
    assert code == 0, err
    again = load_encoder(tmp_path / "run2")
    assert set(again.heads) == {"lesion_type", "density"} and set(read_metadata(second["checkpoint"])["tasks"]) == {
        "lesion_type", "density"}
    out = again.run(again.prepare_image(open_image(phantoms.parent / row["path"])), attention="none")[0]
    assert out.predictions["lesion_type"] == pytest.approx(probabilities, abs=1e-5)
    assert list(out.predictions["density"]) == report_classes(phantoms, "density")


def report_classes(labels: Path, column: str) -> list[str]:
    return sorted({row[column] for row in csv.DictReader(open(labels))})


def test_class_weights_are_inverse_frequency():
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([0] * 6 + [1] * 3 + [2])
    weights = class_weights(y, 3)
    assert np.allclose(weights, compute_class_weight("balanced", classes=np.arange(3), y=y))
    assert np.allclose(weights, [10 / 18, 10 / 9, 10 / 3])
    assert np.allclose(np.bincount(y) * weights, len(y) / 3)  # each class weighs the same in the loss


def test_the_grouped_split_never_puts_a_patient_on_both_sides():
    rng = np.random.default_rng(0)
    patients = [f"P{i}" for i in rng.integers(0, 40, 200)]
    y = np.array([int(p[1:]) % 3 for p in patients])  # classes follow patients, as density does
    for seed in range(5):
        train, val = grouped_split(y, patients, 0.2, seed)
        assert len(train) + len(val) == 200 and not set(train) & set(val)
        assert not {patients[i] for i in train} & {patients[i] for i in val}
        assert 0.1 < len(val) / 200 < 0.3 and set(y[val]) == {0, 1, 2}


def test_a_small_labels_file_is_split_or_refused_in_one_line():
    """12 images of 4 classes (3 each): fewer than the 5 folds a 0.2 split asks for, which scikit-learn
    refuses with a traceback; 4 images of 4 classes cannot be split at all."""
    y = np.repeat(np.arange(4), 3)
    patients = [f"P{i}" for i in range(12)]
    train, val = grouped_split(y, patients, 0.2, 0)
    assert len(train) + len(val) == 12 and len(val) >= 1 and not set(train) & set(val)
    with pytest.raises(MammoInputError, match="too few to split"):
        grouped_split(np.arange(4), ["a", "b", "c", "d"], 0.2, 0)


def test_early_stopping_keeps_the_best_epoch_and_stops_after_patience(tmp_path):
    val_losses = iter([1.0, 0.5, 0.6, 0.55, 0.7, 0.2, 0.1])
    states = iter(range(100))
    config = FinetuneConfig(epochs=7, patience=3)
    seen = list(epochs(lambda: (0.0, 1, 1), lambda: {"val_loss": next(val_losses)}, lambda: next(states),
                       config, RunFolder(tmp_path / "run"), 1e-3, lambda: False))
    stopper = seen[-1][1]
    assert [m["epoch"] for m, _ in seen] == [0, 1, 2, 3, 4]  # 0.6, 0.55, 0.7 do not beat 0.5
    assert stopper.best_epoch == 1 and stopper.state == 1 and stopper.stop
    assert len(read_metrics(tmp_path / "run")) == 5
    plain = EarlyStopping(2)
    plain.update(0, 1.0, {}, dict)
    plain.update(1, 1.0, {}, dict)  # equal is no improvement
    assert not plain.stop and plain.best_epoch == 0


def test_sigterm_saves_the_best_epoch_and_exits_cleanly(phantoms, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "training", "finetune", "--labels", str(phantoms), "--target", "lesion",
               "--out", str(run), "--mode", "full", "--epochs", "10000", "--patience", "10000", "--batch-size", "4",
               *FAST]
    code, stdout, stderr = terminated_when(run / "metrics.jsonl", command, {**os.environ, "OMP_NUM_THREADS": "1"})
    assert code == 0, stderr
    assert "SIGTERM" in stderr
    report = json.loads(stdout)
    assert report["status"] == "cancelled" and 1 <= report["epochs_run"] < 10000
    meta = read_metadata(report["checkpoint"])
    assert meta["tasks"]["lesion"]["status"] == "cancelled" and meta["tasks"]["lesion"]["mode"] == "full"
    encoder = load_encoder(report["checkpoint"])
    assert list(encoder.heads["lesion"].classes) == ["0", "1"]


def test_the_lesion_heatmap_head_is_saved_for_inference(phantoms, tmp_path, capsys):
    run = tmp_path / "run"
    code, report, err = finetune(capsys, "--labels", str(phantoms), "--target", "lesion_mask", "--out", str(run),
                                 "--checkpoint", "random:tiny/16", "--resolution", "128", "--epochs", "15",
                                 "--quiet", "--json")
    assert code == 0, err
    assert report["task"] == "lesion_heatmap" and report["kind"] == "localisation"
    froc = report["validation"]["froc"]
    assert froc["n_images"] == report["n_val"] and froc["n_lesions"] >= 1
    assert 0 <= froc["sensitivity_at_1_fp"] <= froc["sensitivity_at_2_fp"] <= 1
    assert report["validation"]["auroc"] is None or 0 <= report["validation"]["auroc"] <= 1
    meta = read_metadata(report["checkpoint"])
    assert meta["tasks"]["lesion_heatmap"]["validation"]["froc"] == froc
    encoder = load_encoder(run)
    row = next(csv.DictReader(open(phantoms)))
    prepared = encoder.prepare_image(open_image(phantoms.parent / row["path"]))
    heatmap = encoder.run(prepared, attention="none")[0].heatmaps["lesion_heatmap"]
    assert heatmap.shape == prepared.grid and ((heatmap >= 0) & (heatmap <= 1)).all()


@pytest.mark.parametrize("problem", ["missing column", "one class", "missing path", "not categorical",
                                     "existing run"])
def test_bad_labels_exit_2_with_one_line(problem, phantoms, tmp_path, capsys):
    rows = list(csv.DictReader(open(phantoms)))
    target = "density"
    if problem == "missing column":
        target = "cancer"
    elif problem == "one class":
        for row in rows:
            row["density"] = "B"
    elif problem == "missing path":
        rows[3]["path"] = "nowhere/x.dcm"
    elif problem == "not categorical":
        target = "glandular_fraction"
    labels = tmp_path / "labels.csv"
    write_csv(rows, labels)
    out = tmp_path / "run"
    if problem == "existing run":
        RunFolder(out).append_metrics({"step": 1})
    code, _, err = finetune(capsys, "--labels", str(labels), "--target", target, "--out", str(out),
                            "--data", str(phantoms.parent), *FAST)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    expected = {"missing column": "'cancer': no such column", "one class": "only one class",
                "missing path": "1 of 20 paths do not exist",
                "not categorical": "needs a categorical column", "existing run": "already holds a run"}[problem]
    assert expected in err
