"""`mammodino pretrain --init-weights FILE` (a local timm/DINOv2/RAD-DINO backbone) and `--device`, and the
one step function that the loop and the benchmark share."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from helpers import MICRO
from timm.models.vision_transformer import VisionTransformer

from training.checkpoint import load_checkpoint, read_metadata, unprefixed
from training.cli import main
from training.ssl.presets import load_config
from training.ssl.data import PretrainDataset, StepBatches, collate
from training.ssl.pretrain import build_training
from training.ssl.step import train_step


def timm_vit(depth: int = 2) -> VisionTransformer:
    """A timm ViT of the micro config's shape (48 dims, 3 heads, patch 8) as people save them: RGB input,
    224-style position grid of another size (8 x 8 here, 4 x 4 in the model)."""
    torch.manual_seed(7)
    return VisionTransformer(img_size=64, patch_size=8, in_chans=3, embed_dim=48, depth=depth, num_heads=3,
                             init_values=1e-5, num_classes=0)


def pretrain_args(labels, out, *extra: str) -> list[str]:
    return ["pretrain", "--config", "cpu-tiny", *sum((["--set", s] for s in MICRO), []), "--data", str(labels),
            "--out", str(out), "--quiet", *extra]


def test_init_weights_start_student_and_teacher_from_the_file_and_are_recorded(labels, tmp_path, capsys):
    vit = timm_vit()
    weights = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, weights)
    out = tmp_path / "run"
    assert main(pretrain_args(labels, out, "--init-weights", str(weights), "--max-steps", "0",
                              "--device", "cpu", "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"] == "cpu" and report["init_weights"]["layout"] == "timm"
    tensors, meta = load_checkpoint(out / "checkpoints" / "last.safetensors")
    assert meta["init_weights"]["path"] == str(weights.resolve()) and len(meta["init_weights"]["sha256"]) == 64
    assert "patch_embed: 3 -> 1 channels" in meta["init_weights"]["adapted"]
    assert "--init-weights" in meta["command"]
    for side in ("student", "teacher"):
        backbone = unprefixed(f"model.{side}.backbone", tensors)
        torch.testing.assert_close(backbone["blocks.1.mlp.fc2.weight"], vit.state_dict()["blocks.1.mlp.fc2.weight"])
        # one grey channel: the RGB filters summed (exact for a grey image repeated on three channels)
        grey = vit.patch_embed.proj.weight.sum(1, keepdim=True)
        torch.testing.assert_close(backbone["patch_embed.proj.weight"], grey)
        assert backbone["pos_embed"].shape == (1, 1 + 4 * 4, 48)
    # resumed, the run keeps its record (the weights come from the checkpoint)
    assert main(pretrain_args(labels, out, "--max-steps", "1", "--resume")) == 0
    assert read_metadata(out / "checkpoints" / "last.safetensors")["init_weights"]["path"] == str(weights.resolve())


def test_init_weights_of_another_shape_exit_2_with_one_line(labels, tmp_path, capsys):
    weights = tmp_path / "deeper.safetensors"
    save_file({k: v.contiguous() for k, v in timm_vit(depth=3).state_dict().items()}, weights)
    code = main(pretrain_args(labels, tmp_path / "run", "--init-weights", str(weights), "--max-steps", "1"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "does not fit model" in err and "blocks.2" in err, err
    code = main(pretrain_args(labels, tmp_path / "run2", "--init-weights", str(tmp_path / "none.safetensors")))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no such file" in err and len(err.splitlines()) == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_exits_2_with_one_line(labels, tmp_path, capsys):
    code = main(pretrain_args(labels, tmp_path / "run", "--device", "cuda", "--max-steps", "1"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--device cuda" in err, err


def test_train_step_updates_the_student_and_the_ema_teacher(labels):
    config = load_config("cpu-tiny", MICRO + ["schedule.warmup_steps=0", "schedule.freeze_last_layer_steps=0"])
    dataset = PretrainDataset(labels, config.sampler, seed=0)
    batch = collate([dataset[k] for k in next(iter(StepBatches(dataset, 4)))])
    torch.manual_seed(0)
    model, loss, optimizer = build_training(config)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_step(model, loss, optimizer, config, batch, step=3)
    after = model.state_dict()
    assert set(result.scalars) >= {"total", "dino", "ibot", "koleo", "dbt", "teacher_entropy"}
    assert all(math.isfinite(v) for v in result.scalars.values()) and result.grad_norm > 0 and not result.stop
    name = "blocks.0.attn.qkv.weight"
    moved = (after[f"student.backbone.{name}"] - before[f"student.backbone.{name}"]).abs().max()
    followed = after[f"teacher.backbone.{name}"] - before[f"teacher.backbone.{name}"]
    # the teacher moved (1 - m) of the way to the new student: m = the momentum of step 3
    expected = (1 - result.values.momentum) * (after[f"student.backbone.{name}"] - before[f"teacher.backbone.{name}"])
    assert moved > 0
    torch.testing.assert_close(followed, expected, rtol=1e-4, atol=1e-7)
