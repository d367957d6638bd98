"""Linear probes (`mammodino probe`) and the frozen features under them: metrics equal scikit-learn's,
bootstrap intervals are seeded and contain the estimate, patient-grouped folds never split a
patient, a separable set is probed perfectly, the CLI reports one JSON object and one-line errors,
and cached features are the computed ones without decoding anything."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from dicom_factory import write_enhanced_dbt
from helpers import write_csv
from training.cli import main
from training.evaluate.encoder import load_encoder, random_encoder
from training.errors import MammoInputError
from training.evaluate.features import encoder_identity, extract_features, features_of, volume_slices
from training.dicom.io import open_image
from training.evaluate.metrics import classification_metrics, grouped_folds
from training.evaluate.probe import bootstrap_intervals, evaluate_probe, weighted_metrics

REQUIRED = {"auroc", "balanced_accuracy", "macro_f1", "n", "classes", "folds", "target", "encoder", "counts"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """24 small FFDM phantoms (one per patient) with density A-D and lesion 0/1 in labels.csv."""
    from training.phantom.dataset import generate

    out = tmp_path_factory.mktemp("probe") / "phantoms"
    generate(out, "ffdm", 24, seed=3, shape=(128, 104), progress=False)
    return out


def _probe(phantoms: Path, cache: Path, *extra: str) -> list[str]:
    return ["probe", "--checkpoint", "random:tiny/16", "--labels", str(phantoms / "labels.csv"),
            "--resolution", "64", "--cache", str(cache), "--quiet", "--boot", "200", *extra]


# --- metrics -----------------------------------------------------------------------------------------

def test_metrics_equal_sklearn_on_hand_cases():
    y = np.array([0, 0, 1, 1, 1, 0])
    p1 = np.array([0.1, 0.6, 0.6, 0.8, 0.3, 0.2])  # a tie across the classes counts one half
    proba = np.c_[1 - p1, p1]
    got = classification_metrics(y, proba)
    assert got["auroc"] == pytest.approx(roc_auc_score(y, p1)) == pytest.approx(7.5 / 9)
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p1 > 0.5))
    assert got["macro_f1"] == pytest.approx(f1_score(y, p1 > 0.5, average="macro"))

    y3 = np.array([0, 1, 2, 2, 1, 0, 2])
    proba3 = np.array([[.7, .2, .1], [.2, .5, .3], [.1, .3, .6], [.3, .4, .3], [.5, .3, .2], [.6, .3, .1],
                       [.2, .2, .6]])
    got3 = classification_metrics(y3, proba3)
    assert got3["auroc"] == pytest.approx(roc_auc_score(y3, proba3, multi_class="ovr", average="macro"))
    assert got3["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y3, proba3.argmax(1)))
    assert got3["macro_f1"] == pytest.approx(f1_score(y3, proba3.argmax(1), average="macro"))


@pytest.mark.parametrize("n_classes", [2, 4])
def test_weighted_bootstrap_metrics_equal_sklearn_on_the_resampled_rows(n_classes):
    rng = np.random.default_rng(n_classes)
    y = rng.integers(0, n_classes, 50)
    proba = rng.dirichlet(np.ones(n_classes), 50).round(1)  # rounded: many ties
    proba /= proba.sum(1, keepdims=True)
    weights = rng.multinomial(50, np.full(50, 1 / 50), size=30)
    got = weighted_metrics(y, proba, weights)
    checked = 0
    for b, counts in enumerate(weights):
        rows = np.repeat(np.arange(50), counts)
        if len(np.unique(y[rows])) < n_classes:
            continue
        expected = classification_metrics(y[rows], proba[rows])
        for name, value in expected.items():
            assert got[name][b] == pytest.approx(value, abs=1e-12), name
        checked += 1
    assert checked > 20


def test_bootstrap_interval_contains_the_estimate_and_is_seeded():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    p1 = np.clip(0.5 + 0.25 * (2 * y - 1) + rng.normal(0, 0.25, 80), 0, 1)
    proba = np.c_[1 - p1, p1]
    point = classification_metrics(y, proba)
    first, used = bootstrap_intervals(y, proba, 500, seed=7)
    again, _ = bootstrap_intervals(y, proba, 500, seed=7)
    other, _ = bootstrap_intervals(y, proba, 500, seed=8)
    assert first == again and first != other and used == 500
    for name, (low, high) in first.items():
        assert low < point[name] < high, name

    rare = np.r_[np.zeros(30, int), 1]  # one positive: about a third of the draws miss it
    _, used = bootstrap_intervals(rare, np.c_[np.full(31, 0.5), np.full(31, 0.5)], 300, seed=0)
    assert 100 < used < 300


# --- folds and the probe -----------------------------------------------------------------------------

def test_grouped_folds_never_split_a_patient_and_cover_every_row():
    rng = np.random.default_rng(1)
    groups = np.repeat([f"P{i}" for i in range(30)], rng.integers(1, 5, 30))
    y = np.array([int(g[1:]) % 3 for g in groups])  # a patient's images share a label
    splits, notes = grouped_folds(y, groups, n_splits=5, seed=0)
    assert len(splits) == 5 and not notes
    tested = np.concatenate([test for _, test in splits])
    assert sorted(tested) == list(range(len(y)))
    for train, test in splits:
        assert not set(groups[train]) & set(groups[test])


def test_grouped_folds_shrink_for_a_rare_class_and_refuse_one_group():
    y = np.array([0] * 10 + [1] * 3)
    splits, notes = grouped_folds(y, [f"P{i}" for i in range(13)], n_splits=5, classes=["no", "yes"])
    assert len(splits) == 3 and "class 'yes' occurs in only 3" in notes[0]
    with pytest.raises(MammoInputError, match="class 'yes' occurs in only 1 patient"):
        grouped_folds(y, [f"P{i}" for i in range(10)] + ["Q"] * 3, classes=["no", "yes"])


@pytest.mark.parametrize("n_classes", [2, 3])
def test_probe_on_separable_features_is_perfect(n_classes):
    rng = np.random.default_rng(0)
    y = np.arange(60) % n_classes
    centres = 4 * rng.normal(size=(n_classes, 8))
    x = centres[y] + 0.3 * rng.normal(size=(60, 8))  # clusters many standard deviations apart
    report = evaluate_probe(x, y, [f"P{i // 2}" for i in range(60)], [f"c{k}" for k in range(n_classes)],
                            folds=4, n_boot=100)
    assert report["auroc"]["value"] == 1.0 and report["balanced_accuracy"]["value"] == 1.0
    assert report["macro_f1"]["ci95"] == [1.0, 1.0]
    assert report["folds"] == 4 and report["n"] == 60


def test_probe_on_noise_is_near_chance():
    rng = np.random.default_rng(2)
    y = np.arange(80) % 2
    report = evaluate_probe(rng.normal(size=(80, 30)), y, [f"P{i}" for i in range(80)], ["0", "1"], folds=3, n_boot=200)
    low, high = report["auroc"]["ci95"]
    assert low < 0.5 < high


# --- the command -------------------------------------------------------------------------------------

def test_cli_probe_prints_one_json_object(phantoms, tmp_path, capsys):
    assert main(_probe(phantoms, tmp_path, "--target", "density", "--group", "patient_id", "--json")) == 0
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 1 and err == ""
    report = json.loads(out)
    assert REQUIRED <= set(report)
    assert report["n"] == 24 and report["classes"] == ["A", "B", "C", "D"] and report["target"] == "density"
    assert sum(report["counts"].values()) == 24
    assert report["encoder"]["source"] == "random:tiny/16" and report["features"]["resolution"] == 64
    for name in ("auroc", "balanced_accuracy", "macro_f1"):
        low, high = report[name]["ci95"]
        assert 0 <= low <= report[name]["value"] <= high <= 1
    assert report["folds"] == min(5, min(report["counts"].values()))  # the rarest class bounds the folds
    assert set(report["auroc_per_class"]) == {"A", "B", "C", "D"}


def _labels_with(phantoms: Path, tmp: Path, edit) -> Path:
    with open(phantoms / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows = edit(rows)
    path = tmp / "labels.csv"
    write_csv(rows, path)
    return path


BAD_LABELS = {
    "missing_column": (lambda rows: rows, "lesion_size", "no such column"),
    "one_class": (lambda rows: [{**r, "lesion": "1"} for r in rows], "lesion", "only one class"),
    "missing_path": (lambda rows: rows[:-1] + [{**rows[-1], "path": "nobody/LCC.dcm"}], "lesion", "do not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_cli_probe_bad_labels_exit_2_with_one_line(phantoms, tmp_path, capsys, case):
    edit, target, message = BAD_LABELS[case]
    labels = _labels_with(phantoms, tmp_path, edit)
    argv = _probe(phantoms, tmp_path / "cache", "--target", target, "--json")
    argv[argv.index("--labels") + 1] = str(labels)
    assert main(argv + ["--data", str(phantoms)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and message in err
    assert err.startswith("mammodino probe: error:")


# --- features and their cache ------------------------------------------------------------------------

def test_cached_features_are_identical_and_decode_nothing(phantoms, tmp_path, decoded):
    encoder = load_encoder("random:tiny/16")
    paths = sorted(phantoms.glob("*/*.dcm"))[:4]
    first = extract_features(encoder, paths, resolution=64, cache=tmp_path, progress=False)
    assert first.computed == 4 and first.cached == 0 and len(decoded) >= 4
    assert len(list(tmp_path.glob("*.npz"))) == 4
    decoded.clear()
    again = extract_features(encoder, paths, resolution=64, cache=tmp_path, progress=False)
    assert again.cached == 4 and again.computed == 0 and decoded == []
    np.testing.assert_array_equal(again.features, first.features)
    uncached = extract_features(encoder, paths, resolution=64, cache=False, progress=False)
    np.testing.assert_array_equal(uncached.features, first.features)
    with np.load(next(tmp_path.glob("*.npz")), allow_pickle=False) as entry:  # plain arrays only
        assert entry["features"].shape == (2 * encoder.embed_dim,)

    os.utime(paths[0], ns=(1, 1))  # an edited file, another resolution, another encoder: new entries
    assert extract_features(encoder, paths, resolution=64, cache=tmp_path, progress=False).computed == 1
    assert extract_features(encoder, paths[:1], resolution=48, cache=tmp_path, progress=False).computed == 1
    assert extract_features(random_encoder("tiny/16", seed=1), paths[:1], resolution=64, cache=tmp_path,
                            progress=False).computed == 1


def test_encoder_identity_follows_the_weights():
    assert encoder_identity(random_encoder("tiny/16")) == encoder_identity(random_encoder("tiny/16"))
    assert encoder_identity(random_encoder("tiny/16")) != encoder_identity(random_encoder("tiny/16", seed=1))
    assert encoder_identity(random_encoder("tiny/16")) != encoder_identity(random_encoder("tiny/14"))


def test_volume_features_are_the_mean_of_evenly_spaced_slices(tmp_path):
    assert volume_slices(20, 4) == [2, 7, 12, 17] and volume_slices(5, 1) == [2] and volume_slices(3, 8) == [0, 1, 2]
    rng = np.random.default_rng(0)
    volume = np.zeros((6, 96, 72), np.uint16)
    for i in range(6):  # a breast-like bright region whose texture differs per slice
        volume[i, 8:88, :56] = 1500 + rng.integers(0, 1500, (80, 56))
    image = open_image(write_enhanced_dbt(tmp_path / "dbt.dcm", volume))
    encoder = random_encoder("tiny/16")
    per_slice = encoder.features([encoder.prepare_image(image, frame=i, resolution=64) for i in volume_slices(6, 3)])
    assert not np.allclose(per_slice[0], per_slice[1])
    np.testing.assert_allclose(features_of(encoder, image, resolution=64, max_slices=3), per_slice.mean(0),
                               rtol=1e-5, atol=1e-6)


def test_a_folder_of_several_images_is_one_line_error(phantoms, tmp_path):
    with pytest.raises(MammoInputError, match="pass one file or a folder holding one series"):
        extract_features(random_encoder("tiny/16"), [phantoms], resolution=64, cache=False, progress=False)
