"""PNG/JPEG/TIFF mammograms enter the pipeline as MammoImages: faithful values, parsed views, the
breast found on real film, and damaged or lying files refused in one line before any allocation."""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import REPO
from training.cli import main
from training.errors import MammoInputError
from training.dicom.io import open_file, open_image, open_path
from training.dicom.raster import RasterSource, patient_from_name, view_from_name

DATA = REPO.parent / "shared" / "data"
DDSM = DATA / "ddsm_tissue66"
CDD = DATA / "cddcesm_dm9"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found (shared/data lies outside the repo)")
    return path


def _ddsm_pairs() -> list[tuple[Path, Path]]:
    images = sorted(_need(DDSM).glob("*/fgt_seg/*.png"))
    return [(p, p.parent.parent / "fgt_seg_labels" / f"{p.stem}_LI.png") for p in images]


def _one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and text
    return text


def test_ddsm_png_opens_lazily_with_a_synthetic_header():
    path = _need(DDSM / "test" / "fgt_seg" / "A_0040_1.RIGHT_MLO.png")
    image = open_image(path)
    meta = image.meta
    assert (meta.kind, meta.view, meta.laterality, meta.photometric) == ("ffdm", "MLO", "R", "MONOCHROME2")
    assert meta.shape == (960, 480) and meta.dtype == "uint8" and meta.spacing_mm is None
    assert image.data.numblocks == (1, 1)
    assert isinstance(image.frames[0].source, RasterSource) and image.frames[0].source.path == str(path)
    header = image.header
    assert (header.Modality, header.BodyPartExamined, header.ImageLaterality, header.ViewPosition) == \
        ("MG", "BREAST", "R", "MLO")
    assert header.PatientID == "A_0040_1" and "PixelSpacing" not in header
    stored = np.asarray(Image.open(path))
    np.testing.assert_array_equal(image.frame(0), stored)
    np.testing.assert_array_equal(image.data.compute(), stored)
    assert len(open_path(path)) == 1 and open_file(path).meta.shape == (960, 480)


def test_cddcesm_rgb_jpeg_becomes_luminance():
    path = _need(CDD / "images" / "flipped_P150_L_DM_CC.jpg")
    image = open_image(path)
    assert (image.meta.view, image.meta.laterality, image.meta.shape) == ("CC", "L", (512, 512))
    assert Image.open(path).mode == "RGB"
    np.testing.assert_array_equal(image.frame(0), np.asarray(Image.open(path).convert("L")))


@pytest.mark.parametrize("name, view, laterality, patient", [
    ("A_0002_1.RIGHT_MLO.png", "MLO", "R", "A_0002_1"),
    ("flipped_P150_L_DM_CC.jpg", "CC", "L", "flipped_P150_DM"),
    ("case12_LEFT_CC.tiff", "CC", "L", "case12"),
    ("P7_RMLO.png", "MLO", "R", "P7"),
    ("scan.png", None, None, "scan"),
])
def test_view_laterality_and_patient_come_from_the_file_name(name, view, laterality, patient):
    assert view_from_name(name) == (view, laterality)
    assert patient_from_name(name) == patient


def test_a_name_that_is_only_a_view_takes_its_folders_patient():
    assert patient_from_name(Path("P0042") / "LCC.png") == "P0042"


def test_tissue_mask_matches_the_manual_breast_maps_of_ddsm():
    """Our breast mask against DDSM's manual map (label > 64: adipose, fibroglandular, pectoral)."""
    from training.tissue import tissue_of

    ious = []
    for image_path, label_path in _ddsm_pairs():
        mask = tissue_of(open_image(image_path)).mask
        truth = np.asarray(Image.open(label_path)) > 64
        ious.append((mask & truth).sum() / (mask | truth).sum())
    ious = np.array(ious)
    print(f"ddsm tissue IoU over {len(ious)} images: median {np.median(ious):.3f}, "
          f"10th percentile {np.percentile(ious, 10):.3f}, min {ious.min():.3f}")
    assert len(ious) == 66
    assert np.median(ious) >= 0.93
    assert (ious >= 0.85).mean() >= 0.85  # two films whose grey film base passes for breast fail (README)


def test_sixteen_bit_png_and_tiff_keep_their_values(tmp_path):
    values = np.random.default_rng(0).integers(0, 4096, (80, 60), dtype=np.uint16)
    for name in ("P1_L_CC.png", "P1_R_CC.tif"):
        Image.fromarray(values).save(tmp_path / name)
        image = open_image(tmp_path / name)
        assert image.meta.dtype == "uint16" and image.header.BitsAllocated == 16
        np.testing.assert_array_equal(image.frame(0), values)


def test_sampler_and_preprocessing_cache_open_a_png(tmp_path):
    from training.ssl.cache import FrameCache, build_cache
    from training.sampler.sampler import sample_image

    path = _need(DDSM / "test" / "fgt_seg" / "B_3627_1.RIGHT_MLO.png")
    image = open_image(path)
    views = sample_image(image, seed=0).views()
    assert views["global"].shape[0] == 2 and np.isfinite(views["global"]).all()
    build_cache([image], tmp_path / "cache", workers=1)  # its worker reopens the file by path
    values, tissue = FrameCache(tmp_path / "cache").frame(FrameCache(tmp_path / "cache").entry(image), 0)
    assert values.shape == tissue.shape == (960, 480) and 0.2 < tissue.mean() < 0.9


def test_truncated_png_is_one_line_when_decoded(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 200), dtype=np.uint8)).save(good)
    bad = tmp_path / "bad_L_CC.png"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    image = open_image(bad)  # the header is intact: opening reads only it
    with pytest.raises(MammoInputError) as excinfo:
        image.frame(0)
    assert "truncated" in _one_line_error(excinfo)


def test_truncated_png_through_the_cli_exits_2_with_one_line(tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((300, 200), 7, np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:60])
    assert main(["tissue", str(bad), "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "bad.png" in err


def test_not_an_image_is_one_line(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not a picture")
    with pytest.raises(MammoInputError) as excinfo:
        open_image(path)
    assert "not a readable PNG" in _one_line_error(excinfo)


def _png_header_only(path: Path, rows: int, cols: int) -> Path:
    """A PNG whose IHDR claims rows x cols 16-bit grey pixels, followed by a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", cols, rows, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("rows, cols", [(20000, 100), (12000, 12000), (16000, 16000)])
def test_lying_size_is_refused_before_any_allocation(tmp_path, rows, cols):
    path = _png_header_only(tmp_path / "huge.png", rows, cols)
    tracemalloc.start()
    try:
        with pytest.raises(MammoInputError) as excinfo:
            open_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "implausib" in _one_line_error(excinfo)
    assert peak < 8_000_000  # a 12000 x 12000 16-bit frame would be 288 MB


def test_multi_page_tiff_and_float_tiff_are_refused(tmp_path):
    pages = [Image.fromarray(np.zeros((10, 10), np.uint8)) for _ in range(2)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(MammoInputError) as excinfo:
        open_image(tmp_path / "stack.tif")
    assert "2 pages" in _one_line_error(excinfo)
    Image.fromarray(np.zeros((10, 10), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(MammoInputError) as excinfo:
        open_image(tmp_path / "float.tif")
    assert "mode F" in _one_line_error(excinfo)
