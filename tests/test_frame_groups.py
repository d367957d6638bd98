"""The one-pass functional-group reader must see exactly what pydicom's Dataset API sees, however the
sequences are encoded, and the native fast path must give exactly pydicom's pixels."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian

from dicom_factory import labelled_volume, write_enhanced_dbt, write_ffdm
from training.dicom.frame_groups import functional_groups
from training.dicom.io import open_file

WINDOWS = [(100 * i + 50, 100 + i) for i in range(7)]


def _reference(path):
    """Positions and windows per frame, through pydicom's own Dataset API."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    out = []
    for item in ds.PerFrameFunctionalGroupsSequence:
        voi = item.FrameVOILUTSequence[0]
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        out.append((position, float(voi.WindowCenter), float(voi.WindowWidth)))
    return out


def _ours(path):
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    groups = functional_groups(ds)
    out = []
    for frame in range(len(groups)):
        voi = groups.item("FrameVOILUTSequence", frame)
        position = groups.item("PlanePositionSequence", frame).get("ImagePositionPatient")
        out.append((list(position), voi.get("WindowCenter"), voi.get("WindowWidth")))
    return out, groups


def _undefined_lengths(ds, from_depth=0, depth=0):
    """Mark the sequences and items of `ds` (nested `from_depth` deep or more) undefined-length, as
    many modalities write them."""
    for element in ds:
        if element.VR == "SQ":
            element.is_undefined_length = depth >= from_depth
            for item in element.value:
                item.is_undefined_length_sequence_item = depth >= from_depth
                _undefined_lengths(item, from_depth, depth + 1)


@pytest.mark.parametrize("encoding", ["explicit, defined lengths", "explicit, undefined lengths",
                                      "explicit, nested undefined lengths", "implicit VR",
                                      "implicit VR, undefined lengths"])
def test_functional_groups_match_pydicom_in_every_encoding(tmp_path, encoding):
    path = write_enhanced_dbt(tmp_path / "dbt.dcm", labelled_volume(7), per_frame_windows=WINDOWS,
                              spacing=(0.1, 0.12), laterality="L")
    ds = pydicom.dcmread(path)
    if "undefined" in encoding:
        _undefined_lengths(ds, from_depth=1 if "nested" in encoding else 0)
    implicit = "implicit" in encoding
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=True)

    ours, groups = _ours(path)
    assert ours == _reference(path)
    assert groups.item("PixelMeasuresSequence", 3).get("PixelSpacing") == [0.1, 0.12]  # from shared
    assert groups.item("FrameAnatomySequence").get("FrameLaterality") == "L"
    meta = open_file(path).meta
    assert meta.laterality == "L" and meta.spacing_mm == pytest.approx((1.0, 0.1, 0.12))
    assert [[(w.center, w.width) for w in f] for f in meta.frame_windows] == [[w] for w in WINDOWS]


def test_single_frame_file_has_no_functional_groups(tmp_path):
    ds = pydicom.dcmread(write_ffdm(tmp_path / "x.dcm", np.zeros((8, 8), np.uint16)), stop_before_pixels=True)
    groups = functional_groups(ds)
    assert len(groups) == 0 and groups.item("PixelMeasuresSequence") is None


@pytest.mark.parametrize("signed", [False, True])
def test_native_fast_path_clears_unused_bits_like_pydicom(tmp_path, signed):
    """12 bits stored in 16: garbage in the top 4 bits must be masked (unsigned) or sign-extended
    (signed), exactly as pydicom's own decoder does."""
    rng = np.random.default_rng(0)
    stored = rng.integers(-2048 if signed else 0, 2048 if signed else 4096, (3, 16, 12))
    raw = stored.astype(np.int16 if signed else np.uint16)
    garbage = (raw.view(np.uint16) & 0x0FFF) | (rng.integers(0, 16, raw.shape).astype(np.uint16) << 12)
    path = write_enhanced_dbt(tmp_path / "bits.dcm", garbage.view(raw.dtype))
    ds = pydicom.dcmread(path)
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, int(signed)
    ds.save_as(path, enforce_file_format=True)

    image = open_file(path)
    expected = pydicom.dcmread(path).pixel_array
    np.testing.assert_array_equal(np.stack([image.frame(i) for i in range(3)]), expected)
    np.testing.assert_array_equal(expected, stored)
