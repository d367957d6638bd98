"""The committed sample_data/: what it holds, that the generator remakes it byte for byte, and the
napari sample contributions "Phantom exam" and "Phantom DBT" (images plus ground-truth Labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from training.dicom.display import to_display
from training.dicom.io import open_image, open_path
from training.phantom.dataset import SAMPLE_PARTS, load_mask, read_truth, write_sample_set

SAMPLES = Path(__file__).resolve().parents[1] / "sample_data"
PLUGIN = "napari-mammodino"


@pytest.fixture(scope="module")
def rows() -> dict[str, dict]:
    return {row["path"]: row for row in read_truth(SAMPLES / "labels.csv")}


def test_sample_set_is_complete_and_under_20_mb(rows):
    size = sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file())
    assert size <= 20e6
    assert {path.split("/")[0] for path in rows} == set(SAMPLE_PARTS)
    assert "scripts/make_sample_data.py" in (SAMPLES / "README.md").read_text()
    for row in rows.values():
        for column in ("path", "breast_mask", "glandular_mask", "lesion_mask"):
            assert (SAMPLES / row[column]).exists()


def test_exam_has_four_views_and_a_lesion_in_one_breast(rows):
    exam = [row for path, row in rows.items() if path.startswith("exam/")]
    assert sorted(r["laterality"] + r["view"] for r in exam) == ["LCC", "LMLO", "RCC", "RMLO"]
    assert len({r["laterality"] for r in exam if r["lesion"]}) == 1
    images = open_path(SAMPLES / "exam")
    assert sorted(f"{im.meta.laterality}{im.meta.view}" for im in images) == ["LCC", "LMLO", "RCC", "RMLO"]


def test_dbt_has_a_mass_and_a_calcification_cluster_in_different_slices(rows):
    (row,) = [r for path, r in rows.items() if path.startswith("dbt/")]
    kinds = {lesion["kind"]: lesion for lesion in row["lesions"]}
    assert set(kinds) == {"mass", "calc"} and row["lesion_type"] == "mass+calc"
    assert abs(kinds["mass"]["center_slice"] - kinds["calc"]["center_slice"]) >= 3
    volume = open_image(SAMPLES / row["path"])
    assert volume.meta.kind == "dbt" and volume.meta.n_files == 1 and volume.data.ndim == 3
    labels = load_mask(SAMPLES / row["lesion_mask"])
    assert labels.shape == volume.data.shape
    for lesion in kinds.values():  # each lesion's voxels lie within its own slice range
        slices = np.nonzero((labels == lesion["label"]).any(axis=(1, 2)))[0]
        assert lesion["slice_range"][0] <= slices.min() and slices.max() <= lesion["slice_range"][1]


def test_variants_hold_the_same_image(rows):
    multi = open_image(SAMPLES / "dbt")
    series, j2k = open_image(SAMPLES / "dbt_series" / "LCC_dbt"), open_image(SAMPLES / "jpeg2000")
    assert series.meta.n_files == multi.data.shape[0]
    np.testing.assert_array_equal(series.data.compute(), multi.data.compute())
    np.testing.assert_array_equal(j2k.data.compute(), multi.data.compute())
    assert j2k.meta.transfer_syntax == "1.2.840.10008.1.2.4.90"
    (m1_path,) = [path for path in rows if path.startswith("monochrome1/")]
    m1 = open_image(SAMPLES / m1_path)
    m2 = open_image(SAMPLES / "exam" / Path(m1_path).name)
    assert m1.meta.photometric == "MONOCHROME1"
    np.testing.assert_allclose(to_display(m1.frame(0), m1.meta), to_display(m2.frame(0), m2.meta), atol=1e-6)


def test_generator_remakes_the_committed_files_byte_for_byte(rows, tmp_path):
    parts = ("exam", "monochrome1")  # the FFDM parts: the fast ones to remake
    made = {row["path"]: row for row in write_sample_set(tmp_path, parts)}
    assert made.keys() == {path for path in rows if path.split("/")[0] in parts}
    for path, row in made.items():
        assert (tmp_path / path).read_bytes() == (SAMPLES / path).read_bytes(), (
            f"{path}: the simulator or writer changed since sample_data was made; remake it with "
            ".venv/bin/python scripts/make_sample_data.py and commit it")
        for column in ("breast_mask", "glandular_mask", "lesion_mask"):
            np.testing.assert_array_equal(load_mask(tmp_path / row[column]), load_mask(SAMPLES / row[column]))
        assert row == rows[path]
    header = pydicom.dcmread(tmp_path / next(iter(made)), stop_before_pixels=True)
    assert header.StudyDate == "20250101"  # fixed, not today's date


def _by_name(viewer):
    return {layer.name: layer for layer in viewer.layers}


def test_phantom_exam_sample_opens_with_truth_on_the_same_grid(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "phantom_exam")
    images = [layer for layer in viewer.layers if layer._type_string == "image"]
    labels = {layer.name: layer for layer in viewer.layers if layer._type_string == "labels"}
    assert len(images) == 4 and len(labels) == 8
    for image in images:
        view = image.name.split()[0]
        for kind in ("lesions", "tissue"):
            truth = labels[f"{view} {kind} truth"]
            assert truth.data.shape == image.data.shape
            np.testing.assert_allclose(truth.scale, image.scale)
            np.testing.assert_allclose(truth.translate, image.translate)
            np.testing.assert_allclose(truth.extent.world, image.extent.world)
        tissue = np.asarray(labels[f"{view} tissue truth"].data)
        pixels = np.asarray(image.data, dtype=float)
        assert pixels[tissue > 0].mean() > pixels[tissue == 0].mean()  # breast on breast, even if mirrored
    lesion_views = [name for name, layer in labels.items() if "lesions" in name and np.asarray(layer.data).any()]
    assert len(lesion_views) == 2  # CC and MLO of the breast with the lesion


def test_phantom_dbt_sample_opens_with_3d_truth(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "phantom_dbt")
    layers = _by_name(viewer)
    (image,) = [layer for layer in viewer.layers if layer._type_string == "image"]
    lesions = layers["LCC lesions truth"]
    assert image.ndim == 3 and lesions.data.shape == image.data.shape
    np.testing.assert_allclose(lesions.scale, image.scale)
    assert set(np.unique(lesions.data)) == {0, 1, 2}
    assert not layers["LCC tissue truth"].visible
