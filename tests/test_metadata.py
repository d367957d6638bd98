"""Kind, view, laterality, spacing and windows named as a radiologist would name them: from the proper
tags, from the functional groups of enhanced DBT, and from the fallbacks that real archives force."""

from __future__ import annotations

import pytest

from dicom_factory import damage, labelled_volume, ramp, write_enhanced_dbt, write_ffdm
from training.errors import MammoInputError
from training.dicom.io import open_file
from training.phantom.dicom import code_item

IMAGE = ramp((64, 48))


def meta_of(path):
    return open_file(path).meta


@pytest.mark.parametrize("code, view", [
    (code_item("399368009", "medio-lateral oblique"), "MLO"),  # SNOMED CT
    (code_item("R-10242", "cranio-caudal", "SRT"), "CC"),  # legacy SNOMED-RT
    (code_item("99MLO", "Medio-Lateral Oblique", "99LOCAL"), "MLO"),  # private code, standard meaning
    (code_item("99CC", "craniocaudal", "99LOCAL"), "CC"),
])
def test_view_from_view_code_sequence_when_view_position_is_missing(tmp_path, code, view):
    meta = meta_of(write_ffdm(tmp_path / "x.dcm", IMAGE, view=None, ViewCodeSequence=[code]))
    assert (meta.view, meta.view_source) == (view, "ViewCodeSequence")


@pytest.mark.parametrize("patient_id, view, laterality", [
    ("P_0001_LEFT_MLO", "MLO", "L"), ("Mass-Test_P_00173_RIGHT_CC", "CC", "R"), ("EXAM7 RCC", "CC", "R")])
def test_view_and_laterality_from_patient_id_text(tmp_path, patient_id, view, laterality):
    meta = meta_of(write_ffdm(tmp_path / "x.dcm", IMAGE, view=None, laterality=None, PatientID=patient_id))
    assert (meta.view, meta.laterality) == (view, laterality)
    assert meta.view_source == meta.laterality_source == "PatientID"


def test_view_and_laterality_from_the_file_name_as_a_last_resort(tmp_path):
    meta = meta_of(write_ffdm(tmp_path / "R_MLO", IMAGE, view=None, laterality=None))
    assert (meta.view, meta.laterality, meta.laterality_source) == ("MLO", "R", "file name")


@pytest.mark.parametrize("extra, laterality", [
    ({"Laterality": "R"}, "R"),  # series-level tag, as in CBIS-DDSM
    ({"ImageLaterality": "L", "PatientOrientation": ["A", "R"]}, "L"),  # the tag wins over letters
    ({"PatientOrientation": ["A", "R"]}, None),  # direction letters are not a breast side
])
def test_laterality_from_tags_never_from_direction_letters(tmp_path, extra, laterality):
    meta = meta_of(write_ffdm(tmp_path / "image.dcm", IMAGE, laterality=None, **extra))
    assert meta.laterality == laterality


@pytest.mark.parametrize("tags, spacing, source", [
    ({"PixelSpacing": [0.07, 0.065]}, (0.07, 0.065), "PixelSpacing"),
    ({"ImagerPixelSpacing": [0.085, 0.08]}, (0.085, 0.08), "ImagerPixelSpacing"),
    ({"PixelSpacing": [0.07, 0.065], "ImagerPixelSpacing": [0.085, 0.08]}, (0.07, 0.065), "PixelSpacing"),
    ({}, None, None),
])
def test_in_plane_spacing_in_row_column_order(tmp_path, tags, spacing, source):
    meta = meta_of(write_ffdm(tmp_path / "x.dcm", IMAGE, spacing=None, **tags))
    assert (meta.spacing_mm, meta.spacing_source) == (spacing, source)


def test_enhanced_dbt_facts_come_from_functional_groups(tmp_path):
    windows = [(100 * i + 50, 100) for i in range(12)]
    path = write_enhanced_dbt(tmp_path / "dbt", labelled_volume(12), spacing=(0.09, 0.07), slice_spacing=1.25,
                              slice_thickness=2.0, laterality="L", view="CC", per_frame_windows=windows)
    meta = meta_of(path)
    assert (meta.kind, meta.shape) == ("dbt", (12, 64, 48))
    assert meta.spacing_mm == pytest.approx((1.25, 0.09, 0.07))  # slice step from positions, not thickness
    assert meta.spacing_source == "ImagePositionPatient + PixelMeasuresSequence"
    assert (meta.view, meta.laterality, meta.laterality_source) == ("CC", "L", "FrameAnatomySequence")
    assert [(w.center, w.width) for w in meta.windows] == [windows[0]]
    assert [[(w.center, w.width) for w in frame] for frame in meta.frame_windows] == [[w] for w in windows]


def test_enhanced_dbt_with_one_shared_window_has_no_per_frame_windows(tmp_path):
    meta = meta_of(write_enhanced_dbt(tmp_path / "dbt", labelled_volume(6), window=(600, 1200)))
    assert [(w.center, w.width) for w in meta.windows] == [(600, 1200)]
    assert meta.frame_windows is None


def test_windows_keep_their_explanations_and_order(tmp_path):
    meta = meta_of(write_ffdm(tmp_path / "x.dcm", IMAGE, window=[(2000, 4000), (1500, 800)],
                              WindowCenterWidthExplanation=["NORMAL", "HARDER"]))
    assert [(w.center, w.width, w.explanation) for w in meta.windows] == [(2000, 4000, "NORMAL"),
                                                                          (1500, 800, "HARDER")]


def test_malformed_window_is_ignored_but_malformed_rescale_is_an_input_error(tmp_path):
    window = write_ffdm(tmp_path / "w.dcm", IMAGE, WindowCenter="2.047E3", WindowWidth=4095)
    assert meta_of(damage(window, "2.047E3", "2.0x7E3")).windows == []  # opens; display uses the header range
    rescale = write_ffdm(tmp_path / "r.dcm", IMAGE, RescaleSlope="+1.0E0", RescaleIntercept=0)
    with pytest.raises(MammoInputError, match="RescaleSlope"):  # values would be wrong: refuse
        open_file(damage(rescale, "+1.0E0", "+1.xE0"))


def test_real_mg1_header(mg1_path):
    meta = meta_of(mg1_path)
    assert (meta.kind, meta.view, meta.laterality) == ("ffdm", "MLO", "L")
    assert (meta.shape, meta.bits_stored, meta.photometric) == ((4664, 3064), 12, "MONOCHROME2")
    assert meta.spacing_mm is None  # Secondary Capture of a film: no spacing, and none invented
    assert [(w.center, w.width) for w in meta.windows] == [(2047, 4095)]


def test_real_cbis_exams_name_every_view_and_breast(cbis_cases):
    named, expected = {}, {}
    for i, case in enumerate(cbis_cases):
        for key, path in case.items():  # key like 'lmlo': left MLO
            meta = meta_of(path)
            named[i, key] = (meta.kind, meta.view, meta.laterality)
            expected[i, key] = ("ffdm", key[1:].upper(), key[0].upper())
    assert len(named) == 8
    assert named == expected
