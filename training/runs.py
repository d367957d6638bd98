"""A run folder: every file name a run writes, in one place."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from training.errors import MammoInputError


# The file names of a run folder RUN. Written by the trainers (pretraining, fine-tuning) and the job
# wrapper around them, read by the jobs widget, load_encoder and the release scripts.
METRICS_FILE = "metrics.jsonl"              # one JSON object per logged step, epoch or evaluation
CHECKPOINTS_DIR = "checkpoints"
LAST_CHECKPOINT = "last.safetensors"        # in CHECKPOINTS_DIR: the newest checkpoint, always a whole file
JOB_FILE, LOG_FILE, EXIT_FILE, CANCEL_FILE = "job.json", "job.log", "job.exit", "job.cancel"  # training.jobs


class RunFolder:
    """The files of one run folder: ``metrics.jsonl``, ``checkpoints/`` (pretraining's
    ``step_<7-digit step>.safetensors``, and ``last.safetensors`` of every run) and the job wrapper's
    ``job.json``, ``job.log``, ``job.exit`` and ``job.cancel`` (:mod:`training.jobs`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.metrics = self.path / METRICS_FILE
        self.checkpoints = self.path / CHECKPOINTS_DIR
        self.last_checkpoint = self.checkpoints / LAST_CHECKPOINT
        self.job, self.job_log, self.job_exit, self.job_cancel = (
            self.path / name for name in (JOB_FILE, LOG_FILE, EXIT_FILE, CANCEL_FILE))

    @classmethod
    def fresh(cls, path: str | Path) -> "RunFolder":
        """The folder of a new fine-tuning run: refused when it already holds a run or is a file."""
        folder = cls(path)
        if folder.holds_run:
            raise MammoInputError(f"--out {folder.path} already holds a run; choose a new folder")
        if folder.path.exists() and not folder.path.is_dir():
            raise MammoInputError(f"--out {folder.path} is a file, not a folder")
        return folder

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def step_checkpoint(self, step: int) -> Path:
        """Pretraining's checkpoint of ``step``; the zero padding sorts them by step."""
        return self.checkpoints / f"step_{step:07d}.safetensors"

    def step_checkpoints(self) -> list[Path]:
        """The step checkpoints saved, oldest first."""
        return sorted(self.checkpoints.glob("step_*.safetensors"))

    def link_last(self, checkpoint: Path) -> None:
        """Make ``last.safetensors`` a hard link to ``checkpoint`` atomically: it always names a whole file."""
        link = self.checkpoints / ".last.tmp"
        link.unlink(missing_ok=True)
        os.link(checkpoint, link)
        os.replace(link, self.last_checkpoint)

    @property
    def holds_run(self) -> bool:
        return self.metrics.exists() or self.last_checkpoint.exists()

    def keep_metrics_through(self, step: int) -> None:
        """Drop the metrics lines after ``step``: a run resumed from its checkpoint at ``step`` logs the
        later steps again (a run killed after the checkpoint had logged them once already)."""
        if self.metrics.is_file():
            lines = [line for line in self.metrics.read_text(encoding="utf-8").splitlines()
                     if line.strip() and json.loads(line).get("step", 0) <= step]
            self.metrics.write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """One line of ``metrics.jsonl``, creating the folder."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


# Loss terms in the order a plot should list them (pretrain logs "total", finetune "loss"/"val_loss").
LOSS_ORDER = ("total", "loss", "val_loss", "dino", "ibot", "koleo", "dbt")


def tail_lines(path: str | Path, n: int = 20, block: int = 65536) -> list[str]:
    """The last ``n`` lines of a text file, reading only its end. A carriage return (a progress bar's
    redraw) keeps what was written after it."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            data = b""
            while size > 0 and data.count(b"\n") <= n:
                step = min(block, size)
                size -= step
                f.seek(size)
                data = f.read(step) + data
    except OSError:
        return []
    text = data.decode("utf-8", "replace")
    lines = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    if text.endswith("\n"):
        lines.pop()
    return lines[-n:] if n > 0 else []


class JsonlReader:
    """Rows of a JSON-lines file, read incrementally: each :meth:`read` parses only the bytes appended
    since the last one, and only whole lines (a half-written last line waits for its newline). A file
    that shrank or whose steps went backwards (a resumed run rewrites its metrics up to its checkpoint)
    is read again from the start; an eval line after the training line of its own step is no step back."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self._offset = 0
        self._inode: int | None = None

    def read(self) -> list[dict[str, Any]]:
        """The rows appended since the last call (all rows after a restart); updates :attr:`rows`."""
        try:
            stat = self.path.stat()
        except OSError:
            return []
        if stat.st_ino != self._inode or stat.st_size < self._offset:
            self.rows, self._offset, self._inode = [], 0, stat.st_ino
        if stat.st_size == self._offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read(stat.st_size - self._offset)
        end = data.rfind(b"\n") + 1  # whole lines only
        self._offset += end
        new = []
        for line in data[:end].splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line garbled by a crash mid-write: skip it, keep the rest
            if isinstance(row, dict):
                new.append(row)
        previous = self.rows[-1].get("step") if self.rows else None
        step = new[0].get("step") if new else None
        if isinstance(previous, (int, float)) and isinstance(step, (int, float)) \
                and (step < previous or (step == previous and not (is_eval(new[0]) and not is_eval(self.rows[-1])))):
            self.rows, self._offset = [], 0  # rewritten in place: start again
            return self.read()
        self.rows.extend(new)
        return new


def is_eval(row: Mapping[str, Any]) -> bool:
    """A learning-curve line (``{"step", "kind": "eval", "eval": {...}}``, :mod:`training.evaluate.learning_curve`),
    not a training step's metrics."""
    return row.get("kind") == "eval"


def eval_curves(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The learning curve in metrics rows: each measure that has a chance level (a ``NAME_chance`` beside
    it; mean ranks, on another scale, are left out) as ``{"steps": [...], "values": [...], "chance":
    the latest chance level}``, in the order the measures first appear. Undefined values are skipped."""
    curves: dict[str, dict[str, Any]] = {}
    for row in rows:
        values = row.get("eval") if is_eval(row) else None
        if not isinstance(values, Mapping):
            continue
        for name, value in values.items():
            chance = values.get(f"{name}_chance")
            if name.endswith("_chance") or "mean_rank" in name or not _number(chance):
                continue
            curve = curves.setdefault(name, {"steps": [], "values": [], "chance": None})
            curve["chance"] = float(chance)
            if _number(value):
                curve["steps"].append(row.get("step"))
                curve["values"].append(float(value))
    return curves


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def loss_terms(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The loss terms present in metrics rows, in a stable order: the known ones (total, loss,
    val_loss, dino, ibot, koleo, dbt), then any other ``*loss`` column."""
    present = {k for row in rows for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    known = [k for k in LOSS_ORDER if k in present]
    return known + sorted(k for k in present if k.endswith("loss") and k not in known)
