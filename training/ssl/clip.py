"""An image-report model (Mammo-CLIP, Ghosh et al. 2024; CLIP, Radford et al. 2021): an image encoder
the project loads, a text encoder over report pieces (:mod:`training.ssl.text`), and the two linear
maps that put both in one embedding space.

The image side reads what :class:`~training.evaluate.encoder.Encoder` gives for an image, the class
token ``c`` and the patch tokens ``p_1..p_N``, and embeds it as

.. math:: u = W_c c + W_p \\bar p = \\frac{1}{N} \\sum_i (W_c c + W_p p_i)

so the image-text similarity :math:`\\hat t \\cdot u` is exactly the mean over patches of
:math:`\\hat t \\cdot (W_c c + W_p p_i)`. The patch term :math:`\\hat t \\cdot W_p p_i` is then each
patch's share of a sentence's score: the attribute map of that sentence (Mammo-FActOR maps encoder
channels to sentences for the same purpose; here the map is read straight from the model, no extra
training). With a frozen image encoder, training needs only ``c`` and :math:`\\bar p` per image,
computed once, so a CPU trains the text side in minutes.

A CLIP file is an encoder file (:func:`~training.evaluate.encoder.save_encoder`) with the text tower
added: tensors ``clip.*`` and metadata ``clip`` (the tokenizer as JSON, the text config, the
embedding size). Everything that loads an encoder loads its image side; :func:`load_clip` loads both.
The image encoder's weights are inside the file, so it never points at another path.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.checkpoint import load_tensors, prefixed, read_metadata, unprefixed
from training.errors import MammoInputError
from training.ssl.text import TextConfig, TextEncoder, tokenize, tokenizer_from_json, tokenizer_to_json

CLIP_FORMAT = 1
DEMO_CLIP = Path(__file__).resolve().parents[1] / "weights" / "mammodino-clip-demo.safetensors"


class ClipHead(nn.Module):
    """The trainable part of an image-report model on top of an image encoder: ``W_c`` and ``W_p``
    (image tokens -> embedding), the text encoder and the learnt temperature (CLIP's logit scale,
    capped at 100)."""

    def __init__(self, image_dim: int, text: TextConfig, temperature: float = 0.07):
        super().__init__()
        self.text_config = text
        self.image_cls = nn.Linear(image_dim, text.embed_dim, bias=False)
        self.image_patch = nn.Linear(image_dim, text.embed_dim, bias=False)
        self.text = TextEncoder(text)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp().clamp(max=100.0)

    def image_embedding(self, cls: Tensor, patch_mean: Tensor) -> Tensor:
        """Image embeddings (B, E), not normalised, of class tokens and mean patch tokens (B, D)."""
        return self.image_cls(cls) + self.image_patch(patch_mean)

    def text_embedding(self, ids: Tensor, padding: Tensor) -> Tensor:
        return self.text(ids, padding)


class Clip:
    """A loaded image-report model: ``encoder`` (an :class:`~training.evaluate.encoder.Encoder`, the
    image side), ``head`` (:class:`ClipHead`) and ``tokenizer``. Every method runs in eval mode without
    gradients."""

    def __init__(self, encoder: Any, head: ClipHead, tokenizer: Any, source: str = ""):
        self.encoder = encoder
        self.head = head.eval()
        self.tokenizer = tokenizer
        self.source = source

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    def to(self, device: str | torch.device) -> "Clip":
        self.encoder.to(device)
        self.head.to(device)
        return self

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised embeddings (T, E) of texts; an empty text is one line."""
        if not len(texts):
            raise MammoInputError("no text given: give a sentence, e.g. 'spiculated mass'")
        ids, padding = tokenize(self.tokenizer, list(texts), self.head.text_config.max_length)
        out = self.head.text_embedding(ids.to(self.device), padding.to(self.device))
        return F.normalize(out.float(), dim=-1).cpu().numpy()

    @torch.no_grad()
    def embed_features(self, features: np.ndarray) -> np.ndarray:
        """L2-normalised image embeddings (B, E) of the encoder's probe features (B, 2D): class token and
        mean patch token side by side (:func:`training.evaluate.features.extract_features`, a DBT
        volume's slice mean included: the map is linear)."""
        x = torch.as_tensor(np.asarray(features, dtype=np.float32), device=self.device)
        if x.ndim != 2 or x.shape[1] != 2 * self.head.image_cls.in_features:
            raise ValueError(f"features {tuple(x.shape)}: expected (B, {2 * self.head.image_cls.in_features})")
        cls, mean = x.chunk(2, dim=1)
        return F.normalize(self.head.image_embedding(cls, mean).float(), dim=-1).cpu().numpy()

    def image_embeddings(self, outputs: Sequence[Any]) -> np.ndarray:
        """L2-normalised embeddings (B, E) of encoder :class:`~training.evaluate.encoder.Output` s."""
        return self.embed_features(np.stack([o.features for o in outputs]))

    @torch.no_grad()
    def patch_scores(self, output: Any, text_embedding: np.ndarray) -> np.ndarray:
        """The attribute map of one sentence on one image: each patch's share ``t . W_p p_i`` of the
        image-text similarity, (h, w), from an encoder output and the sentence's normalised embedding."""
        patches = torch.from_numpy(np.ascontiguousarray(output.patches)).to(self.device)
        projected = self.head.image_patch(patches)  # (h, w, E)
        text = torch.as_tensor(np.asarray(text_embedding), dtype=projected.dtype, device=self.device)
        return (projected @ text).float().cpu().numpy()

    def probabilities(self, image_embeddings: np.ndarray, class_embeddings: np.ndarray) -> np.ndarray:
        """Zero-shot class probabilities (B, K): softmax over the classes of the learnt scale times the
        cosine similarity of each image with each class's (normalised) prompt embedding."""
        scale = float(self.head.scale.detach())
        logits = scale * image_embeddings @ class_embeddings.T
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "image": self.encoder.describe(), "text": asdict(self.head.text_config),
                "vocabulary": self.tokenizer.get_vocab_size(), "temperature": 1.0 / float(self.head.scale.detach())}


def clip_tensors(head: ClipHead) -> dict[str, Tensor]:
    """The text tower's tensors as a CLIP file stores them (``clip.*``)."""
    return prefixed("clip", head.state_dict())


def clip_metadata(head: ClipHead, tokenizer: Any, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``clip`` block of a CLIP file's metadata."""
    return {"format": CLIP_FORMAT, "text": asdict(head.text_config), "image_dim": head.image_cls.in_features,
            "tokenizer": tokenizer_to_json(tokenizer), **(extra or {})}


def _clip_block(meta: Mapping[str, Any], name: str) -> dict[str, Any]:
    block = meta.get("clip")
    if not isinstance(block, dict) or block.get("format") != CLIP_FORMAT:
        raise MammoInputError(f"{name} has no text tower (it is an image encoder only): text queries and "
                              f"zero-shot need a model trained with `mammodino clip`")
    return block


def head_from(meta: Mapping[str, Any], tensors: Mapping[str, Tensor], path: Path) -> tuple[ClipHead, Any]:
    """The :class:`ClipHead` and tokenizer a file's ``clip`` metadata and ``clip.*`` tensors hold."""
    from training.evaluate.encoder import load_state

    block = _clip_block(meta, path.name)
    try:
        text = TextConfig(**block["text"])
        image_dim = int(block["image_dim"])
    except (KeyError, TypeError, ValueError):
        raise MammoInputError(f"{path.name}: its text-tower metadata is damaged") from None
    tokenizer = tokenizer_from_json(block.get("tokenizer", ""))
    head = ClipHead(image_dim, text)
    load_state(head, unprefixed("clip", tensors), path)
    return head, tokenizer


def has_text_tower(path: str | Path) -> bool:
    """Whether a file is a CLIP file (reads only its header)."""
    return isinstance(read_metadata(path).get("clip"), dict)


def load_clip(spec: str | Path | None = None, device: str | torch.device = "cpu") -> Clip:
    """The image-report model of ``spec``: a CLIP file, a `mammodino clip` run folder (its last
    checkpoint) or None/"demo" for the shipped demo model. A checkpoint without a text tower is one line."""
    from training.evaluate.encoder import encoder_from_state
    from training.runs import RunFolder

    if spec is None or str(spec) == "demo":
        if not DEMO_CLIP.is_file():
            raise MammoInputError(f"the demo CLIP model is missing ({DEMO_CLIP}); reinstall the package or "
                                  f"pass --checkpoint")
        path = DEMO_CLIP
    else:
        path = Path(str(spec))
        if str(spec).startswith("random:"):
            raise MammoInputError(f"{spec}: a random encoder has no text tower; give a model trained with "
                                  f"`mammodino clip`")
        if path.is_dir():
            path = RunFolder(path).last_checkpoint
        if not path.is_file():
            raise MammoInputError(f"--checkpoint {spec}: no such file (a CLIP file or run folder)")
    meta = read_metadata(path)
    _clip_block(meta, path.name)  # before reading any tensor
    tensors, _ = load_tensors(path)
    head, tokenizer = head_from(meta, tensors, path)
    encoder = encoder_from_state(meta, tensors, path)
    if encoder.embed_dim != head.image_cls.in_features:
        raise MammoInputError(f"{path.name}: its text tower expects {head.image_cls.in_features}-wide image "
                              f"tokens, its image encoder gives {encoder.embed_dim}")
    return Clip(encoder, head, tokenizer, source=str(path)).to(device)
