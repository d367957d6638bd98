"""Opening is lazy and faithful: slices come in body order, one frame decodes only itself, every
codec a mammography archive uses gives back the stored pixels, real files decode as they should."""

from __future__ import annotations

import os
import sys
import tracemalloc

import numpy as np
import pydicom
import pytest
from pydicom.uid import (ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless,
                         RLELossless)

from dicom_factory import labelled_volume, ramp, write_enhanced_dbt, write_ffdm, write_slice_series
from training.errors import MammoInputError
from training.lazy import FrameStack, LazyStack
from training.dicom.io import open_file, open_image, open_path


def test_shuffled_series_folder_opens_in_position_order(tmp_path):
    volume = labelled_volume(7)
    paths = write_slice_series(tmp_path / "series", volume, slice_spacing=1.5, SliceThickness=3.0)
    (tmp_path / "series" / "notes.txt").write_text("not an image")
    names = sorted(p.name for p in paths)
    assert [p.name for p in paths] != names  # file names alone would give the wrong order
    assert any("." not in name for name in names)  # found by the DICM marker, not the extension

    image = open_image(tmp_path / "series")
    data = image.data.compute()
    assert [int(s.min()) // 100 for s in data] == list(range(7))  # slice i holds 100 * i + ramp
    np.testing.assert_array_equal(data, volume)
    assert (image.meta.kind, image.meta.n_files) == ("dbt", 7)
    assert image.meta.spacing_mm == pytest.approx((1.5, 0.1, 0.1))  # step between positions, not thickness
    assert image.meta.spacing_source.startswith("ImagePositionPatient")


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless])
def test_computing_one_dbt_slice_decodes_exactly_that_frame(tmp_path, decoded, syntax):
    volume = labelled_volume(60)
    image = open_file(write_enhanced_dbt(tmp_path / "dbt", volume, transfer_syntax=syntax))
    assert decoded == []  # opening reads headers only
    assert image.data.shape == (60, 64, 48) and image.data.numblocks == (60, 1, 1)

    slice_30 = image.data[30].compute()
    assert decoded == [30]
    np.testing.assert_array_equal(slice_30, volume[30])


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless,
                                    JPEGLosslessSV1])
def test_lossless_codecs_give_back_the_stored_pixels(tmp_path, syntax):
    if syntax == JPEGLosslessSV1:
        pytest.importorskip("gdcm", reason="JPEG Lossless files are encoded here with python-gdcm")
    stored = np.random.default_rng(1).integers(0, 4096, (3, 64, 48), dtype=np.uint16)
    image = open_file(write_enhanced_dbt(tmp_path / "x", stored, transfer_syntax=syntax))
    assert image.meta.transfer_syntax == syntax
    np.testing.assert_array_equal(image.data.compute(), stored)
    np.testing.assert_array_equal(image.frame(2), stored[2])


def test_rescale_gives_modality_values(tmp_path):
    stored = ramp((64, 48))
    image = open_file(write_ffdm(tmp_path / "x.dcm", stored, RescaleSlope=2, RescaleIntercept=-100))
    assert image.data.dtype == np.float32
    np.testing.assert_array_equal(image.data.compute(), stored * 2.0 - 100)


def test_folder_with_an_exam_gives_each_image(tmp_path):
    for view, side in [("CC", "R"), ("CC", "L"), ("MLO", "R"), ("MLO", "L")]:
        write_ffdm(tmp_path / f"{side}{view}", ramp((64, 48)), view=view, laterality=side)
    images = open_path(tmp_path)
    assert sorted((im.meta.laterality, im.meta.view) for im in images) == [
        ("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]


@pytest.mark.parametrize("lie", [
    {"Rows": 65535, "Columns": 65535, "NumberOfFrames": 100000},  # beyond any detector
    {"Rows": 4096, "Columns": 3328, "NumberOfFrames": 2000},  # plausible, but the bytes are not there
])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless])
def test_a_lying_header_is_refused_before_anything_is_allocated(tmp_path, lie, syntax):
    path = write_ffdm(tmp_path / "x.dcm", ramp((64, 48)), transfer_syntax=syntax)
    ds = pydicom.dcmread(path)
    for keyword, value in lie.items():
        setattr(ds, keyword, value)
    ds.save_as(path)
    tracemalloc.start()
    try:
        with pytest.raises(MammoInputError, match="header"):
            open_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20  # far below one claimed frame (26 MB) let alone the volume


def test_real_jpeg2000_mammogram_decodes(mg1_path):
    image = open_file(mg1_path)
    assert image.meta.transfer_syntax == "1.2.840.10008.1.2.4.91"
    pixels = image.data.compute()
    assert (pixels.shape, pixels.dtype) == ((4664, 3064), np.uint16)
    assert 0 <= pixels.min() and pixels.max() <= 4095 and pixels.max() > 2000  # 12 bits, really used
    np.testing.assert_array_equal(pixels, pydicom.dcmread(mg1_path).pixel_array)  # same as a full decode


def test_real_rle_mammogram_decodes(cbis_cases):
    path = cbis_cases[0]["lmlo"]
    image = open_file(path)
    assert image.meta.transfer_syntax == RLELossless
    pixels = image.data.compute()
    assert pixels.shape == image.meta.shape and pixels.std() > 100
    np.testing.assert_array_equal(pixels, pydicom.dcmread(path).pixel_array)


def test_frame_stack_indexes_like_the_array_and_keeps_only_a_few_frames(tmp_path, decoded):
    """What napari slices: numpy semantics, each frame decoded once while it stays among the last
    `keep`, the transform applied per frame."""
    volume = labelled_volume(10)
    image = open_file(write_enhanced_dbt(tmp_path / "dbt.dcm", volume))
    stack = FrameStack(image, transform=lambda values, frame: values[:, ::-1], keep=3)
    flipped = volume[..., ::-1]
    assert (stack.shape, stack.ndim, stack.dtype, len(stack)) == (volume.shape, 3, volume.dtype, 10)
    np.testing.assert_array_equal(stack[4], flipped[4])
    np.testing.assert_array_equal(stack[-1, 5:9, ::2], flipped[-1, 5:9, ::2])
    np.testing.assert_array_equal(stack[2:8:3], flipped[2:8:3])
    np.testing.assert_array_equal(stack[..., 7], flipped[..., 7])
    np.testing.assert_array_equal(np.asarray(stack), flipped)
    decoded.clear()
    stack[9], stack[9], stack[8]  # both still cached after the full read: no decode
    assert decoded == []
    stack[0]
    assert decoded == [0] and len(stack._cache) == 3
    with pytest.raises(IndexError):
        stack[10]


def test_frame_stack_of_a_2d_image(tmp_path):
    pixels = ramp((32, 24))
    stack = FrameStack(open_file(write_ffdm(tmp_path / "x.dcm", pixels)), dtype=np.float32)
    np.testing.assert_array_equal(stack[3:5, ::-1], pixels[3:5, ::-1].astype(np.float32))
    assert stack[...].dtype == np.float32 and stack.shape == (32, 24)


def test_lazy_stack_planes_not_ready_and_deferred():
    """A plane not ready yet (None) reads as zeros and is asked for again; a deferred stack's bare int
    index computes nothing until its values are read."""
    asked = []
    ready = {1: np.full((3, 4), 7, np.uint16)}

    def plane(index):
        asked.append(index)
        return ready.get(index)

    stack = LazyStack((2, 3, 4), np.uint8, plane, keep=2)
    assert not stack[0].any() and not stack[0].any() and asked == [0, 0]  # not kept: asked again
    assert stack[1].dtype == np.uint8 and stack[1, 0, 0] == 7 and asked == [0, 0, 1]
    assert not stack[1].flags.writeable and ready[1].flags.writeable  # the caller's array is left alone
    deferred = LazyStack((2, 3, 4), np.uint8, plane, deferred=True)
    lazy = deferred[1]
    assert (lazy.shape, lazy.dtype, lazy.ndim) == ((3, 4), np.uint8, 2) and asked == [0, 0, 1]
    assert np.asarray(lazy)[2, 3] == 7 and asked == [0, 0, 1, 1]


def test_frame_index_is_checked_by_the_image(tmp_path):
    volume = open_file(write_enhanced_dbt(tmp_path / "dbt.dcm", labelled_volume(5)))
    flat = open_file(write_ffdm(tmp_path / "x.dcm", ramp((32, 24))))
    assert (volume.n_frames, flat.n_frames) == (5, 1)
    assert [volume.frame_index(f) for f in (None, 0, 4, -1)] == [2, 0, 4, 4]
    assert [flat.frame_index(f) for f in (None, 0)] == [0, 0]
    with pytest.raises(MammoInputError, match=r"^frame 5 does not exist: the image has frames 0\.\.4$"):
        volume.frame_index(5)
    with pytest.raises(MammoInputError, match="^--frame 1 does not exist: the image has only frame 0$"):
        flat.frame_index(1, label="--frame")


def test_frames_get_buffers_of_their_own_that_go_back_to_the_system(tmp_path):
    from training.dicom.image import frame_buffer

    buffer = frame_buffer((2048, 1664), np.uint16)
    assert buffer.shape == (2048, 1664) and buffer.dtype == np.uint16 and buffer.flags.writeable
    assert not buffer.any()  # fresh memory reads as zeros
    if sys.platform.startswith("linux"):  # a mapping of its own, from a huge-page boundary
        assert buffer.ctypes.data % (2 << 20) == 0


def test_a_volume_that_shrinks_after_opening_says_which_frame_is_missing(tmp_path):
    path = write_enhanced_dbt(tmp_path / "dbt.dcm", labelled_volume(6))
    image = open_file(path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - image.shape[1] * image.shape[2])  # half of the last frame gone
    np.testing.assert_array_equal(image.frame(4), labelled_volume(6)[4])
    with pytest.raises(MammoInputError, match="frame 5 is truncated"):
        image.frame(5)
