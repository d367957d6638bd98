"""Remake sample_data/ (the committed phantom sample set) with the project's own generator.

    .venv/bin/python scripts/make_sample_data.py [OUT]     # OUT defaults to sample_data/

Deterministic: the same code and library versions give the same bytes (tests/test_phantom_samples.py
regenerates part of it and compares). Prints each part's size; the set must stay under 20 MB.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.phantom.dataset import SAMPLE_PARTS, write_sample_set  # noqa: E402

LIMIT_MB = 20.0


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else ROOT / "sample_data"
    for part in SAMPLE_PARTS:  # only what the generator owns; README.md stays
        shutil.rmtree(out / part, ignore_errors=True)
    rows = write_sample_set(out)
    total = 0
    for part in SAMPLE_PARTS:
        size = sum(p.stat().st_size for p in (out / part).rglob("*") if p.is_file())
        total += size
        print(f"{part:<12} {size / 1e6:7.2f} MB")
    total += (out / "labels.csv").stat().st_size
    print(f"{'total':<12} {total / 1e6:7.2f} MB, {len(rows)} labelled images -> {out}")
    if total > LIMIT_MB * 1e6:
        print(f"sample set is over {LIMIT_MB} MB: reduce SAMPLE_*_SHAPE in training/phantom/dataset.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
