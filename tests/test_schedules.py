"""Schedules (end points, warm-ups, batch scaling), layer-wise decay groups and gradient clipping."""

from __future__ import annotations

import math

import pytest
import torch

from training.errors import MammoInputError
from training.ssl.models import HeadConfig, ModelConfig, SSLNetwork
from training.ssl.schedules import (ScheduleConfig, apply_schedule, clip_gradients, cosine, layer_id,
    linear_warmup, param_groups, values_at)

torch.set_num_threads(2)


def test_cosine_end_points_warmup_and_midpoint():
    assert cosine(0, 1.0, 0.1, 110, warmup_steps=10) == 0.0
    assert cosine(5, 1.0, 0.1, 110, warmup_steps=10) == pytest.approx(0.5)
    assert cosine(10, 1.0, 0.1, 110, warmup_steps=10) == pytest.approx(1.0)
    assert cosine(60, 1.0, 0.1, 110, warmup_steps=10) == pytest.approx(0.55)     # half-way down
    assert cosine(110, 1.0, 0.1, 110, warmup_steps=10) == pytest.approx(0.1)
    assert cosine(10_000, 1.0, 0.1, 110, warmup_steps=10) == 0.1
    values = [cosine(s, 1.0, 0.1, 110, warmup_steps=10) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert cosine(0, 0.992, 1.0, 100) == pytest.approx(0.992) and cosine(100, 0.992, 1.0, 100) == 1.0


def test_linear_warmup():
    assert linear_warmup(0, 0.04, 0.07, 30) == 0.04
    assert linear_warmup(15, 0.04, 0.07, 30) == pytest.approx(0.055)
    assert linear_warmup(30, 0.04, 0.07, 30) == 0.07 and linear_warmup(999, 0.04, 0.07, 30) == 0.07
    assert linear_warmup(0, 0.04, 0.07, 0) == 0.07


def test_dinov2_defaults_at_their_end_points():
    c = ScheduleConfig()
    start, end = values_at(c, 0, 1024), values_at(c, c.total_steps, 1024)
    assert start.lr == 0.0 and start.last_layer_lr == 0.0
    assert values_at(c, c.warmup_steps, 1024).lr == pytest.approx(0.004)
    assert end.lr == pytest.approx(1e-6)
    assert start.momentum == pytest.approx(0.992) and end.momentum == 1.0
    assert start.teacher_temp == pytest.approx(0.04) and end.teacher_temp == pytest.approx(0.07)
    assert values_at(c, c.teacher_temp_warmup_steps // 2, 1024).teacher_temp == pytest.approx(0.055)
    assert start.weight_decay == pytest.approx(0.04) and end.weight_decay == pytest.approx(0.4)
    frozen = values_at(c, c.freeze_last_layer_steps - 1, 1024)
    thawed = values_at(c, c.freeze_last_layer_steps, 1024)
    assert frozen.last_layer_lr == 0.0 and frozen.lr > 0 and thawed.last_layer_lr == thawed.lr


def test_learning_rate_scales_with_the_batch():
    sqrt_rule = ScheduleConfig(base_lr=0.004, lr_scaling="sqrt_wrt_1024")
    assert sqrt_rule.peak_lr(64) == pytest.approx(0.004 * math.sqrt(64 / 1024))
    linear = ScheduleConfig(base_lr=5e-4, lr_scaling="linear_wrt_256")
    assert linear.peak_lr(512) == pytest.approx(1e-3)
    assert ScheduleConfig(base_lr=1e-3, lr_scaling="none").peak_lr(7) == 1e-3
    c = ScheduleConfig(total_steps=100, warmup_steps=10, lr_scaling="linear_wrt_256", base_lr=1e-3)
    assert values_at(c, 10, 128).lr == pytest.approx(5e-4)


def test_values_depend_on_the_step_only():
    c = ScheduleConfig(total_steps=500, warmup_steps=50, teacher_temp_warmup_steps=100)
    fresh = [values_at(c, s, 32) for s in range(500)]
    resumed = [values_at(c, s, 32) for s in range(250, 500)]   # as a resumed run computes them
    assert resumed == fresh[250:]


def test_schedule_config_checks_and_round_trips():
    c = ScheduleConfig(total_steps=10, warmup_steps=2)
    assert ScheduleConfig.from_dict(c.to_dict()) == c
    with pytest.raises(MammoInputError, match="total_steps"):
        ScheduleConfig(total_steps=0)
    with pytest.raises(MammoInputError, match="lr_scaling"):
        ScheduleConfig.from_dict({"lr_scaling": "cubic"})


# --- parameter groups ------------------------------------------------------------------------------

def _network(depth: int = 3) -> SSLNetwork:
    return SSLNetwork(ModelConfig(arch="tiny", embed_dim=24, depth=depth, num_heads=2, patch_size=8, img_size=16,
                                  dino_head=HeadConfig(16, 12, 4)))


def test_layer_ids_of_a_vit():
    assert layer_id("backbone.patch_embed.proj.weight", 12) == 0
    assert layer_id("backbone.cls_token", 12) == 0 and layer_id("backbone.mask_token", 12) == 0
    assert layer_id("backbone.blocks.0.attn.qkv.weight", 12) == 1
    assert layer_id("backbone.blocks.11.mlp.fc2.bias", 12) == 12
    assert layer_id("backbone.norm.weight", 12) == 13 and layer_id("dino_head.mlp.0.weight", 12) == 13
    assert layer_id("blocks.3.norm1.weight", 12) == 4   # a bare backbone's names too


def test_layerwise_decay_groups():
    net = _network(depth=3)
    groups = param_groups(net.named_parameters(), n_blocks=3, layerwise_decay=0.5, patch_embed_lr_mult=0.2)
    by_name = {name: g for g in groups for name in g["names"]}
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert set(by_name) == trainable and sum(len(g["params"]) for g in groups) == len(trainable)
    assert by_name["backbone.blocks.2.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.5)     # 0.5^(4-3)
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.125)   # 0.5^(4-1)
    assert by_name["backbone.cls_token"]["lr_multiplier"] == pytest.approx(0.0625)                # 0.5^4
    assert by_name["backbone.patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.0625 * 0.2)
    assert by_name["dino_head.mlp.0.weight"]["lr_multiplier"] == 1.0
    assert by_name["backbone.norm.weight"]["lr_multiplier"] == 1.0
    for name in ("backbone.blocks.0.attn.qkv.bias", "backbone.blocks.1.norm1.weight", "backbone.blocks.1.ls1.gamma",
                 "backbone.pos_embed", "backbone.cls_token", "backbone.mask_token", "dino_head.last_layer_g"):
        assert by_name[name]["wd_multiplier"] == 0.0, name
    for name in ("backbone.blocks.0.attn.qkv.weight", "dino_head.mlp.0.weight", "dino_head.last_layer_v"):
        assert by_name[name]["wd_multiplier"] == 1.0, name
    assert by_name["dino_head.last_layer_v"]["last_layer"] and not by_name["dino_head.mlp.0.weight"]["last_layer"]


def test_apply_schedule_sets_every_group():
    net = _network()
    optimizer = torch.optim.AdamW(param_groups(net.named_parameters(), 3, 0.5, 0.2))
    c = ScheduleConfig(total_steps=100, warmup_steps=10, freeze_last_layer_steps=20, lr_scaling="none", base_lr=1e-3)
    apply_schedule(optimizer, values_at(c, 10, 64))
    for group in optimizer.param_groups:
        expected_lr = 0.0 if group["last_layer"] else 1e-3 * group["lr_multiplier"]
        assert group["lr"] == pytest.approx(expected_lr)
        assert group["weight_decay"] == pytest.approx(values_at(c, 10, 64).weight_decay * group["wd_multiplier"])
    frozen = [p.clone() for g in optimizer.param_groups if g["last_layer"] for p in g["params"]]
    net(torch.rand(2, 1, 16, 16))["global_dino"].square().sum().backward()
    optimizer.step()
    after = [p for g in optimizer.param_groups if g["last_layer"] for p in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(frozen, after))   # lr 0 (and decoupled decay x lr 0)


def test_clip_gradients_per_part():
    net = _network()
    net(torch.rand(2, 1, 16, 16))["global_dino"].mul(1000).square().sum().backward()
    parts = {"backbone": net.backbone, "dino_head": net.dino_head}
    norms = clip_gradients(parts, max_norm=0.5)
    assert set(norms) == {"backbone", "dino_head"} and all(n > 0.5 for n in norms.values())
    for module in parts.values():
        grads = [p.grad.norm() for p in module.parameters() if p.grad is not None]
        total = torch.linalg.vector_norm(torch.stack(grads))
        assert total <= 0.5 + 1e-4
    measured = clip_gradients(parts, max_norm=0)
    assert measured["backbone"] == pytest.approx(0.5, rel=1e-3)
