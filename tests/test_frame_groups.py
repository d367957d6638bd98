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
from training.lazy import FrameStack

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


def _eager(ds):
    """Every per-frame item parsed up front, as the reader did before frames were parsed on demand."""
    from training.dicom.frame_groups import PER_FRAME, _parse_sequence

    implicit, little = ds.original_encoding
    return _parse_sequence(ds.get_item(PER_FRAME).value, (bool(implicit), little is not False), {})


MACROS = ("PlanePositionSequence", "FrameVOILUTSequence", "PixelValueTransformationSequence",
          "PixelMeasuresSequence", "FrameAnatomySequence")
KEYWORDS = ("ImagePositionPatient", "WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept",
            "PixelSpacing", "FrameLaterality")


def _values(groups, frame, eager=None):
    out = {}
    for macro in MACROS:
        item = groups.item(macro, frame)
        if eager is not None and frame < len(eager) and eager[frame].get(macro):
            item = eager[frame].get(macro)[0]
        out[macro] = None if item is None else {k: item.get(k) for k in KEYWORDS if k in item}
    return out


@pytest.mark.parametrize("encoding", ["explicit, defined lengths", "explicit, undefined lengths", "implicit VR"])
def test_frames_parsed_on_demand_give_what_parsing_every_frame_gives(tmp_path, encoding):
    windows = [(2000, 4000)] * 17 + [(1500, 800)] + [(2000, 4000)] * 12  # frame 17 differs
    path = write_enhanced_dbt(tmp_path / "dbt.dcm", labelled_volume(30), per_frame_windows=windows)
    ds = pydicom.dcmread(path)
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):  # frame 9 alone is rescaled
        transform = pydicom.Dataset()
        transform.RescaleSlope, transform.RescaleIntercept = (2, -5) if k == 9 else (1, 0)
        transform.RescaleType = "US"
        item.PixelValueTransformationSequence = [transform]
    if "undefined" in encoding:
        _undefined_lengths(ds)
    implicit = "implicit" in encoding
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=True)

    header = pydicom.dcmread(path, stop_before_pixels=True)
    lazy, eager = functional_groups(header), _eager(header)
    assert len(lazy) == len(eager) == 30
    shared = functional_groups(pydicom.dcmread(path, stop_before_pixels=True))
    for frame in (29, 0, 17, 9, 3, 17):  # any order, again
        assert _values(lazy, frame) == _values(shared, frame, eager)
    assert not lazy.same_in_every_frame("FrameVOILUTSequence", 30)
    assert not lazy.same_in_every_frame("PixelValueTransformationSequence", 30)
    assert lazy.same_in_every_frame("PixelMeasuresSequence", 30)  # shared only

    image = open_file(path)  # frames that differ are found, whichever frame it is
    assert image.meta.frame_windows[17][0].center == 1500 and image.meta.frame_windows[16][0].center == 2000
    assert image.data.dtype == np.float32
    np.testing.assert_array_equal(image.frame(9), labelled_volume(30)[9] * 2.0 - 5)
    np.testing.assert_array_equal(image.frame(10), labelled_volume(30)[10])


@pytest.mark.parametrize("n", [30, 240])
def test_opening_a_volume_and_showing_a_slice_parses_a_few_frames_whatever_its_size(tmp_path, n):
    """The first slice costs the same at 30 and 240 frames: the frames every frame shares are
    recognised from the bytes, so no more than a handful of per-frame items are parsed."""
    path = write_enhanced_dbt(tmp_path / "dbt.dcm", labelled_volume(n, (8, 6)), per_frame_windows=[(900, 1800)] * n,
                              slice_spacing=0.5)
    image = open_file(path)
    FrameStack(image)[n // 2]
    parsed = [i for i, item in enumerate(functional_groups(image.header).per_frame._items) if item is not None]
    assert parsed == [0, 1, n - 1]  # frame 0 for its macros, frames 0, 1 and the last for the spacing
    assert image.meta.spacing_mm == pytest.approx((0.5, 0.085, 0.085))
    assert image.meta.frame_windows is None and [(w.center, w.width) for w in image.meta.windows] == [(900, 1800)]
    assert image.data.dtype == np.uint16


def test_unevenly_spaced_frames_fall_back_to_the_median_step(tmp_path):
    path = write_enhanced_dbt(tmp_path / "dbt.dcm", labelled_volume(6))
    ds = pydicom.dcmread(path)
    for k, z in enumerate([0.0, 1.0, 2.0, 3.0, 4.0, 9.0]):  # the last step is 5 mm: the median says 1
        ds.PerFrameFunctionalGroupsSequence[k].PlanePositionSequence[0].ImagePositionPatient = [0, 0, z]
    ds.save_as(path, enforce_file_format=True)
    assert open_file(path).meta.spacing_mm[0] == pytest.approx(1.0)


def test_a_per_frame_item_whose_length_lies_allocates_nothing(tmp_path):
    """An item length past the end of its sequence (here 4 GB) is a damaged sequence, read as absent,
    never a buffer of that size."""
    import struct
    import tracemalloc

    path = write_enhanced_dbt(tmp_path / "dbt.dcm", labelled_volume(12), slice_spacing=1.5)
    raw = bytearray(path.read_bytes())
    start = raw.index(b"\x00\x52\x30\x92SQ")  # PerFrameFunctionalGroupsSequence
    item = raw.index(b"\xfe\xff\x00\xe0", start)
    raw[item + 4:item + 8] = struct.pack("<L", 0xFFFFFFF0)
    path.write_bytes(bytes(raw))
    tracemalloc.start()
    try:
        image = open_file(path)
        FrameStack(image)[6]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20
    assert len(functional_groups(image.header)) == 0  # no positions: the spacing is the thickness
    assert image.meta.spacing_mm[0] == pytest.approx(1.5) and image.meta.spacing_source.startswith("SliceThickness")


def _same(ours, theirs):
    if isinstance(theirs, (list, tuple)) or type(theirs).__name__ == "MultiValue":
        return isinstance(ours, list) and len(ours) == len(theirs) and all(_same(a, b) for a, b in zip(ours, theirs))
    if isinstance(theirs, float):
        return ours == pytest.approx(theirs)
    return ours == theirs


def test_header_values_read_fast_are_pydicoms(tmp_path, mg1_path, cbis_cases):
    """value_of converts numbers, codes and UIDs itself (a third of pydicom's cost): every such
    element of real and phantom headers must read as pydicom reads it; sequences become Items."""
    from training.dicom.frame_groups import value_of

    dbt = write_enhanced_dbt(tmp_path / "dbt.dcm", labelled_volume(5), per_frame_windows=WINDOWS[:5])
    ffdm = write_ffdm(tmp_path / "x.dcm", np.zeros((8, 8), np.uint16), window=[(2000, 4000), (1500, 800)])
    checked = 0
    for path in (mg1_path, cbis_cases[0]["lmlo"], dbt, ffdm):
        ds, theirs = (pydicom.dcmread(path, stop_before_pixels=True) for _ in range(2))
        for element in theirs:
            if element.keyword and element.VR != "SQ":
                assert _same(value_of(ds, element.keyword), theirs.get(element.keyword)), element.keyword
                checked += 1
        for keyword in ("ViewCodeSequence", "SharedFunctionalGroupsSequence"):
            if keyword in theirs:
                items = value_of(ds, keyword)
                assert len(items) == len(theirs.get(keyword)) and all(hasattr(i, "get") for i in items)
    assert checked > 100
    assert value_of(ds, "PatientWeight", "none") == "none"  # absent: the default, as pydicom's get
