"""`torchrun --nproc_per_node 2 ... mammodino pretrain` on CPUs (gloo) with the micro ViT of
test_pretrain: the two processes stay in sync, and the run is the single-process run of the same global
batches (losses and weights within floating-point tolerance), through a resume too."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import MICRO, REPO, student_weights

from training.checkpoint import read_metadata
from training.ssl.presets import load_config
from training.ssl.distributed import shard
from training.ssl.pretrain import pretrain

TERMS = ("total", "dino", "ibot", "koleo", "dbt", "teacher_entropy")
# Layer scale 0.1, not DINOv2's 1e-5: at 1e-5 the class tokens of different images start nearly equal,
# their cosine similarities round to 1.0 in float32, and KoLeo's nearest neighbour (and its -log of a
# ~1e-4 distance) is then decided by rounding: the 1e-7 differences between a batch of 4 and two of 2
# moved KoLeo by ~1% at step 3 (and any other rounding change would). With distinct tokens: ~1e-7.
SETTINGS = [*MICRO, "model.layerscale=0.1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path, labels: Path, *extra: str) -> dict:
    """Two gloo processes on this machine; returns the one JSON report (rank 0's)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "training", "pretrain", "--config", "cpu-tiny", *sum((["--set", s] for s in SETTINGS), []),
               "--data", str(labels), "--out", str(out), "--quiet", "--json", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1, done.stdout  # rank 1 prints nothing
    return reports[0]


def test_shards_are_contiguous_and_cover_the_batch():
    items = list(range(7))
    parts = [shard(items, r, 3) for r in range(3)]
    assert sum(parts, []) == items and sorted(len(p) for p in parts) == [2, 2, 3]
    assert [shard(items, r, 1) for r in range(1)] == [items]


def test_two_processes_stay_in_sync_and_match_one_process_through_a_resume(labels, tmp_path):
    # 4 items a step split 2 + 2 (a DBT pair gives two images, so the shares' sizes can differ):
    # DINO and iBOT are share-weighted, KoLeo and the DBT InfoNCE use the gathered whole batch.
    end = 3
    config = load_config("cpu-tiny", SETTINGS)
    pretrain(config, labels, tmp_path / "one", max_steps=end, progress=False)
    first = torchrun(tmp_path / "two", labels, "--max-steps", "2")
    assert first["world_size"] == 2 and first["step"] == 2
    resumed = torchrun(tmp_path / "two", labels, "--max-steps", str(end), "--resume")
    assert resumed["start_step"] == 2 and resumed["step"] == end

    # (a) the replicas: every process's student, teacher and centres hash the same at each checkpoint
    for name in ("step_0000002.safetensors", "last.safetensors"):
        digests = read_metadata(tmp_path / "two" / "checkpoints" / name)["replica_digests"]
        assert len(digests) == 2 and digests[0] == digests[1]
    # (b) the losses of each step equal the single-process ones on the same global batch
    one, two = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                for run in ("one", "two"))
    assert [m["step"] for m in two] == [m["step"] for m in one] == [1, 2, 3]
    assert any(m["dbt"] > 0 for m in two)  # pairs of both volumes met across the two shares
    for a, b in zip(one, two):
        for term in TERMS:
            assert b[term] == pytest.approx(a[term], rel=1e-4, abs=1e-6), (a["step"], term)
    # and so do the weights after the same updates, but for the key biases: softmax ignores a shift of
    # every logit, so their true gradient is 0 and Adam (g / sqrt(v)) moves them by rounding noise
    single, ddp = student_weights(tmp_path / "one"), student_weights(tmp_path / "two")
    assert single.keys() == ddp.keys()
    for name in single:
        a, b = single[name], ddp[name]
        if name.endswith("attn.qkv.bias"):
            a, b = (torch.cat([t[: len(t) // 3], t[2 * len(t) // 3:]]) for t in (a, b))  # query and value
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_bf16_autocast_and_activation_checkpointing_are_options(labels, tmp_path):
    # the GPU options also run on a CPU: bf16 rounds the forward passes (the losses move a little, the
    # float32 losses do not), activation checkpointing only recomputes (the same numbers)
    runs = {"fp32": [], "bf16": ["train.precision=bf16"], "recompute": ["model.grad_checkpointing=true"]}
    first = {}
    for name, extra in runs.items():
        pretrain(load_config("cpu-tiny", SETTINGS + extra), labels, tmp_path / name, max_steps=1, progress=False)
        first[name] = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])["dino"]
    assert first["recompute"] == pytest.approx(first["fp32"], rel=1e-6)
    assert first["bf16"] != first["fp32"] and first["bf16"] == pytest.approx(first["fp32"], rel=2e-2)
