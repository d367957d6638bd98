"""Embeddings and similar cases (`mammodino embed`): a query from the set finds itself first,
precision@k is right on toy sets with known clusters (and ignores same-patient neighbours when
asked), and embedding files are plain arrays that load without pickles."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from training.cli import main
from training.errors import MammoInputError
from training.evaluate.retrieval import Embeddings, nearest, normalise, precision_at_k


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from training.phantom.dataset import generate

    out = tmp_path_factory.mktemp("retrieval") / "phantoms"
    generate(out, "ffdm", 12, seed=5, shape=(128, 104), progress=False)
    return out


def _clusters(sizes: list[int], spread: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points around far-apart centres, and which centre each belongs to."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), 16))
    which = np.repeat(np.arange(len(sizes)), sizes)
    return normalise(centres[which] + spread * rng.normal(size=(len(which), 16))), which


def test_precision_at_k_on_known_clusters():
    vectors, cluster = _clusters([4, 4, 4])
    assert precision_at_k(vectors, cluster, k=3)["value"] == 1.0  # the 3 others of a cluster share its label
    labels = np.array(list("aabb") * 3)  # two of each label inside each cluster
    result = precision_at_k(vectors, labels, k=3)
    assert result["value"] == pytest.approx(1 / 3, abs=1e-4)  # 1 of a row's 3 cluster mates shares its label
    assert result["chance"] == pytest.approx(5 / 11, abs=1e-4) and result["n"] == 12


def test_precision_at_k_ignores_neighbours_of_the_same_patient():
    # each cluster: patient A (two near-identical views, label x) and patient B (two views, label y)
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 16))
    offsets = np.array([0.0, 0.01, 0.1, 0.11])[:, None] * np.eye(16)[0]
    vectors = normalise((centres[:, None, :] + offsets[None]).reshape(-1, 16))
    labels = np.array(list("xxyy") * 3)
    groups = np.array([f"{c}{p}" for c in range(3) for p in "AABB"])
    assert precision_at_k(vectors, labels, k=1)["value"] == 1.0  # the other view of the same breast
    assert precision_at_k(vectors, labels, k=1, groups=groups)["value"] == 0.0
    with pytest.raises(MammoInputError, match="--k 11"):
        precision_at_k(vectors, labels, k=11, groups=groups)


def test_nearest_returns_the_query_itself_first():
    vectors, _ = _clusters([5, 5])
    indices, distances = nearest(vectors, vectors[[7, 2]], k=3)
    assert indices[:, 0].tolist() == [7, 2] and np.allclose(distances[:, 0], 0, atol=1e-6)
    assert (np.diff(distances, axis=1) >= 0).all()


def test_embeddings_round_trip_without_pickles(tmp_path):
    vectors, _ = _clusters([2, 2])
    saved = Embeddings(vectors, ["a/é.dcm", "b.dcm", "c", "d"], {"source": "random:tiny/16"}, 64, 8)
    path = saved.save(tmp_path / "emb.npz")
    with np.load(path, allow_pickle=False) as data:
        assert data["paths"].dtype.kind == "U" and data["vectors"].dtype == np.float32
    loaded = Embeddings.load(path)
    np.testing.assert_array_equal(loaded.vectors, vectors)
    assert loaded.paths == saved.paths and loaded.encoder == saved.encoder and loaded.resolution == 64


def _embed(*args: str) -> list[str]:
    return ["embed", "--checkpoint", "random:tiny/16", "--resolution", "64", "--quiet", "--json", *args]


def test_cli_embed_labels_query_and_precision(phantoms, tmp_path, capsys):
    query = sorted(phantoms.glob("*/*.dcm"))[5]
    out = tmp_path / "emb.npz"
    argv = _embed("--data", str(phantoms / "labels.csv"), "--out", str(out), "--cache", str(tmp_path / "cache"),
                  "--target", "density", "--target", "lesion", "--group", "patient_id", "--query", str(query),
                  "--k", "3")
    assert main(argv) == 0
    stdout, _ = capsys.readouterr()
    report = json.loads(stdout)
    assert report["n"] == 12 and report["dim"] == 384
    first = report["query"]["neighbours"][0]
    assert os.path.samefile(first["path"], query) and first["distance"] == pytest.approx(0, abs=1e-5)
    assert len(report["query"]["neighbours"]) == 3
    for target in ("density", "lesion"):
        result = report["precision_at_k"][target]
        assert result["k"] == 3 and 0 <= result["value"] <= 1 and 0 < result["chance"] < 1
    assert sum(report["precision_at_k"]["lesion"]["counts"].values()) == 12
    with np.load(out, allow_pickle=False) as data:
        assert data["vectors"].shape == (12, 384) and data["paths"].dtype.kind == "U"
        np.testing.assert_allclose(np.linalg.norm(data["vectors"], axis=1), 1, rtol=1e-5)


def test_cli_embed_a_folder_and_bad_input(phantoms, tmp_path, capsys):
    out = tmp_path / "folder.npz"
    assert main(_embed("--data", str(phantoms), "--out", str(out), "--no-cache")) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 12  # every DICOM below the folder, masks skipped
    assert main(_embed("--data", str(phantoms), "--out", str(out), "--no-cache", "--target", "density")) == 2
    stdout, err = capsys.readouterr()
    assert stdout == "" and len(err.strip().splitlines()) == 1 and "need labels" in err
