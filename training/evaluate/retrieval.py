"""Embeddings and similar-case retrieval (VersaMammo's retrieval task): each image's frozen features
(:mod:`training.evaluate.features`) scaled to unit length, so that the cosine distance ranks similar cases;
the k nearest neighbours of a query image; and precision@k, the share of an image's k nearest
other images that carry its label (density, lesion, ...), which says how well the embedding groups
cases a radiologist would call alike without training anything on the labels.

Embedding files are plain ``.npz`` (``vectors`` float32, ``paths`` unicode, ``encoder`` JSON text):
``np.load(path, allow_pickle=False)`` reads them anywhere.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from training.errors import MammoInputError


@dataclass
class Embeddings:
    """Unit-length ``vectors`` (N, F) float32, one per ``paths`` entry, and the encoder that made them."""

    vectors: np.ndarray
    paths: list[str]
    encoder: dict[str, Any] = field(default_factory=dict)
    resolution: int = 0
    max_slices: int = 0

    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` of plain arrays (no pickles) at exactly ``path``."""
        path = Path(path)
        try:
            with open(path, "wb") as f:
                np.savez(f, vectors=self.vectors.astype(np.float32), paths=np.array(self.paths, dtype=str),
                         encoder=np.array(json.dumps(self.encoder)), resolution=np.array(self.resolution),
                         max_slices=np.array(self.max_slices))
        except OSError as exc:
            raise MammoInputError(f"--out {path}: cannot write the embeddings ({exc.strerror})") from None
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Embeddings":
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(data["vectors"].astype(np.float32), [str(p) for p in data["paths"]],
                           json.loads(str(data["encoder"])), int(data["resolution"]), int(data["max_slices"]))
        except (OSError, ValueError, KeyError) as exc:
            raise MammoInputError(f"{path}: not an embeddings file written by mammodino embed ({exc})") from None


def normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); an all-zero row stays zero."""
    features = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(features, axis=-1, keepdims=True)
    return (features / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def nearest(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cosine distances (Q, k) of the ``k`` rows of ``vectors`` nearest each query, nearest
    first (exhaustive search: exact, and fast enough for the few thousand images of a study)."""
    from sklearn.neighbors import NearestNeighbors

    queries = np.atleast_2d(queries)
    index = NearestNeighbors(n_neighbors=min(k, len(vectors)), metric="cosine", algorithm="brute").fit(vectors)
    distances, indices = index.kneighbors(queries)
    return indices, distances


def precision_at_k(vectors: np.ndarray, labels: Sequence[Any], k: int = 5,
                   groups: Sequence[Any] | None = None) -> dict[str, Any]:
    """Leave-one-out precision@k: for each row, the fraction of its ``k`` nearest other rows with its
    label, averaged over rows. Rows of the same group (patient) are not counted as neighbours, so
    another view of the same breast cannot make retrieval look good. ``chance`` is the same share
    for neighbours drawn at random from the eligible rows."""
    labels = np.asarray(labels)
    n = len(labels)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    if len(vectors) != n or len(groups) != n:
        raise ValueError("vectors, labels and groups must have one row each")
    _, group_index, group_sizes = np.unique(groups, return_inverse=True, return_counts=True)
    largest = int(group_sizes.max())
    if k < 1 or k > n - largest:
        raise MammoInputError(f"--k {k}: each image has only {n - largest} eligible neighbours (other patients)")
    indices, _ = nearest(vectors, vectors, min(n, k + largest))
    hits = []
    for row, found in enumerate(indices):
        others = [j for j in found if group_index[j] != group_index[row]][:k]
        hits.append(np.mean(labels[others] == labels[row]))
    same_label = labels[:, None] == labels[None, :]
    other_group = group_index[:, None] != group_index[None, :]
    chance = (same_label & other_group).sum(axis=1) / other_group.sum(axis=1)
    return {"value": round(float(np.mean(hits)), 4), "chance": round(float(chance.mean()), 4), "k": k, "n": n}


# --- the command -----------------------------------------------------------------------------------

def run_embed(data: str | Path, out: str | Path, checkpoint: str | None = None, labels: str | Path | None = None,
              targets: Sequence[str] = (), group: str | None = None, query: str | Path | None = None, k: int = 5,
              resolution: int | None = None, max_slices: int = 8, cache: str | Path | bool | None = True,
              device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """``mammodino embed``: embeddings of a folder (every image in it) or of a labels CSV's rows,
    written to ``out``; the neighbours of ``query``; precision@k for each of ``targets``."""
    from training.evaluate.encoder import load_encoder
    from training.evaluate.features import extract_features
    from training.evaluate.probe import resolve_device

    start = time.perf_counter()
    if k < 1:
        raise MammoInputError(f"--k {k}: ask for at least one neighbour")
    sources, csv_path, base = _embedding_sources(Path(data), Path(labels) if labels else None)
    if (targets or group) and csv_path is None:
        raise MammoInputError("--target/--group need labels: pass --labels CSV or a labels CSV as --data")
    if not Path(out).parent.is_dir():
        raise MammoInputError(f"--out {out}: the folder {Path(out).parent} does not exist")
    encoder = load_encoder(checkpoint, resolve_device(device))
    features = extract_features(encoder, sources, resolution, max_slices, cache, progress)
    embeddings = Embeddings(normalise(features.features), features.paths, encoder.describe(),
                            features.resolution, features.max_slices)
    embeddings.save(out)
    report: dict[str, Any] = {"out": str(out), "n": len(embeddings.paths), "dim": int(embeddings.vectors.shape[1]),
                              "data": str(data), "encoder": encoder.describe(), "features": features.summary()}
    if targets:
        report["precision_at_k"] = {target: _target_precision(embeddings, csv_path, target, group, base, k)
                                    for target in targets}
        report["group"] = group
    if query is not None:
        found = extract_features(encoder, [Path(query)], resolution, max_slices, cache, progress=False)
        indices, distances = nearest(embeddings.vectors, normalise(found.features), k)
        report["query"] = {"path": str(query), "k": int(indices.shape[1]), "neighbours": [
            {"rank": rank + 1, "path": embeddings.paths[i], "distance": round(float(d), 6)}
            for rank, (i, d) in enumerate(zip(indices[0], distances[0]))]}
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report


def _embedding_sources(data: Path, labels: Path | None) -> tuple[list[Any], Path | None, Path | None]:
    """What to embed: (sources, labels CSV or None, base folder of the CSV's paths). A folder gives
    every image in it (files and series); a labels CSV (as --data or --labels) gives its rows."""
    from training.labels import read_rows

    if not data.exists():
        raise MammoInputError(f"--data {data}: no such file or folder")
    if data.is_file() and labels is not None:
        raise MammoInputError("--data is already a labels CSV: leave out --labels, or pass the image folder as --data")
    if data.is_file():
        labels, base = data, data.parent
    elif labels is not None:
        base = data
    else:
        from training.dicom.io import open_path

        return open_path(data), None, None
    rows = read_rows(labels)
    paths = list(dict.fromkeys(base / row["path"] for row in rows if (row.get("path") or "").strip()))
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise MammoInputError(f"{labels.name}: {len(missing)} of {len(paths)} paths do not exist, e.g. {missing[0]} "
                              f"(paths are relative to {'--data' if base != labels.parent else 'the CSV'})")
    return paths, labels, base


def _target_precision(embeddings: Embeddings, csv_path: Path, target: str, group: str | None, base: Path,
                      k: int) -> dict[str, Any]:
    """precision@k of one target over the embedded rows that have it."""
    from training.labels import read_labels

    labelled = read_labels(csv_path, target, group=group, data=None if base == csv_path.parent else base)
    row_of = {os.path.abspath(p): i for i, p in enumerate(embeddings.paths)}
    rows = [row_of[os.path.abspath(p)] for p in labelled.paths]
    result = precision_at_k(embeddings.vectors[rows], labelled.targets, k, labelled.groups if group else None)
    counts = {c: labelled.targets.count(c) for c in labelled.classes}
    return {**result, "classes": labelled.classes, "counts": counts}
