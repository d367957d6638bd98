"""Simulated images -> real DICOM files: the one writer of FFDM and DBT files (the tests and benchmarks
use it too).

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
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds



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


def save_dataset(ds: FileDataset, path: str | os.PathLike) -> Path:
    return atomic_write(Path(path), lambda tmp: ds.save_as(tmp, enforce_file_format=True))


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


__all__ = [
    "Identity", "LABEL_COLUMNS", "dbt_dataset", "dbt_slice_datasets", "ffdm_dataset", "write_dbt",
    "write_dbt_series", "write_ffdm", "save_dataset",
]
