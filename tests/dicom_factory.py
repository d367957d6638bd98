"""Small DICOM files for tests, as a modality (or a broken one) would write them: made by the project's
one writer (:mod:`training.phantom.dicom`), then edited where a test needs a file to lie or lack something.

Every writer returns the path(s) it wrote. Pixel arrays are stored values (uint16, 12 bits stored
unless told otherwise); images are tiny (e.g. 64 x 48) so that a test stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian

from training.phantom.dicom import (AXIAL, BREAST_TOMOSYNTHESIS, MG_FOR_PRESENTATION, Identity, enhanced_dbt_dataset,
                                    mammogram_dataset, mark_undefined_lengths, new_dataset, save_dataset)

Window = tuple[float, float]  # (center, width)


def fresh_identity() -> Identity:
    """A fresh study and series for every file (random UIDs: two files never match by accident)."""
    return Identity.unique(patient_id="TEST0001", patient_name="Test^Patient")


def apply_extra(ds: Dataset, extra: dict[str, Any]) -> None:
    """Set attributes by keyword; a value of None deletes the attribute (to make a file lack it)."""
    for keyword, value in extra.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)


def _windows(windows: Window | Sequence[Window]) -> list[Window]:
    """One window or several, as a list."""
    return [windows] if isinstance(windows[0], (int, float)) else list(windows)  # type: ignore[list-item]


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
    ds = mammogram_dataset(pixels, fresh_identity(), photometric=photometric, bits_stored=bits_stored, view=view,
                           laterality=laterality, spacing=spacing, spacing_tag=spacing_tag,
                           windows=_windows(window) if window is not None else (), voi_function=voi_function)
    if voi_lut is not None:
        ds.VOILUTSequence = [voi_lut_item(*voi_lut)]
    apply_extra(ds, extra)
    return save_dataset(ds, path, transfer_syntax)


def write_enhanced_dbt(path: str | Path, volume: np.ndarray, *,
                       per_frame_windows: Sequence[Window] | None = None, window: Window | None = None,
                       spacing: tuple[float, float] = (0.085, 0.085), slice_spacing: float = 1.0,
                       slice_thickness: float | None = None, view: str = "MLO", laterality: str = "R",
                       transfer_syntax: str = ExplicitVRLittleEndian, undefined_lengths: bool = False,
                       **extra: Any) -> Path:
    """A Breast Tomosynthesis multi-frame object whose spacing, geometry, laterality and windows live
    only in the Shared / Per-Frame Functional Groups (nothing at the top level but the view code).
    Frames step `slice_spacing` mm apart along the normal; `slice_thickness` defaults to the same.
    `undefined_lengths` writes every sequence and item with undefined length (as vendors do)."""
    positions = [[0.0, 0.0, 10.0 + i * slice_spacing] for i in range(volume.shape[0])]
    ds = enhanced_dbt_dataset(volume, fresh_identity(), spacing=(slice_spacing, *spacing),
                              slice_thickness=slice_thickness, orientation=AXIAL, positions=positions, view=view,
                              laterality=laterality, windows=[window] if window is not None else (),
                              frame_windows=None if per_frame_windows is None else [[w] for w in per_frame_windows])
    apply_extra(ds, extra)
    if undefined_lengths:
        mark_undefined_lengths(ds)
    return save_dataset(ds, path, transfer_syntax)


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
    series, paths = fresh_identity(), []
    for i in range(n):
        rank = int(order[i])  # where slice i comes in file-name order
        ds = new_dataset(BREAST_TOMOSYNTHESIS, volume[i], series, series.instance_uid(i))
        ds.ViewPosition, ds.ImageLaterality = "CC", "L"
        ds.PixelSpacing, ds.SliceThickness = list(spacing), slice_spacing
        ds.ImageOrientationPatient = list(AXIAL)
        ds.ImagePositionPatient = [0.0, 0.0, -20.0 + i * slice_spacing]
        ds.InstanceNumber = rank + 1
        apply_extra(ds, extra)
        paths.append(save_dataset(ds, folder / (f"IM{rank:04d}" + (".dcm" if rank % 2 else ""))))
    return paths


def write_fake_encapsulated(path: str | Path, transfer_syntax: str, shape: tuple[int, int] = (64, 48)) -> Path:
    """A file whose header names `transfer_syntax` (e.g. MPEG2) over a fragment of meaningless bytes."""
    ds = new_dataset(MG_FOR_PRESENTATION, np.zeros(shape, np.uint16), fresh_identity())
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
