"""What a mammography header says about its image: kind, view, laterality, spacing, windows, LUTs.

Pure functions of a pydicom Dataset read without its pixel data. Each value records where it came
from (``*_source``) because real archives are messy: the CBIS-DDSM files, for instance, carry the
view in PatientOrientation and the laterality nowhere but Laterality and PatientID.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from training.errors import MammoInputError
from training.dicom.frame_groups import Item, functional_groups, value_of

MAMMO_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # ... - For Processing
}
DBT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.13.1.3",  # Breast Tomosynthesis Image Storage
    "1.2.840.10008.5.1.4.1.1.13.1.4",  # Breast Projection X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.13.1.5",  # ... - For Processing
}

# DICOM CID 4014 "View for Mammography": SNOMED CT and the older SNOMED-RT ("R-") code values.
VIEW_CODES = {
    "399162004": "CC", "R-10242": "CC",
    "399368009": "MLO", "R-10226": "MLO",
    "399260004": "ML", "R-10224": "ML",
    "399352003": "LM", "R-10230": "LM",
    "399099002": "LMO", "R-10228": "LMO",
    "399192003": "XCCL", "R-1024A": "XCCL",
    "399101009": "XCCM", "R-1024B": "XCCM",
    "399196006": "FB", "R-10244": "FB",
    "399188001": "SIO", "R-102D0": "SIO",
    "399255003": "AT", "R-102CF": "AT",
}
# Code meanings, squeezed to letters, for files whose code values are private or misspelt.
VIEW_MEANINGS = {
    "craniocaudal": "CC", "mediolateraloblique": "MLO", "mediolateral": "ML",
    "lateromedial": "LM", "lateromedialoblique": "LMO", "craniocaudalexaggeratedlaterally": "XCCL",
    "craniocaudalexaggeratedmedially": "XCCM", "caudocranialfrombelow": "FB",
    "superolateraltoinferomedialoblique": "SIO", "axillarytail": "AT",
}
VIEWS = {"CC", "MLO", "ML", "LM", "LMO", "XCCL", "XCCM", "FB", "SIO", "AT", "CV", "SM", "ID"}
LATERALITY_WORDS = {"L": "L", "LEFT": "L", "R": "R", "RIGHT": "R"}


@dataclass
class Window:
    """One stored VOI window: centre/width in modality units, the function that applies it."""

    center: float
    width: float
    function: str = "LINEAR"  # LINEAR, LINEAR_EXACT or SIGMOID
    explanation: str = ""


@dataclass
class VoiLut:
    """One item of the VOI LUT Sequence: a table from modality values to display values."""

    first_mapped: int
    data: list[int]
    bits: int
    explanation: str = ""


@dataclass
class ImageMeta:
    """Header facts about one image (a 2D mammogram or a DBT volume), JSON-serialisable."""

    path: str
    kind: str  # "ffdm", "dbt" or "other"
    shape: tuple[int, ...]
    dtype: str
    sop_class: str
    sop_class_name: str
    modality: str
    transfer_syntax: str
    transfer_syntax_name: str
    photometric: str
    bits_stored: int
    view: str | None
    view_source: str | None
    laterality: str | None
    laterality_source: str | None
    spacing_mm: tuple[float, ...] | None  # array order: (slices,) rows, columns
    spacing_source: str | None
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    rescale_type: str = ""
    windows: list[Window] = field(default_factory=list)
    voi_lut_function: str = "LINEAR"
    voi_luts: list[VoiLut] = field(default_factory=list)
    # Per-frame windows of an enhanced multi-frame object, only where frames differ from windows[0].
    frame_windows: list[list[Window]] | None = None
    pixel_range: tuple[float, float] | None = None  # Smallest/LargestImagePixelValue, modality units
    patient_orientation: list[str] = field(default_factory=list)
    patient_id: str = ""
    study_uid: str = ""
    series_uid: str = ""
    n_files: int = 1

    @property
    def is_volume(self) -> bool:
        return len(self.shape) == 3

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for lut in out["voi_luts"]:  # the table itself is bulky and says nothing to a reader
            lut["entries"] = len(lut.pop("data"))
        return out


def _first(seq_item: Any, keyword: str) -> Any:
    """Item 0 of a sequence attribute (of a Dataset or a functional-group Item), or None."""
    seq = value_of(seq_item, keyword) if seq_item is not None else None
    return seq[0] if seq else None


def _functional(ds: Dataset, macro: str, frame: int = 0) -> Item | None:
    """A functional-group macro (e.g. PixelMeasuresSequence) for a frame: per-frame wins over shared."""
    return functional_groups(ds).item(macro, frame)


def _floats(value: Any) -> list[float]:
    """Numbers of a DS/IS/US value; a malformed text value (e.g. DS '20x7') counts as absent."""
    if value is None or value == "":
        return []
    iterable = hasattr(value, "__iter__") and not isinstance(value, str)
    try:
        return [float(v) for v in (value if iterable else [value])]
    except (TypeError, ValueError):
        return []


def _texts(ds: Dataset) -> list[tuple[str, str]]:
    """Free-text fields that often carry view/laterality when the proper tags are missing."""
    keys = ["SeriesDescription", "ProtocolName", "PatientID", "PatientName", "ImageComments",
            "StudyDescription", "AcquisitionDeviceProcessingDescription"]
    return [(k, str(value_of(ds, k, "") or "")) for k in keys]


def _tokens(text: str) -> list[str]:
    return [t for t in re.split(r"[^A-Z0-9]+", text.upper()) if t]


def _view_from_text(text: str) -> str | None:
    for tok in _tokens(text):
        if tok in VIEWS:
            return tok
        if tok[:1] in "LR" and tok[1:] in VIEWS:  # compounds such as LCC, RMLO
            return tok[1:]
    return None


def _laterality_from_text(text: str) -> str | None:
    for tok in _tokens(text):
        if tok in LATERALITY_WORDS:
            return LATERALITY_WORDS[tok]
        if tok[:1] in "LR" and tok[1:] in VIEWS:
            return tok[0]
    return None


def view_of(ds: Dataset, filename: str = "") -> tuple[str | None, str | None]:
    """(view abbreviation, source) from ViewPosition, ViewCodeSequence, then text fallbacks."""
    vp = str(value_of(ds, "ViewPosition", "") or "").strip().upper()
    if vp in VIEWS:
        return vp, "ViewPosition"
    code = _first(ds, "ViewCodeSequence")
    if code is None:
        code = _first(_functional(ds, "FrameAnatomySequence"), "ViewCodeSequence")
    if code is not None:
        value = str(code.get("CodeValue", "") or code.get("LongCodeValue", "") or "")
        if value in VIEW_CODES:
            return VIEW_CODES[value], "ViewCodeSequence"
        meaning = re.sub(r"[^a-z]", "", str(code.get("CodeMeaning", "")).lower())
        if meaning in VIEW_MEANINGS:
            return VIEW_MEANINGS[meaning], "ViewCodeSequence"
    # PatientOrientation normally holds direction letters (A\FR); some archives put the view there.
    po = "\\".join(str(v) for v in _patient_orientation(ds))
    candidates = [("PatientOrientation", po), *_texts(ds), ("file name", filename)]
    for source, text in candidates:
        view = _view_from_text(text)
        if view:
            return view, source
    return None, None


def laterality_of(ds: Dataset, filename: str = "") -> tuple[str | None, str | None]:
    """('L'|'R', source) from ImageLaterality, Laterality, FrameLaterality, then text fallbacks."""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(value_of(ds, keyword, "") or "").strip().upper()
        if value in ("L", "R"):
            return value, keyword
    frame_lat = str((_functional(ds, "FrameAnatomySequence") or {}).get("FrameLaterality", "") or "")
    if frame_lat.strip().upper() in ("L", "R"):
        return frame_lat.strip().upper(), "FrameAnatomySequence"
    for source, text in [*_texts(ds), ("file name", filename)]:
        lat = _laterality_from_text(text)
        if lat:
            return lat, source
    # Direction letters are not laterality, but a compound view such as "LCC" is.
    for tok in _patient_orientation(ds):
        if tok[:1] in "LR" and tok[1:] in VIEWS:
            return tok[0], "PatientOrientation"
    return None, None


def _patient_orientation(ds: Dataset) -> list[str]:
    value = value_of(ds, "PatientOrientation")
    if not value:
        return []
    return [str(v).upper() for v in ([value] if isinstance(value, str) else list(value))]


def in_plane_spacing(ds: Dataset) -> tuple[tuple[float, float] | None, str | None]:
    """(row, column) spacing in mm and the tag it came from."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        values = _floats(value_of(ds, keyword))
        if len(values) == 2 and min(values) > 0:
            return (values[0], values[1]), keyword
    measures = _functional(ds, "PixelMeasuresSequence")
    values = _floats(measures.get("PixelSpacing")) if measures is not None else []
    if len(values) == 2 and min(values) > 0:
        return (values[0], values[1]), "PixelMeasuresSequence"
    values = _floats(value_of(ds, "NominalScannedPixelSpacing"))  # digitised film
    if len(values) == 2 and min(values) > 0:
        return (values[0], values[1]), "NominalScannedPixelSpacing"
    return None, None


def frame_positions(ds: Dataset, n_frames: int, frames: Sequence[int] | None = None) -> list[np.ndarray] | None:
    """ImagePositionPatient of every frame (or of `frames`) of an enhanced multi-frame object, if all
    are present."""
    positions = []
    for i in range(n_frames) if frames is None else frames:
        plane = _functional(ds, "PlanePositionSequence", i)
        values = _floats(plane.get("ImagePositionPatient")) if plane is not None else []
        if len(values) != 3:
            return None
        positions.append(np.array(values))
    return positions


def slice_normal(ds: Dataset) -> np.ndarray | None:
    orient = value_of(ds, "ImageOrientationPatient")
    if orient is None:
        plane = _functional(ds, "PlaneOrientationSequence")
        orient = plane.get("ImageOrientationPatient") if plane is not None else None
    values = _floats(orient)
    if len(values) != 6:
        return None
    (a, b, c), (d, e, f) = values[:3], values[3:]
    normal = (b * f - c * e, c * d - a * f, a * e - b * d)  # row x column (np.cross costs 0.15 ms once)
    norm = sum(v * v for v in normal) ** 0.5
    return np.array(normal) / norm if norm > 0 else None


def slice_spacing(positions: Sequence[np.ndarray] | None, ds: Dataset) -> tuple[float | None, str | None]:
    """Distance between slices: from positions along the normal, else SpacingBetweenSlices/SliceThickness."""
    if positions is not None and len(positions) > 1:
        normal = slice_normal(ds)
        steps = np.diff(np.asarray(positions), axis=0)
        distances = np.abs(steps @ normal) if normal is not None else np.linalg.norm(steps, axis=1)
        if np.all(distances > 0):
            return float(np.median(distances)), "ImagePositionPatient"
    measures = _functional(ds, "PixelMeasuresSequence")
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        for source in (measures, ds):
            values = _floats(value_of(source, keyword)) if source is not None else []
            if values and values[0] > 0:
                return values[0], keyword
    return None, None


def frames_slice_spacing(ds: Dataset, n_frames: int) -> tuple[float | None, str | None]:
    """:func:`slice_spacing` of an enhanced multi-frame volume, parsing three frames rather than all:
    when the first step and the mean step from the first to the last frame agree, the slices are
    evenly spaced and the mean step is the spacing. Otherwise every frame's position is read and the
    median step taken, as for a series."""
    if n_frames > 2:
        ends = frame_positions(ds, n_frames, (0, 1, n_frames - 1))
        if ends is None:  # frames without positions: the spacing comes from the header's fields
            return slice_spacing(None, ds)
        normal = slice_normal(ds)
        first, whole = ends[1] - ends[0], ends[2] - ends[0]
        step, mean = (abs(float(v @ normal)) if normal is not None else float(np.linalg.norm(v))
                      for v in (first, whole / (n_frames - 1)))
        if step > 0 and abs(step - mean) <= 1e-3 * step:
            return mean, "ImagePositionPatient"
    return slice_spacing(frame_positions(ds, n_frames), ds)


def frame_rescales(ds: Dataset, n_frames: int) -> tuple[tuple[float, float], ...]:
    """(slope, intercept) of every frame; frame 0's for all when every frame shares its item (the
    usual case: then no other frame is parsed). A malformed value raises :class:`MammoInputError`."""
    if functional_groups(ds).same_in_every_frame("PixelValueTransformationSequence", n_frames):
        return (rescale_of(ds, 0)[:2],) * n_frames
    return tuple(rescale_of(ds, frame)[:2] for frame in range(n_frames))


def rescale_of(ds: Dataset, frame: int = 0) -> tuple[float, float, str]:
    item = _functional(ds, "PixelValueTransformationSequence", frame)
    for source in (item, ds):
        if source is not None and "RescaleSlope" in source:
            return (_number(source, "RescaleSlope", 1.0), _number(source, "RescaleIntercept", 0.0),
                    str(value_of(source, "RescaleType", "") or ""))
    return 1.0, 0.0, ""


def _number(item: Dataset, keyword: str, default: float) -> float:
    """One number that changes pixel values: absent gives `default`, malformed is an input error."""
    raw = value_of(item, keyword)
    if raw is None or raw == "":
        return default
    values = _floats(raw)
    if len(values) != 1:
        raise MammoInputError(f"{keyword} is {str(raw)[:40]!r}, not one number; the header is corrupt")
    return values[0]


def _windows_in(item: Dataset | None) -> list[Window]:
    if item is None:
        return []
    centers, widths = _floats(value_of(item, "WindowCenter")), _floats(value_of(item, "WindowWidth"))
    explanations = item.get("WindowCenterWidthExplanation", "")
    explanations = [str(e) for e in explanations] if not isinstance(explanations, str) else [explanations]
    function = str(value_of(item, "VOILUTFunction", "") or "LINEAR").upper()
    return [Window(c, w, function, explanations[i] if i < len(explanations) else "")
            for i, (c, w) in enumerate(zip(centers, widths)) if w > 0]


def windows_of(ds: Dataset, n_frames: int) -> tuple[list[Window], list[list[Window]] | None]:
    """Stored windows (top level, else functional groups) and per-frame windows where they differ."""
    windows = _windows_in(ds) or _windows_in(_functional(ds, "FrameVOILUTSequence"))
    groups = functional_groups(ds)
    if not len(groups):
        return windows, None
    if groups.same_in_every_frame("FrameVOILUTSequence", n_frames):  # no frame but the first is parsed
        frames = [_windows_in(_functional(ds, "FrameVOILUTSequence", 0))] * n_frames
    else:
        by_item: dict[int, list[Window]] = {}  # frames mostly share one parsed item: convert it once
        frames = []
        for i in range(n_frames):
            item = _functional(ds, "FrameVOILUTSequence", i)
            if id(item) not in by_item:
                by_item[id(item)] = _windows_in(item)
            frames.append(by_item[id(item)])
    if all(f == frames[0] for f in frames) and frames[0] == windows:
        return windows, None
    return windows or frames[0], frames


def voi_luts_of(ds: Dataset) -> list[VoiLut]:
    luts = []
    for item in getattr(ds, "VOILUTSequence", None) or []:
        descriptor = _floats(item.get("LUTDescriptor"))
        raw = item.get("LUTData")
        if len(descriptor) != 3 or raw is None:
            continue
        entries, first, bits = int(descriptor[0]) or 65536, int(descriptor[1]), int(descriptor[2])
        if isinstance(raw, (bytes, bytearray)):
            # 8-bit entries are mostly written one per 16-bit word (PS3.3 C.11.2.1.1 note; pydicom's
            # apply_voi reads them so); only a table of exactly one byte per entry is packed.
            packed = bits <= 8 and len(raw) < 2 * entries
            data = np.frombuffer(raw[:len(raw) // 2 * 2] if not packed else raw,
                                 dtype="u1" if packed else "<u2")[:entries].tolist()
        else:
            data = [int(v) for v in (raw if hasattr(raw, "__iter__") else [raw])][:entries]
        luts.append(VoiLut(first, data, bits, str(item.get("LUTExplanation", "") or "")))
    return luts


def kind_of(ds: Dataset, n_frames: int, n_files: int) -> str:
    sop = str(value_of(ds, "SOPClassUID", ""))
    breast = str(value_of(ds, "BodyPartExamined", "")).upper() == "BREAST" or value_of(ds, "Modality") == "MG"
    if sop in DBT_SOP_CLASSES and (n_frames > 1 or n_files > 1):
        return "dbt"
    if (n_frames > 1 or n_files > 1) and breast:
        return "dbt"
    if n_frames == 1 and n_files == 1 and (sop in MAMMO_SOP_CLASSES or sop in DBT_SOP_CLASSES or breast):
        return "ffdm"
    return "other"


def build_meta(ds: Dataset, path: str, shape: tuple[int, ...], dtype: str, n_frames: int,
               n_files: int = 1, positions: Sequence[np.ndarray] | None = None) -> ImageMeta:
    """Gather every header fact about one image; `positions` are per-slice positions for a series."""
    name = path.rsplit("/", 1)[-1]
    view, view_source = view_of(ds, name)
    laterality, lat_source = laterality_of(ds, name)
    plane, spacing_source = in_plane_spacing(ds)
    spacing: tuple[float, ...] | None = plane
    if len(shape) == 3:
        dz, dz_source = slice_spacing(positions, ds) if positions is not None else frames_slice_spacing(ds, n_frames)
        spacing = (dz, *plane) if plane and dz else None
        spacing_source = f"{dz_source} + {spacing_source}" if spacing else None
    slope, intercept, rescale_type = rescale_of(ds)
    windows, frame_windows = windows_of(ds, n_frames)
    lo, hi = value_of(ds, "SmallestImagePixelValue"), value_of(ds, "LargestImagePixelValue")
    pixel_range = None
    if isinstance(lo, int) and isinstance(hi, int) and hi > lo:
        pixel_range = (lo * slope + intercept, hi * slope + intercept)
    sop = UID(str(value_of(ds, "SOPClassUID", "")))
    ts = UID(str(value_of(ds.file_meta, "TransferSyntaxUID", "")))
    return ImageMeta(
        path=path, kind=kind_of(ds, n_frames, n_files), shape=tuple(int(s) for s in shape), dtype=dtype,
        sop_class=str(sop), sop_class_name=sop.name if sop else "", modality=str(value_of(ds, "Modality", "")),
        transfer_syntax=str(ts), transfer_syntax_name=ts.name, photometric=str(value_of(ds, "PhotometricInterpretation")),
        bits_stored=int(value_of(ds, "BitsStored", value_of(ds, "BitsAllocated", 16))),
        view=view, view_source=view_source, laterality=laterality, laterality_source=lat_source,
        spacing_mm=tuple(float(s) for s in spacing) if spacing else None, spacing_source=spacing_source,
        rescale_slope=slope, rescale_intercept=intercept, rescale_type=rescale_type,
        windows=windows, voi_lut_function=windows[0].function if windows else
        str(value_of(ds, "VOILUTFunction", "") or "LINEAR").upper(),
        voi_luts=voi_luts_of(ds), frame_windows=frame_windows, pixel_range=pixel_range,
        patient_orientation=_patient_orientation(ds), patient_id=str(value_of(ds, "PatientID", "") or ""),
        study_uid=str(value_of(ds, "StudyInstanceUID", "")), series_uid=str(value_of(ds, "SeriesInstanceUID", "")),
        n_files=n_files,
    )
