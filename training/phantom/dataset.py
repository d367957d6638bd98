"""Phantom datasets on disk: each simulated image as DICOM plus its ground-truth masks, one
labels CSV row per image (the DESIGN contract), generated in parallel; and the committed sample set.

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
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless

from training.errors import MammoInputError
from training.labels import read_rows
from training.phantom.dicom import Identity, atomic_write, write_dbt, write_dbt_series, write_ffdm

if TYPE_CHECKING:
    from training.phantom import SimulatedImage


KINDS = ("ffdm", "dbt", "exam")


LESIONS = ("none", "mass", "calc", "any")


DENSITIES = ("A", "B", "C", "D")


LABEL_COLUMNS = (
    "path", "patient_id", "item", "kind", "view", "laterality", "density", "glandular_fraction",
    "lesion", "lesion_type", "lesion_shape", "malignant", "birads", "n_lesions", "lesions",
    "breast_mask", "glandular_mask", "lesion_mask", "rows", "cols", "slices", "spacing_mm",
    "chest_wall", "photometric", "transfer_syntax", "seed", "params",
)


JSON_COLUMNS = ("lesions", "spacing_mm", "params")  # structured columns, JSON text in the CSV


NUMBER_COLUMNS = ("item", "lesion", "malignant", "birads", "n_lesions", "rows", "cols", "slices", "seed")


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
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask written by :func:`write_mask`: uint8 with its exact label values."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return np.asarray(data["mask"])
    import imageio.v3 as iio

    return np.asarray(iio.imread(path))


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
    """One labels-CSV row (as :func:`read_truth` gives it back): paths relative to `root` (the
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


def write_labels(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """The labels CSV (columns :data:`LABEL_COLUMNS`), rows in the order given; the structured
    columns (:data:`JSON_COLUMNS`) as JSON text."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=LABEL_COLUMNS, lineterminator="\n")
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, **{key: json.dumps(row[key], sort_keys=True) for key in JSON_COLUMNS}})

    return atomic_write(Path(path), write)


def read_truth(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The ground truth of a phantom labels CSV: its rows (:func:`training.labels.read_rows`) with the
    numbers as numbers and the JSON columns decoded, as :func:`truth_row` made them."""
    rows = []
    for row in read_rows(path):
        parsed: dict[str, Any] = dict(row)
        for key in set(NUMBER_COLUMNS) & row.keys():
            parsed[key] = int(row[key])
        parsed["glandular_fraction"] = float(row["glandular_fraction"])
        for key in JSON_COLUMNS:
            parsed[key] = json.loads(row[key])
        rows.append(parsed)
    return rows


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
