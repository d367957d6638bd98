"""Simulated images as real DICOM: IOD attributes, read-back by pydicom and by our reader, variants
(MONOCHROME1, JPEG 2000, per-slice series), ground truth beside the files, determinism and the CLI."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_fragmented_frames
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1

from training.cli import main
from training.dicom.display import to_display
from training.dicom.io import open_image, open_path
from training.phantom import simulate_dbt, simulate_ffdm
from training.phantom.dataset import LABEL_COLUMNS, generate, load_mask, read_truth
from training.phantom.dicom import (Identity, enhanced_dbt_dataset, save_dataset, write_dbt, write_dbt_series,
                                    write_ffdm)

SHAPE = (256, 208)
DBT_SHAPE, DBT_SLICE_MM = (128, 104), 5.0  # a small volume keeps the test fast; the writer does not care


@pytest.fixture(scope="module")
def ffdm():
    return simulate_ffdm(3, view="MLO", laterality="R", lesion="calc", shape=SHAPE)


@pytest.fixture(scope="module")
def dbt():
    return simulate_dbt(4, view="CC", laterality="L", lesion="calc", shape=DBT_SHAPE, slice_mm=DBT_SLICE_MM)


@pytest.fixture(scope="module")
def files(ffdm, dbt, tmp_path_factory):
    """Every kind of file the writer makes, written once for the module."""
    out = tmp_path_factory.mktemp("phantom_dicom")
    who = Identity("PHTEST-000001", "1", 1, 1)
    return {
        "ffdm": write_ffdm(ffdm, out / "RMLO.dcm", who),
        "ffdm_m1": write_ffdm(ffdm, out / "m1" / "RMLO.dcm", Identity("PHTEST-000001", "1", 2, 1),
                              photometric="MONOCHROME1"),
        "ffdm_j2k": write_ffdm(ffdm, out / "j2k" / "RMLO.dcm", Identity("PHTEST-000001", "1", 3, 1),
                               transfer_syntax=JPEG2000Lossless),
        "dbt": write_dbt(dbt, out / "LCC_dbt.dcm", Identity("PHTEST-000001", "1", 10, 1)),
        "dbt_per_frame": write_dbt(dbt, out / "pf" / "LCC_dbt.dcm", Identity("PHTEST-000001", "1", 11, 1),
                                   per_frame_windows=True),
        "dbt_j2k": write_dbt(dbt, out / "j2k" / "LCC_dbt.dcm", Identity("PHTEST-000001", "1", 12, 1),
                             transfer_syntax=JPEG2000Lossless),
        "dbt_series": write_dbt_series(dbt, out / "series", Identity("PHTEST-000001", "1", 13, 1))[0].parent,
    }


def _missing(ds, keywords):
    return [k for k in keywords if k not in ds]


# Type 1 and 2 attributes of the modules of each IOD (PS3.3 A.26 Digital Mammography X-Ray Image,
# A.55 Breast Tomosynthesis Image); type 2 may be empty but must be there.
COMMON = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
          "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "Modality", "SeriesInstanceUID",
          "SeriesNumber", "Manufacturer", "SOPClassUID", "SOPInstanceUID", "SamplesPerPixel",
          "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
          "PixelRepresentation", "PixelData", "InstanceNumber", "ContentDate", "ContentTime", "ImageType",
          "AcquisitionContextSequence", "BurnedInAnnotation", "LossyImageCompression", "ViewCodeSequence",
          "BreastImplantPresent"]
FFDM_ONLY = ["PresentationIntentType", "PatientOrientation", "PixelIntensityRelationship",
             "PixelIntensityRelationshipSign", "RescaleIntercept", "RescaleSlope", "RescaleType",
             "PresentationLUTShape", "ImagerPixelSpacing", "DetectorType", "ImageLaterality",
             "AnatomicRegionSequence", "PositionerType", "OrganExposed", "ViewPosition", "WindowCenter",
             "WindowWidth", "WindowCenterWidthExplanation", "VOILUTFunction", "BodyPartExamined"]
DBT_ONLY = ["FrameOfReferenceUID", "PositionReferenceIndicator", "ManufacturerModelName", "DeviceSerialNumber",
            "SoftwareVersions", "NumberOfFrames", "SharedFunctionalGroupsSequence",
            "PerFrameFunctionalGroupsSequence", "ContentQualification", "PresentationLUTShape",
            "PixelPresentation", "VolumetricProperties", "VolumeBasedCalculationTechnique"]


def test_ffdm_file_has_the_digital_mammography_iod_attributes(ffdm, files):
    ds = pydicom.dcmread(files["ffdm"])
    assert _missing(ds, COMMON + FFDM_ONLY) == []
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.2" == ds.file_meta.MediaStorageSOPClassUID
    assert (ds.Modality, ds.PresentationIntentType, ds.BodyPartExamined) == ("MG", "FOR PRESENTATION", "BREAST")
    assert (ds.ViewPosition, ds.ImageLaterality, list(ds.PatientOrientation)) == ("MLO", "R", ["P", "FL"])
    code = ds.ViewCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("399368009", "SCT",
                                                                               "medio-lateral oblique")
    assert [float(v) for v in ds.ImagerPixelSpacing] == pytest.approx(ffdm.spacing_mm)
    assert (ds.BitsStored, ds.BitsAllocated, ds.HighBit) == (ffdm.bits_stored, 16, ffdm.bits_stored - 1)
    assert list(ds.WindowCenterWidthExplanation) == ["NORMAL", "HARDER", "SOFTER"]
    assert (float(ds.WindowCenter[0]), float(ds.WindowWidth[0])) == pytest.approx(ffdm.window)
    assert ds.VOILUTFunction == "LINEAR" and ds.PresentationLUTShape == "IDENTITY"


def test_dbt_file_has_the_breast_tomosynthesis_iod_attributes(dbt, files):
    ds = pydicom.dcmread(files["dbt"])
    assert _missing(ds, COMMON + DBT_ONLY) == []
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.13.1.3" and ds.Modality == "MG"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "TOMOSYNTHESIS", "NONE"]
    assert ds.ViewCodeSequence[0].CodeValue == "399162004" and ds.PhotometricInterpretation == "MONOCHROME2"
    n = dbt.pixels.shape[0]
    assert ds.NumberOfFrames == n == len(ds.PerFrameFunctionalGroupsSequence)
    shared = ds.SharedFunctionalGroupsSequence[0]
    measures = shared.PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == pytest.approx(dbt.spacing_mm[1:])
    assert float(measures.SliceThickness) == float(measures.SpacingBetweenSlices) == pytest.approx(dbt.spacing_mm[0])
    assert shared.FrameAnatomySequence[0].FrameLaterality == "L"
    voi = shared.FrameVOILUTSequence[0]
    assert list(voi.WindowCenterWidthExplanation) == ["NORMAL", "HARDER", "SOFTER"]
    orientation = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    positions = []
    for k, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        assert frame.FrameContentSequence[0].InStackPositionNumber == k + 1
        assert frame.XRay3DFrameTypeSequence[0].FrameType[2] == "TOMOSYNTHESIS"
        positions.append([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
    steps = np.diff(np.array(positions) @ normal)
    np.testing.assert_allclose(steps, dbt.spacing_mm[0], rtol=1e-9)  # frames run along the normal


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools' dciodvfy is not installed")
@pytest.mark.parametrize("name", ["ffdm", "ffdm_m1", "dbt", "dbt_per_frame", "dbt_j2k"])
def test_dciodvfy_finds_no_error(files, name):
    result = subprocess.run(["dciodvfy", str(files[name])], capture_output=True, text=True)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


def test_pydicom_alone_reads_the_pixels_back(ffdm, dbt, files):
    np.testing.assert_array_equal(pydicom.dcmread(files["ffdm"]).pixel_array, ffdm.pixels)
    np.testing.assert_array_equal(pydicom.dcmread(files["ffdm_j2k"]).pixel_array, ffdm.pixels)
    # File frame 0 is the slice nearest the paddle: the simulator's last slice.
    np.testing.assert_array_equal(pydicom.dcmread(files["dbt"]).pixel_array, dbt.pixels[::-1])
    np.testing.assert_array_equal(pydicom.dcmread(files["dbt_j2k"]).pixel_array, dbt.pixels[::-1])


def test_our_reader_reads_kind_view_laterality_spacing_and_windows(ffdm, dbt, files):
    image = open_image(files["ffdm"])
    meta = image.meta
    assert (meta.kind, meta.view, meta.laterality) == ("ffdm", "MLO", "R")
    assert meta.spacing_mm == pytest.approx(ffdm.spacing_mm) and meta.spacing_source == "ImagerPixelSpacing"
    assert [w.explanation for w in meta.windows] == ["NORMAL", "HARDER", "SOFTER"]
    assert (meta.windows[0].center, meta.windows[0].width) == pytest.approx(ffdm.window)
    np.testing.assert_array_equal(image.frame(0), ffdm.pixels)
    volume = open_image(files["dbt"])
    meta = volume.meta
    assert (meta.kind, meta.view, meta.laterality, meta.shape) == ("dbt", "CC", "L", dbt.pixels.shape)
    assert meta.spacing_mm == pytest.approx(dbt.spacing_mm) and meta.frame_windows is None
    assert meta.patient_orientation == ["A", "R"]
    np.testing.assert_array_equal(volume.frame(1), dbt.pixels[-2])


def test_mammodino_info_json_reports_the_truth(dbt, files, capsys):
    assert main(["info", str(files["dbt"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["kind"], report["view"], report["laterality"]) == ("dbt", "CC", "L")
    assert report["spacing_mm"] == pytest.approx(list(dbt.spacing_mm))


def test_monochrome1_twin_displays_exactly_like_monochrome2(ffdm, files):
    m2, m1 = open_image(files["ffdm"]), open_image(files["ffdm_m1"])
    assert m1.meta.photometric == "MONOCHROME1"
    np.testing.assert_array_equal(m1.frame(0), 2 ** ffdm.bits_stored - 1 - ffdm.pixels)
    ds = pydicom.dcmread(files["ffdm_m1"])
    assert ds.PresentationLUTShape == "INVERSE" and ds.PixelIntensityRelationshipSign == 1
    for choice in range(3):  # every stored window, not just the first
        shown2 = to_display(m2.frame(0), m2.meta, choice=choice)
        shown1 = to_display(m1.frame(0), m1.meta, choice=choice)
        assert shown2.std() > 0.05
        np.testing.assert_allclose(shown1, shown2, atol=1e-6)


def test_jpeg2000_variant_is_lossless_with_one_fragment_per_frame(dbt, files):
    ds = pydicom.dcmread(files["dbt_j2k"])
    assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless and ds.LossyImageCompression == "00"
    frames = list(generate_fragmented_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames))
    assert [len(f) for f in frames] == [1] * dbt.pixels.shape[0]
    image = open_image(files["dbt_j2k"])
    np.testing.assert_array_equal(image.data.compute(), dbt.pixels[::-1])
    assert files["dbt_j2k"].stat().st_size < 0.8 * files["dbt"].stat().st_size


def test_per_slice_series_opens_as_the_same_volume_whatever_the_file_names(files, tmp_path):
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    paths = sorted(files["dbt_series"].glob("*.dcm"))
    names = [f"{i:03d}" for i in range(len(paths))]
    random.Random(0).shuffle(names)
    for path, name in zip(paths, names):
        shutil.copy(path, shuffled / name)  # names say nothing about the order
    multi = open_image(files["dbt"])
    for folder in (files["dbt_series"], shuffled):
        series = open_image(folder)
        assert series.meta.n_files == len(paths) and series.meta.kind == "dbt"
        assert series.meta.spacing_mm == pytest.approx(multi.meta.spacing_mm)
        assert (series.meta.view, series.meta.laterality) == (multi.meta.view, multi.meta.laterality)
        np.testing.assert_array_equal(series.data.compute(), multi.data.compute())
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    assert len({h.SeriesInstanceUID for h in headers}) == 1 and len({h.SOPInstanceUID for h in headers}) == len(paths)


def test_per_frame_windows_follow_each_slice(dbt, files):
    meta = open_image(files["dbt_per_frame"]).meta
    assert meta.frame_windows is not None and len(meta.frame_windows) == dbt.pixels.shape[0]
    ds = pydicom.dcmread(files["dbt_per_frame"], stop_before_pixels=True)
    assert "FrameVOILUTSequence" not in ds.SharedFunctionalGroupsSequence[0]
    centers = [w[0].center for w in meta.frame_windows]
    frames, masks = dbt.pixels[::-1], dbt.breast_mask[::-1]
    with_breast = [k for k in range(len(frames)) if masks[k].any()]
    for k in (with_breast[0], with_breast[-1]):  # the window sits in the middle of that slice's breast values
        lo, hi = np.percentile(frames[k][masks[k]], [1, 99])
        assert centers[k] == pytest.approx((lo + hi) / 2, abs=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("dataset") / "exam"
    generate(out, "exam", 1, seed=11, lesion="mass", shape=SHAPE, workers=1, progress=False)
    return out


def test_labels_csv_has_the_documented_columns_and_relative_paths(dataset):
    header = (dataset / "labels.csv").read_text().splitlines()[0].split(",")
    assert tuple(header) == LABEL_COLUMNS
    rows = read_truth(dataset / "labels.csv")
    assert sorted(r["laterality"] + r["view"] for r in rows) == ["LCC", "LMLO", "RCC", "RMLO"]
    assert len({r["patient_id"] for r in rows}) == 1
    # The lesion is in one breast only: both of its views say so, the other breast's say none.
    with_lesion = {r["laterality"] for r in rows if r["lesion"]}
    assert len(with_lesion) == 1
    for row in rows:
        for column in ("path", "breast_mask", "glandular_mask", "lesion_mask"):
            assert not Path(row[column]).is_absolute() and (dataset / row[column]).is_file()
        assert row["lesion_type"] == ("mass" if row["lesion"] else "none")
        assert row["birads"] == (max(l["birads"] for l in row["lesions"]) if row["lesion"] else 1)
        assert row["density"] in "ABCD" and row["seed"] >= 0


def test_masks_align_with_the_pixels(dataset):
    for row in read_truth(dataset / "labels.csv"):
        pixels = open_image(dataset / row["path"]).frame(0).astype(float)
        breast = load_mask(dataset / row["breast_mask"]).astype(bool)
        glandular = load_mask(dataset / row["glandular_mask"]).astype(bool)
        lesions = load_mask(dataset / row["lesion_mask"])
        assert breast.shape == glandular.shape == lesions.shape == pixels.shape
        # Air is dark in a For Presentation image: the breast mask must cover the bright part.
        assert pixels[breast].mean() > pixels[~breast].mean() + 5 * pixels[~breast].std() + 1
        assert not (glandular & ~breast).any()
        assert set(np.unique(lesions)) == {0, *[l["label"] for l in row["lesions"]]}
        for lesion in row["lesions"]:
            r0, c0, r1, c1 = lesion["box"]
            rr, cc = np.nonzero(lesions == lesion["label"])
            assert r0 <= rr.min() and rr.max() < r1 and c0 <= cc.min() and cc.max() < c1
            inside = pixels[lesions == lesion["label"]].mean()
            ring = pixels[max(r0 - 10, 0):r1 + 10, max(c0 - 10, 0):c1 + 10]
            assert inside > np.median(ring)  # a mass attenuates more than what surrounds it


def test_dbt_ground_truth_is_in_file_frame_order(dbt, tmp_path):
    from training.phantom.dataset import write_image

    row = write_image(dbt, tmp_path, tmp_path, Identity("PHTEST-000002"))
    lesions = load_mask(tmp_path / row["lesion_mask"])
    np.testing.assert_array_equal(lesions, dbt.lesion_labels[::-1])
    n = dbt.pixels.shape[0]
    (lesion,) = row["lesions"]
    first, last = lesion["slice_range"]
    occupied = np.nonzero((lesions == lesion["label"]).any(axis=(1, 2)))[0]
    assert first <= occupied.min() and occupied.max() <= last
    assert lesion["center_slice"] == n - 1 - dbt.lesions[0].center_slice


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_the_same_bytes_whatever_the_number_of_workers(tmp_path):
    options = dict(lesion="any", shape=(128, 104), progress=False)
    generate(tmp_path / "one", "ffdm", 3, seed=5, workers=1, **options)
    generate(tmp_path / "two", "ffdm", 3, seed=5, workers=2, **options)
    generate(tmp_path / "other", "ffdm", 3, seed=6, workers=1, **options)
    one, two, other = _digest(tmp_path / "one"), _digest(tmp_path / "two"), _digest(tmp_path / "other")
    assert len(one) == 3 * 4 + 1  # per item a DICOM file and three masks, plus labels.csv
    assert one == two
    dicom = {name: digest for name, digest in one.items() if name.endswith(".dcm")}
    assert len(dicom) == 3 and not set(dicom.values()) & set(other.values())  # another seed, other images
    assert [p.name for p in tmp_path.rglob(".*.tmp")] == []  # no temporary file left behind


def test_unique_identities_never_share_uids_but_keep_one_series_across_instances():
    plain = Identity("P", "1", 3, 1)
    assert plain.series_uid == Identity("P", "1", 3, 2).series_uid  # deterministic: same fields, same UIDs
    a, b = Identity.unique(patient_id="P"), Identity.unique(patient_id="P")
    assert len({a.study_uid, b.study_uid, plain.study_uid}) == 3
    assert len({a.series_uid, b.series_uid, plain.series_uid}) == 3
    slice_2 = replace(a, instance_number=2)
    assert slice_2.series_uid == a.series_uid and slice_2.instance_uid() != a.instance_uid()


def test_the_writer_encodes_jpeg_lossless_through_gdcm(tmp_path):
    pytest.importorskip("gdcm")
    volume = np.random.default_rng(0).integers(0, 4096, (3, 32, 24), dtype=np.uint16)
    ds = enhanced_dbt_dataset(volume, Identity.unique(), spacing=(1.0, 0.1, 0.1))
    path = save_dataset(ds, tmp_path / "x.dcm", JPEGLosslessSV1)
    image = open_image(path)
    assert image.meta.transfer_syntax == JPEGLosslessSV1 and image.meta.spacing_mm == pytest.approx((1.0, 0.1, 0.1))
    np.testing.assert_array_equal(np.stack([image.frame(i) for i in range(3)]), volume)
    assert [p.name for p in tmp_path.iterdir()] == ["x.dcm"]  # transcoded before the rename


def test_cli_phantom_writes_a_dataset_and_reports_one_json_object(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["phantom", str(out), "--kind", "dbt", "--n", "1", "--seed", "2", "--shape", "96x78",
                 "--lesion", "mass", "--density", "C", "--json", "--quiet"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert {"out", "n", "files", "labels_csv", "seconds"} <= report.keys()
    assert report["n"] == 1 and report["files"] == 1 and Path(report["labels_csv"]).is_file()
    (row,) = read_truth(report["labels_csv"])
    assert (row["kind"], row["density"], row["lesion_type"]) == ("dbt", "C", "mass")
    (image,) = open_path(out / row["path"])
    assert (image.meta.kind, image.meta.view, image.meta.laterality) == ("dbt", row["view"], row["laterality"])


@pytest.mark.parametrize("argv, message", [
    (["--n", "0"], "at least one item"),
    (["--shape", "12x"], "ROWSxCOLS"),
    (["--shape", "10x10"], "64 to 8192"),
    (["--workers", "0"], "at least one process"),
    (["--seed", "-1"], "non-negative"),
    (["--density", "E"], "invalid choice"),
    (["--kind", "ct"], "invalid choice"),
])
def test_cli_phantom_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, message):
    assert _exit_code(["phantom", str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "x").exists()


def _exit_code(argv: list[str]) -> int:
    """main()'s status, also where argparse exits by itself (a usage mistake)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


def test_cli_phantom_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["phantom", str(tmp_path), "--n", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not empty" in err and "--overwrite" in err
    assert (tmp_path / "keep.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
