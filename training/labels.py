"""Labels CSVs (the DESIGN contract): a ``path`` column relative to the CSV and one column per target
(``density`` A-D, ``lesion`` 0/1, ``lesion_type``, ``birads``; ``patient_id`` for splits). Every
evaluation command reads them here, so a missing column, a target with one class or a path that does
not exist gives the same one-line error everywhere."""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.errors import MammoInputError


@dataclass
class LabelledSet:
    """Rows of a labels CSV with a usable target: ``paths`` resolved, ``targets`` as strings,
    ``classes`` sorted (numerically when they are numbers), ``groups`` (the group column, or one group
    per row), ``rows`` the CSV rows kept (dicts) and ``dropped`` rows whose target was empty."""

    csv: Path
    target: str
    paths: list[Path]
    targets: list[str]
    classes: list[str]
    groups: list[str]
    rows: list[dict[str, str]]
    dropped: int

    @property
    def y(self) -> np.ndarray:
        """Class indices into ``classes``."""
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[t] for t in self.targets], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)


def read_rows(csv_path: str | Path, option: str = "--labels") -> list[dict[str, str]]:
    """The rows of a labels CSV (one clear error, naming the command's ``option``, when it is missing,
    empty or has no ``path`` column)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise MammoInputError(f"{option} {csv_path}: no such file")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise MammoInputError(f"{option} {csv_path.name}: not a readable CSV ({exc})") from None
    if not rows:
        raise MammoInputError(f"{option} {csv_path.name}: no rows")
    if "path" not in rows[0]:
        raise MammoInputError(f"{option} {csv_path.name}: needs a 'path' column (files relative to the CSV); "
                              f"it has {sorted(rows[0])}")
    return rows


def read_labels(csv_path: str | Path, target: str, group: str | None = None,
                data: str | Path | None = None, min_classes: int = 2) -> LabelledSet:
    """Rows of ``csv_path`` with a non-empty ``target``. Paths are relative to ``data`` when given, else
    to the CSV's folder. Raises one line for a missing column, fewer than ``min_classes`` classes or
    paths that do not exist."""
    csv_path = Path(csv_path)
    rows = read_rows(csv_path)
    columns = sorted(rows[0])
    for name, what in ((target, "--target"), (group, "--group")):
        if name is not None and name not in rows[0]:
            raise MammoInputError(f"{what} {name!r}: no such column in {csv_path.name} (columns: "
                                  f"{', '.join(columns)})")
    base = Path(data) if data is not None else csv_path.parent
    if data is not None and not base.is_dir():
        raise MammoInputError(f"--data {base}: no such folder")
    kept = [row for row in rows if (row.get(target) or "").strip() and (row.get("path") or "").strip()]
    if not kept:
        raise MammoInputError(f"--target {target!r}: every row of {csv_path.name} has it empty")
    paths = [base / row["path"] for row in kept]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise MammoInputError(f"{csv_path.name}: {len(missing)} of {len(paths)} paths do not exist, e.g. "
                              f"{missing[0]} (paths are relative to {'--data' if data else 'the CSV'})")
    targets = [row[target].strip() for row in kept]
    classes = sorted(set(targets), key=_class_key)
    if len(classes) < min_classes:
        raise MammoInputError(f"--target {target!r}: only one class ({classes[0]!r}) among {len(kept)} rows; "
                              f"a classifier needs at least {min_classes}")
    groups = [row[group].strip() or f"row{i}" for i, row in enumerate(kept)] if group else \
        [f"row{i}" for i in range(len(kept))]
    return LabelledSet(csv_path, target, paths, targets, classes, groups, kept, len(rows) - len(kept))


def _class_key(value: str) -> tuple[int, Any]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def data_paths(source: str | Path) -> list[Path]:
    """What ``--data`` names: a folder (itself), or each ``path`` of a labels CSV (relative to it)."""
    source = Path(source)
    if source.is_dir():
        return [source]
    if not source.is_file():
        raise MammoInputError(f"--data {source}: no such folder or CSV file")
    if source.suffix.lower() != ".csv":
        raise MammoInputError(f"--data {source}: expected a folder of DICOM files or a labels CSV")
    rows = read_rows(source, option="--data")
    paths = list(dict.fromkeys(source.parent / row["path"] for row in rows if row["path"]))
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise MammoInputError(f"{source.name}: {len(missing)} paths do not exist, e.g. {missing[0]}")
    return paths


def open_data(source: str | Path) -> list[Any]:
    """Every image (:class:`training.dicom.image.MammoImage`, headers read, pixels lazy) that ``--data`` names;
    what cannot be opened is skipped with one line on stderr (:func:`open_data_skipping`)."""
    return open_data_skipping(source)[0]


def open_data_skipping(source: str | Path) -> tuple[list[Any], list[tuple[str, str]]]:
    """The images ``--data`` names, and ``(path, reason)`` of each one skipped because its reader refused
    it (:class:`MammoInputError` or :class:`OSError`: damaged header, not DICOM, unreadable), each
    reported in one line on stderr. A folder that fails as a whole is opened file by file, so one bad
    file costs only itself. No image at all is an error."""
    from training.dicom.io import open_path

    images: list[Any] = []
    skipped: list[tuple[str, str]] = []
    for path in data_paths(source):
        try:
            images.extend(open_path(path))
        except (MammoInputError, OSError) as exc:
            if not path.is_dir():
                skipped.append((str(path), _reason(exc, path)))
                continue
            found, failed = _open_folder_by_file(path)
            images.extend(found)
            skipped.extend(failed)
    for path, reason in skipped:
        print(f"mammodino: skipped {path}: {reason}", file=sys.stderr)
    if not images:
        example = f" ({skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise MammoInputError(f"{source}: no DICOM images to pretrain on{example}")
    return images, skipped


def _open_folder_by_file(folder: Path) -> tuple[list[Any], list[tuple[str, str]]]:
    """A folder that :func:`training.dicom.io.open_folder` refused: its readable files, grouped into images as
    open_folder groups them (slice series become volumes), and the files or series it skips."""
    from training.dicom import io  # its grouping helpers: open_folder itself takes a whole folder or nothing

    paths = io.dicom_files_in(folder)  # too many files is the user's mistake: it raises
    headers, skipped = {}, []
    for path in paths:
        try:
            headers[path] = io.read_header(path)
        except (MammoInputError, OSError) as exc:
            skipped.append((str(path), _reason(exc, path)))
    series: dict[str, list[Path]] = {}
    for i, (path, (ds, _)) in enumerate(headers.items()):
        series.setdefault(str(ds.get("SeriesInstanceUID", f"file-{i}")), []).append(path)
    images = []
    for members in series.values():
        try:
            if io._is_slice_series([headers[p][0] for p in members]):
                images.append(io.open_series(members, [headers[p] for p in members]))
            else:
                images.extend(io._from_header(p, *headers[p]) for p in members)
        except (MammoInputError, OSError) as exc:  # e.g. two slices at one position
            skipped.append((str(members[0].parent if len(members) > 1 else members[0]), _reason(exc, members[0])))
    return images, skipped


def _reason(exc: Exception, path: Path) -> str:
    """The reader's message in one line, without the path the skip line names already."""
    reason = " ".join(str(exc).split())
    for prefix in (f"{path}: ", f"{path.parent}: "):
        reason = reason.removeprefix(prefix)
    return reason or type(exc).__name__
