"""Training jobs as subprocesses that a GUI (or a script) starts, watches, cancels and re-attaches to.

A job is ``mammodino pretrain|finetune|clip ... --out RUN --quiet`` run by the same Python in its own session
(``start_new_session``): a crash or an out-of-memory kill of the trainer can't take the viewer down,
and the job outlives the widget, even the viewer, that started it. Everything about a job lives in its
run folder, so any process can re-attach to it:

* ``RUN/job.json``: pid (of the wrapper below), the trainer's command, kind, start time, the planned
  total (steps or epochs) and batch size; written atomically at launch.
* ``RUN/job.log``: the trainer's stdout and stderr (appended to by each launch into the folder).
* ``RUN/job.exit``: written by the wrapper when the trainer ends: its return code, whether a cancel
  was asked, its last log line. A job started elsewhere is not our child, so ``waitpid`` can't tell
  us how it ended; this file can.
* ``RUN/job.cancel``: present once someone asked the job to stop.
* The trainer's own ``RUN/metrics.jsonl`` (read incrementally for progress and curves) and
  ``RUN/checkpoints/last.safetensors``.

The wrapper (``python -m training.jobs _wrap RUN -- COMMAND``) is a few lines of standard library: it
forwards SIGTERM to the trainer (which then saves a checkpoint and exits) and records the exit status.
Nothing here imports torch, napari or Qt: polling a job costs a few file reads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from training.errors import MammoInputError
from training.runs import JsonlReader, RunFolder, tail_lines


KINDS = ("pretrain", "finetune", "clip")


RUNNING, FINISHED, FAILED, CANCELLED = "running", "finished", "failed", "cancelled"


OBSERVED_QUIET_S = 600  # a run started elsewhere counts as running while it wrote metrics this recently


_PRESETS = Path(__file__).resolve().parent / "ssl" / "presets"  # not imported: it pulls in torch


_RESERVED = ("--out", "--quiet", "--json")


# Jobs this process launched: polling their Popen reaps them (no zombie that os.kill(pid, 0) would
# still find alive) and keeps Python from warning that a running subprocess was garbage-collected.
_CHILDREN: dict[tuple[int, str], subprocess.Popen] = {}  # (pid, run folder) -> process


def to_argv(args: Mapping[str, Any] | Sequence[str]) -> list[str]:
    """Command-line arguments from a list (as given) or a mapping: ``{"max_steps": 4, "resume": True,
    "set": ["train.batch_size=2"]}`` -> ``--max-steps 4 --resume --set train.batch_size=2``. ``False``
    and ``None`` values are left out; lists repeat the option."""
    if not isinstance(args, Mapping):
        return [str(a) for a in args]
    argv: list[str] = []
    for key, value in args.items():
        flag = key if key.startswith("--") else "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def cli_options(kind: str) -> frozenset[str]:
    """The options ``mammodino KIND`` accepts in this installation (read from the CLI's own parser, so
    the widget offers ``--device`` only where the trainer has it)."""
    from training.cli import command_options

    return command_options(kind)


def option_values(argv: Sequence[str], flag: str) -> list[str]:
    """Every value given to ``flag`` in ``argv`` (``--flag V`` or ``--flag=V``)."""
    found = []
    for i, item in enumerate(argv):
        if item == flag and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif item.startswith(flag + "="):
            found.append(item.split("=", 1)[1])
    return found


def _check_options(kind: str, argv: Sequence[str]) -> frozenset[str]:
    options = cli_options(kind)
    for item in argv:
        flag = item.split("=", 1)[0]
        if flag in _RESERVED:
            raise MammoInputError(f"{flag} is set by the job itself (the run folder, no progress bar)")
        if flag.startswith("--") and flag not in options:
            raise MammoInputError(f"`mammodino {kind}` has no option {flag}")
    return options


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def plan(kind: str, argv: Sequence[str]) -> dict[str, Any]:
    """What the job will do, as far as its arguments tell without importing the trainer: ``total``
    (steps for pretrain: ``--max-steps`` or the config's ``schedule.total_steps``; for clip: ``--max-steps``,
    ``--steps`` or the default; epochs for finetune:
    ``--epochs``; None when unknown), ``unit`` and ``batch_size`` (None when unknown)."""
    if kind == "clip":
        from training.ssl.commands import CLIP_DEFAULTS

        given = option_values(argv, "--max-steps") or option_values(argv, "--steps")
        batch = option_values(argv, "--batch-size")
        return {"unit": "step", "total": _int(given[-1]) if given else CLIP_DEFAULTS["steps"],
                "batch_size": _int(batch[-1]) if batch else CLIP_DEFAULTS["batch_size"]}
    if kind == "finetune":
        batch = option_values(argv, "--batch-size")
        return {"unit": "epoch", "total": _int((option_values(argv, "--epochs") or [None])[-1]),
                "batch_size": _int(batch[-1]) if batch else None}
    config: dict[str, Any] = {}
    name = (option_values(argv, "--config") or [""])[-1]
    path = Path(name)
    if name and not path.suffix and (_PRESETS / f"{name}.json").is_file():
        path = _PRESETS / f"{name}.json"
    try:
        from training.config import apply_overrides

        config = apply_overrides(json.loads(path.read_text(encoding="utf-8")), option_values(argv, "--set"))
    except (OSError, ValueError, MammoInputError, AttributeError):
        pass  # the trainer itself reports a bad config, in one line in the log
    section = lambda key: config.get(key) if isinstance(config.get(key), dict) else {}  # noqa: E731
    steps = option_values(argv, "--max-steps")
    total = _int(steps[-1]) if steps else _int(section("schedule").get("total_steps"))
    return {"unit": "step", "total": total, "batch_size": _int(section("train").get("batch_size"))}


def command_line(kind: str, argv: Sequence[str], run_dir: str | Path,
                 options: frozenset[str] | None = None) -> list[str]:
    """The trainer's command: ``python -m training KIND ARGS --out RUN --quiet --json`` (the last two
    where the command has them: no progress bar in the log, the final report as one JSON line)."""
    options = cli_options(kind) if options is None else options
    extra = [flag for flag in ("--quiet", "--json") if flag in options]
    return [sys.executable, "-m", "training", kind, *argv, "--out", str(run_dir), *extra]


def _write_json(path: Path, values: dict[str, Any]) -> None:
    """Atomically: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(values, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return values if isinstance(values, dict) else None


@dataclass(frozen=True)
class Progress:
    """How far a job is: ``done`` of ``total`` ``unit``s (steps or epochs), the fraction (None when the
    total is unknown), the recent rate (units per second) and the estimated seconds left."""

    done: int
    total: int | None
    unit: str
    fraction: float | None
    rate: float | None
    eta_s: float | None

    def describe(self) -> str:
        """``step 40/200 (20%), 1.3 step/s, ETA 2 min 3 s``."""
        text = f"{self.unit} {self.done}" + (f"/{self.total}" if self.total else "")
        if self.fraction is not None:
            text += f" ({self.fraction:.0%})"
        if self.rate:
            text += f", {self.rate:.3g} {self.unit}/s"
        if self.eta_s is not None and (self.fraction or 0) < 1:
            text += f", ETA {format_seconds(self.eta_s)}"
        return text


def format_seconds(seconds: float) -> str:
    """``42 s``, ``2 min 3 s``, ``1 h 05 min``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Job:
    """A training job known by its run folder. Cheap to poll: :meth:`status` reads a file and checks a
    pid; :meth:`metrics` and :meth:`progress` read only what metrics.jsonl gained since the last call."""

    def __init__(self, run_dir: str | Path, info: Mapping[str, Any]):
        self.run_dir = Path(run_dir)
        self.folder = RunFolder(self.run_dir)
        self.info = dict(info)
        self.kind: str = self.info["kind"]
        self.pid: int = int(self.info["pid"])
        self.command: list[str] = list(self.info["command"])
        self.total: int | None = self.info.get("total")
        self.unit: str = self.info.get("unit", "step")
        self._metrics = JsonlReader(self.folder.metrics)
        self._samples: deque[tuple[float, int]] = deque(maxlen=12)  # (time, done) for the recent rate
        self._exit: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"Job({self.kind}, {str(self.run_dir)!r}, pid={self.pid})"

    @classmethod
    def attach(cls, run_dir: str | Path) -> "Job":
        """The job whose folder is ``run_dir`` (running or ended), from its ``job.json``; a pretraining run
        started elsewhere (``mammodino pretrain`` in a shell, a cluster job) is watched from its
        metrics.jsonl and checkpoint alone (:attr:`observed`: it can be watched, not cancelled)."""
        run_dir = Path(run_dir).expanduser().resolve()  # as launch() wrote it into the wrapper's command
        folder = RunFolder(run_dir)
        info = _read_json(folder.job)
        if info is None and folder.metrics.is_file():
            return cls(run_dir, _observed_info(run_dir))
        if info is None or not {"kind", "pid", "command"} <= set(info):
            raise MammoInputError(f"{run_dir} holds no job (job.json) and no metrics.jsonl: start one there, or "
                                  f"pick a run folder")
        return cls(run_dir, info)

    @property
    def observed(self) -> bool:
        """A run this machine did not start (no job.json): its process is unknown."""
        return bool(self.info.get("observed"))

    # -- state --

    def _alive(self) -> bool:
        if self.observed:  # no process to ask: a run that wrote a line lately and has not reached its end
            try:
                recent = time.time() - self.folder.metrics.stat().st_mtime < OBSERVED_QUIET_S
            except OSError:
                return False
            total = self.total
            return recent and not (total and self._done(self.metrics()) >= total)
        process = _CHILDREN.get((self.pid, str(self.run_dir)))
        if process is not None:
            return process.poll() is None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        proc = Path(f"/proc/{self.pid}")
        if proc.is_dir():  # Linux: not a zombie, and not another program that got the pid since
            try:
                state = proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0]
                cmdline = proc.joinpath("cmdline").read_bytes().decode("utf-8", "replace")
            except (OSError, IndexError):
                return False
            return state != "Z" and "training.jobs" in cmdline and str(self.run_dir) in cmdline
        return True

    def _exit_info(self) -> dict[str, Any] | None:
        if self._exit is None:
            self._exit = _read_json(self.folder.job_exit)
        return self._exit

    @property
    def cancel_requested(self) -> bool:
        exit_info = self._exit_info() or {}
        return bool(exit_info.get("cancelled")) or self.folder.job_cancel.exists()

    @property
    def returncode(self) -> int | None:
        """The trainer's exit status (negative: killed by that signal); None while it runs or when the
        wrapper itself was killed."""
        exit_info = self._exit_info()
        return None if exit_info is None else int(exit_info["returncode"])

    def status(self) -> str:
        """``running``, ``finished`` (exit 0), ``cancelled`` (ended after a cancel: normally exit 0 after
        SIGTERM with a checkpoint) or ``failed`` (any other exit, or gone without an exit status)."""
        if self._exit_info() is None and self._alive():
            return RUNNING
        if self.observed:  # ended, or quiet for long: finished when it reached its last step
            progress = self.progress()
            return FINISHED if progress.fraction is not None and progress.fraction >= 1 else CANCELLED
        code = self.returncode
        if code == 0:
            if not self.cancel_requested:
                return FINISHED
            progress = self.progress()  # a cancel that came after the last step changed nothing
            return FINISHED if progress.fraction is not None and progress.fraction >= 1 else CANCELLED
        # Asked to stop, it stopped: however the trainer exited (killed, or refusing to save nothing).
        return CANCELLED if self.cancel_requested else FAILED

    def running(self) -> bool:
        return self.status() == RUNNING

    def message(self) -> str:
        """One line on the job's state: progress while it runs, where its checkpoint is when it ended,
        the trainer's last line (its error) when it failed."""
        state = self.status()
        if state == RUNNING:
            return f"running: {self.progress().describe()}"
        checkpoint = self.latest_checkpoint()
        kept = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint"
        if state == FINISHED:
            return f"finished at {self.unit} {self.progress().done}; {kept}"
        if state == CANCELLED:
            return f"cancelled at {self.unit} {self.progress().done}; {kept}"
        code = self.returncode
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"failed: the trainer was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
        exit_info = self._exit_info() or {}
        last = exit_info.get("last_line") or next((line for line in reversed(self.log_tail(5)) if line.strip()), "")
        if code is None:
            return f"failed: the job ended without an exit status (killed?); {last}".rstrip("; ")
        return f"failed (exit {code}): {last}"

    def wait(self, timeout: float | None = None, poll: float = 0.2) -> str:
        """Block until the job ends; returns its status. For scripts and tests: a GUI polls instead."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (state := self.status()) == RUNNING:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self} still running after {timeout} s")
            time.sleep(poll)
        return state

    # -- outputs --

    def metrics(self) -> list[dict[str, Any]]:
        """Every row of metrics.jsonl so far (parsing only what was appended since the last call)."""
        if self._metrics.read():
            try:
                written = self._metrics.path.stat().st_mtime  # when the newest row was written
            except OSError:
                written = time.time()
            self._samples.append((written, self._done(self._metrics.rows)))
        return self._metrics.rows

    def _done(self, rows: Sequence[Mapping[str, Any]]) -> int:
        if not rows:
            return 0
        if self.unit == "epoch":  # one row per epoch, numbered from 0 or 1: count them
            return len({row.get("epoch") for row in rows if "epoch" in row}) or len(rows)
        return int(rows[-1].get("step", len(rows)))

    def progress(self, read: bool = True) -> Progress:
        """Units done of the total, and the recent rate and ETA (from when metrics rows were written;
        before two rows exist, from the last row's images/s and the batch size). ``read=False``: from the
        rows the last :meth:`metrics` call returned (a progress that matches them exactly)."""
        rows = self.metrics() if read else self._metrics.rows
        done = self._done(rows)
        total = self.total
        fraction = min(1.0, done / total) if total else None
        rate = None
        if len(self._samples) >= 2:
            (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
            if t1 > t0 and d1 > d0:
                rate = (d1 - d0) / (t1 - t0)
        batch = self.info.get("batch_size")
        if rate is None and rows and self.unit == "step" and batch and rows[-1].get("images_per_s"):
            rate = float(rows[-1]["images_per_s"]) / batch
        eta = None
        if rate and total and done < total:
            since = time.time() - self._samples[-1][0] if self._samples else 0.0
            eta = max(0.0, (total - done) / rate - since)
        elif total and done >= total:
            eta = 0.0
        return Progress(done, total, self.unit, fraction, rate, eta)

    def log_tail(self, n: int = 20) -> list[str]:
        """The last ``n`` lines the trainer wrote (stdout and stderr)."""
        return tail_lines(self.folder.job_log, n)

    def latest_checkpoint(self) -> Path | None:
        """``checkpoints/last.safetensors`` if saved, else the newest checkpoint there, else None."""
        last, folder = self.folder.last_checkpoint, self.folder.checkpoints
        if last.is_file():
            return last
        saved = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
        return saved[-1] if saved else None

    # -- control --

    def cancel(self, force: bool = False) -> bool:
        """Ask the job to stop: SIGTERM, on which the trainer saves a checkpoint and exits (at the end of
        its current step). ``force``: SIGKILL the job's whole process group now (no checkpoint).
        Returns False when the job had already ended."""
        if self.status() != RUNNING:
            return False
        if self.observed:
            raise MammoInputError(f"{self.run_dir} was started outside napari: stop it where it runs (SIGTERM "
                                  f"saves a checkpoint)")
        self.folder.job_cancel.write_text(json.dumps({"time": time.time(), "force": force}), encoding="utf-8")
        try:
            if force:
                os.killpg(self.pid, signal.SIGKILL)  # the wrapper leads its own group (new session)
            else:
                os.kill(self.pid, signal.SIGTERM)  # the wrapper forwards it to the trainer
        except ProcessLookupError:
            return False
        return True


def _observed_info(run_dir: Path) -> dict[str, Any]:
    """What a run folder without job.json says about its job: the command, total steps and batch size
    from its newest checkpoint's metadata (a run not yet at its first checkpoint: none known)."""
    from training.checkpoint import read_metadata

    last = RunFolder(run_dir).last_checkpoint
    meta: dict[str, Any] = {}
    if last.is_file():
        try:
            meta = read_metadata(last)
        except MammoInputError:
            meta = {}
    config = meta.get("config") or {}
    command = [str(part) for part in meta.get("command") or ["mammodino", "pretrain"]]
    total = (config.get("schedule") or {}).get("total_steps")
    if "--max-steps" in command[:-1]:
        total = int(command[command.index("--max-steps") + 1])
    return {"kind": "pretrain", "pid": 0, "command": command, "total": total, "observed": True,
            "batch_size": (config.get("train") or {}).get("batch_size"), "args": command[2:]}


def launch(kind: str, args: Mapping[str, Any] | Sequence[str], run_dir: str | Path) -> Job:
    """Start ``mammodino KIND ARGS --out RUN_DIR`` as a detached subprocess; returns at once.

    ``args`` as a list (``["--config", "cpu-tiny", "--data", "DIR"]``) or a mapping (see :func:`to_argv`).
    Refused (:class:`MammoInputError`, one line) before anything starts: an unknown kind or option, a
    folder whose job is still running, a pretraining folder that holds a run without ``--resume``."""
    if kind not in KINDS:
        raise MammoInputError(f"job kind {kind!r}: choose one of {', '.join(KINDS)}")
    argv = to_argv(args)
    options = _check_options(kind, argv)
    run_dir = Path(run_dir).expanduser().resolve()
    folder = RunFolder(run_dir)
    if folder.job.is_file():
        try:
            previous = Job.attach(run_dir)
        except MammoInputError:
            previous = None
        if previous is not None and previous.running():
            raise MammoInputError(f"{run_dir} already has a running job (pid {previous.pid}): cancel it or "
                                  f"choose another output folder")
    if kind in ("pretrain", "clip") and folder.last_checkpoint.exists() and "--resume" not in argv:
        raise MammoInputError(f"{run_dir} already holds a run: tick resume to continue it or choose a new folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in (folder.job_exit, folder.job_cancel):
        stale.unlink(missing_ok=True)
    command = command_line(kind, argv, run_dir, options)
    wrapper = [sys.executable, "-m", "training.jobs", "_wrap", str(run_dir), "--", *command]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    package_root = str(Path(__file__).resolve().parents[1])  # the child finds this `training`
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    started = time.time()
    with open(folder.job_log, "ab") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} mammodino {kind} {' '.join(argv)}\n".encode())
        log.flush()
        process = subprocess.Popen(wrapper, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, close_fds=True, env=env)
    _CHILDREN[(process.pid, str(run_dir))] = process
    info = {"kind": kind, "pid": process.pid, "command": command, "args": argv, "started": started,
            "started_iso": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)), **plan(kind, argv)}
    _write_json(folder.job, info)
    return Job(run_dir, info)


def _wrap(run_dir: Path, command: list[str]) -> int:
    """Run the trainer, forward SIGTERM to it, record how it ended in ``job.exit``."""
    asked: list[int] = []
    child: subprocess.Popen | None = None

    def forward(signum: int, frame: Any) -> None:
        asked.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    code = -signal.SIGTERM
    if not asked:
        child = subprocess.Popen(command)  # inherits job.log and the job's process group
        if asked:  # SIGTERM came while the trainer was starting
            child.send_signal(signal.SIGTERM)
        code = child.wait()
    folder = RunFolder(run_dir)
    last = next((line for line in reversed(tail_lines(folder.job_log, 5)) if line.strip()), "")
    _write_json(folder.job_exit, {"returncode": code, "cancelled": bool(asked), "ended": time.time(),
                                  "last_line": last})
    return code if code >= 0 else 128 - code


def _main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "_wrap" and argv[2] == "--":
        return _wrap(Path(argv[1]), argv[3:])
    print("usage: python -m training.jobs _wrap RUN_DIR -- COMMAND (used by training.jobs.launch)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
