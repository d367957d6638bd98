"""Checkpoints: safetensors + JSON round trips, atomic writes, and refusal of anything that unpickles."""

from __future__ import annotations

import json
import pickle

import pytest
import safetensors.torch
import torch

import training.checkpoint as checkpoint
from training.checkpoint import (
    FORMAT, load_checkpoint, load_optimizer_state, load_tensors, optimizer_state, prefixed, provenance,
    read_metadata, save_checkpoint, unprefixed,
)
from training.errors import MammoInputError
from training.ssl.losses import LossConfig, MammoDINOLoss
from training.ssl.models import HeadConfig, ModelConfig, StudentTeacher
from training.ssl.schedules import param_groups

torch.set_num_threads(2)

CONFIG = ModelConfig(arch="tiny", embed_dim=24, depth=2, num_heads=2, patch_size=8, img_size=16,
                     drop_path_rate=0.0, dino_head=HeadConfig(16, 12, 4))


def _forbid_unpickling(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load / pickle must never be called by checkpoint loading")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    """Every test here fails if anything reaches for torch.load or pickle."""
    _forbid_unpickling(monkeypatch)


def test_round_trip_of_tensors_and_metadata(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {
        "a": base, "view": base[1:],                      # shares memory with "a"
        "bf16": torch.randn(5).to(torch.bfloat16), "step": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 3), "flag": torch.tensor([True, False]),
    }
    meta = {"model": CONFIG.to_dict(), "metrics": {"loss": 1.5}, "rng": [1, 2, 3], "note": "ünïcode"}
    path = save_checkpoint(tmp_path / "ckpt.safetensors", tensors, meta)
    loaded, got = load_checkpoint(path)
    assert set(loaded) == set(tensors)
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value), name
    assert got == {"format": FORMAT, **meta}
    assert read_metadata(path) == got
    assert ModelConfig.from_dict(got["model"]) == CONFIG


def test_model_and_loss_state_round_trip_gives_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = StudentTeacher(CONFIG)
    loss = MammoDINOLoss(LossConfig(), 16)
    with torch.no_grad():
        loss.dino_targets.center.normal_()
        for p in model.student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tensors = {**prefixed("model", model.state_dict()), **prefixed("loss", loss.state_dict())}
    path = save_checkpoint(tmp_path / "m.safetensors", tensors, {"model": CONFIG.to_dict()})
    loaded, meta = load_checkpoint(path)
    again = StudentTeacher(ModelConfig.from_dict(meta["model"]))
    again.load_state_dict(unprefixed("model", loaded))
    loss_again = MammoDINOLoss(LossConfig(), 16)
    loss_again.load_state_dict(unprefixed("loss", loaded))
    images = torch.rand(2, 1, 16, 16)
    model.eval()
    again.eval()
    assert torch.equal(again.forward_student(images)["global_dino"], model.forward_student(images)["global_dino"])
    assert torch.equal(again.forward_teacher(images)["global_dino"], model.forward_teacher(images)["global_dino"])
    assert torch.equal(loss_again.dino_targets.center, loss.dino_targets.center)


def _train_step(model: StudentTeacher, optimizer: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    out = model.forward_student(torch.rand(2, 1, 16, 16, generator=g))
    optimizer.zero_grad()
    out["global_dino"].square().mean().backward()
    optimizer.step()


def test_optimizer_state_round_trip_continues_identically(tmp_path):
    torch.manual_seed(1)
    model = StudentTeacher(CONFIG)
    optimizer = torch.optim.AdamW(param_groups(model.student.named_parameters(), 2), lr=1e-2, betas=(0.9, 0.99))
    for seed in range(2):
        _train_step(model, optimizer, seed)
    tensors, meta = optimizer_state(optimizer)
    path = save_checkpoint(tmp_path / "o.safetensors", {**tensors, **prefixed("model", model.state_dict())},
                           {"optimizer": meta})
    json.dumps(meta)  # the optimiser's non-tensor state is plain JSON
    loaded, got = load_checkpoint(path)
    resumed = StudentTeacher(CONFIG)
    resumed.load_state_dict(unprefixed("model", loaded))
    resumed_optimizer = torch.optim.AdamW(param_groups(resumed.student.named_parameters(), 2), lr=1e-2)
    load_optimizer_state(resumed_optimizer, loaded, got["optimizer"])
    assert resumed_optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    _train_step(model, optimizer, 2)
    _train_step(resumed, resumed_optimizer, 2)
    for a, b in zip(model.student.parameters(), resumed.student.parameters()):
        assert torch.equal(a, b)
    other = torch.optim.AdamW([p for p in resumed.student.parameters()][:3])
    with pytest.raises(MammoInputError, match="parameter groups"):
        load_optimizer_state(other, loaded, got["optimizer"])


def test_a_failing_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.safetensors", {"w": torch.ones(1000)}, {"step": 1})
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:      # half a file, then the disk fills up
            f.write(b"\x00" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, {"w": torch.zeros(1000)}, {"step": 2})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]   # no temporary file left
    assert read_metadata(path)["step"] == 1


def test_metadata_that_is_not_json_writes_nothing(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "x.safetensors", {"w": torch.ones(1)}, {"bad": object()})
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path / "x.safetensors", {"w": torch.ones(1)}, {"loss": float("nan")})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MammoInputError, match=".safetensors"):
        save_checkpoint(tmp_path / "x.pt", {"w": torch.ones(1)}, {})


def test_pickle_files_are_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.undo()  # torch.save itself pickles: write the files first, then forbid unpickling again
    zipped = tmp_path / "zip.safetensors"
    torch.save({"w": torch.ones(3)}, zipped)
    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    _forbid_unpickling(monkeypatch)
    for path, hint in ((zipped, "zip archive"), (raw, "pickle")):
        for load in (load_checkpoint, load_tensors, read_metadata):
            with pytest.raises(MammoInputError, match=hint) as info:
                load(path)
            message = str(info.value)
            assert "\n" not in message and "never unpickles" in message


def test_damaged_or_truncated_files_are_refused(tmp_path):
    good = save_checkpoint(tmp_path / "good.safetensors", {"w": torch.ones(64)}, {"step": 3})
    data = good.read_bytes()
    n = int.from_bytes(data[:8], "little")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(data[:8] + b"#" * n + data[8 + n:])
    with pytest.raises(MammoInputError, match="damaged safetensors header"):
        load_checkpoint(damaged)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-16])
    with pytest.raises(MammoInputError, match="truncated"):
        load_checkpoint(truncated)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(MammoInputError, match="not a safetensors file"):
        load_checkpoint(tiny)
    with pytest.raises(MammoInputError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_foreign_safetensors_load_as_tensors_but_not_as_checkpoints(tmp_path):
    path = tmp_path / "timm.safetensors"
    safetensors.torch.save_file({"cls_token": torch.zeros(1, 1, 4)}, str(path))
    tensors, meta = load_tensors(path)
    assert meta == {} and tensors["cls_token"].shape == (1, 1, 4)
    with pytest.raises(MammoInputError, match="not a MammoDINO checkpoint"):
        load_checkpoint(path)


def test_provenance_names_the_commit_and_command():
    record = provenance(["mammodino", "pretrain", "--config", "cpu-tiny"], data="phantoms/")
    assert record["command"][:2] == ["mammodino", "pretrain"] and record["data"] == "phantoms/"
    commit = record["git_commit"]
    if commit is not None:  # a source tree outside git (an unpacked wheel) has none
        assert len(commit.split("+")[0]) == 40
    assert record["versions"]["torch"] == torch.__version__
    json.dumps(record)
