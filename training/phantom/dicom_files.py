"""Writing a DICOM dataset to a file: encoded in any transfer syntax pydicom encodes, or JPEG Lossless
through GDCM (:func:`save_dataset`), never half-written (:func:`atomic_write`), optionally with the
undefined lengths many modalities use (:func:`mark_undefined_lengths`). :mod:`training.phantom.dicom`
builds the datasets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileDataset
from pydicom.pixels import get_encoder
from pydicom.uid import UID


def encode(ds: FileDataset, transfer_syntax: str) -> FileDataset:
    """`ds` (native) in `transfer_syntax`: a native one just relabels it; a compressed one is encoded
    by pydicom, one fragment per frame (JPEG Lossless, which pydicom cannot encode: :func:`save_dataset`)."""
    ts = UID(transfer_syntax)
    if ts == ds.file_meta.TransferSyntaxUID:
        return ds
    if not ts.is_compressed:
        ds.file_meta.TransferSyntaxUID = ts
        return ds
    ds.compress(ts, generate_instance_uid=False)
    return ds


def _pydicom_encodes(ts: UID) -> bool:
    try:
        return get_encoder(ts).is_available
    except NotImplementedError:
        return False


def _gdcm_transcode(path: Path, ts: UID) -> None:
    """Re-encode a native file in place with GDCM (JPEG Lossless, process 14, which pydicom cannot)."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str(ts))))
    if not reader.Read():
        raise OSError(f"GDCM cannot read {path}")
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise ValueError(f"GDCM cannot encode {ts.name}")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(path))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise OSError(f"GDCM cannot write {path}")


def mark_undefined_lengths(ds: Dataset, from_depth: int = 0, depth: int = 0) -> Dataset:
    """Mark the sequences and items of `ds` (nested `from_depth` deep or more) to be written with
    undefined lengths and delimitation items, as many modalities write them."""
    for element in ds:
        if element.VR == "SQ":
            element.is_undefined_length = depth >= from_depth
            for item in element.value:
                item.is_undefined_length_sequence_item = depth >= from_depth
                mark_undefined_lengths(item, from_depth, depth + 1)
    return ds


def atomic_write(path: Path, write: Any) -> Path:
    """Write through a temporary name in the same folder, then rename: a crash never leaves a
    half-written file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_dataset(ds: FileDataset, path: str | os.PathLike, transfer_syntax: str | None = None) -> Path:
    """Write `ds` as a Part 10 file, first encoded in `transfer_syntax` when given: by pydicom, or by
    GDCM for what pydicom cannot encode (JPEG Lossless)."""
    ts = UID(transfer_syntax) if transfer_syntax else None
    by_gdcm = ts is not None and ts.is_compressed and not _pydicom_encodes(ts)
    if ts is not None and not by_gdcm:
        encode(ds, ts)

    def write(tmp: Path) -> None:
        ds.save_as(tmp, enforce_file_format=True)
        if by_gdcm:
            _gdcm_transcode(tmp, ts)

    return atomic_write(Path(path), write)
