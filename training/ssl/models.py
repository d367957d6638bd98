"""MammoDINO's networks: a timm ViT backbone that takes single-channel crops of any size, DINO/iBOT
projection heads, and the student/teacher pair of self-distillation.

* Backbone. A timm ``VisionTransformer`` (presets tiny, small, base, large; patch 14 or 16) with
  ``dynamic_img_size=True``: the position embeddings are stored for ``img_size`` (the global crop size)
  and resampled bicubically for any other size, so the same weights take 224 px global crops, 96/98 px
  local crops and 518+ px images at inference. Input is one channel (``in_chans=1``), pixels in [0, 1]
  normalised inside the model by ``pixel_mean``/``pixel_std`` so that training and inference cannot
  disagree. Optional register tokens (Darcet et al. 2024, "Vision Transformers Need Registers"); with
  registers the position embeddings cover the patches only (timm's DINOv2-with-registers convention).
  A learnt ``mask_token`` replaces the patch embeddings of iBOT-masked patches before the position
  embeddings are added (iBOT, Zhou et al. 2022; DINOv2, Oquab et al. 2023). Layer scale 1e-5 and
  uniform drop path follow DINOv2's defaults.
* Heads. DINO head (Caron et al. 2021, DINOv2): MLP in -> hidden -> ... -> bottleneck, L2
  normalisation, then weight-normalised prototypes without bias. ``norm_last_layer=False`` keeps the
  prototypes' gain learnable as DINOv2 does (initialised at 1); ``True`` fixes it at 1 as DINO did.
  The iBOT head is the DINO head (DINOv2's default) or a separate one.
* Student/teacher. :class:`StudentTeacher` holds two :class:`SSLNetwork` (backbone + heads); the
  teacher is an exponential moving average of the student, never receives gradients and always runs
  in eval mode (no drop path). Crops are batched view-major: crop ``v`` of image ``b`` is row
  ``v * B + b``, as DINOv2's collate lays them out.

No network access: backbones are built with random weights; :meth:`StudentTeacher.load_backbone` and
:func:`load_backbone_weights` initialise from a local ``.safetensors`` file in timm, original DINOv2 or
Hugging Face ``Dinov2Model`` layout (RAD-DINO), refusing anything else with one clear line.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import DropPath
from timm.models import adapt_input_conv, checkpoint_seq
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from training.checkpoint import load_tensors
from training.config import from_dict, to_dict
from training.errors import MammoInputError

# (embed_dim, depth, num_heads) of the ViT sizes (Dosovitskiy et al. 2021; DeiT for tiny).
ARCHS: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


# --- configuration ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadConfig:
    """A DINO/iBOT projection head. Defaults are DINOv2's (``ssl_default_config.yaml``)."""

    n_prototypes: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    n_layers: int = 3
    norm_last_layer: bool = False   # DINOv2 keeps the prototypes' weight-norm gain learnable

    def __post_init__(self) -> None:
        for name in ("n_prototypes", "hidden_dim", "bottleneck_dim", "n_layers"):
            if getattr(self, name) < 1:
                raise MammoInputError(f"head: {name} must be a positive integer")


@dataclass(frozen=True)
class ModelConfig:
    """Backbone and heads, as data (JSON round trip through :meth:`to_dict`/:meth:`from_dict`)."""

    arch: Literal["tiny", "small", "base", "large"] = "small"
    patch_size: int = 14
    img_size: int = 224                 # grid the position embeddings are stored at (the global crop size)
    in_chans: int = 1
    reg_tokens: int = 0
    embed_dim: int | None = None        # None: the arch's; set these three only for experiments and tests
    depth: int | None = None
    num_heads: int | None = None
    layerscale: float | None = 1e-5     # DINOv2 layerscale; None: no layer scale
    drop_path_rate: float = 0.1
    drop_path_uniform: bool = True      # DINOv2: the same rate in every block (timm: linear in depth)
    pixel_mean: float = 0.449           # mean of ImageNet's RGB means: DINOv2/ImageNet weights see what they know
    pixel_std: float = 0.226
    grad_checkpointing: bool = False    # recompute blocks in backward (saves activation memory on GPUs)
    dino_head: HeadConfig = field(default_factory=HeadConfig)
    ibot_head: HeadConfig | None = None  # None: iBOT shares the DINO head (DINOv2's default)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise MammoInputError(f"model config: arch must be one of {sorted(ARCHS)}, not {self.arch!r}")
        problems = []
        if self.patch_size < 1 or self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        if self.in_chans not in (1, 3):
            problems.append("in_chans must be 1 (grey crops) or 3 (the grey crop repeated)")
        if self.reg_tokens < 0:
            problems.append("reg_tokens must be >= 0")
        if not 0 <= self.drop_path_rate < 1:
            problems.append("drop_path_rate must be in [0, 1)")
        if self.pixel_std <= 0:
            problems.append("pixel_std must be positive")
        dim, _, heads = self.dims
        if dim % heads:
            problems.append(f"embed_dim {dim} must be a multiple of num_heads {heads}")
        if problems:
            raise MammoInputError("model config: " + "; ".join(problems))

    @property
    def dims(self) -> tuple[int, int, int]:
        """(embed_dim, depth, num_heads): the arch's, with any explicit override."""
        dim, depth, heads = ARCHS[self.arch]
        return self.embed_dim or dim, self.depth or depth, self.num_heads or heads

    @property
    def ibot_prototypes(self) -> int:
        return (self.ibot_head or self.dino_head).n_prototypes

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        return from_dict(cls, values, "model")


# --- backbone --------------------------------------------------------------------------------------

@dataclass
class Tokens:
    """Backbone output after the final norm: ``cls`` (B, D), ``registers`` (B, R, D), ``patches``
    (B, h*w, D) row-major on the ``grid`` (h, w)."""

    cls: Tensor
    registers: Tensor
    patches: Tensor
    grid: tuple[int, int]


class ViTBackbone(VisionTransformer):
    """timm ViT with dynamic image size, a mask token for iBOT and in-model pixel normalisation. Its
    ``state_dict`` is a timm ViT's plus ``mask_token``."""

    def __init__(self, config: ModelConfig):
        dim, depth, heads = config.dims
        super().__init__(
            img_size=config.img_size, patch_size=config.patch_size, in_chans=config.in_chans, num_classes=0,
            embed_dim=dim, depth=depth, num_heads=heads, init_values=config.layerscale,
            reg_tokens=config.reg_tokens, no_embed_class=config.reg_tokens > 0, dynamic_img_size=True,
            drop_path_rate=0.0 if config.drop_path_uniform else config.drop_path_rate,
        )
        if config.drop_path_uniform and config.drop_path_rate > 0:
            for block in self.blocks:
                block.drop_path1 = DropPath(config.drop_path_rate)
                block.drop_path2 = DropPath(config.drop_path_rate)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # DINOv2 initialises it at zero
        self.config = config
        self.set_grad_checkpointing(config.grad_checkpointing)

    def forward_tokens(self, images: Tensor, masks: Tensor | None = None) -> Tokens:
        """``images`` (B, 1, H, W) in [0, 1] with H, W multiples of the patch size; ``masks`` (B, h, w)
        bool: patches to replace by the mask token (iBOT)."""
        if images.ndim != 4 or images.shape[1] not in (1, self.config.in_chans):
            raise ValueError(f"expected images (B, 1, H, W), got {tuple(images.shape)}")
        p = self.config.patch_size
        height, width = images.shape[-2:]
        if height % p or width % p:
            raise MammoInputError(f"crop size {height}x{width} is not a multiple of the patch size {p}; "
                                  f"use sizes such as {p * (height // p)} or {p * (height // p + 1)}")
        x = (images - self.config.pixel_mean) / self.config.pixel_std
        if x.shape[1] != self.config.in_chans:
            x = x.expand(-1, self.config.in_chans, -1, -1)  # grey repeated for 3-channel weights
        x = self.patch_embed(x)  # (B, h, w, D): dynamic_img_size keeps the grid
        grid = (x.shape[1], x.shape[2])
        if masks is not None:
            if tuple(masks.shape) != (x.shape[0], *grid):
                raise ValueError(f"masks {tuple(masks.shape)} do not match the patch grid {(x.shape[0], *grid)}")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = self.norm_pre(self.patch_drop(self._pos_embed(x)))
        x = checkpoint_seq(self.blocks, x) if self.grad_checkpointing and self.training else self.blocks(x)
        x = self.norm(x)
        n_prefix = self.num_prefix_tokens
        return Tokens(cls=x[:, 0], registers=x[:, 1:n_prefix], patches=x[:, n_prefix:], grid=grid)

    def forward(self, images: Tensor) -> Tensor:
        """The class token (B, D), as DINOv2 features are used downstream."""
        return self.forward_tokens(images).cls


# --- heads -----------------------------------------------------------------------------------------

class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised prototypes (cosine logits times a gain)."""

    def __init__(self, in_dim: int, config: HeadConfig):
        super().__init__()
        dims = [in_dim] + [config.hidden_dim] * (config.n_layers - 1) + [config.bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        # Weight norm written out (w = g * v / |v|) so the state dict holds two plain tensors.
        self.last_layer_v = nn.Parameter(torch.empty(config.n_prototypes, config.bottleneck_dim))
        self.last_layer_g = nn.Parameter(torch.ones(config.n_prototypes, 1),
                                         requires_grad=not config.norm_last_layer)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.last_layer_v, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, eps=1e-6 if x.dtype in (torch.float16, torch.bfloat16) else 1e-12)
        # g * v / |v| in torch's fused kernel (what its public weight-norm APIs call): written out in
        # three ops it cost 2.5x as much forward + backward with 65536 prototypes.
        weight = torch._weight_norm(self.last_layer_v, self.last_layer_g, 0)
        return F.linear(x, weight.to(x.dtype))


# --- student / teacher -----------------------------------------------------------------------------

class SSLNetwork(nn.Module):
    """Backbone plus heads: what the student and the teacher each are."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.backbone = ViTBackbone(config)
        dim = config.dims[0]
        self.dino_head = DINOHead(dim, config.dino_head)
        self.ibot_head = DINOHead(dim, config.ibot_head) if config.ibot_head is not None else None

    def forward(self, global_crops: Tensor, local_crops: Tensor | None = None, masks: Tensor | None = None,
                mask_inputs: bool = True) -> dict[str, Tensor]:
        """Tokens and head logits of one multi-crop batch.

        ``global_crops`` (Ng, 1, S, S) and ``local_crops`` (Nl, 1, s, s), view-major; ``masks`` (Ng, h, w)
        bool marks the iBOT patches: they are replaced by the mask token when ``mask_inputs`` (the
        student) and their output tokens go through the iBOT head either way (the teacher sees the
        unmasked crop). Returns ``global_cls``, ``global_patch_mean`` (Ng, D), ``global_dino`` (Ng, K),
        ``local_cls``/``local_dino`` when locals are given, and ``ibot`` (M, K') for the M masked
        patches in ``masks.nonzero()`` order (image, row, column) when masks are given.
        """
        masks = masks.bool() if masks is not None else None
        tokens = self.backbone.forward_tokens(global_crops, masks if mask_inputs else None)
        out = {"global_cls": tokens.cls, "global_patch_mean": tokens.patches.mean(dim=1)}
        head_inputs = {"global": tokens.cls}
        if local_crops is not None and local_crops.shape[0] > 0:
            out["local_cls"] = self.backbone.forward_tokens(local_crops).cls
            head_inputs["local"] = out["local_cls"]
        masked = None
        if masks is not None:
            masked = tokens.patches.flatten(0, 1)[masks.flatten()]
        if masked is not None and self.ibot_head is None:
            head_inputs["ibot"] = masked
        # One head call over every input: fewer, larger matrix products (DINOv2 concatenates too).
        sizes = [t.shape[0] for t in head_inputs.values()]
        logits = self.dino_head(torch.cat(list(head_inputs.values()))).split(sizes)
        for name, value in zip(head_inputs, logits):
            out[f"{name}_dino" if name != "ibot" else "ibot"] = value
        if masked is not None and self.ibot_head is not None:
            out["ibot"] = self.ibot_head(masked)
        return out


class StudentTeacher(nn.Module):
    """The student and its EMA teacher (same architecture; the teacher starts as an exact copy)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.student = SSLNetwork(config)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True) -> "StudentTeacher":
        super().train(mode)
        self.teacher.eval()  # the teacher never drops paths
        return self

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, for every parameter (DINO's EMA)."""
        teacher = [p for p in self.teacher.parameters()]
        student = [p.detach() for p in self.student.parameters()]
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1.0 - momentum)

    def forward_student(self, global_crops: Tensor, local_crops: Tensor | None = None,
                        masks: Tensor | None = None) -> dict[str, Tensor]:
        return self.student(global_crops, local_crops, masks, mask_inputs=True)

    @torch.no_grad()
    def forward_teacher(self, global_crops: Tensor, masks: Tensor | None = None) -> dict[str, Tensor]:
        return self.teacher(global_crops, None, masks, mask_inputs=False)

    def load_backbone(self, path: str | Path) -> dict[str, Any]:
        """Initialise both backbones from a local weights file (see :func:`load_backbone_weights`)."""
        report = load_backbone_weights(self.student.backbone, path)
        self.teacher.backbone.load_state_dict(self.student.backbone.state_dict())
        return report


# --- weights from other projects -------------------------------------------------------------------

_HF_BLOCK = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
_HF_NAMES = {
    "norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "attention.output.dense": "attn.proj", "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
}


def _from_huggingface(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face ``Dinov2Model`` names (RAD-DINO) -> original DINOv2 names (query/key/value fused)."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    renames = {
        "embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
        "embeddings.register_tokens": "register_tokens", "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
    }
    for key, value in tensors.items():
        if key in renames:
            out[renames[key]] = value
            continue
        match = _HF_BLOCK.fullmatch(key)
        if match is None:
            out[key] = value  # left for the key check to report
            continue
        index, rest = int(match.group(1)), match.group(2)
        attn = re.fullmatch(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)
        if attn:
            qkv.setdefault((index, attn.group(2)), {})[attn.group(1)] = value
            continue
        module, _, kind = rest.rpartition(".")
        if f"{module}.{kind}" in _HF_NAMES:  # the layer-scale entries are whole names
            out[f"blocks.{index}.{_HF_NAMES[f'{module}.{kind}']}"] = value
        elif module in _HF_NAMES:
            out[f"blocks.{index}.{_HF_NAMES[module]}.{kind}"] = value
        else:
            out[key] = value
    for (index, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise MammoInputError(f"weights file: block {index} lacks one of attention query/key/value {kind}")
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def load_backbone_weights(backbone: ViTBackbone, path: str | Path) -> dict[str, Any]:
    """Load a local ``.safetensors`` ViT into ``backbone`` (no network, never unpickles).

    Accepted layouts: timm (``vit_*_dinov2`` and any timm ViT of the same shape), original DINOv2
    (``register_tokens``, ``mask_token``) and Hugging Face ``Dinov2Model``/``Dinov2WithRegistersModel``
    (RAD-DINO), optionally under a ``dinov2.``/``backbone.``/``module.`` prefix. Position embeddings are
    resampled to the model's grid; RGB patch-embedding weights are summed over channels for one-channel
    input (timm's ``adapt_input_conv``, exact for a grey image repeated on three channels). Anything
    that does not fit raises :class:`MammoInputError` naming the first offending keys and shapes.
    Returns a small report (layout, keys loaded, what was adapted).
    """
    tensors, _ = load_tensors(path)
    for prefix in ("module.", "dinov2.", "backbone.", "model."):
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    layout = "timm"
    if any(k.startswith("embeddings.") for k in tensors):
        layout, tensors = "huggingface", _from_huggingface(tensors)
    elif "register_tokens" in tensors or "mask_token" in tensors:
        layout = "dinov2"
    adapted = []
    mask_token = tensors.get("mask_token")
    dropped = sorted(k for k in tensors if k.startswith(("head.", "fc_norm.", "pooler.")))
    tensors = {k: v for k, v in tensors.items() if k not in dropped}
    try:
        state = checkpoint_filter_fn(dict(tensors), backbone)  # registers, pos-embed resampling
    except Exception as exc:  # timm asserts on shapes it cannot reconcile
        raise MammoInputError(f"weights file {Path(path).name}: cannot adapt it to this model ({exc})") from None
    weight = state.get("patch_embed.proj.weight")
    in_chans = backbone.patch_embed.proj.weight.shape[1]
    if weight is not None and weight.ndim == 4 and weight.shape[1] != in_chans:
        state["patch_embed.proj.weight"] = adapt_input_conv(in_chans, weight)
        adapted.append(f"patch_embed: {weight.shape[1]} -> {in_chans} channels")
    if mask_token is not None:
        state["mask_token"] = mask_token.reshape(1, -1)
    own = backbone.state_dict()
    if "mask_token" not in state:
        state["mask_token"] = own["mask_token"]  # timm files have none: keep ours (zeros, as DINOv2)
        adapted.append("mask_token kept at its initial value")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        c = backbone.config
        parts = [f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}" if missing else "",
                 f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}" if unexpected else "",
                 wrong[0] if wrong else ""]
        raise MammoInputError(
            f"weights file {Path(path).name} ({layout} layout) does not fit model arch={c.arch} "
            f"patch_size={c.patch_size} reg_tokens={c.reg_tokens}: " + "; ".join(p for p in parts if p))
    backbone.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return {"layout": layout, "loaded": len(state), "adapted": adapted, "dropped": dropped}
