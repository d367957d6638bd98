"""Simulated images -> real DICOM files, ground-truth masks and a labels CSV; datasets in parallel.

DICOM
-----
* FFDM: Digital Mammography X-Ray Image Storage - For Presentation (PS3.3 A.26), one file per view.
* DBT: Breast Tomosynthesis Image Storage (PS3.3 A.55), one enhanced multi-frame file per volume
  (:func:`write_dbt`), or the same volume as a per-slice series of single-frame instances of that
  class sharing one Series Instance UID (:func:`write_dbt_series`).
* Variants: MONOCHROME1 (stored values inverted, windows moved so it displays exactly like the
  MONOCHROME2 file; FFDM only, because the X-Ray 3D Image module allows MONOCHROME2 alone) and any
  transfer syntax pydicom can encode, e.g. JPEG 2000 lossless (one fragment per frame).

Geometry. PatientOrientation follows the detector convention of the phantom contract (left breast:
"A\\R" CC, "A\\FR" MLO; right: "P\\L", "P\\FL"); DBT ImageOrientationPatient is built from the same
letters, so its slice normal (row x column) points from the X-ray source to the detector. Frames are
written in order of increasing position along that normal, the order every DICOM reader stacks a
per-slice series in: **file frame 0 is the slice nearest the compression paddle**, the reverse of
the simulator's slice order (slice 0 nearest the detector). Masks and slice ranges written beside
a file are in the file's frame order.

Determinism. Same image and arguments -> identical bytes: UIDs come from
``pydicom.uid.generate_uid(entropy_srcs=...)`` over the patient, series, instance and seed; dates
and times are fixed; the file meta names this writer rather than the pydicom version; masks are
PNG (2D) or a zip written with fixed timestamps (3D .npz).

Ground truth. Per image, three mask files with exact values (0/1 for the breast and glandular
masks, 0..k for lesion k of the ``lesions`` list): PNG for 2D, ``.npz`` (one array ``mask``, read
with ``allow_pickle=False``; :func:`load_mask` reads both) for 3D. One row per image in the labels
CSV (columns: :data:`LABEL_COLUMNS`, documented in the README), paths relative to the CSV.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from pydicom.valuerep import format_number_as_ds

from training.errors import MammoInputError

if TYPE_CHECKING:
    from training.phantom import SimulatedImage

MG_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.2")  # Digital Mammography X-Ray - For Presentation
BREAST_TOMOSYNTHESIS = UID("1.2.840.10008.5.1.4.1.1.13.1.3")  # Breast Tomosynthesis Image Storage

KINDS = ("ffdm", "dbt", "exam")
LESIONS = ("none", "mass", "calc", "any")
DENSITIES = ("A", "B", "C", "D")

# What the files say made them; fixed so that the bytes do not change with a pydicom upgrade.
MANUFACTURER = "napari-mammodino"
MODEL = "MammoDINO breast phantom simulator"
SOFTWARE_VERSION = "phantom-writer 1"
IMPLEMENTATION_VERSION = "MAMMODINO_1"
UID_NAMESPACE = "mammodino-phantom"
STUDY_DATE, STUDY_TIME = "20250101", "090000"  # fixed: same seed, same bytes

# CID 4014 "View for Mammography" (SNOMED CT) and CID 4013 "Anatomic Region for Mammography".
VIEW_CODES = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}
BREAST_CODE = ("76752008", "Breast")
# PatientOrientation per laterality and view: (direction of increasing column, of increasing row).
PATIENT_ORIENTATION = {("L", "CC"): ("A", "R"), ("L", "MLO"): ("A", "FR"),
                       ("R", "CC"): ("P", "L"), ("R", "MLO"): ("P", "FL")}
# DICOM patient coordinates (LPS): +x to the patient's left, +y posterior, +z head.
_DIRECTIONS = {"L": (1, 0, 0), "R": (-1, 0, 0), "P": (0, 1, 0), "A": (0, -1, 0), "H": (0, 0, 1), "F": (0, 0, -1)}
# Extra windows around the simulator's one, as the NORMAL/HARDER/SOFTER choices vendors store.
WINDOW_CHOICES = (("NORMAL", 1.0), ("HARDER", 0.7), ("SOFTER", 1.4))

LABEL_COLUMNS = (
    "path", "patient_id", "item", "kind", "view", "laterality", "density", "glandular_fraction",
    "lesion", "lesion_type", "lesion_shape", "malignant", "birads", "n_lesions", "lesions",
    "breast_mask", "glandular_mask", "lesion_mask", "rows", "cols", "slices", "spacing_mm",
    "chest_wall", "photometric", "transfer_syntax", "seed", "params",
)


# --- identities and geometry ------------------------------------------------------------------

def _uid(*parts: Any) -> UID:
    """A UID that depends only on `parts` (joined with a separator, so ("a","bc") != ("ab","c"))."""
    return generate_uid(entropy_srcs=["|".join([UID_NAMESPACE, *(str(p) for p in parts)])])


def _ds(value: float) -> str:
    """A float as a valid DS string (at most 16 characters)."""
    return format_number_as_ds(float(value))


def _unit(letters: str) -> np.ndarray:
    vector = np.sum([_DIRECTIONS[c] for c in letters], axis=0).astype(float)
    return vector / np.linalg.norm(vector)


def patient_orientation(laterality: str, view: str) -> list[str]:
    """PatientOrientation of a detector image: where columns and rows point (e.g. ["A", "FR"])."""
    return list(PATIENT_ORIENTATION[(laterality, view)])


def image_orientation(laterality: str, view: str) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors (along a row, down a column) in patient coordinates, from PatientOrientation."""
    along_row, down_column = PATIENT_ORIENTATION[(laterality, view)]
    return _unit(along_row), _unit(down_column)


@dataclass(frozen=True)
class Identity:
    """Who and which series/instance an image belongs to; every UID is derived from it."""

    patient_id: str = "PHANTOM"
    study: str = "1"
    series_number: int = 1
    instance_number: int = 1
    series_description: str = ""

    @property
    def study_uid(self) -> UID:
        return _uid(self.patient_id, "study", self.study)

    @property
    def series_uid(self) -> UID:
        return _uid(self.patient_id, "study", self.study, "series", self.series_number)

    def instance_uid(self, *extra: Any) -> UID:
        return _uid(self.patient_id, "study", self.study, "series", self.series_number,
                    "instance", self.instance_number, *extra)


def _windows(image: SimulatedImage, photometric: str) -> list[tuple[float, float, str]]:
    """(centre, width, explanation) in stored values of the file being written."""
    center, width = image.window
    return [_flip_window(center, max(width * factor, 2.0), name, image.bits_stored, photometric)
            for name, factor in WINDOW_CHOICES]


def _flip_window(center: float, width: float, name: str, bits: int, photometric: str) -> tuple[float, float, str]:
    """A LINEAR window for inverted stored values (M - x) that displays exactly like (center, width)
    on x: PS3.3 C.11.2.1.2.1 maps c - 0.5 to mid-grey, so the mirrored centre is M - c + 1."""
    if photometric == "MONOCHROME1":
        center = (2 ** bits - 1) - center + 1
    return round(float(center), 3), round(float(width), 3), name


# --- DICOM modules ----------------------------------------------------------------------------

def _code(value: str, meaning: str, scheme: str = "SCT") -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _new_file(sop_class: UID, sop_instance: UID, transfer_syntax: UID) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = _uid("implementation")
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_instance  # SOP Common
    return ds


def _patient_module(ds: Dataset, who: Identity) -> None:
    ds.PatientName = f"Phantom^{who.patient_id}"
    ds.PatientID = who.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "F"


def _study_module(ds: Dataset, who: Identity) -> None:
    ds.StudyInstanceUID = who.study_uid
    ds.StudyDate, ds.StudyTime = STUDY_DATE, STUDY_TIME
    ds.ReferringPhysicianName = ""
    ds.StudyID = who.study
    ds.AccessionNumber = ""
    ds.StudyDescription = "Simulated breast phantom (napari-mammodino)"


def _series_module(ds: Dataset, who: Identity) -> None:
    """General Series plus the MG series attributes (DX Series / Enhanced Mammography Series)."""
    ds.Modality = "MG"
    ds.SeriesInstanceUID = who.series_uid
    ds.SeriesNumber = who.series_number
    ds.SeriesDate, ds.SeriesTime = STUDY_DATE, STUDY_TIME
    ds.SeriesDescription = who.series_description
    ds.BodyPartExamined = "BREAST"


def _equipment_module(ds: Dataset) -> None:
    """General Equipment and Enhanced General Equipment."""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = SOFTWARE_VERSION


def _pixel_module(ds: Dataset, shape: tuple[int, ...], bits: int, photometric: str) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(shape[-2]), int(shape[-1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0


def _view_codes(view: str) -> list[Dataset]:
    item = _code(*VIEW_CODES[view])
    item.ViewModifierCodeSequence = []
    return [item]


def _voi_attributes(item: Dataset, windows: list[tuple[float, float, str]]) -> None:
    item.WindowCenter = [_ds(c) for c, _, _ in windows]
    item.WindowWidth = [_ds(w) for _, w, _ in windows]
    item.WindowCenterWidthExplanation = [name for _, _, name in windows]
    item.VOILUTFunction = "LINEAR"


def _check_pixels(image: SimulatedImage, ndim: int) -> np.ndarray:
    pixels = np.asarray(image.pixels)
    if pixels.ndim != ndim or pixels.dtype != np.uint16:
        raise ValueError(f"expected {ndim}-D uint16 pixels, got {pixels.ndim}-D {pixels.dtype}")
    if int(pixels.max()) > 2 ** image.bits_stored - 1:
        raise ValueError(f"pixel values exceed {image.bits_stored} bits stored")
    return pixels


def _set_pixels(ds: FileDataset, pixels: np.ndarray, transfer_syntax: UID) -> None:
    """Native little-endian bytes, or encoded by pydicom (one fragment per frame)."""
    if not transfer_syntax.is_compressed:
        ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
        return
    if "Lossless" not in transfer_syntax.name:  # the ground truth describes these exact pixels
        raise ValueError(f"{transfer_syntax.name}: only lossless transfer syntaxes keep the ground truth valid")
    ds.compress(transfer_syntax, pixels, generate_instance_uid=False)


def ffdm_dataset(image: SimulatedImage, who: Identity = Identity(), *, photometric: str = "MONOCHROME2",
                 transfer_syntax: str = ExplicitVRLittleEndian) -> FileDataset:
    """A Digital Mammography X-Ray Image - For Presentation dataset for a 2D simulated image."""
    ts = UID(transfer_syntax)
    pixels = _check_pixels(image, 2)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, not {photometric!r}")
    maximum = 2 ** image.bits_stored - 1
    stored = (maximum - pixels).astype(np.uint16) if photometric == "MONOCHROME1" else pixels
    ds = _new_file(MG_FOR_PRESENTATION, who.instance_uid(image.seed, image.laterality, image.view,
                                                          photometric, ts), ts)
    _patient_module(ds, who)
    _study_module(ds, who)
    _series_module(ds, who)
    ds.PresentationIntentType = "FOR PRESENTATION"  # DX Series
    _equipment_module(ds)
    # General Image, DX Image, Mammography Image
    ds.InstanceNumber = who.instance_number
    ds.PatientOrientation = patient_orientation(image.laterality, image.view)
    ds.ContentDate, ds.ContentTime = STUDY_DATE, STUDY_TIME
    ds.AcquisitionDate, ds.AcquisitionTime = STUDY_DATE, STUDY_TIME
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.ImageComments = f"Simulated phantom, seed {image.seed}; not a patient image"
    _pixel_module(ds, pixels.shape, image.bits_stored, photometric)
    ds.PixelIntensityRelationship = "LOG"
    # Dense tissue attenuates most and is bright in MONOCHROME2: higher values = less X-ray intensity.
    ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME2" else 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.QualityControlImage = "NO"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.ViewPosition = image.view  # DX Positioning
    ds.OrganExposed = "BREAST"
    ds.ImageLaterality = image.laterality  # DX Anatomy Imaged
    ds.AnatomicRegionSequence = [_code(*BREAST_CODE)]
    ds.ViewCodeSequence = _view_codes(image.view)
    ds.BreastImplantPresent = "NO"
    ds.PartialView = "NO"
    _acquisition_facts(ds, image)
    # DX Detector
    ds.DetectorType = "DIRECT"
    ds.ImagerPixelSpacing = [_ds(s) for s in image.spacing_mm]
    _voi_attributes(ds, _windows(image, photometric))  # VOI LUT module
    ds.AcquisitionContextSequence = []
    _set_pixels(ds, stored, ts)
    return ds


def _acquisition_facts(ds: Dataset, image: SimulatedImage) -> None:
    """Optional acquisition attributes the simulator's parameters provide (PS3.3 type 3)."""
    params = image.params or {}
    thickness = params.get("thickness_mm", params.get("compressed_thickness_mm"))
    if isinstance(thickness, (int, float)) and thickness > 0:
        ds.BodyPartThickness = _ds(thickness)
    kvp = params.get("kvp")
    if isinstance(kvp, (int, float)) and kvp > 0:
        ds.KVP = _ds(kvp)


def _dbt_geometry(image: SimulatedImage, n: int) -> tuple[list[float], list[list[float]]]:
    """ImageOrientationPatient and the ImagePositionPatient of each file frame (increasing along
    the normal, which points from the source to the detector: file frame 0 is nearest the paddle)."""
    along_row, down_column = image_orientation(image.laterality, image.view)
    normal = np.cross(along_row, down_column)
    dz = float(image.spacing_mm[0])
    positions = [[float(v) + 0.0 for v in (k - (n - 1)) * dz * normal] for k in range(n)]  # + 0.0: no "-0"
    orientation = [float(v) for v in (*along_row, *down_column)]
    return orientation, positions


def _frame_windows(image: SimulatedImage, frames: np.ndarray, per_frame: bool) -> list[list[tuple[float, float, str]]]:
    """The VOI windows of each file frame: the volume's window everywhere, or each slice's own
    (1st-99th percentile of its breast pixels) as some vendors store per frame."""
    shared = _windows(image, "MONOCHROME2")
    if not per_frame:
        return [shared] * len(frames)
    masks = np.asarray(image.breast_mask)[::-1]
    out = []
    for values, mask in zip(frames, masks):
        inside = values[mask] if mask.any() else values.ravel()
        lo, hi = np.percentile(inside, [1, 99])
        out.append([(round(float(lo + hi) / 2, 3), round(max(float(hi - lo) * f, 2.0), 3), name)
                    for name, f in WINDOW_CHOICES])
    return out


def _dbt_base(image: SimulatedImage, who: Identity, ts: UID, n_frames: int, sop_instance: UID) -> FileDataset:
    ds = _new_file(BREAST_TOMOSYNTHESIS, sop_instance, ts)
    _patient_module(ds, who)
    _study_module(ds, who)
    _series_module(ds, who)
    ds.FrameOfReferenceUID = _uid(who.patient_id, "study", who.study, "frame of reference",
                                  image.laterality, image.view, image.seed)
    ds.PositionReferenceIndicator = ""
    _equipment_module(ds)
    # X-Ray 3D Image (with the Common CT/MR Image Description macro) and Breast View
    ds.ImageType = ["ORIGINAL", "PRIMARY", "TOMOSYNTHESIS", "NONE"]
    ds.PixelPresentation, ds.VolumetricProperties, ds.VolumeBasedCalculationTechnique = "MONOCHROME", "VOLUME", "NONE"
    ds.ContentQualification = "RESEARCH"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.ViewCodeSequence = _view_codes(image.view)
    ds.BreastImplantPresent = "NO"
    ds.PartialView = "NO"
    # Not in the IOD, but real DBT files carry it and viewers hang images by it (standard extended).
    ds.PatientOrientation = patient_orientation(image.laterality, image.view)
    ds.ImageComments = f"Simulated phantom, seed {image.seed}; not a patient image"
    # Multi-frame Functional Groups
    ds.InstanceNumber = who.instance_number
    ds.ContentDate, ds.ContentTime = STUDY_DATE, STUDY_TIME
    ds.NumberOfFrames = n_frames
    ds.AcquisitionContextSequence = []
    _pixel_module(ds, image.pixels.shape, image.bits_stored, "MONOCHROME2")
    return ds


def _shared_groups(image: SimulatedImage, orientation: list[float],
                   windows: list[tuple[float, float, str]] | None) -> Dataset:
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [_ds(s) for s in image.spacing_mm[1:]]
    measures.SliceThickness = _ds(image.spacing_mm[0])
    measures.SpacingBetweenSlices = _ds(image.spacing_mm[0])
    shared.PixelMeasuresSequence = [measures]
    plane = Dataset()
    plane.ImageOrientationPatient = [_ds(v) for v in orientation]
    shared.PlaneOrientationSequence = [plane]
    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = [_code(*BREAST_CODE)]
    anatomy.FrameLaterality = image.laterality
    shared.FrameAnatomySequence = [anatomy]
    transform = Dataset()
    transform.RescaleIntercept, transform.RescaleSlope, transform.RescaleType = "0", "1", "US"
    shared.PixelValueTransformationSequence = [transform]
    if windows is not None:
        voi = Dataset()
        _voi_attributes(voi, windows)
        shared.FrameVOILUTSequence = [voi]
    return shared


def _frame_group(index: int, position: list[float], windows: list[tuple[float, float, str]] | None) -> Dataset:
    group = Dataset()
    content = Dataset()
    content.FrameReferenceDateTime = content.FrameAcquisitionDateTime = STUDY_DATE + STUDY_TIME
    content.FrameAcquisitionDuration = 0
    content.StackID = "1"
    content.InStackPositionNumber = index + 1
    content.DimensionIndexValues = [1, index + 1]
    group.FrameContentSequence = [content]
    plane = Dataset()
    plane.ImagePositionPatient = [_ds(v) for v in position]
    group.PlanePositionSequence = [plane]
    # Frame type is a per-frame macro: validators (dciodvfy) expect it in every frame's group.
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "TOMOSYNTHESIS", "NONE"]
    frame_type.PixelPresentation, frame_type.VolumetricProperties = "MONOCHROME", "VOLUME"
    frame_type.VolumeBasedCalculationTechnique = "NONE"
    group.XRay3DFrameTypeSequence = [frame_type]
    if windows is not None:
        voi = Dataset()
        _voi_attributes(voi, windows)
        group.FrameVOILUTSequence = [voi]
    return group


def _dimensions(ds: Dataset, organization: UID) -> None:
    """Multi-frame Dimension: frames indexed by stack and position in the stack."""
    org = Dataset()
    org.DimensionOrganizationUID = organization
    ds.DimensionOrganizationSequence = [org]
    ds.DimensionOrganizationType = "3D"
    indices = []
    for keyword_tag in (0x00209056, 0x00209057):  # StackID, InStackPositionNumber
        index = Dataset()
        index.DimensionOrganizationUID = organization
        index.DimensionIndexPointer = keyword_tag
        index.FunctionalGroupPointer = 0x00209111  # FrameContentSequence
        indices.append(index)
    ds.DimensionIndexSequence = indices


def dbt_dataset(image: SimulatedImage, who: Identity = Identity(), *, transfer_syntax: str = ExplicitVRLittleEndian,
                per_frame_windows: bool = False) -> FileDataset:
    """A Breast Tomosynthesis Image multi-frame dataset (frames in file order, see the module doc)."""
    ts = UID(transfer_syntax)
    frames = _check_pixels(image, 3)[::-1]
    n = len(frames)
    ds = _dbt_base(image, who, ts, n, who.instance_uid(image.seed, image.laterality, image.view, "dbt", ts,
                                                        per_frame_windows))
    orientation, positions = _dbt_geometry(image, n)
    windows = _frame_windows(image, frames, per_frame_windows)
    shared_windows = None if per_frame_windows else windows[0]
    ds.SharedFunctionalGroupsSequence = [_shared_groups(image, orientation, shared_windows)]
    ds.PerFrameFunctionalGroupsSequence = [_frame_group(k, positions[k], None if shared_windows else windows[k])
                                           for k in range(n)]
    _dimensions(ds, _uid(ds.SOPInstanceUID, "dimensions"))
    _set_pixels(ds, frames, ts)
    return ds


def dbt_slice_datasets(image: SimulatedImage, who: Identity = Identity(), *,
                       transfer_syntax: str = ExplicitVRLittleEndian) -> list[FileDataset]:
    """The volume as single-frame Breast Tomosynthesis instances of one series, InstanceNumber k+1
    for file frame k, each with its own PlanePosition; a reader stacks them into the same volume."""
    ts = UID(transfer_syntax)
    frames = _check_pixels(image, 3)[::-1]
    n = len(frames)
    orientation, positions = _dbt_geometry(image, n)
    windows = _windows(image, "MONOCHROME2")
    out = []
    for k in range(n):
        slice_who = Identity(who.patient_id, who.study, who.series_number, k + 1, who.series_description)
        uid = slice_who.instance_uid(image.seed, image.laterality, image.view, "dbt slice", ts)
        ds = _dbt_base(image, slice_who, ts, 1, uid)
        ds.SharedFunctionalGroupsSequence = [_shared_groups(image, orientation, windows)]
        ds.PerFrameFunctionalGroupsSequence = [_frame_group(k, positions[k], None)]
        _dimensions(ds, _uid(who.series_uid, "dimensions"))
        _set_pixels(ds, frames[k], ts)
        out.append(ds)
    return out


# --- files --------------------------------------------------------------------------------------

def _atomic_write(path: Path, write: Any) -> Path:
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


def save_dataset(ds: FileDataset, path: str | os.PathLike) -> Path:
    return _atomic_write(Path(path), lambda tmp: ds.save_as(tmp, enforce_file_format=True))


def write_ffdm(image: SimulatedImage, path: str | os.PathLike, who: Identity = Identity(), *,
               photometric: str = "MONOCHROME2", transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    """One FFDM view as a For Presentation digital mammogram file."""
    return save_dataset(ffdm_dataset(image, who, photometric=photometric, transfer_syntax=transfer_syntax), path)


def write_dbt(image: SimulatedImage, path: str | os.PathLike, who: Identity = Identity(), *,
              transfer_syntax: str = ExplicitVRLittleEndian, per_frame_windows: bool = False) -> Path:
    """One DBT volume as one enhanced multi-frame Breast Tomosynthesis Image file."""
    return save_dataset(dbt_dataset(image, who, transfer_syntax=transfer_syntax,
                                    per_frame_windows=per_frame_windows), path)


def write_dbt_series(image: SimulatedImage, folder: str | os.PathLike, who: Identity = Identity(), *,
                     transfer_syntax: str = ExplicitVRLittleEndian) -> list[Path]:
    """One DBT volume as a per-slice series: ``folder/slice_001.dcm``... (file frame order)."""
    folder = Path(folder)
    return [save_dataset(ds, folder / f"slice_{k + 1:03d}.dcm")
            for k, ds in enumerate(dbt_slice_datasets(image, who, transfer_syntax=transfer_syntax))]


def _npz_bytes(array: np.ndarray) -> bytes:
    """np.savez_compressed's format (one array, ``mask``) with a fixed timestamp in the zip, so the
    same mask always gives the same bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        info = zipfile.ZipInfo("mask.npy", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type, info.create_system = zipfile.ZIP_DEFLATED, 3
        with zf.open(info, "w") as f:
            np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def write_mask(mask: np.ndarray, path: str | os.PathLike) -> Path:
    """A mask with its exact values (uint8): PNG for 2D, .npz (array ``mask``) for 3D."""
    path = Path(path)
    values = np.asarray(mask).astype(np.uint8)
    if values.ndim == 2 and path.suffix == ".png":
        import imageio.v3 as iio

        data = iio.imwrite("<bytes>", values, extension=".png")
    elif path.suffix == ".npz":
        data = _npz_bytes(values)
    else:
        raise ValueError(f"{path}: masks are .png (2D) or .npz files")
    return _atomic_write(path, lambda tmp: tmp.write_bytes(data))


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask written by :func:`write_mask`: uint8 with its exact label values."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return np.asarray(data["mask"])
    import imageio.v3 as iio

    return np.asarray(iio.imread(path))


# --- ground truth and labels ------------------------------------------------------------------

def _file_order_lesions(image: SimulatedImage) -> list[dict[str, Any]]:
    """The lesions as JSON-able dicts, slice indices in file frame order for DBT."""
    n = image.pixels.shape[0] if image.kind == "dbt" else 0
    out = []
    for lesion in image.lesions:
        slice_range = center = None
        if n and lesion.slice_range is not None:
            first, last = lesion.slice_range
            slice_range = [n - 1 - int(last), n - 1 - int(first)]
        if n and lesion.center_slice is not None:
            center = n - 1 - int(lesion.center_slice)
        out.append(dict(label=int(lesion.label), kind=lesion.kind, shape=lesion.shape,
                        box=[int(v) for v in lesion.box], slice_range=slice_range, center_slice=center,
                        malignant=bool(lesion.malignant), birads=int(lesion.birads),
                        size_mm=round(float(lesion.size_mm), 3)))
    return out


def _joined(values: list[str]) -> str:
    unique = list(dict.fromkeys(values))
    return "+".join(unique) if unique else "none"


def truth_row(image: SimulatedImage, dicom_path: Path, root: Path, masks: dict[str, Path], *,
              patient_id: str, item: int, photometric: str = "MONOCHROME2",
              transfer_syntax: str = ExplicitVRLittleEndian) -> dict[str, Any]:
    """One labels-CSV row (as :func:`read_labels` gives it back): paths relative to `root` (the
    CSV's folder), every ground-truth fact."""
    lesions = _file_order_lesions(image)
    shape = image.pixels.shape

    def rel(path: Path) -> str:
        return Path(os.path.relpath(path, root)).as_posix()

    return {
        "path": rel(dicom_path), "patient_id": patient_id, "item": item, "kind": image.kind,
        "view": image.view, "laterality": image.laterality, "density": image.density,
        "glandular_fraction": round(float(image.glandular_fraction), 4),
        "lesion": int(bool(lesions)), "lesion_type": _joined([l["kind"] for l in lesions]),
        "lesion_shape": _joined([l["shape"] for l in lesions]),
        "malignant": int(any(l["malignant"] for l in lesions)),
        "birads": max([l["birads"] for l in lesions], default=1), "n_lesions": len(lesions),
        "lesions": lesions,
        "breast_mask": rel(masks["breast"]), "glandular_mask": rel(masks["glandular"]),
        "lesion_mask": rel(masks["lesions"]),
        "rows": shape[-2], "cols": shape[-1], "slices": shape[0] if len(shape) == 3 else 1,
        "spacing_mm": [round(float(s), 6) for s in image.spacing_mm],
        "chest_wall": image.chest_wall, "photometric": photometric, "transfer_syntax": str(UID(transfer_syntax)),
        "seed": int(image.seed), "params": json.loads(json.dumps(image.params, default=str)),
    }


def write_truth_masks(image: SimulatedImage, stem: Path) -> dict[str, Path]:
    """Breast, glandular and lesion masks beside the image (3D in file frame order)."""
    volume = image.kind == "dbt"
    suffix = ".npz" if volume else ".png"
    out = {}
    for name, mask in (("breast", image.breast_mask), ("glandular", image.glandular_mask),
                       ("lesions", image.lesion_labels)):
        mask = np.asarray(mask)
        out[name] = write_mask(mask[::-1] if volume else mask, stem.with_name(f"{stem.name}_{name}{suffix}"))
    return out


def write_image(image: SimulatedImage, folder: Path, root: Path, who: Identity, *, item: int = 0,
                stem: str | None = None, photometric: str = "MONOCHROME2",
                transfer_syntax: str = ExplicitVRLittleEndian, series: bool = False) -> dict[str, Any]:
    """An image (file, or a per-slice series folder) with its masks; returns its labels row."""
    stem = stem or f"{image.laterality}{image.view}{'_dbt' if image.kind == 'dbt' else ''}"
    base = folder / stem
    if image.kind == "dbt" and series:
        write_dbt_series(image, base, who, transfer_syntax=transfer_syntax)
        path = base
    elif image.kind == "dbt":
        if photometric != "MONOCHROME2":
            raise ValueError("Breast Tomosynthesis Image allows MONOCHROME2 only (PS3.3 C.8.21.1)")
        path = write_dbt(image, base.with_suffix(".dcm"), who, transfer_syntax=transfer_syntax)
    else:
        path = write_ffdm(image, base.with_suffix(".dcm"), who, photometric=photometric,
                          transfer_syntax=transfer_syntax)
    masks = write_truth_masks(image, base)
    return truth_row(image, path, root, masks, patient_id=who.patient_id, item=item,
                     photometric=photometric, transfer_syntax=transfer_syntax)


JSON_COLUMNS = ("lesions", "spacing_mm", "params")


def write_labels(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """The labels CSV (columns :data:`LABEL_COLUMNS`), rows in the order given; the structured
    columns (:data:`JSON_COLUMNS`) as JSON text."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=LABEL_COLUMNS, lineterminator="\n")
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, **{key: json.dumps(row[key], sort_keys=True) for key in JSON_COLUMNS}})

    return _atomic_write(Path(path), write)


def read_labels(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a labels CSV with numbers as numbers and the JSON columns parsed."""
    numbers = {"item", "lesion", "malignant", "birads", "n_lesions", "rows", "cols", "slices", "seed"}
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            parsed: dict[str, Any] = dict(row)
            for key in numbers & row.keys():
                parsed[key] = int(row[key])
            parsed["glandular_fraction"] = float(row["glandular_fraction"])
            for key in JSON_COLUMNS:
                parsed[key] = json.loads(row[key])
            rows.append(parsed)
    return rows


# --- datasets -----------------------------------------------------------------------------------

def item_seed(seed: int, item: int) -> int:
    """The phantom seed of item `item` of a dataset: independent streams per item (numpy
    SeedSequence), so item i is the same whatever N and however many workers make it."""
    return int(np.random.SeedSequence(entropy=int(seed), spawn_key=(int(item),)).generate_state(1)[0])


@dataclass(frozen=True)
class ItemJob:
    out_dir: str
    kind: str
    item: int
    seed: int
    density: str | None
    lesion: str
    shape: tuple[int, int] | None


def patient_id_of(seed: int, item: int) -> str:
    return f"PH{seed}-{item:06d}"


def make_item(job: ItemJob) -> list[dict[str, Any]]:
    """Simulate and write one dataset item (an image, a volume or a four-view exam); its rows."""
    from training.phantom import simulate_dbt, simulate_exam, simulate_ffdm

    seed = item_seed(job.seed, job.item)
    options = dict(density=job.density, lesion=job.lesion, shape=job.shape)
    if job.kind == "exam":
        images = simulate_exam(seed, kind="ffdm", **options)
    else:
        choice = np.random.default_rng(seed)  # which breast and view this item shows
        view, laterality = str(choice.choice(["CC", "MLO"])), str(choice.choice(["L", "R"]))
        simulate = simulate_dbt if job.kind == "dbt" else simulate_ffdm
        images = [simulate(seed, view=view, laterality=laterality, **options)]
    patient = patient_id_of(job.seed, job.item)
    root = Path(job.out_dir)
    rows = []
    for index, image in enumerate(images):
        dbt = image.kind == "dbt"
        who = Identity(patient, "1", 10 + index if dbt else 1, 1 if dbt else index + 1,
                       "Simulated DBT" if dbt else "Simulated FFDM")
        rows.append(write_image(image, root / patient, root, who, item=job.item))
    return rows


def _check_options(out_dir: Path, kind: str, n: int, seed: int, density: str | None, lesion: str,
                   shape: tuple[int, int] | None, workers: int | None, overwrite: bool) -> None:
    if kind not in KINDS:
        raise MammoInputError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    if n < 1:
        raise MammoInputError(f"--n {n}: make at least one item")
    if seed < 0:
        raise MammoInputError(f"--seed {seed}: seeds are non-negative integers")
    if workers is not None and workers < 1:
        raise MammoInputError(f"--workers {workers}: use at least one process")
    if density is not None and density not in DENSITIES:
        raise MammoInputError(f"density {density!r} is not an ACR class A, B, C or D")
    if lesion not in LESIONS:
        raise MammoInputError(f"lesion {lesion!r} is not one of {', '.join(LESIONS)}")
    if shape is not None and (len(shape) != 2 or min(shape) < 64 or max(shape) > 8192):
        raise MammoInputError(f"shape {shape} must be two sides of 64 to 8192 pixels (ROWSxCOLS)")
    if out_dir.exists() and not out_dir.is_dir():
        raise MammoInputError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise MammoInputError(f"{out_dir}: folder is not empty; choose a new one or pass --overwrite")


def parse_shape(text: str) -> tuple[int, int]:
    """'ROWSxCOLS' (e.g. '1024x832') -> (rows, cols)."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        rows, cols = (int(p) for p in parts)
    except ValueError:
        raise MammoInputError(f"--shape {text!r}: expected ROWSxCOLS, e.g. 1024x832") from None
    return rows, cols


def generate(out_dir: str | os.PathLike, kind: str, n: int, seed: int, density: str | None = None,
             lesion: str = "any", shape: tuple[int, int] | None = None, workers: int | None = None,
             progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Make `n` items (FFDM images, DBT volumes or four-view FFDM exams) with ground truth into
    `out_dir`: one folder per virtual patient and ``labels.csv``. Items run in parallel processes
    (`workers`, default: one per CPU, at most `n`) with a progress bar on stderr; item i depends
    only on (seed, i), so the bytes are the same whatever the number of workers."""
    out = Path(out_dir)
    _check_options(out, kind, n, seed, density, lesion, shape, workers, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(n, workers or os.cpu_count() or 1))
    jobs = [ItemJob(str(out), kind, i, int(seed), density, lesion, tuple(shape) if shape else None)
            for i in range(n)]
    start = time.perf_counter()
    results: dict[int, list[dict[str, Any]]] = {}
    for job, rows in _run(jobs, workers, progress, kind):
        results[job.item] = rows
    rows = [row for i in range(n) for row in results[i]]
    labels = write_labels(rows, out / "labels.csv")
    seconds = time.perf_counter() - start
    return {"out": str(out), "kind": kind, "n": n, "seed": int(seed), "files": len(rows),
            "masks": 3 * len(rows), "labels_csv": str(labels), "workers": workers,
            "seconds": round(seconds, 3), "items_per_second": round(n / seconds, 3) if seconds else None}


def _run(jobs: list[ItemJob], workers: int, progress: bool, kind: str) -> Iterator[tuple[ItemJob, list[dict]]]:
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=f"phantom {kind}", unit="item", file=sys.stderr, disable=not progress,
               mininterval=0.5)
    try:
        if workers == 1:
            for job in jobs:
                yield job, make_item(job)
                bar.update()
            return
        # spawn, not fork: a caller may hold threads (napari, dask) that a fork would copy mid-lock.
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(make_item, job): job for job in jobs}
            for future in as_completed(futures):
                yield futures[future], future.result()
                bar.update()
    finally:
        bar.close()




# --- the committed sample set -----------------------------------------------------------------

SAMPLE_SEED = 20251125  # its DBT (seed + 1) is a thin breast (~42 mm): ~42 slices of 1 mm fit the budget
SAMPLE_PATIENT = "PHSAMPLE-000000"
SAMPLE_PARTS = ("exam", "monochrome1", "dbt", "dbt_series", "jpeg2000")
SAMPLE_FFDM_SHAPE = (640, 520)  # reduced from ~2048 x 1664 so that the set fits in 20 MB
SAMPLE_DBT_SHAPE = (288, 234)  # 0.71 mm pixels
SAMPLE_DBT_LESION = "mass+calc"  # a mass and a calcification cluster, in focus in different slices


def write_sample_set(out_dir: str | os.PathLike, parts: Sequence[str] = SAMPLE_PARTS) -> list[dict[str, Any]]:
    """The sample data of ``sample_data/`` (all parts) or some of its parts, with ``labels.csv``:

    * ``exam/``: a four-view FFDM exam (RCC, LCC, RMLO, LMLO) with a mass in one breast;
    * ``monochrome1/``: the exam's view with the lesion again, stored MONOCHROME1;
    * ``dbt/``: a left CC DBT volume, one multi-frame file, with a mass and a calcification cluster;
    * ``dbt_series/``: the same volume as a per-slice series;
    * ``jpeg2000/``: the same volume, JPEG 2000 lossless, one fragment per frame.
    Same code and library versions -> the same bytes."""
    from training.phantom import simulate_dbt, simulate_exam

    unknown = set(parts) - set(SAMPLE_PARTS)
    if unknown:
        raise ValueError(f"unknown sample parts {sorted(unknown)}; choose from {SAMPLE_PARTS}")
    out = Path(out_dir)
    rows: list[dict[str, Any]] = []

    def who(series: int, instance: int, description: str) -> Identity:
        return Identity(SAMPLE_PATIENT, "1", series, instance, description)

    if {"exam", "monochrome1"} & set(parts):
        exam = simulate_exam(SAMPLE_SEED, kind="ffdm", lesion="mass", shape=SAMPLE_FFDM_SHAPE)
        if "exam" in parts:
            for index, image in enumerate(exam):
                rows.append(write_image(image, out / "exam", out, who(1, index + 1, "Simulated FFDM exam")))
        if "monochrome1" in parts:
            image = next((im for im in exam if im.lesions), exam[0])
            rows.append(write_image(image, out / "monochrome1", out, who(2, 1, "Simulated FFDM, MONOCHROME1"),
                                    photometric="MONOCHROME1"))
    if {"dbt", "dbt_series", "jpeg2000"} & set(parts):
        volume = simulate_dbt(SAMPLE_SEED + 1, view="CC", laterality="L", lesion=SAMPLE_DBT_LESION,
                              shape=SAMPLE_DBT_SHAPE)
        if "dbt" in parts:
            rows.append(write_image(volume, out / "dbt", out, who(10, 1, "Simulated DBT")))
        if "dbt_series" in parts:
            rows.append(write_image(volume, out / "dbt_series", out, who(11, 1, "Simulated DBT, per slice"),
                                    series=True))
        if "jpeg2000" in parts:
            rows.append(write_image(volume, out / "jpeg2000", out, who(12, 1, "Simulated DBT, JPEG 2000"),
                                    transfer_syntax=JPEG2000Lossless))
    write_labels(rows, out / "labels.csv")
    return rows


__all__ = [
    "Identity", "LABEL_COLUMNS", "dbt_dataset", "dbt_slice_datasets", "ffdm_dataset", "generate", "item_seed",
    "load_mask", "make_item", "parse_shape", "read_labels", "write_dbt", "write_dbt_series", "write_ffdm",
    "write_image", "write_labels", "write_mask", "write_sample_set", "save_dataset",
]
