"""Constants and small helpers that several test modules share (fixtures live in conftest.py; no test
module imports another)."""

from __future__ import annotations

import csv
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from training.checkpoint import load_checkpoint, unprefixed

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_data"
EXAM = SAMPLES / "exam"  # four small FFDM views

# A micro ViT for pretraining tests: 2 blocks, 48 dims, 32 px crops, patch 8.
MICRO = [
    "model.embed_dim=48", "model.depth=2", "model.num_heads=3", "model.patch_size=8", "model.img_size=32",
    "model.dino_head.n_prototypes=64", "model.dino_head.hidden_dim=64", "model.dino_head.bottleneck_dim=32",
    "sampler.patch_size=8", "sampler.global_size=32", "sampler.local_size=16", "sampler.n_local=2",
    "train.batch_size=4", "train.num_workers=0", "train.log_every=1", "train.checkpoint_every=2",
    "schedule.total_steps=40", "schedule.warmup_steps=4", "schedule.teacher_temp_warmup_steps=10",
    "schedule.freeze_last_layer_steps=2", "schedule.lr_scaling=none", "schedule.base_lr=0.002",
]
# cpu-tiny shrunk further so that a jobs-test step takes a fraction of a second on a CI core.
TINY = ["train.batch_size=2", "train.log_every=1", "train.num_workers=0", "model.depth=1",
        "model.img_size=32", "sampler.global_size=32", "sampler.local_size=16", "sampler.n_local=2",
        "model.dino_head.n_prototypes=32", "model.dino_head.hidden_dim=32", "model.dino_head.bottleneck_dim=16"]


def student_weights(run: Path) -> dict[str, torch.Tensor]:
    """The student's tensors in a run folder's last checkpoint."""
    tensors, _ = load_checkpoint(run / "checkpoints" / "last.safetensors")
    return unprefixed("model.student", tensors)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """``rows`` as a CSV at ``path`` (columns of the first row), as a user's edited labels file."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def terminated_when(path: Path, command: Sequence[str], env: dict[str, str] | None = None,
                    seconds: float = 120) -> tuple[int, str, str]:
    """Run ``command`` (in the repository), send it SIGTERM once ``path`` exists (a run's first metrics
    line) and wait for it: (exit status, stdout, stderr). The process must still be running then."""
    process = subprocess.Popen(list(command), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    try:
        deadline = time.monotonic() + seconds
        while not path.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert process.poll() is None, process.communicate()[1]
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=seconds)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, stdout, stderr


def phantom_labels(folder: Path, n: int, seed: int = 3) -> Path:
    """``n`` small FFDM phantoms (128 x 104, one patient each, lesions of every kind) in ``folder``, and
    their labels CSV (density, lesion, lesion_type, birads, masks...)."""
    from training.phantom.dataset import generate

    generate(folder, "ffdm", n, seed=seed, lesion="any", shape=(128, 104), workers=2, progress=False)
    return folder / "labels.csv"
