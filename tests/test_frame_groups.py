"""The one-pass functional-group reader must see exactly what pydicom's Dataset API sees, however the
sequences are encoded, and the native fast path must give exactly pydicom's pixels."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_factory import labelled_volume, mark_undefined_lengths, write_enhanced_dbt, write_ffdm
from training.dicom.frame_groups import PER_FRAME, functional_groups, read_until_pixels
from training.dicom.io import open_file, read_header
from training.dicom.metadata import frame_positions, frame_rescales, windows_of
from training.errors import MammoInputError
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


@pytest.mark.parametrize("encoding", ["explicit, defined lengths", "explicit, undefined lengths",
                                      "explicit, nested undefined lengths", "implicit VR",
                                      "implicit VR, undefined lengths"])
def test_functional_groups_match_pydicom_in_every_encoding(tmp_path, encoding):
    path = write_enhanced_dbt(tmp_path / "dbt.dcm", labelled_volume(7), per_frame_windows=WINDOWS,
                              spacing=(0.1, 0.12), laterality="L")
    ds = pydicom.dcmread(path)
    if "undefined" in encoding:
        mark_undefined_lengths(ds, from_depth=1 if "nested" in encoding else 0)
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
        mark_undefined_lengths(ds)
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


# --- sequences of undefined length, as vendors write them: walked, not parsed, when the header is read ---

def _vendor_dbt(path, n, implicit=False, rescaled=(), windows=None):
    """An `n`-frame DBT with every sequence and item of undefined length; frames in `rescaled` have
    their own rescale (the others 1, 0), and elements follow the per-frame sequence, one of them an
    undefined-length sequence too (the reader reads on after the walk)."""
    path = write_enhanced_dbt(path, labelled_volume(n, (8, 6)), per_frame_windows=windows, slice_spacing=0.5)
    ds = pydicom.dcmread(path)
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        transform, content = pydicom.Dataset(), pydicom.Dataset()
        transform.RescaleSlope, transform.RescaleIntercept = (2, -5) if k in rescaled else (1, 0)
        transform.RescaleType = "US"
        item.PixelValueTransformationSequence = [transform]
        content.InStackPositionNumber, content.DimensionIndexValues = k + 1, [1, k + 1]
        item.FrameContentSequence = [content]
    wave = pydicom.Dataset()
    wave.NumberOfWaveformChannels = 1
    ds.WaveformSequence = [wave]  # (5400,0100), after the per-frame sequence
    ds.add_new(0x60000010, "US", 8)  # OverlayRows
    mark_undefined_lengths(ds)
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    return path


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit VR", "implicit VR"])
def test_undefined_length_volume_opens_parsing_only_the_frames_asked_for(tmp_path, implicit):
    n = 240
    path = _vendor_dbt(tmp_path / "dbt.dcm", n, implicit, windows=[(900, 1800)] * n)
    image = open_file(path)
    FrameStack(image)[n // 2]
    assert isinstance(image.header.get_item(PER_FRAME).value, bytes)  # pydicom built no Dataset of it
    parsed = [i for i, item in enumerate(functional_groups(image.header).per_frame._items) if item is not None]
    assert parsed == [0, 1, n - 1]
    assert image.meta.spacing_mm == pytest.approx((0.5, 0.085, 0.085))
    assert image.meta.frame_windows is None and [(w.center, w.width) for w in image.meta.windows] == [(900, 1800)]
    np.testing.assert_array_equal(image.frame(n // 2), pydicom.dcmread(path).pixel_array[n // 2])  # the pixel data found


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit VR", "implicit VR"])
def test_undefined_length_header_reads_as_pydicoms_full_parse(tmp_path, implicit):
    """Every top-level value, the pixel-data position, and each frame's position, window and rescale
    (frames differing from one another, their items in length too) are what pydicom's full parse gives."""
    n = 40
    windows = [(2000 + 10 * (k % 3), 4000 - 100 * k) for k in range(n)]  # "1000.0", then "900.0": items shrink
    path = _vendor_dbt(tmp_path / "dbt.dcm", n, implicit, rescaled={9, 31}, windows=windows)
    with open(path, "rb") as f:
        ours, at = read_until_pixels(f), f.tell()
    with open(path, "rb") as f:
        theirs, their_at = pydicom.dcmread(f, stop_before_pixels=True), f.tell()
    assert at == their_at
    assert [e.tag for e in ours] == [e.tag for e in theirs]
    assert all(ours[e.tag].value == e.value for e in theirs)

    header, source = read_header(path)
    assert isinstance(header.get_item(PER_FRAME).value, bytes)
    assert source.rescale == frame_rescales(theirs, n) and source.rescale[9] == (2.0, -5.0) != source.rescale[8]
    assert windows_of(header, n) == windows_of(theirs, n)
    assert [[(w.center, w.width) for w in frame] for frame in windows_of(header, n)[1]] == [[w] for w in windows]
    reference = [[float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
                 for item in theirs.PerFrameFunctionalGroupsSequence]
    assert [list(p) for p in frame_positions(header, n)] == reference
    assert _values(functional_groups(header), 31) == _values(functional_groups(theirs), 31)


def test_undefined_length_item_count_that_differs_from_the_frames_reads_as_defined_length(tmp_path):
    """Fewer per-frame items than NumberOfFrames: the frames without one take the shared groups,
    whatever the lengths' encoding."""
    metas = []
    for undefined in (False, True):
        path = write_enhanced_dbt(tmp_path / f"dbt{undefined}.dcm", labelled_volume(24, (8, 6)),
                                  per_frame_windows=[(900, 1800)] * 23 + [(700, 1400)], slice_thickness=2.0)
        ds = pydicom.dcmread(path)
        del ds.PerFrameFunctionalGroupsSequence[-1]
        if undefined:
            mark_undefined_lengths(ds)
        ds.save_as(path, enforce_file_format=True)
        image = open_file(path)
        assert len(functional_groups(image.header)) == 23
        metas.append((image.meta.spacing_mm, image.meta.windows, image.meta.frame_windows))
    assert metas[0] == metas[1] and metas[1][0] == pytest.approx((2.0, 0.085, 0.085))


def _nested(depth):
    item = pydicom.Dataset()
    for _ in range(depth):
        outer = pydicom.Dataset()
        outer.ContentSequence = [item]
        item = outer
    return item


@pytest.mark.parametrize("damage", ["truncated in the sequence", "no sequence delimiter",
                                    "a length past the end of the file", "absurd nesting"])
def test_a_damaged_undefined_length_sequence_is_a_one_line_error(tmp_path, damage):
    """Damage is found by the walk and reported in one line, without reading on past a length that
    lies (pydicom would) and without allocating what a header value claims."""
    import struct
    import tracemalloc

    path = write_enhanced_dbt(tmp_path / "dbt.dcm", labelled_volume(24, (8, 6)), undefined_lengths=True)
    if damage == "absurd nesting":
        ds = pydicom.dcmread(path)
        ds.PerFrameFunctionalGroupsSequence[5].ContentSequence = [_nested(100)]
        mark_undefined_lengths(ds)
        ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    start, pixels = raw.index(b"\x00\x52\x30\x92SQ"), raw.index(b"\xe0\x7f\x10\x00OW")
    if damage == "truncated in the sequence":
        raw = raw[:(start + pixels) // 2]
    elif damage == "no sequence delimiter":
        raw = raw[:pixels - 8] + raw[pixels:]
    elif damage == "a length past the end of the file":
        lie = b"\x09\x00\x01\x10OB\x00\x00" + struct.pack("<L", 0xFFFFFFF0)  # a 4 GB private value
        raw = raw[:pixels - 16] + lie + raw[pixels - 16:]  # in the last item, before its delimiter
    path.write_bytes(raw)
    tracemalloc.start()
    try:
        with pytest.raises(MammoInputError, match="damaged or truncated DICOM header") as err:
            open_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "\n" not in str(err.value) and peak < 8 * 2**20


def test_implicit_vr_items_in_an_explicit_vr_file_are_left_to_pydicom(tmp_path):
    """Some writers encode a sequence's items in implicit VR inside an explicit VR file: the walk cannot
    follow them, so pydicom reads the header whole, as before, and the values are its values."""
    import warnings

    windows = [(100 * k, 400) for k in range(6)]
    paths = [write_enhanced_dbt(tmp_path / f"{name}.dcm", labelled_volume(6, (8, 6)), per_frame_windows=windows,
                                undefined_lengths=True, transfer_syntax=syntax)
             for name, syntax in (("explicit", ExplicitVRLittleEndian), ("implicit", ImplicitVRLittleEndian))]
    (explicit, implicit), spans = (p.read_bytes() for p in paths), []
    for data, head in ((explicit, b"\x00\x52\x30\x92SQ\x00\x00\xff\xff\xff\xff"), (implicit, b"\x00\x52\x30\x92\xff\xff\xff\xff")):
        start = data.index(head) + len(head)
        spans.append((start, data.index(b"\xe0\x7f\x10\x00", start) - 8))  # the items, up to the delimiter
    (start, end), (their_start, their_end) = spans
    mixed = tmp_path / "mixed.dcm"
    mixed.write_bytes(explicit[:start] + implicit[their_start:their_end] + explicit[end:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom says it found implicit VR
        image = open_file(mixed)
    assert not isinstance(image.header.get_item(PER_FRAME).value, bytes)  # pydicom's parse
    assert [[(w.center, w.width) for w in frame] for frame in image.meta.frame_windows] == [[w] for w in windows]
