"""The project's one writer of mammography DICOM files, FFDM and DBT, in two layers:

* Any pixels (the tests' and benchmarks' files): :func:`new_dataset` (file meta, identity, Image
  Pixel module); :func:`mammogram_dataset` and :func:`enhanced_dbt_dataset` add what a reader needs
  to place and show the image (view, laterality, spacing, windows; for DBT the geometry lives in the
  Shared / Per-Frame Functional Groups only); :func:`save_dataset` writes it in any transfer syntax
  pydicom encodes, or JPEG Lossless through GDCM (:mod:`training.phantom.dicom_files`, re-exported
  here). Callers add or delete anything else (a test's deliberately broken file).
* Simulated images: :func:`ffdm_dataset`, :func:`dbt_dataset` and :func:`dbt_slice_datasets` build
  on those the complete IODs of a :class:`~training.phantom.SimulatedImage`; :func:`write_ffdm`,
  :func:`write_dbt` and :func:`write_dbt_series` save them.

DICOM
-----
* FFDM: Digital Mammography X-Ray Image Storage - For Presentation (PS3.3 A.26), one file per view.
* DBT: Breast Tomosynthesis Image Storage (PS3.3 A.55), one enhanced multi-frame file per volume
  (:func:`write_dbt`), or the same volume as a per-slice series of single-frame instances of that
  class sharing one Series Instance UID (:func:`write_dbt_series`).
* Variants: MONOCHROME1 (stored values inverted, windows moved so it displays exactly like the
  MONOCHROME2 file; FFDM only, because the X-Ray 3D Image module allows MONOCHROME2 alone) and any
  lossless transfer syntax, e.g. JPEG 2000 lossless (one fragment per frame).

Geometry. PatientOrientation follows the detector convention of the phantom contract (left breast:
"A\\R" CC, "A\\FR" MLO; right: "P\\L", "P\\FL"); DBT ImageOrientationPatient is built from the same
letters, so its slice normal (row x column) points from the X-ray source to the detector. Frames are
written in order of increasing position along that normal, the order every DICOM reader stacks a
per-slice series in: **file frame 0 is the slice nearest the compression paddle**, the reverse of
the simulator's slice order (slice 0 nearest the detector). Masks and slice ranges written beside
a file are in the file's frame order.

Determinism. Same image and arguments -> identical bytes: UIDs come from
``pydicom.uid.generate_uid(entropy_srcs=...)`` over the :class:`Identity` (patient, study, series,
instance) and the image's seed; dates and times are fixed; the file meta names this writer rather
than the pydicom version. :meth:`Identity.unique` salts the UIDs for files that must differ.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from training.phantom.dicom_files import atomic_write, encode, mark_undefined_lengths, save_dataset  # noqa: F401

if TYPE_CHECKING:
    from training.phantom import SimulatedImage


MG_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.2")  # Digital Mammography X-Ray - For Presentation
BREAST_TOMOSYNTHESIS = UID("1.2.840.10008.5.1.4.1.1.13.1.3")  # Breast Tomosynthesis Image Storage


# What the files say made them; fixed so that the bytes do not change with a pydicom upgrade.
MANUFACTURER, MODEL = "napari-mammodino", "MammoDINO breast phantom simulator"
SOFTWARE_VERSION, IMPLEMENTATION_VERSION = "phantom-writer 1", "MAMMODINO_1"
UID_NAMESPACE = "mammodino-phantom"
STUDY_DATE, STUDY_TIME = "20250101", "090000"  # fixed: same seed, same bytes


# CID 4014 "View for Mammography" (SNOMED CT) and CID 4013 "Anatomic Region for Mammography".
VIEW_CODES = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique"),
              "ML": ("399260004", "medio-lateral")}


BREAST_CODE = ("76752008", "Breast")


# PatientOrientation per laterality and view: (direction of increasing column, of increasing row).
PATIENT_ORIENTATION = {("L", "CC"): ("A", "R"), ("L", "MLO"): ("A", "FR"),
                       ("R", "CC"): ("P", "L"), ("R", "MLO"): ("P", "FL")}


# DICOM patient coordinates (LPS): +x to the patient's left, +y posterior, +z head.
_DIRECTIONS = {"L": (1, 0, 0), "R": (-1, 0, 0), "P": (0, 1, 0), "A": (0, -1, 0), "H": (0, 0, 1), "F": (0, 0, -1)}


AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # rows along x, columns along y: frames step along z


# Extra windows around the simulator's one, as the NORMAL/HARDER/SOFTER choices vendors store.
WINDOW_CHOICES = (("NORMAL", 1.0), ("HARDER", 0.7), ("SOFTER", 1.4))


# A VOI window: (centre, width) or (centre, width, explanation), in stored values.
Window = tuple[float, float] | tuple[float, float, str]


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
    """Who and which series/instance an image belongs to; every UID is derived from it (and from
    `salt`, when set: see :meth:`unique`)."""

    patient_id: str = "PHANTOM"
    study: str = "1"
    series_number: int = 1
    instance_number: int = 1
    series_description: str = ""
    patient_name: str = ""  # empty: "Phantom^<patient_id>"
    salt: str = ""

    @classmethod
    def unique(cls, **fields: Any) -> Identity:
        """An identity with a random salt: its UIDs are its own (two test files never share a study
        or series by accident) yet stable across its instances (the slices of one series)."""
        return cls(salt=secrets.token_hex(8), **fields)

    def uid(self, *parts: Any) -> UID:
        """A UID of this identity for `parts` (e.g. a frame of reference)."""
        return _uid(*([self.salt] if self.salt else []), self.patient_id, "study", self.study, *parts)

    @property
    def study_uid(self) -> UID:
        return self.uid()

    @property
    def series_uid(self) -> UID:
        return self.uid("series", self.series_number)

    def instance_uid(self, *extra: Any) -> UID:
        return self.uid("series", self.series_number, "instance", self.instance_number, *extra)


def code_item(value: str, meaning: str, scheme: str = "SCT") -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def view_codes(view: str) -> list[Dataset]:
    """A ViewCodeSequence (CID 4014, SNOMED CT) for CC, MLO or ML, with its (empty, type 2) modifiers."""
    item = code_item(*VIEW_CODES[view])
    item.ViewModifierCodeSequence = []
    return [item]


def set_windows(item: Dataset, windows: Sequence[Window], function: str | None = None) -> None:
    """WindowCenter/Width (several windows: multi-valued, in order), their explanations when given,
    and VOILUTFunction when given, on `item` (the dataset or a FrameVOILUT item)."""
    item.WindowCenter = [_ds(w[0]) for w in windows]
    item.WindowWidth = [_ds(w[1]) for w in windows]
    explanations = [str(w[2]) for w in windows if len(w) > 2]
    if explanations:
        item.WindowCenterWidthExplanation = explanations
    if function:
        item.VOILUTFunction = function


# --- any pixels ---------------------------------------------------------------------------------

def new_dataset(sop_class: str, pixels: np.ndarray, who: Identity, instance_uid: str | None = None, *,
                photometric: str = "MONOCHROME2", bits_stored: int = 12) -> FileDataset:
    """A Part 10 dataset (native, Explicit VR Little Endian) holding `pixels`, (rows, cols) or (frames,
    rows, cols), as stored values: file meta, SOP Common, patient, study and series UIDs, Modality and
    the Image Pixel module. Values are not checked against `bits_stored`: tests write garbage bits."""
    pixels = np.ascontiguousarray(pixels, dtype="<u2")
    sop_class, sop_instance = UID(sop_class), UID(instance_uid or who.instance_uid())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _uid("implementation")
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_instance
    ds.PatientName = who.patient_name or f"Phantom^{who.patient_id}"
    ds.PatientID = who.patient_id
    ds.StudyInstanceUID, ds.SeriesInstanceUID = who.study_uid, who.series_uid
    ds.Modality, ds.BodyPartExamined = "MG", "BREAST"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(pixels.shape[-2]), int(pixels.shape[-1])
    if pixels.ndim == 3:
        ds.NumberOfFrames = int(pixels.shape[0])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.PixelData = pixels.tobytes()
    return ds


def mammogram_dataset(pixels: np.ndarray, who: Identity, instance_uid: str | None = None, *,
                      photometric: str = "MONOCHROME2", bits_stored: int = 12, view: str | None = "CC",
                      laterality: str | None = "L", spacing: Sequence[float] | None = (0.1, 0.1),
                      spacing_tag: str = "PixelSpacing", windows: Sequence[Window] = (),
                      voi_function: str | None = None) -> FileDataset:
    """A 2D Digital Mammography X-Ray Image - For Presentation with what a reader needs: view
    (ViewPosition and code), ImageLaterality, in-plane spacing (row, column) under `spacing_tag`,
    windows. None (or no windows) leaves the attribute out."""
    ds = new_dataset(MG_FOR_PRESENTATION, pixels, who, instance_uid, photometric=photometric, bits_stored=bits_stored)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if view:
        ds.ViewPosition = view
        ds.ViewCodeSequence = view_codes(view)
    if laterality:
        ds.ImageLaterality = laterality
    if spacing:
        setattr(ds, spacing_tag, [_ds(s) for s in spacing])
    if windows:
        set_windows(ds, windows, voi_function)
    return ds


def frame_positions(orientation: Sequence[float], n: int, step: float,
                    first: Sequence[float] = (0.0, 0.0, 0.0)) -> list[list[float]]:
    """ImagePositionPatient of `n` frames `step` mm apart along the normal (row x column) from `first`."""
    normal = np.cross(orientation[:3], orientation[3:])
    return [[float(v) + 0.0 for v in np.asarray(first, float) + k * step * normal] for k in range(n)]  # no "-0"


def enhanced_dbt_dataset(volume: np.ndarray, who: Identity, instance_uid: str | None = None, *,
                         bits_stored: int = 12, spacing: Sequence[float] = (1.0, 0.1, 0.1),
                         slice_thickness: float | None = None, spacing_between_slices: bool = False,
                         orientation: Sequence[float] = AXIAL, positions: Sequence[Sequence[float]] | None = None,
                         view: str | None = "CC", laterality: str = "L", windows: Sequence[Window] = (),
                         frame_windows: Sequence[Sequence[Window]] | None = None,
                         voi_function: str | None = None) -> FileDataset:
    """A Breast Tomosynthesis Image multi-frame dataset of `volume` (frames in file order) whose
    geometry, laterality and windows live only where the standard puts them, in the functional
    groups. Shared: PixelMeasures (PixelSpacing = spacing[1:], SliceThickness = `slice_thickness` or
    the slice step spacing[0], SpacingBetweenSlices when asked), PlaneOrientation, FrameAnatomy and
    the shared `windows`. Per frame: PlanePosition (`positions`; default :func:`frame_positions`
    from the origin) and each frame's own `frame_windows`. At the top level only the view code."""
    ds = new_dataset(BREAST_TOMOSYNTHESIS, volume, who, instance_uid, bits_stored=bits_stored)
    n = int(ds.get("NumberOfFrames", 1))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "TOMOSYNTHESIS", "NONE"]
    if view:
        ds.ViewCodeSequence = view_codes(view)
    shared, measures, plane, anatomy = Dataset(), Dataset(), Dataset(), Dataset()
    measures.PixelSpacing = [_ds(s) for s in spacing[1:]]
    measures.SliceThickness = _ds(slice_thickness or spacing[0])
    if spacing_between_slices:
        measures.SpacingBetweenSlices = _ds(spacing[0])
    shared.PixelMeasuresSequence = [measures]
    plane.ImageOrientationPatient = [_ds(v) for v in orientation]
    shared.PlaneOrientationSequence = [plane]
    anatomy.AnatomicRegionSequence = [code_item(*BREAST_CODE)]
    anatomy.FrameLaterality = laterality
    shared.FrameAnatomySequence = [anatomy]
    if windows:
        shared.FrameVOILUTSequence = [_voi_item(windows, voi_function)]
    ds.SharedFunctionalGroupsSequence = [shared]
    positions = frame_positions(orientation, n, spacing[0]) if positions is None else positions
    groups = []
    for k in range(n):
        group, position = Dataset(), Dataset()
        position.ImagePositionPatient = [_ds(v) for v in positions[k]]
        group.PlanePositionSequence = [position]
        if frame_windows is not None:
            group.FrameVOILUTSequence = [_voi_item(frame_windows[k], voi_function)]
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = groups
    return ds


def _voi_item(windows: Sequence[Window], function: str | None) -> Dataset:
    item = Dataset()
    set_windows(item, windows, function)
    return item


# --- phantoms: the complete IODs ----------------------------------------------------------------

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


def _lossless(transfer_syntax: str) -> UID:
    ts = UID(transfer_syntax)
    if ts.is_compressed and "Lossless" not in ts.name:  # the ground truth describes these exact pixels
        raise ValueError(f"{ts.name}: only lossless transfer syntaxes keep the ground truth valid")
    return ts


def _check_pixels(image: SimulatedImage, ndim: int) -> np.ndarray:
    pixels = np.asarray(image.pixels)
    if pixels.ndim != ndim or pixels.dtype != np.uint16:
        raise ValueError(f"expected {ndim}-D uint16 pixels, got {pixels.ndim}-D {pixels.dtype}")
    if int(pixels.max()) > 2 ** image.bits_stored - 1:
        raise ValueError(f"pixel values exceed {image.bits_stored} bits stored")
    return pixels


def _complete_identity(ds: Dataset, who: Identity, image: SimulatedImage) -> None:
    """Patient, General Study, General Series (with the MG series attributes), General Equipment and
    the General Image attributes a phantom file carries on top of :func:`new_dataset`'s."""
    ds.PatientBirthDate = ""
    ds.PatientSex = "F"
    ds.StudyDate, ds.StudyTime = STUDY_DATE, STUDY_TIME
    ds.ReferringPhysicianName = ""
    ds.StudyID = who.study
    ds.AccessionNumber = ""
    ds.StudyDescription = "Simulated breast phantom (napari-mammodino)"
    ds.SeriesNumber = who.series_number
    ds.SeriesDate, ds.SeriesTime = STUDY_DATE, STUDY_TIME
    ds.SeriesDescription = who.series_description
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = SOFTWARE_VERSION
    ds.InstanceNumber = who.instance_number
    ds.PatientOrientation = patient_orientation(image.laterality, image.view)
    ds.ContentDate, ds.ContentTime = STUDY_DATE, STUDY_TIME
    ds.ImageComments = f"Simulated phantom, seed {image.seed}; not a patient image"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.BreastImplantPresent = "NO"
    ds.PartialView = "NO"
    ds.AcquisitionContextSequence = []


def ffdm_dataset(image: SimulatedImage, who: Identity = Identity(), *, photometric: str = "MONOCHROME2",
                 transfer_syntax: str = ExplicitVRLittleEndian) -> FileDataset:
    """A Digital Mammography X-Ray Image - For Presentation dataset for a 2D simulated image."""
    ts = _lossless(transfer_syntax)
    pixels = _check_pixels(image, 2)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, not {photometric!r}")
    maximum = 2 ** image.bits_stored - 1
    stored = (maximum - pixels).astype(np.uint16) if photometric == "MONOCHROME1" else pixels
    ds = mammogram_dataset(stored, who, who.instance_uid(image.seed, image.laterality, image.view, photometric, ts),
                           photometric=photometric, bits_stored=image.bits_stored, view=image.view,
                           laterality=image.laterality, spacing=image.spacing_mm, spacing_tag="ImagerPixelSpacing",
                           windows=_windows(image, photometric), voi_function="LINEAR")
    _complete_identity(ds, who, image)
    ds.PresentationIntentType = "FOR PRESENTATION"  # DX Series
    # DX Image, Mammography Image
    ds.AcquisitionDate, ds.AcquisitionTime = STUDY_DATE, STUDY_TIME
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PixelIntensityRelationship = "LOG"
    # Dense tissue attenuates most and is bright in MONOCHROME2: higher values = less X-ray intensity.
    ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME2" else 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    ds.QualityControlImage = "NO"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.OrganExposed = "BREAST"
    ds.AnatomicRegionSequence = [code_item(*BREAST_CODE)]
    _acquisition_facts(ds, image)
    ds.DetectorType = "DIRECT"  # DX Detector
    return encode(ds, ts)


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


def _frame_windows(image: SimulatedImage, frames: np.ndarray) -> list[list[tuple[float, float, str]]]:
    """Each file frame's own VOI windows (1st-99th percentile of its breast pixels), as some vendors
    store them per frame."""
    masks = np.asarray(image.breast_mask)[::-1]
    out = []
    for values, mask in zip(frames, masks):
        inside = values[mask] if mask.any() else values.ravel()
        lo, hi = np.percentile(inside, [1, 99])
        out.append([(round(float(lo + hi) / 2, 3), round(max(float(hi - lo) * f, 2.0), 3), name)
                    for name, f in WINDOW_CHOICES])
    return out


def _phantom_dbt(image: SimulatedImage, who: Identity, uid: UID, frames: np.ndarray, first: int,
                 frame_windows: list | None) -> FileDataset:
    """The complete Breast Tomosynthesis Image IOD over `frames` (file frames `first`, `first` + 1, ...
    of the volume): :func:`enhanced_dbt_dataset` plus the modules and frame macros the IOD requires."""
    n_volume = image.pixels.shape[0]
    orientation, positions = _dbt_geometry(image, n_volume)
    ds = enhanced_dbt_dataset(frames, who, uid, bits_stored=image.bits_stored, spacing=image.spacing_mm,
                              spacing_between_slices=True, orientation=orientation,
                              positions=positions[first:first + len(frames)], view=image.view,
                              laterality=image.laterality,
                              windows=() if frame_windows else _windows(image, "MONOCHROME2"),
                              frame_windows=frame_windows, voi_function="LINEAR")
    _complete_identity(ds, who, image)
    ds.FrameOfReferenceUID = who.uid("frame of reference", image.laterality, image.view, image.seed)
    ds.PositionReferenceIndicator = ""
    # X-Ray 3D Image (with the Common CT/MR Image Description macro) and Breast View
    ds.PixelPresentation, ds.VolumetricProperties, ds.VolumeBasedCalculationTechnique = "MONOCHROME", "VOLUME", "NONE"
    ds.ContentQualification = "RESEARCH"
    ds.PresentationLUTShape = "IDENTITY"
    transform = Dataset()
    transform.RescaleIntercept, transform.RescaleSlope, transform.RescaleType = "0", "1", "US"
    ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence = [transform]
    for k, group in enumerate(ds.PerFrameFunctionalGroupsSequence, start=first):
        content = Dataset()
        content.FrameReferenceDateTime = content.FrameAcquisitionDateTime = STUDY_DATE + STUDY_TIME
        content.FrameAcquisitionDuration = 0
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        content.DimensionIndexValues = [1, k + 1]
        group.FrameContentSequence = [content]
        # Frame type is a per-frame macro: validators (dciodvfy) expect it in every frame's group.
        frame_type = Dataset()
        frame_type.FrameType = ["ORIGINAL", "PRIMARY", "TOMOSYNTHESIS", "NONE"]
        frame_type.PixelPresentation, frame_type.VolumetricProperties = "MONOCHROME", "VOLUME"
        frame_type.VolumeBasedCalculationTechnique = "NONE"
        group.XRay3DFrameTypeSequence = [frame_type]
    return ds


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
    """A Breast Tomosynthesis Image multi-frame dataset (frames in file order, see the module doc),
    with the volume's windows shared or, with `per_frame_windows`, each frame's own."""
    ts = _lossless(transfer_syntax)
    frames = _check_pixels(image, 3)[::-1]
    uid = who.instance_uid(image.seed, image.laterality, image.view, "dbt", ts, per_frame_windows)
    ds = _phantom_dbt(image, who, uid, frames, 0, _frame_windows(image, frames) if per_frame_windows else None)
    _dimensions(ds, _uid(ds.SOPInstanceUID, "dimensions"))
    return encode(ds, ts)


def dbt_slice_datasets(image: SimulatedImage, who: Identity = Identity(), *,
                       transfer_syntax: str = ExplicitVRLittleEndian) -> list[FileDataset]:
    """The volume as single-frame Breast Tomosynthesis instances of one series, InstanceNumber k+1
    for file frame k, each with its own PlanePosition; a reader stacks them into the same volume."""
    ts = _lossless(transfer_syntax)
    frames = _check_pixels(image, 3)[::-1]
    out = []
    for k in range(len(frames)):
        slice_who = replace(who, instance_number=k + 1)
        uid = slice_who.instance_uid(image.seed, image.laterality, image.view, "dbt slice", ts)
        ds = _phantom_dbt(image, slice_who, uid, frames[k:k + 1], k, None)
        _dimensions(ds, _uid(who.series_uid, "dimensions"))
        out.append(encode(ds, ts))
    return out


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
    "AXIAL", "Identity", "Window", "code_item", "dbt_dataset", "dbt_slice_datasets", "encode", "enhanced_dbt_dataset",
    "ffdm_dataset", "frame_positions", "mammogram_dataset", "new_dataset", "save_dataset", "set_windows",
    "view_codes", "write_dbt", "write_dbt_series", "write_ffdm",
]
