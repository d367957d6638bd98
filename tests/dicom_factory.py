"""Small DICOM files for tests, written with pydicom exactly as a modality (or a broken one) would.

Every writer returns the path(s) it wrote. Pixel arrays are stored values (uint16, 12 bits stored
unless told otherwise); images are tiny (e.g. 64 x 48) so that a test stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (UID, ExplicitVRLittleEndian, JPEGLosslessSV1, PYDICOM_IMPLEMENTATION_UID,
                         generate_uid)

MG_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image Storage - For Presentation
BREAST_TOMO = "1.2.840.10008.5.1.4.1.1.13.1.3"  # Breast Tomosynthesis Image Storage
SNOMED_VIEWS = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique"),
                "ML": ("399260004", "medio-lateral")}
AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # rows along x, columns along y: slices step along z

Window = tuple[float, float]  # (center, width)


def code_item(value: str, meaning: str, scheme: str = "SCT") -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def view_code(view: str) -> list[Dataset]:
    """A ViewCodeSequence (CID 4014, SNOMED CT) for CC, MLO or ML."""
    return [code_item(*SNOMED_VIEWS[view])]


def new_dataset(sop_class: str, pixels: np.ndarray, *, photometric: str = "MONOCHROME2",
                bits_stored: int = 12, series_uid: str | None = None) -> FileDataset:
    """A Part 10 dataset holding `pixels` (rows, cols) or (frames, rows, cols) as native pixel data."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = UID(sop_class), generate_uid()
    meta.TransferSyntaxUID, meta.ImplementationClassUID = ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined = "MG", "BREAST"
    ds.PatientID, ds.PatientName = "TEST0001", "Test^Patient"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), series_uid or generate_uid()
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.PixelData = pixels.tobytes()
    return ds


def apply_extra(ds: Dataset, extra: dict[str, Any]) -> None:
    """Set attributes by keyword; a value of None deletes the attribute (to make a file lack it)."""
    for keyword, value in extra.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)


def save(ds: FileDataset, path: str | Path, transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    """Write `ds` in `transfer_syntax`: native, any syntax pydicom encodes, or JPEG Lossless via GDCM."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ts = UID(transfer_syntax)
    if ts == JPEGLosslessSV1:
        ds.save_as(path, enforce_file_format=True)
        _gdcm_transcode(path, ts)
        return path
    if ts.is_compressed:
        ds.compress(ts, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return path


def _gdcm_transcode(path: Path, ts: UID) -> None:
    """pydicom cannot encode JPEG Lossless (process 14); GDCM can."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    assert reader.Read(), f"GDCM cannot read {path}"
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str(ts))))
    change.SetInput(reader.GetImage())
    assert change.Change(), f"GDCM cannot encode {ts.name}"
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(path))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write(), f"GDCM cannot write {path}"


def set_windows(item: Dataset, windows: Window | Sequence[Window], function: str | None = None,
                explanations: Sequence[str] = ()) -> None:
    """WindowCenter/Width (one or several windows) and optionally VOILUTFunction on `item`."""
    pairs = [windows] if isinstance(windows[0], (int, float)) else list(windows)
    item.WindowCenter = [float(c) for c, _ in pairs] if len(pairs) > 1 else float(pairs[0][0])
    item.WindowWidth = [float(w) for _, w in pairs] if len(pairs) > 1 else float(pairs[0][1])
    if explanations:
        item.WindowCenterWidthExplanation = list(explanations) if len(explanations) > 1 else explanations[0]
    if function:
        item.VOILUTFunction = function


def voi_lut_item(first_mapped: int, data: Sequence[int], bits: int = 16, explanation: str = "") -> Dataset:
    """One VOI LUT Sequence item; LUT Data as OW words, as most modalities write it."""
    item = Dataset()
    item.add(DataElement(0x00283002, "US", [len(data) % 65536, first_mapped, bits]))  # LUTDescriptor
    item.add(DataElement(0x00283006, "OW", np.asarray(data, dtype="<u2").tobytes()))  # LUTData
    if explanation:
        item.LUTExplanation = explanation
    return item


def write_ffdm(path: str | Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2",
               bits_stored: int = 12, window: Window | Sequence[Window] | None = None,
               voi_function: str | None = None, voi_lut: tuple[int, Sequence[int], int] | None = None,
               view: str | None = "CC", laterality: str | None = "L",
               spacing: tuple[float, float] | None = (0.1, 0.1), spacing_tag: str = "PixelSpacing",
               transfer_syntax: str = ExplicitVRLittleEndian, **extra: Any) -> Path:
    """A 2D digital mammogram. `voi_lut` is (first mapped value, table, bits per entry); `extra`
    sets (or, with None, deletes) any attribute by keyword."""
    ds = new_dataset(MG_PRESENTATION, pixels, photometric=photometric, bits_stored=bits_stored)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if view:
        ds.ViewPosition = view
        ds.ViewCodeSequence = view_code(view)
    if laterality:
        ds.ImageLaterality = laterality
    if spacing:
        setattr(ds, spacing_tag, list(spacing))
    if window is not None:
        set_windows(ds, window, voi_function)
    if voi_lut is not None:
        ds.VOILUTSequence = [voi_lut_item(*voi_lut)]
    apply_extra(ds, extra)
    return save(ds, path, transfer_syntax)


def write_enhanced_dbt(path: str | Path, volume: np.ndarray, *,
                       per_frame_windows: Sequence[Window] | None = None, window: Window | None = None,
                       spacing: tuple[float, float] = (0.085, 0.085), slice_spacing: float = 1.0,
                       slice_thickness: float | None = None, view: str = "MLO", laterality: str = "R",
                       transfer_syntax: str = ExplicitVRLittleEndian, **extra: Any) -> Path:
    """A Breast Tomosynthesis multi-frame object whose spacing, geometry, laterality and windows live
    only in the Shared / Per-Frame Functional Groups (nothing at the top level but the view code).
    Frames step `slice_spacing` mm apart along the normal; `slice_thickness` defaults to the same."""
    ds = new_dataset(BREAST_TOMO, volume)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "TOMOSYNTHESIS", "NONE"]
    ds.ViewCodeSequence = view_code(view)
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = list(spacing), slice_thickness or slice_spacing
    shared.PixelMeasuresSequence = [measures]
    orientation = Dataset()
    orientation.ImageOrientationPatient = AXIAL
    shared.PlaneOrientationSequence = [orientation]
    anatomy = Dataset()
    anatomy.FrameLaterality = laterality
    anatomy.AnatomicRegionSequence = [code_item("76752008", "Breast")]
    shared.FrameAnatomySequence = [anatomy]
    if window is not None:
        voi = Dataset()
        set_windows(voi, window)
        shared.FrameVOILUTSequence = [voi]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for i in range(volume.shape[0]):
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = [0.0, 0.0, 10.0 + i * slice_spacing]
        item.PlanePositionSequence = [position]
        if per_frame_windows is not None:
            voi = Dataset()
            set_windows(voi, per_frame_windows[i])
            item.FrameVOILUTSequence = [voi]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    apply_extra(ds, extra)
    return save(ds, path, transfer_syntax)


def write_slice_series(folder: str | Path, volume: np.ndarray, *, shuffle_names: bool = True,
                       spacing: tuple[float, float] = (0.1, 0.1), slice_spacing: float = 1.0,
                       seed: int = 0, **extra: Any) -> list[Path]:
    """One single-frame file per slice of one series. With `shuffle_names` the file names (and
    InstanceNumbers) run in a scrambled order unrelated to ImagePositionPatient, and every other file
    has no extension. Returns the paths in true slice order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = volume.shape[0]
    order, rng = np.arange(n), np.random.default_rng(seed)
    while shuffle_names and n > 2 and (np.all(np.diff(order) > 0) or np.all(np.diff(order) < 0)):
        order = rng.permutation(n)  # neither sorted nor reversed: names alone give a wrong order
    series_uid, paths = generate_uid(), []
    for i in range(n):
        rank = int(order[i])  # where slice i comes in file-name order
        ds = new_dataset(BREAST_TOMO, volume[i], series_uid=series_uid)
        ds.ViewPosition, ds.ImageLaterality = "CC", "L"
        ds.PixelSpacing, ds.SliceThickness = list(spacing), slice_spacing
        ds.ImageOrientationPatient = AXIAL
        ds.ImagePositionPatient = [0.0, 0.0, -20.0 + i * slice_spacing]
        ds.InstanceNumber = rank + 1
        apply_extra(ds, extra)
        paths.append(save(ds, folder / (f"IM{rank:04d}" + (".dcm" if rank % 2 else ""))))
    return paths


def write_fake_encapsulated(path: str | Path, transfer_syntax: str, shape: tuple[int, int] = (64, 48)) -> Path:
    """A file whose header names `transfer_syntax` (e.g. MPEG2) over a fragment of meaningless bytes."""
    ds = new_dataset(MG_PRESENTATION, np.zeros(shape, np.uint16))
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(200)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def truncate(path: str | Path, keep: int) -> Path:
    """Cut a file after `keep` bytes (negative: drop that many from the end), as a failed copy would."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:keep])
    return Path(path)


def damage(path: str | Path, sentinel: str, replacement: str) -> Path:
    """Overwrite a text value written on purpose (e.g. WindowCenter='2.047E3', unique in the file)
    with bytes of the same length, as a broken modality would write them."""
    data, old, new = Path(path).read_bytes(), sentinel.encode(), replacement.encode()
    assert data.count(old) == 1 and len(old) == len(new), "the sentinel must be unique and keep its length"
    Path(path).write_bytes(data.replace(old, new))
    return Path(path)


def ramp(shape: tuple[int, ...], top: int = 4095) -> np.ndarray:
    """Stored values spanning 0..top, distinct along the last axes (a stand-in for an image)."""
    values = np.linspace(0, top, int(np.prod(shape[-2:])))
    return np.broadcast_to(np.rint(values).reshape(shape[-2:]), shape).astype(np.uint16)


def labelled_volume(n: int, shape: tuple[int, int] = (64, 48)) -> np.ndarray:
    """A volume whose slice i holds 100 * i plus a small ramp, so any slice tells its index."""
    base = ramp(shape, top=50)
    return np.stack([base + 100 * i for i in range(n)]).astype(np.uint16)
