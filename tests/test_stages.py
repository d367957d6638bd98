"""Pretraining in stages: `mammodino pretrain --from RUN` starts a later stage (new crops, schedule, data)
from an earlier stage's student, teacher and centres, as the recipes end with a short high-resolution stage;
and `export_state` writes the small file a run can be continued from on another machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.checkpoint import load_checkpoint, read_metadata, unprefixed
from training.cli import main
from training.ssl.pretrain import export_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAMPLES = Path(__file__).resolve().parents[1] / "sample_data"

SMALL = ["model.embed_dim=48", "model.depth=2", "model.num_heads=3", "model.dino_head.n_prototypes=64",
         "model.dino_head.hidden_dim=64", "model.dino_head.bottleneck_dim=32", "train.batch_size=4",
         "train.num_workers=0", "train.checkpoint_every=2"]


def pretrain(config: str, out, *extra: str) -> int:
    return main(["pretrain", "--config", config, *sum((["--set", s] for s in SMALL), []), "--data",
                 str(SAMPLES / "labels.csv"), "--out", str(out), "--no-cache", "--quiet", *extra])


def weights(run, side: str) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(run / "checkpoints" / "last.safetensors")
    return unprefixed(f"model.{side}", tensors)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    out = tmp_path_factory.mktemp("stages") / "stage1"
    assert pretrain("cpu-small", out, "--max-steps", "2") == 0
    return out


def test_a_later_stage_starts_from_the_earlier_teacher_and_student_and_records_it(first, tmp_path):
    second = tmp_path / "stage2"
    assert pretrain("cpu-small-hires", second, "--from", str(first), "--max-steps", "0") == 0
    for side in ("student", "teacher"):
        before, after = weights(first, side), weights(second, side)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    meta = read_metadata(second / "checkpoints" / "last.safetensors")
    assert meta["init_from"]["step"] == 2 and meta["init_from"]["config"] == "cpu-small"
    assert meta["config"]["sampler"]["global_size"] == 192 and "--from" in meta["command"]
    # it trains at the new crop size and, resumed, keeps saying where it began
    assert pretrain("cpu-small-hires", second, "--max-steps", "1", "--resume") == 0
    assert read_metadata(second / "checkpoints" / "last.safetensors")["init_from"]["step"] == 2


def test_a_stage_of_another_network_exits_2_with_one_line(first, tmp_path, capsys):
    code = pretrain("cpu-tiny", tmp_path / "other", "--from", str(first), "--max-steps", "1")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "its model differs" in err
    assert not (tmp_path / "other").exists()
    code = pretrain("cpu-small-hires", tmp_path / "none", "--from", str(tmp_path / "missing"))
    assert code == 2 and "no pretraining checkpoint" in capsys.readouterr().err


def test_an_exported_state_is_small_and_continues_from_the_teacher(first, tmp_path):
    state = export_state(first, tmp_path / "state.safetensors")
    full = first / "checkpoints" / "last.safetensors"
    assert state.stat().st_size < full.stat().st_size / 3  # fp16 teacher only: no student, no AdamW moments
    meta = read_metadata(state)
    assert meta["kind"] == "pretraining-state" and meta["step"] == 2 and "optimizer" not in meta
    second = tmp_path / "continued"
    assert pretrain("cpu-small", second, "--from", str(state), "--max-steps", "0") == 0
    teacher = weights(first, "teacher")
    for side in ("student", "teacher"):
        continued = weights(second, side)
        # both start from the teacher, rounded through fp16
        assert all(torch.allclose(continued[k], teacher[k], rtol=1e-3, atol=1e-3) for k in teacher)
