"""Training jobs as detached subprocesses (training.jobs): a tiny cpu-tiny pretraining run to the end,
SIGTERM cancel with a checkpoint, re-attaching from the run folder, a failing command, and the
incremental, crash-tolerant reading of metrics.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import EXAM, TINY
from training.errors import MammoInputError
from training.jobs import CANCELLED, FAILED, FINISHED, RUNNING, Job, launch, plan, to_argv
from training.runs import JsonlReader, loss_terms, tail_lines

TIMEOUT = 240  # generous: CI machines are slow and shared


def tiny_args(steps: int, checkpoint_every: int, data: Path = EXAM) -> dict:
    return {"config": "cpu-tiny", "data": str(data), "max_steps": steps,
            "set": [*TINY, f"train.checkpoint_every={checkpoint_every}"]}


def wait_for(condition, timeout: float = TIMEOUT, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met after {timeout} s")
        time.sleep(0.2)
    return value


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Three jobs started together (they overlap, which keeps this file short): one runs 3 steps to the
    end, one would run 500 steps (to be cancelled), one is given a data folder that does not exist.
    One torch thread each: tiny models gain nothing from more, and the jobs share the cores."""
    root = tmp_path_factory.mktemp("jobs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        started = {"done": launch("pretrain", tiny_args(3, 2), root / "done"),
                   "cancel": launch("pretrain", tiny_args(500, 1000), root / "cancel"),
                   "bad": launch("pretrain", tiny_args(3, 2, data=root / "no-such-folder"), root / "bad")}
    yield started
    for job in started.values():
        job.cancel(force=True)  # whatever a failed test left running


def test_a_tiny_pretraining_job_runs_to_the_end_with_progress_metrics_and_checkpoint(jobs):
    job = jobs["done"]
    assert job.wait(timeout=TIMEOUT) == FINISHED, job.log_tail(10)
    assert job.returncode == 0
    progress = job.progress()
    assert (progress.done, progress.total, progress.fraction, progress.eta_s) == (3, 3, 1.0, 0.0)
    assert "step 3/3 (100%)" in progress.describe()
    rows = job.metrics()
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert {"total", "dino", "ibot", "koleo", "dbt"} <= set(loss_terms(rows))
    assert all(row["total"] == row["total"] for row in rows)  # finite numbers, no NaN
    checkpoint = job.latest_checkpoint()
    assert checkpoint == job.run_dir / "checkpoints" / "last.safetensors" and checkpoint.is_file()
    assert job.message() == f"finished at step 3; checkpoint {checkpoint}"
    info = json.loads((job.run_dir / "job.json").read_text())
    assert info["pid"] == job.pid and info["kind"] == "pretrain" and info["total"] == 3
    assert info["command"][1:4] == ["-m", "training", "pretrain"]
    assert info["command"][-4:] == ["--out", str(job.run_dir), "--quiet", "--json"]
    # The final report (--json) closes the log.
    assert json.loads(job.log_tail(1)[0])["step"] == 3

    again = Job.attach(job.run_dir)  # another process (a reopened viewer) sees the same ended job
    assert (again.pid, again.command, again.status(), again.returncode) == (job.pid, job.command, FINISHED, 0)
    assert again.progress().fraction == 1.0 and len(again.metrics()) == 3


def test_cancel_sends_sigterm_the_trainer_saves_a_checkpoint_and_the_job_reads_cancelled(jobs):
    from training.checkpoint import read_metadata

    job = jobs["cancel"]
    wait_for(lambda: job.metrics() or job.status() != RUNNING, what="a first metrics row")
    attached = Job.attach(job.run_dir)  # control it from the folder, as a reopened widget would
    assert attached.pid == job.pid and attached.status() == RUNNING
    # Another process (a new napari session) sees it running too: by its pid, checked against /proc.
    elsewhere = subprocess.run([sys.executable, "-c", "import sys; from training.jobs import Job; "
                                "job = Job.attach(sys.argv[1]); print(job.pid, job.status())", str(job.run_dir)],
                               capture_output=True, text=True, check=True)
    assert elsewhere.stdout.split() == [str(job.pid), RUNNING]
    assert attached.latest_checkpoint() is None  # checkpoint_every=1000: only SIGTERM saves one
    assert attached.cancel() is True
    assert attached.wait(timeout=TIMEOUT) == CANCELLED
    assert job.status() == CANCELLED and job.returncode == 0
    checkpoint = job.latest_checkpoint()
    assert checkpoint is not None and checkpoint.is_file()
    last_step = job.metrics()[-1]["step"]
    assert 1 <= last_step < 500
    assert read_metadata(checkpoint)["step"] == job.progress().done  # the checkpoint is the last step done
    assert job.message().startswith("cancelled at step ")
    assert "SIGTERM: saved step" in "\n".join(job.log_tail(5))
    assert attached.cancel() is False  # nothing left to cancel


def test_a_job_whose_command_fails_reports_failed_with_the_trainers_message(jobs):
    job = jobs["bad"]
    assert job.wait(timeout=TIMEOUT) == FAILED
    assert job.returncode == 2
    assert "no-such-folder" in job.message() and job.message().startswith("failed (exit 2): mammodino pretrain: error:")
    assert Job.attach(job.run_dir).status() == FAILED
    assert job.latest_checkpoint() is None


def test_launch_refuses_mistakes_before_starting_anything(tmp_path):
    with pytest.raises(MammoInputError, match="choose one of pretrain, finetune"):
        launch("train", [], tmp_path / "a")
    with pytest.raises(MammoInputError, match="no option --bogus"):
        launch("pretrain", ["--config", "cpu-tiny", "--bogus", "1"], tmp_path / "a")
    with pytest.raises(MammoInputError, match="--out is set by the job"):
        launch("pretrain", {"config": "cpu-tiny", "out": "x"}, tmp_path / "a")
    held = tmp_path / "held"
    (held / "checkpoints").mkdir(parents=True)
    (held / "checkpoints" / "last.safetensors").write_bytes(b"")
    with pytest.raises(MammoInputError, match="tick resume"):
        launch("pretrain", {"config": "cpu-tiny", "data": str(EXAM)}, held)
    assert not (tmp_path / "a").exists() and not (held / "job.json").exists()
    with pytest.raises(MammoInputError, match="holds no job"):
        Job.attach(held)


def test_arguments_and_the_planned_total():
    argv = to_argv({"config": "cpu-tiny", "max_steps": None, "resume": True, "set": ["a.b=1", "c.d=2"]})
    assert argv == ["--config", "cpu-tiny", "--resume", "--set", "a.b=1", "--set", "c.d=2"]
    assert plan("pretrain", ["--config", "cpu-tiny"]) == {"unit": "step", "total": 200, "batch_size": 16}
    planned = plan("pretrain", ["--config", "cpu-tiny", "--set", "schedule.total_steps=50", "--set=train.batch_size=4"])
    assert (planned["total"], planned["batch_size"]) == (50, 4)
    assert plan("pretrain", ["--config", "cpu-tiny", "--max-steps", "7"])["total"] == 7
    assert plan("finetune", ["--epochs", "12", "--batch-size", "8"]) == {"unit": "epoch", "total": 12, "batch_size": 8}
    assert plan("clip", ["--steps", "30", "--batch-size", "8"]) == {"unit": "step", "total": 30, "batch_size": 8}
    assert plan("clip", ["--steps", "30", "--max-steps", "40"])["total"] == 40
    assert plan("clip", [])["total"] == 1000  # ClipConfig's default


def test_metrics_reading_is_incremental_and_tolerates_a_half_written_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "total": 3.0}\n{"step": 2, "total": 2.5}\n{"step": 3, "tot')
    reader = JsonlReader(path)
    assert [row["step"] for row in reader.read()] == [1, 2]  # the half line waits for its newline
    assert reader.read() == []
    with open(path, "a") as f:
        f.write('al": 2.0}\n{garbage\n{"step": 4, "total": 1.5}\n')
    assert [row["step"] for row in reader.read()] == [3, 4]  # a garbled line is skipped, not fatal
    assert [row["step"] for row in reader.rows] == [1, 2, 3, 4]
    # A resumed run rewrites its metrics up to its checkpoint, then appends: read again from the start.
    path.write_text('{"step": 1, "total": 3.0}\n{"step": 2, "total": 2.5}\n')
    reader.read()
    assert [row["step"] for row in reader.rows] == [1, 2]
    with open(path, "a") as f:
        f.write('{"step": 3, "total": 2.2}\n{"step": 4, "total": 2.1}\n{"step": 5, "total": 2.0}\n')
    reader.read()
    assert [row["step"] for row in reader.rows] == [1, 2, 3, 4, 5]


def test_a_job_that_vanished_without_exit_status_is_failed_or_cancelled(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    info = {"kind": "pretrain", "pid": int(gone.stdout), "command": ["x"], "total": 10, "unit": "step"}
    (tmp_path / "job.json").write_text(json.dumps(info))
    (tmp_path / "job.log").write_text("step 1\nKilled\n")
    job = Job.attach(tmp_path)
    assert job.status() == FAILED and job.returncode is None
    assert job.message() == "failed: the job ended without an exit status (killed?); Killed"
    (tmp_path / "job.cancel").write_text("{}")  # someone had asked it to stop (a forced cancel)
    assert Job.attach(tmp_path).status() == CANCELLED


def test_log_tail_reads_the_end_and_keeps_the_last_redraw(tmp_path):
    path = tmp_path / "log"
    path.write_text("".join(f"line {i}\n" for i in range(5000)) + "bar 10%\rbar 50%\rbar 90%\n")
    assert tail_lines(path, 3, block=64) == ["line 4998", "line 4999", "bar 90%"]
    assert tail_lines(tmp_path / "missing", 3) == []


def test_a_run_started_outside_napari_is_watched_from_its_folder_and_not_cancelled(tmp_path):
    """`mammodino pretrain` in a shell or on a cluster writes no job.json: its metrics and checkpoint
    are enough to watch it; stopping it is for where it runs."""
    from training.cli import main

    run = tmp_path / "shell_run"
    samples = Path(__file__).resolve().parents[1] / "sample_data" / "labels.csv"
    assert main(["pretrain", "--config", "cpu-tiny", "--data", str(samples), "--out", str(run), "--max-steps", "2",
                 "--set", "train.batch_size=4", "--set", "train.num_workers=0", "--set", "train.log_every=1",
                 "--set", "train.checkpoint_every=1", "--no-cache", "--quiet"]) == 0
    job = Job.attach(run)
    assert job.observed and job.kind == "pretrain" and job.total == 2 and "--max-steps" in job.command
    assert job.status() == "finished" and job.progress().done == 2
    assert job.latest_checkpoint() == run / "checkpoints" / "last.safetensors"
    # the same folder, still writing and short of its end: running, and a cancel says where to stop it
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0] + "\n")
    job = Job.attach(run)
    assert job.status() == "running"
    with pytest.raises(MammoInputError, match="outside napari"):
        job.cancel()
    with pytest.raises(MammoInputError, match="no metrics.jsonl"):
        Job.attach(tmp_path)
