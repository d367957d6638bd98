"""Any timm network as a backbone: the student of distillation (:mod:`training.ssl.distill`, VersaMammo's
stage 2, arXiv 2509.20271, whose student is an EfficientNet-B5).

:class:`TimmBackbone` gives a timm model the interface the rest of the project uses of a
:class:`~training.ssl.models.ViTBackbone`, so that an encoder file holding one loads everywhere an encoder
loads (probes, fine-tuning, ``mammodino infer``, the viewer):

* ``forward_tokens(pixels)`` -> :class:`~training.ssl.models.Tokens`, pixels (B, 1, H, W) in [0, 1]
  normalised inside the model (``pixel_mean``/``pixel_std``, as the ViT backbone does). A CNN's last
  feature map (B, D, h, w) at its output stride becomes the patch tokens (B, h*w, D) and their mean the
  class token (the global average pool every timm CNN head starts with); a ViT's tokens are taken as
  they are (class token, prefix tokens skipped).
* ``config`` (:class:`StudentConfig`): ``patch_size`` is the output stride (32 for most CNNs), so
  :func:`training.evaluate.encoder.prepare` makes inputs a whole number of strides and its patch grid is
  the feature map; ``dims[0]`` the feature width; ``arch`` the timm name.
* ``blocks`` and ``num_prefix_tokens``: a ViT's transformer blocks (attention maps and rollout work as
  for the project's own ViT); ``[]`` and 0 for a network without a class token's attention, whose
  encoder then gives no attention map.

Models are built with random weights (``pretrained=False``): nothing is downloaded. One channel in
(``in_chans=1``), no classifier (``num_classes=0``), and ViTs with ``dynamic_img_size`` so that they take
any whole number of patches, as the project's own ViT does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from training.config import from_dict, to_dict
from training.errors import MammoInputError
from training.ssl.models import Tokens


@dataclass(frozen=True)
class StudentConfig:
    """A timm backbone as data (JSON round trip, recorded in encoder files under ``model``): ``timm``
    the model name, ``patch_size`` its output stride, ``embed_dim`` its feature width, ``depth`` and
    ``num_heads`` its blocks and attention heads (0 where it has none), as measured when it was built."""

    timm: str
    patch_size: int
    embed_dim: int
    depth: int = 0
    num_heads: int = 0
    in_chans: int = 1
    pixel_mean: float = 0.449  # the project's ViT's values: teacher and student see the same numbers
    pixel_std: float = 0.226

    @property
    def arch(self) -> str:
        return self.timm

    @property
    def dims(self) -> tuple[int, int, int]:
        """(feature width, blocks, attention heads), as :attr:`ModelConfig.dims`."""
        return self.embed_dim, self.depth, self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "StudentConfig":
        return from_dict(cls, values, "model")


def check_name(name: str) -> None:
    """One line when timm has no model ``name``."""
    import timm

    if not timm.is_model(name):
        raise MammoInputError(f"student {name!r}: not a timm model name (timm {timm.__version__}); list them with "
                              f"`python -c \"import timm; print(timm.list_models('*mobilenet*'))\"`")


def create_timm(name: str) -> nn.Module:
    """``timm.create_model(name)`` with random weights, one channel in and no classifier (ViTs with a
    dynamic image size); an unknown name is one line."""
    import timm

    check_name(name)
    options = dict(pretrained=False, in_chans=1, num_classes=0)
    try:
        return timm.create_model(name, dynamic_img_size=True, **options)  # ViTs: any whole number of patches
    except TypeError:  # a CNN (or any model without the option) takes any size as it is
        return timm.create_model(name, **options)


class TimmBackbone(nn.Module):
    """A timm model behind the ViT backbone's interface (see the module notes). Its ``state_dict`` is the
    timm model's under ``model.``."""

    def __init__(self, config: StudentConfig, model: nn.Module | None = None):
        super().__init__()
        self.model = create_timm(config.timm) if model is None else model
        self.config = config
        blocks = getattr(self.model, "blocks", [])
        vit = getattr(self.model, "cls_token", None) is not None and len(blocks) > 0
        self._attention = vit and all(hasattr(b, "attn") for b in blocks)
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0)) if self._attention else 0

    @property
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks whose attention an encoder can watch; [] for a CNN."""
        return list(self.model.blocks) if self._attention else []

    def forward_tokens(self, images: Tensor, masks: Tensor | None = None) -> Tokens:
        """``images`` (B, 1, H, W) in [0, 1], H and W multiples of the stride -> class and patch tokens."""
        if masks is not None:
            raise ValueError("a timm student has no mask token (iBOT masking is for the ViT backbone)")
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"expected images (B, 1, H, W), got {tuple(images.shape)}")
        s = self.config.patch_size
        height, width = images.shape[-2:]
        if height % s or width % s:
            raise MammoInputError(f"input {height}x{width} is not a multiple of the student's stride {s}")
        grid = (height // s, width // s)
        x = self.model.forward_features((images - self.config.pixel_mean) / self.config.pixel_std)
        if x.ndim == 4:  # a feature map: NCHW (CNNs) or NHWC (some hierarchical transformers)
            x = x.flatten(2).transpose(1, 2) if x.shape[1] == self.config.embed_dim else x.flatten(1, 2)
            prefix = x[:, :0]
        else:  # tokens
            n = int(getattr(self.model, "num_prefix_tokens", 0))
            prefix, x = x[:, :n], x[:, n:]
        if x.shape[1] != grid[0] * grid[1]:
            raise MammoInputError(f"student {self.config.timm}: {x.shape[1]} output positions for a "
                                  f"{grid[0]}x{grid[1]} grid at stride {s}; it cannot take this input size")
        cls = prefix[:, 0] if self._attention else x.mean(dim=1)
        return Tokens(cls=cls, registers=prefix[:, 1:], patches=x, grid=grid)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_tokens(images).cls


def build_student(name: str) -> TimmBackbone:
    """A new student ``name`` with random weights; its stride, width, blocks and heads are measured by
    one forward pass of a small non-square input (a network that cannot take any whole number of strides
    is refused in one line)."""
    model = create_timm(name)
    info = getattr(model, "feature_info", None)
    stride = int(info[-1]["reduction"]) if info else 0
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None:
        stride = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    if stride < 1:
        raise MammoInputError(f"--student {name}: timm does not say its output stride; choose a CNN or a ViT")
    blocks = getattr(model, "blocks", [])
    heads = getattr(getattr(blocks[-1], "attn", None), "num_heads", 0) if len(blocks) else 0
    was = model.training
    model.eval()  # batch norm's running statistics stay as they are
    try:
        with torch.no_grad():
            out = model.forward_features(torch.zeros(1, 1, 2 * stride, 3 * stride))
    except Exception as exc:  # timm raises assertions and runtime errors of many kinds
        raise MammoInputError(f"--student {name}: it does not take one-channel images of any size "
                              f"({' '.join(str(exc).split())[:160]})") from None
    if out.ndim == 4:
        width = int(getattr(model, "num_features", out.shape[1]))
        width = width if width in (out.shape[1], out.shape[-1]) else out.shape[1]
    else:
        width = int(out.shape[-1])
    config = StudentConfig(timm=name, patch_size=stride, embed_dim=width, depth=len(blocks), num_heads=int(heads))
    student = TimmBackbone(config, model)
    with torch.no_grad():
        student.eval().forward_tokens(torch.zeros(1, 1, 2 * stride, 3 * stride))  # the grid check
    return student.train(was)
