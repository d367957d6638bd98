"""Labels CSVs (the DESIGN contract): a ``path`` column relative to the CSV and one column per target
(``density`` A-D, ``lesion`` 0/1, ``lesion_type``, ``birads``; ``patient_id`` for splits). Every
evaluation command reads them here, so a missing column, a target with one class or a path that does
not exist gives the same one-line error everywhere."""

from __future__ import annotations

import csv
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


def read_rows(csv_path: str | Path) -> list[dict[str, str]]:
    """The rows of a labels CSV (one clear error when it is missing, empty or has no ``path`` column)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise MammoInputError(f"--labels {csv_path}: no such file")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise MammoInputError(f"--labels {csv_path.name}: not a readable CSV ({exc})") from None
    if not rows:
        raise MammoInputError(f"--labels {csv_path.name}: no rows")
    if "path" not in rows[0]:
        raise MammoInputError(f"--labels {csv_path.name}: needs a 'path' column (files relative to the CSV); "
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
