"""Backbone, heads, student/teacher and weight loading; the pretraining configs that describe them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from training.ssl.presets import PretrainConfig, load_config, preset_names
from training.errors import MammoInputError
from training.ssl.models import (DINOHead, HeadConfig, ModelConfig, SSLNetwork, StudentTeacher, ViTBackbone,
    load_backbone_weights)

torch.set_num_threads(2)

SMALL_HEAD = HeadConfig(n_prototypes=32, hidden_dim=24, bottleneck_dim=8)


def tiny(**changes) -> ModelConfig:
    """A 2-block, 48-wide ViT with patch 8: the real code paths at test speed."""
    values = dict(arch="tiny", embed_dim=48, depth=2, num_heads=3, patch_size=8, img_size=32,
                  drop_path_rate=0.0, dino_head=SMALL_HEAD)
    values.update(changes)
    return ModelConfig(**values)


# --- backbone --------------------------------------------------------------------------------------

def test_same_weights_take_two_crop_sizes_and_a_larger_image():
    torch.manual_seed(0)
    backbone = ViTBackbone(tiny()).eval()
    for size, grid in ((32, (4, 4)), (16, (2, 2)), (64, (8, 8))):
        tokens = backbone.forward_tokens(torch.rand(3, 1, size, size))
        assert tokens.cls.shape == (3, 48) and tokens.patches.shape == (3, grid[0] * grid[1], 48)
        assert tokens.grid == grid and tokens.registers.shape == (3, 0, 48)
    tall = backbone.forward_tokens(torch.rand(1, 1, 48, 24))
    assert tall.grid == (6, 3)
    assert backbone(torch.rand(2, 1, 32, 32)).shape == (2, 48)  # the class token downstream


def test_register_tokens():
    backbone = ViTBackbone(tiny(reg_tokens=4)).eval()
    tokens = backbone.forward_tokens(torch.rand(2, 1, 32, 32))
    assert tokens.registers.shape == (2, 4, 48) and tokens.patches.shape == (2, 16, 48)
    assert backbone.pos_embed.shape == (1, 16, 48)  # registers (and the class token) carry no position
    assert "reg_token" in backbone.state_dict()


def test_crop_size_must_be_a_multiple_of_the_patch():
    backbone = ViTBackbone(tiny())
    with pytest.raises(MammoInputError, match="multiple of the patch size 8"):
        backbone.forward_tokens(torch.rand(1, 1, 30, 32))


def test_mask_token_replaces_masked_patches_only():
    torch.manual_seed(1)
    backbone = ViTBackbone(tiny()).eval()
    with torch.no_grad():
        backbone.mask_token.normal_()
    images = torch.rand(2, 1, 32, 32)
    none = torch.zeros(2, 4, 4, dtype=torch.bool)
    plain = backbone.forward_tokens(images)
    assert torch.allclose(backbone.forward_tokens(images, none).patches, plain.patches)
    masks = none.clone()
    masks[0, 1, 2] = True
    masked = backbone.forward_tokens(images, masks)
    assert not torch.allclose(masked.patches[0], plain.patches[0])
    assert torch.allclose(masked.patches[1], plain.patches[1])        # the other image is untouched
    backbone.forward_tokens(images, masks).cls.sum().backward()
    assert backbone.mask_token.grad.abs().sum() > 0                   # the mask token is learnt
    with pytest.raises(ValueError, match="patch grid"):
        backbone.forward_tokens(images, torch.zeros(2, 3, 3, dtype=torch.bool))


def test_uniform_drop_path_and_layerscale():
    backbone = ViTBackbone(tiny(drop_path_rate=0.2, drop_path_uniform=True, depth=3))
    rates = [b.drop_path1.drop_prob for b in backbone.blocks] + [b.drop_path2.drop_prob for b in backbone.blocks]
    assert rates == [0.2] * 6
    assert torch.allclose(backbone.blocks[0].ls1.gamma, torch.full((48,), 1e-5))


# --- heads -----------------------------------------------------------------------------------------

def test_dino_head_gives_scaled_cosines():
    head = DINOHead(48, SMALL_HEAD)
    x = torch.randn(5, 48)
    logits = head(x)
    assert logits.shape == (5, 32)
    assert logits.abs().max() <= 1.0 + 1e-6          # gain 1: cosine between bottleneck and prototypes
    with torch.no_grad():
        head.last_layer_g.mul_(3.0)
    assert torch.allclose(head(x), 3.0 * logits, atol=1e-6)
    assert head.last_layer_g.requires_grad                               # DINOv2: learnable gain
    assert not DINOHead(48, HeadConfig(32, 24, 8, norm_last_layer=True)).last_layer_g.requires_grad


# --- student / teacher -----------------------------------------------------------------------------

def test_network_outputs_for_a_multi_crop_batch():
    torch.manual_seed(2)
    net = SSLNetwork(tiny())
    masks = torch.zeros(4, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True
    masks[3, 3, :] = True
    out = net(torch.rand(4, 1, 32, 32), torch.rand(6, 1, 16, 16), masks)
    assert out["global_cls"].shape == (4, 48) and out["global_patch_mean"].shape == (4, 48)
    assert out["global_dino"].shape == (4, 32) and out["local_dino"].shape == (6, 32)
    assert out["local_cls"].shape == (6, 48) and out["ibot"].shape == (8, 32)
    separate = SSLNetwork(tiny(ibot_head=HeadConfig(16, 24, 8)))
    assert separate(torch.rand(4, 1, 32, 32), None, masks)["ibot"].shape == (8, 16)


def test_shared_head_gives_the_same_logits_as_calling_it_per_input():
    torch.manual_seed(3)
    net = SSLNetwork(tiny()).eval()
    crops, masks = torch.rand(2, 1, 32, 32), torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[1, 0, 0] = True
    out = net(crops, None, masks)
    tokens = net.backbone.forward_tokens(crops, masks)
    assert torch.allclose(out["global_dino"], net.dino_head(tokens.cls), atol=1e-5)
    assert torch.allclose(out["ibot"], net.dino_head(tokens.patches[1, :1]), atol=1e-5)


def test_teacher_starts_equal_gets_no_gradients_and_stays_in_eval():
    model = StudentTeacher(tiny(drop_path_rate=0.1))
    for (name, s), (_, t) in zip(model.student.named_parameters(), model.teacher.named_parameters()):
        assert torch.equal(s, t), name
        assert not t.requires_grad
    model.train()
    assert model.student.training and not model.teacher.training
    out = model.forward_teacher(torch.rand(2, 1, 32, 32))
    assert not out["global_dino"].requires_grad


def test_ema_update_math():
    torch.manual_seed(4)
    model = StudentTeacher(tiny())
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    before = [t.clone() for t in model.teacher.parameters()]
    model.update_teacher(0.9)
    for old, s, t in zip(before, model.student.parameters(), model.teacher.parameters()):
        assert torch.allclose(t, 0.9 * old + 0.1 * s, atol=1e-6)
    frozen = [t.clone() for t in model.teacher.parameters()]
    model.update_teacher(1.0)
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.teacher.parameters()))
    model.update_teacher(0.0)
    assert all(torch.equal(s, t) for s, t in zip(model.student.parameters(), model.teacher.parameters()))


# --- weights from elsewhere ------------------------------------------------------------------------

def _timm_rgb(config: ModelConfig, img_size: int) -> VisionTransformer:
    dim, depth, heads = config.dims
    return VisionTransformer(img_size=img_size, patch_size=config.patch_size, in_chans=3, num_classes=0,
                             embed_dim=dim, depth=depth, num_heads=heads, init_values=1e-5,
                             reg_tokens=config.reg_tokens, no_embed_class=config.reg_tokens > 0).eval()


def test_timm_rgb_weights_load_exactly_for_grey_input(tmp_path):
    torch.manual_seed(5)
    config = tiny()
    reference = _timm_rgb(config, 32)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    backbone = ViTBackbone(config).eval()
    report = load_backbone_weights(backbone, path)
    assert report["layout"] == "timm" and any("3 -> 1" in a for a in report["adapted"])
    grey = torch.rand(2, 1, 32, 32)
    normalised = ((grey - config.pixel_mean) / config.pixel_std).expand(-1, 3, -1, -1)
    expected = reference.forward_features(normalised)
    assert torch.allclose(backbone.forward_tokens(grey).cls, expected[:, 0], atol=1e-5)


def test_position_embeddings_are_resampled_from_a_larger_grid(tmp_path):
    torch.manual_seed(6)
    config = tiny()
    reference = _timm_rgb(config, 64)            # 8 x 8 grid in the file, 4 x 4 in the model
    path = tmp_path / "vit64.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    backbone = ViTBackbone(config)
    load_backbone_weights(backbone, path)
    expected = resample_abs_pos_embed(reference.pos_embed, new_size=(4, 4), old_size=(8, 8), num_prefix_tokens=1)
    assert torch.allclose(backbone.pos_embed, expected, atol=1e-6)


def _huggingface_names(state: dict[str, torch.Tensor], depth: int, dim: int) -> dict[str, torch.Tensor]:
    """A timm-named backbone state under the names of Hugging Face's Dinov2Model (RAD-DINO's layout)."""
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": state["mask_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"],
    }
    for i in range(depth):
        b, e = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = state[b + f"attn.qkv.{kind}"].split(dim)
            out[e + f"attention.attention.query.{kind}"] = q
            out[e + f"attention.attention.key.{kind}"] = k
            out[e + f"attention.attention.value.{kind}"] = v
            out[e + f"attention.output.dense.{kind}"] = state[b + f"attn.proj.{kind}"]
            out[e + f"norm1.{kind}"] = state[b + f"norm1.{kind}"]
            out[e + f"norm2.{kind}"] = state[b + f"norm2.{kind}"]
            out[e + f"mlp.fc1.{kind}"] = state[b + f"mlp.fc1.{kind}"]
            out[e + f"mlp.fc2.{kind}"] = state[b + f"mlp.fc2.{kind}"]
        out[e + "layer_scale1.lambda1"] = state[b + "ls1.gamma"]
        out[e + "layer_scale2.lambda1"] = state[b + "ls2.gamma"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def test_hugging_face_dinov2_layout_loads_to_the_same_network(tmp_path):
    torch.manual_seed(7)
    config = tiny()
    source = ViTBackbone(config).eval()
    with torch.no_grad():
        source.mask_token.normal_()
        for block in source.blocks:
            block.ls1.gamma.fill_(0.5)   # make the blocks matter, so a wrong mapping shows
            block.ls2.gamma.fill_(0.5)
    path = tmp_path / "rad-dino.safetensors"
    save_file({"dinov2." + k: v for k, v in _huggingface_names(source.state_dict(), 2, 48).items()}, str(path))
    target = ViTBackbone(config).eval()
    report = load_backbone_weights(target, path)
    assert report["layout"] == "huggingface"
    images, masks = torch.rand(2, 1, 32, 32), torch.rand(2, 4, 4) < 0.3
    assert torch.allclose(target.forward_tokens(images, masks).patches, source.forward_tokens(images, masks).patches,
                          atol=1e-5)


def test_original_dinov2_layout_with_registers(tmp_path):
    torch.manual_seed(8)
    config = tiny(reg_tokens=2)
    source = ViTBackbone(config).eval()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    # Original DINOv2: the class token has a position (here 0, so ours equals it) and registers are named so.
    state["pos_embed"] = torch.cat([torch.zeros(1, 1, 48), state.pop("pos_embed")], dim=1)
    state["register_tokens"] = state.pop("reg_token")
    path = tmp_path / "dinov2_reg.safetensors"
    save_file(state, str(path))
    target = ViTBackbone(config).eval()
    assert load_backbone_weights(target, path)["layout"] == "dinov2"
    images = torch.rand(1, 1, 32, 32)
    assert torch.allclose(target.forward_tokens(images).cls, source.forward_tokens(images).cls, atol=1e-5)


def test_weights_that_do_not_fit_are_refused_with_names(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in _timm_rgb(tiny(depth=3), 32).state_dict().items()}, str(path))
    with pytest.raises(MammoInputError, match=r"does not fit model arch=tiny.*unexpected \['blocks\.2"):
        load_backbone_weights(ViTBackbone(tiny()), path)
    wide = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in _timm_rgb(tiny(embed_dim=96), 32).state_dict().items()}, str(wide))
    with pytest.raises(MammoInputError, match="in the file"):
        load_backbone_weights(ViTBackbone(tiny()), wide)


def test_student_teacher_load_backbone_initialises_both(tmp_path):
    torch.manual_seed(9)
    source = ViTBackbone(tiny())
    path = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = StudentTeacher(tiny())
    model.load_backbone(path)
    for name, value in source.state_dict().items():
        assert torch.equal(model.student.backbone.state_dict()[name], value)
        assert torch.equal(model.teacher.backbone.state_dict()[name], value)


def test_a_pickle_is_never_loaded_as_weights(tmp_path):
    path = tmp_path / "weights.safetensors"
    torch.save(ViTBackbone(tiny()).state_dict(), path)
    with pytest.raises(MammoInputError, match="not a safetensors file"):
        load_backbone_weights(ViTBackbone(tiny()), path)


# --- configs ---------------------------------------------------------------------------------------

def test_model_config_round_trips_through_json():
    config = tiny(reg_tokens=4, ibot_head=HeadConfig(16, 24, 8))
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(MammoInputError, match="unknown keys.*'depht'"):
        ModelConfig.from_dict({"depht": 3})
    with pytest.raises(MammoInputError, match="model.reg_tokens: expected an integer"):
        ModelConfig.from_dict({"reg_tokens": "four"})
    with pytest.raises(MammoInputError, match="multiple of patch_size"):
        ModelConfig(img_size=100, patch_size=14)


def test_presets_load_and_fit_together():
    assert {"cpu-tiny", "vits14", "vitb14"} <= set(preset_names())
    tiny_preset = load_config("cpu-tiny")
    assert tiny_preset.name == "cpu-tiny"
    assert tiny_preset.model.arch == "tiny" and tiny_preset.model.patch_size == 16
    assert (tiny_preset.sampler.global_size, tiny_preset.sampler.local_size) == (96, 48)
    for name, arch in (("vits14", "small"), ("vitb14", "base")):
        preset = load_config(name)
        assert preset.model.arch == arch and preset.model.patch_size == 14
        assert preset.model.dino_head == HeadConfig(65536, 2048, 256, 3)      # DINOv2's heads
        assert preset.sampler.local_size % 14 == 0 and preset.sampler.global_size == 224
        assert preset.schedule.momentum_teacher == 0.992 and preset.schedule.teacher_temp == 0.07
    round_trip = PretrainConfig.from_dict(json.loads(json.dumps(tiny_preset.to_dict())))
    assert round_trip == tiny_preset


def test_overrides_and_their_errors(tmp_path):
    config = load_config("cpu-tiny", ["schedule.base_lr=1e-3", "loss.centering=softmax_center",
                                      "model.dino_head.n_prototypes=512", "train.batch_size=8"])
    assert config.schedule.base_lr == 1e-3 and config.loss.centering == "softmax_center"
    assert config.model.dino_head.n_prototypes == 512 and config.train.batch_size == 8
    with pytest.raises(MammoInputError, match="unknown keys"):
        load_config("cpu-tiny", ["schedule.base_rl=1"])
    with pytest.raises(MammoInputError, match="section.key=value"):
        load_config("cpu-tiny", ["base_lr"])
    with pytest.raises(MammoInputError, match="not a multiple of model.patch_size"):
        load_config("cpu-tiny", ["sampler.local_size=40"])
    with pytest.raises(MammoInputError, match="neither a preset"):
        load_config("no-such-preset")
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps({"model": {"arch": "tiny", "patch_size": 16, "img_size": 96},
                                  "sampler": {"patch_size": 16, "global_size": 96, "local_size": 48}}))
    assert load_config(custom).name == "mine"
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(MammoInputError, match="not valid JSON"):
        load_config(broken)
