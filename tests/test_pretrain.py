"""`mammodino pretrain` on phantom DICOMs with a micro ViT (2 blocks, 48 dims, 32 px crops, patch 8):
metrics and safetensors checkpoints as documented, exact resume, SIGTERM, learning, bad input."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from dicom_factory import write_ffdm

from training.checkpoint import load_checkpoint, read_metadata, unprefixed
from training.cli import main
from training.ssl.presets import load_config
from training.ssl.pretrain import Guard, TrainingStopped, pretrain

from helpers import MICRO, REPO, SAMPLES, student_weights

METRIC_KEYS = {"step", "epoch", "total", "dino", "ibot", "koleo", "dbt", "lr", "momentum", "teacher_temp",
               "teacher_entropy", "images_per_s"}


def test_run_writes_metrics_and_checkpoints_with_provenance(labels, tmp_path):
    out = tmp_path / "run"
    code = main(["pretrain", "--config", "cpu-tiny", *sum((["--set", s] for s in MICRO), []),
                 "--data", str(labels), "--out", str(out), "--max-steps", "5", "--quiet", "--json"])
    assert code == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
    assert all(METRIC_KEYS <= set(m) for m in lines)
    assert all(m["teacher_entropy"] > 0 and m["images_per_s"] > 0 for m in lines)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["last.safetensors", "step_0000004.safetensors", "step_0000005.safetensors"]
    meta = read_metadata(out / "checkpoints" / "last.safetensors")
    assert meta["step"] == 5 and meta["config"]["model"]["embed_dim"] == 48
    assert meta["command"][:4] == ["mammodino", "pretrain", "--config", "cpu-tiny"] and "--max-steps" in meta["command"]
    assert "git_commit" in meta and meta["data"]["images"] == 4 and meta["data"]["dbt"] == 2
    assert meta["metrics"]["step"] == 5
    # the checkpoint holds the student and a teacher that moved away from it by EMA
    tensors, _ = load_checkpoint(out / "checkpoints" / "last.safetensors")
    student, teacher = unprefixed("model.student", tensors), unprefixed("model.teacher", tensors)
    assert student.keys() == teacher.keys()
    assert not torch.equal(student["backbone.blocks.0.attn.qkv.weight"], teacher["backbone.blocks.0.attn.qkv.weight"])


def cli_command(out: Path, labels: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "training", "pretrain", "--config", "cpu-tiny",
            *sum((["--set", s] for s in MICRO), []), *extra, "--data", str(labels), "--out", str(out), "--quiet"]


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    assert process.poll() is None, process.communicate()[1]


def test_a_run_killed_with_sigkill_resumes_to_the_weights_of_an_uninterrupted_run(labels, tmp_path):
    split = tmp_path / "split"
    # The killed process computes with as many threads as this one, which finishes both runs: another
    # thread count sums floats in another order (1e-4 apart after a few steps).
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen(cli_command(split, labels, "--max-steps", "1000"), cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(split / "checkpoints" / "last.safetensors", process)
    finally:
        process.kill()  # SIGKILL: no handler runs
        process.communicate(timeout=60)
    killed_at = read_metadata(split / "checkpoints" / "last.safetensors")["step"]
    # a line the killed run logged after its checkpoint is dropped on resume and written again
    with open(split / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": killed_at + 1, "total": -1.0}) + "\n")
    end = killed_at + 2
    config = load_config("cpu-tiny", MICRO)
    report = pretrain(config, labels, split, max_steps=end, resume=True, progress=False)
    assert report["start_step"] == killed_at and report["step"] == end
    pretrain(config, labels, tmp_path / "straight", max_steps=end, progress=False)
    straight, resumed = student_weights(tmp_path / "straight"), student_weights(split)
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6)
    lines = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, end + 1)) and all(m["total"] > 0 for m in lines)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(labels, tmp_path):
    out = tmp_path / "run"
    command = cli_command(out, labels, "--set", "train.checkpoint_every=1000", "--max-steps", "1000")
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(out / "metrics.jsonl", process)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "SIGTERM" in stderr and "--resume" in stderr
    meta = read_metadata(out / "checkpoints" / "last.safetensors")
    assert 1 <= meta["step"] < 1000


def test_a_time_limit_ends_the_run_at_a_checkpoint_that_resumes(labels, tmp_path, capsys):
    """A fixed wall-clock slot (a scheduler's allocation, a lent GPU): the run stops at a checkpoint, says
    so in one line, and --resume continues it to the end."""
    out = tmp_path / "run"
    args = ["pretrain", "--config", "cpu-tiny", *sum((["--set", s] for s in MICRO), []),
            "--set", "train.checkpoint_every=1000", "--data", str(labels), "--out", str(out), "--quiet"]
    assert main([*args, "--max-steps", "8", "--time-limit", "0.001", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["time_limited"] and not report["terminated"] and report["step"] == 1
    assert "--time-limit" in captured.err and "--resume" in captured.err
    assert read_metadata(out / "checkpoints" / "last.safetensors")["step"] == 1
    assert main([*args, "--max-steps", "3", "--resume", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 3
    assert main([*args, "--max-steps", "3", "--time-limit", "0", "--resume"]) == 2
    assert "--time-limit" in capsys.readouterr().err


def test_sigterm_to_the_whole_job_with_data_workers_still_saves_a_checkpoint(labels, tmp_path):
    """A scheduler (scancel, systemd, pkill) signals every process of the job, DataLoader workers included."""
    out = tmp_path / "run"
    command = cli_command(out, labels, "--set", "train.checkpoint_every=1000", "--max-steps", "1000",
                          "--set", "train.num_workers=1")
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        wait_for(out / "metrics.jsonl", process)
        os.killpg(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, stderr
    assert 1 <= read_metadata(out / "checkpoints" / "last.safetensors")["step"] < 1000


def test_loss_falls_and_the_teacher_does_not_collapse(labels, tmp_path):
    config = load_config("cpu-tiny", MICRO + ["train.checkpoint_every=100", "train.batch_size=6"])
    pretrain(config, labels, tmp_path / "run", max_steps=30, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = sum(m["total"] for m in lines[:5]) / 5
    last = sum(m["total"] for m in lines[-5:]) / 5
    assert last < first - 0.05, (first, last)
    assert lines[-1]["dino"] < lines[0]["dino"]  # not the KoLeo term alone
    assert any(m["dbt"] > 0 for m in lines)  # batches with both volumes' pairs have negatives
    log_k = math.log(64)  # K = 64 prototypes
    # The targets carry image information: uniform targets (entropy exactly log K, what DINOv2's layer
    # scale 1e-5 gives for this whole run) would let the DINO loss fall by the student turning uniform.
    assert all(m["teacher_entropy"] < log_k - 0.002 for m in lines), [m["teacher_entropy"] for m in lines]
    # ... and the student learns to predict them: the DINO loss less the targets' entropy (the KL part)
    assert lines[-1]["dino"] - lines[-1]["teacher_entropy"] < 0.2 * (lines[0]["dino"] - lines[0]["teacher_entropy"])
    # no collapse: per-image targets far from one-hot, every prototype used across the batch
    assert all(m["teacher_entropy"] > 0.5 * log_k and m["teacher_marginal_entropy"] > 0.95 * log_k for m in lines)


def test_the_teacher_centre_lifts_the_initial_collapse(labels, tmp_path):
    # At initialisation (layer scale 1e-5) every image gives the teacher nearly the same logits: with the
    # running-centre softmax (DINO) the batch-mean target starts near one-hot, and centring must spread it.
    config = load_config("cpu-tiny", MICRO + ["loss.centering=softmax_center", "train.checkpoint_every=100",
                                              "model.layerscale=1e-5"])
    pretrain(config, labels, tmp_path / "run", max_steps=15, progress=False, guard=Guard(0.0))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["teacher_marginal_entropy"] > lines[0]["teacher_marginal_entropy"] + 0.5, lines


def test_a_folder_with_an_image_without_tissue_is_skipped_with_a_warning(tmp_path, capsys):
    folder = tmp_path / "data"
    write_ffdm(folder / "blank.dcm", np.zeros((64, 48), np.uint16))
    shutil.copy(SAMPLES / "exam" / "RCC.dcm", folder / "RCC.dcm")
    code = main(["pretrain", "--config", "cpu-tiny", *sum((["--set", s] for s in MICRO), []),
                 "--set", "train.batch_size=2", "--data", str(folder), "--out", str(tmp_path / "run"),
                 "--max-steps", "2", "--quiet"])
    assert code == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["skipped"] == 2 and lines[-1]["skipped_images"] == 1  # the blank image, once a step
    assert "1 images have no breast tissue; skipped 2 times" in capsys.readouterr().err


def test_collapse_guard_stops_and_keeps_the_last_good_checkpoint(labels, tmp_path):
    config = load_config("cpu-tiny", MICRO)
    # a floor above log K: every step looks collapsed, so the guard fires after `patience` steps
    with pytest.raises(TrainingStopped, match="collapse") as stopped:
        pretrain(config, labels, tmp_path / "run", max_steps=10, progress=False, guard=Guard(1.01, patience=3))
    assert "\n" not in str(stopped.value) and "last good checkpoint (step 2)" in str(stopped.value)
    assert read_metadata(tmp_path / "run" / "checkpoints" / "last.safetensors")["step"] == 2


def test_a_non_finite_loss_stops_with_one_line_and_exit_1(labels, tmp_path, capsys):
    # lr 1e30: Adam moves every weight by ~1e30 in the first step and the second step's loss is NaN
    blow_up = ["schedule.base_lr=1e30", "schedule.warmup_steps=0", "schedule.freeze_last_layer_steps=0",
               "train.checkpoint_every=1"]
    with pytest.raises(SystemExit) as stopped:
        main(["pretrain", "--config", "cpu-tiny", *sum((["--set", s] for s in MICRO + blow_up), []),
              "--data", str(labels), "--out", str(tmp_path / "run"), "--max-steps", "5", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 1 and len(err.splitlines()) == 1, err
    assert re.search(r"the loss became (nan|inf|-inf) at step 2; the last good checkpoint \(step 1\)", err), err
    assert read_metadata(tmp_path / "run" / "checkpoints" / "last.safetensors")["step"] == 1


@pytest.mark.parametrize("args, message", [
    (["--config", "cpu-tiny", "--data", "{tmp}/missing"], "no such folder"),
    (["--config", "no-such-preset", "--data", "{labels}"], "neither a preset"),
    (["--config", "cpu-tiny", "--set", "model.widht=3", "--data", "{labels}"], "unknown keys"),
    (["--config", "cpu-tiny", "--data", "{labels}", "--resume"], "holds no checkpoint"),
])
def test_bad_input_exits_2_with_one_line(labels, tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path, labels=labels) for a in args]
    code = main(["pretrain", *args, "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
