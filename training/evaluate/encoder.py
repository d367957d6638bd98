"""A trained encoder, as everything after pretraining uses it: probes, fine-tuning, retrieval,
inference and the viewer all load, pre-process and run images through this one module, so a probe's
features and the viewer's attention map can never disagree about windowing, crop or resolution.

* Loading (:func:`load_encoder`): ``None`` is the shipped demo encoder; ``random:ARCH[/PATCH]`` a
  randomly initialised backbone (the baseline every probe table needs); a MammoDINO pretraining
  checkpoint (its EMA teacher's backbone, the network DINOv2 evaluates); an encoder file written by
  :func:`save_encoder` (backbone plus named task heads, e.g. the demo, a fine-tuned model or a distilled
  student, whose backbone may be any timm network, :mod:`training.ssl.student`); or a
  DINOv2 / RAD-DINO ``.safetensors`` weights file in timm or Hugging Face layout, whose shape is read
  from its tensors. Nothing is downloaded and nothing is unpickled.
* Pre-processing (:func:`prepare_image`: one path from an image's frame to the encoder's input, for
  inference, probes, fine-tuning and retrieval alike): MONOCHROME2 values (tissue bright); the breast-tissue
  bounding box (the sampler's ``region="tissue"``); intensities mapped to [0, 1] by the tissue
  percentiles the model was trained with (``intensity_percentiles``); an antialiased resize so that
  the long side is ``resolution`` pixels and both sides are whole patches (518 = 37 x 14 is DINOv2's
  high-resolution size). The returned :class:`Prepared` knows where each patch lies in the image, so
  patch maps can be drawn on the image in mm.
* Running (:meth:`Encoder.run`): class token, patch tokens, the last layer's class-token-to-patch
  attention per head (computed explicitly in that layer only, so it costs little more than a plain
  forward pass) or attention rollout (Abnar & Zuidema 2020) over all layers (None for a backbone
  without attention, such as a CNN student), and the task heads'
  predictions. Image features for probes are the class token concatenated with the mean patch token
  (DINOv2's linear-probe features, ``dinov2/eval/linear.py``).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from training.checkpoint import FORMAT, load_tensors, prefixed, read_metadata, save_checkpoint, unprefixed
from training.errors import MammoInputError
from training.ssl.models import ARCHS, HeadConfig, ModelConfig, ViTBackbone, load_backbone_weights
from training.ssl.student import StudentConfig, TimmBackbone

DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "weights" / "mammodino-demo.safetensors"
DEFAULT_PERCENTILES = (0.5, 99.5)  # the sampler's default intensity_percentiles
AttentionKind = Literal["none", "last", "rollout"]


# --- task heads ------------------------------------------------------------------------------------

class TaskHead(nn.Module):
    """A linear classifier on standardised features: ``on="image"`` reads :func:`image_features`
    (class token + mean patch token), ``on="patch"`` reads each patch token (a lesion heatmap).
    ``classes`` names the outputs, so predictions are shown with their labels."""

    def __init__(self, in_dim: int, classes: Sequence[str], on: Literal["image", "patch"] = "image"):
        super().__init__()
        if len(classes) < 2:
            raise MammoInputError("a task head needs at least two classes")
        if on not in ("image", "patch"):
            raise MammoInputError(f"a task head reads 'image' or 'patch' features, not {on!r}")
        self.classes = [str(c) for c in classes]
        self.on = on
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))
        self.linear = nn.Linear(in_dim, len(self.classes))

    def forward(self, features: Tensor) -> Tensor:
        """Logits (..., n_classes) of features (..., in_dim)."""
        return self.linear((features - self.mean) / self.scale)

    def describe(self) -> dict[str, Any]:
        return {"classes": self.classes, "on": self.on, "in_dim": int(self.mean.numel())}


def image_features(cls: Tensor, patches: Tensor) -> Tensor:
    """Probe features: the class token and the mean patch token side by side, (B, 2D)."""
    return torch.cat([cls, patches.mean(dim=1)], dim=-1)


# --- pre-processing --------------------------------------------------------------------------------

@dataclass
class Prepared:
    """One image ready for the encoder, and where it came from.

    ``pixels`` (H, W) float32 in [0, 1]; ``box`` (row0, col0, row1, col1) the region of the stored
    image it shows (image pixels, half-open); ``grid`` (h, w) patches; ``patch_px`` the image pixels
    one patch spans along rows and columns; ``tissue`` (h, w) each patch's tissue fraction."""

    pixels: np.ndarray
    box: tuple[int, int, int, int]
    grid: tuple[int, int]
    patch_px: tuple[float, float]
    tissue: np.ndarray
    image_shape: tuple[int, int]
    frame: int | None = None

    def patch_origin_px(self) -> tuple[float, float]:
        """Image coordinates (pixel centres at integers) of the centre of patch (0, 0): with a layer's
        pixel ``scale`` s and ``translate`` t, a patch map goes at ``t + s * origin`` with scale
        ``s * patch_px``."""
        return (self.box[0] - 0.5 + 0.5 * self.patch_px[0], self.box[1] - 0.5 + 0.5 * self.patch_px[1])

    def to_image(self, patch_map: np.ndarray, order: int = 1) -> np.ndarray:
        """A (h, w) patch map resampled onto the full stored image grid (zero outside ``box``)."""
        from scipy import ndimage

        out = np.zeros(self.image_shape, dtype=np.float32)
        r0, c0, r1, c1 = self.box
        zoom = ((r1 - r0) / patch_map.shape[0], (c1 - c0) / patch_map.shape[1])
        region = ndimage.zoom(np.asarray(patch_map, dtype=np.float32), zoom, order=order, mode="nearest",
                              grid_mode=True)
        out[r0:r0 + region.shape[0], c0:c0 + region.shape[1]] = region[:r1 - r0, :c1 - c0]
        return out


def output_shape(box_shape: tuple[int, int], resolution: int, patch: int) -> tuple[int, int]:
    """(rows, cols) whole patches with the long side ``resolution`` (rounded down to whole patches)."""
    height, width = box_shape
    long_side = max(patch, resolution // patch * patch)
    factor = long_side / max(height, width)
    return (max(patch, round(height * factor / patch) * patch), max(patch, round(width * factor / patch) * patch))


def prepare(values: np.ndarray, tissue: np.ndarray, resolution: int, patch: int,
            percentiles: Sequence[float] = DEFAULT_PERCENTILES, frame: int | None = None) -> Prepared:
    """``values`` (MONOCHROME2, tissue bright) and its ``tissue`` mask -> :class:`Prepared`: the tissue
    box (the whole image when there is no tissue) at ``resolution`` px on its long side."""
    from training.sampler.augment import Pyramid, tissue_window
    from training.sampler.boxes import tissue_box

    values = np.asarray(values)
    tissue = np.asarray(tissue, dtype=bool)
    if values.ndim != 2 or tissue.shape != values.shape:
        raise MammoInputError(f"expected a 2D image and a mask of the same shape, got {values.shape} and "
                              f"{tissue.shape}")
    if resolution < patch:
        raise MammoInputError(f"resolution {resolution} is smaller than one patch ({patch} px)")
    box = tissue_box(tissue) or (0, 0, *values.shape)
    rows, cols = output_shape((box[2] - box[0], box[3] - box[1]), resolution, patch)
    lo, hi = tissue_window(values, tissue, box, tuple(percentiles))
    pixels = Pyramid(values, box).resample(box, (rows, cols), lo, hi)
    grid = (rows // patch, cols // patch)
    fraction = Pyramid(tissue.astype(np.float32), box).resample(box, grid, 0.0, 1.0)
    patch_px = ((box[2] - box[0]) / grid[0], (box[3] - box[1]) / grid[1])
    return Prepared(pixels, box, grid, patch_px, fraction, tuple(values.shape), frame)


def prepare_image(image: Any, frame: int | None, resolution: int, patch: int,
                  percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> Prepared:
    """One frame of an image -> :class:`Prepared`: the one path every encoder input takes.

    ``image``: a :class:`~training.dicom.image.MammoImage`, its frame decoded once, MONOCHROME1
    inverted, and its tissue from :func:`training.tissue.tissue_of` (its header's photometric, spacing
    and PatientOrientation); or a 2D image / 3D volume array of MONOCHROME2 values, taken as shown
    (tissue bright). ``frame``: the DBT slice (checked; default the middle one); a 2D image's
    ``Prepared.frame`` is None. Then :func:`prepare` crops and resizes."""
    return prepare_image_sizes(image, frame, [(resolution, patch)], percentiles)[0]


def prepare_image_sizes(image: Any, frame: int | None, sizes: Sequence[tuple[int, int]],
                        percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> list[Prepared]:
    """:func:`prepare_image` at several ``(resolution, patch)`` sizes, the frame read and its tissue
    found once (a distillation teacher and its student see the same breast at their own sizes)."""
    from training.dicom.image import MammoImage, frame_index
    from training.tissue import frame_and_tissue, segment_tissue

    if isinstance(image, MammoImage):
        volume = image.data.ndim == 3
        index = image.frame_index(frame)
        values, tissue = frame_and_tissue(image, index)
    else:
        shape = tuple(getattr(image, "shape", ()))
        if len(shape) not in (2, 3):
            raise MammoInputError(f"expected a mammogram, a 2D image or a 3D volume, got shape {shape}")
        volume = len(shape) == 3
        index = frame_index(frame, shape[0] if volume else 1)
        values = np.asarray(image[index] if volume else image)
        tissue = segment_tissue(values).mask
    return [prepare(values, tissue, resolution, patch, percentiles, index if volume else None)
            for resolution, patch in sizes]


# --- the encoder -----------------------------------------------------------------------------------

@dataclass
class Output:
    """What one forward pass gives for one image: ``cls`` (D), ``patches`` (h, w, D), ``attention``
    (heads, h, w) last-layer class-token attention (each head sums to 1 over patches) or None,
    ``rollout`` (h, w) or None, ``predictions`` {task: {class: probability}} of image heads and
    ``heatmaps`` {task: (h, w) probability of the head's last class} of patch heads."""

    cls: np.ndarray
    patches: np.ndarray
    attention: np.ndarray | None = None
    rollout: np.ndarray | None = None
    predictions: dict[str, dict[str, float]] = field(default_factory=dict)
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def features(self) -> np.ndarray:
        """Probe features: class token + mean patch token (2D,)."""
        return np.concatenate([self.cls, self.patches.reshape(-1, self.patches.shape[-1]).mean(0)])


class Encoder:
    """A backbone in eval mode with its pre-processing and task heads. ``meta`` is what the file said
    (empty for random and foreign weights); ``source`` names where it came from. The backbone is the
    project's ViT or a timm student (:class:`~training.ssl.student.TimmBackbone`)."""

    def __init__(self, backbone: ViTBackbone | TimmBackbone, heads: dict[str, TaskHead] | None = None,
                 meta: dict[str, Any] | None = None, source: str = "", resolution: int | None = None,
                 percentiles: Sequence[float] | None = None):
        self.backbone = backbone.eval()
        self.heads = nn.ModuleDict(heads or {}).eval()
        self.meta = meta or {}
        self.source = source
        self.config: ModelConfig | StudentConfig = backbone.config
        pre = self.meta.get("preprocess", {})
        self.resolution = int(resolution or pre.get("resolution") or 37 * self.patch_size)
        self.percentiles = tuple(percentiles or pre.get("intensity_percentiles") or DEFAULT_PERCENTILES)

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def embed_dim(self) -> int:
        return self.config.dims[0]

    @property
    def has_attention(self) -> bool:
        """Whether :meth:`run` can give attention maps (a ViT; not a CNN student)."""
        return len(self.backbone.blocks) > 0

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def to(self, device: str | torch.device) -> "Encoder":
        self.backbone.to(device)
        self.heads.to(device)
        return self

    def describe(self) -> dict[str, Any]:
        """What reports print about the encoder."""
        dim, depth, heads = self.config.dims
        info = {"source": self.source, "arch": self.config.arch, "patch_size": self.patch_size,
                "embed_dim": dim, "depth": depth, "num_heads": heads, "resolution": self.resolution,
                "heads": {name: head.describe() for name, head in self.heads.items()}}
        if isinstance(self.config, StudentConfig):  # patch_size is the output stride
            info.update(timm=self.config.timm, attention=self.has_attention)
        return info

    # pre-processing
    def prepare(self, values: np.ndarray, tissue: np.ndarray, resolution: int | None = None,
                frame: int | None = None) -> Prepared:
        return prepare(values, tissue, resolution or self.resolution, self.patch_size, self.percentiles, frame)

    def prepare_image(self, image: Any, frame: int | None = None, resolution: int | None = None) -> Prepared:
        """:func:`prepare_image` with this encoder's patch size and intensity percentiles."""
        return prepare_image(image, frame, resolution or self.resolution, self.patch_size, self.percentiles)

    # forward passes
    @torch.no_grad()
    def run(self, prepared: Prepared | Sequence[Prepared], attention: AttentionKind = "last") -> list[Output]:
        """Tokens, attention and head outputs of one or more prepared images (same-shaped images are
        run as one batch)."""
        items = [prepared] if isinstance(prepared, Prepared) else list(prepared)
        outputs: list[Output] = []
        for batch in _same_shape_batches(items):
            pixels = torch.from_numpy(np.stack([p.pixels for p in batch])[:, None]).to(self.device)
            outputs.extend(self._forward(pixels, [p.grid for p in batch], attention))
        return outputs

    def features(self, prepared: Prepared | Sequence[Prepared]) -> np.ndarray:
        """Probe features (N, 2D) of prepared images."""
        return np.stack([o.features for o in self.run(prepared, attention="none")])

    def _forward(self, pixels: Tensor, grids: list[tuple[int, int]], attention: AttentionKind) -> list[Output]:
        blocks = list(self.backbone.blocks)
        if not blocks:  # no attention to show (a CNN): features and heads only
            attention = "none"
        watched = {"none": [], "last": blocks[-1:], "rollout": blocks}[attention]
        with attention_probabilities(watched) as maps:
            tokens = self.backbone.forward_tokens(pixels)
        h, w = grids[0]
        n_prefix = self.backbone.num_prefix_tokens
        last = rollout = None
        if attention != "none":
            last = maps[-1][:, :, 0, n_prefix:].float()  # (B, heads, h*w) class token -> patches
            last = last / last.sum(-1, keepdim=True).clamp_min(1e-12)
        if attention == "rollout":
            rollout = attention_rollout(maps)[:, 0, n_prefix:]
            rollout = rollout / rollout.sum(-1, keepdim=True).clamp_min(1e-12)
        predictions, heatmaps = self._heads(tokens.cls.float(), tokens.patches.float())
        outputs = []
        for b in range(pixels.shape[0]):
            outputs.append(Output(
                cls=tokens.cls[b].float().cpu().numpy(),
                patches=tokens.patches[b].float().reshape(h, w, -1).cpu().numpy(),
                attention=None if last is None else last[b].reshape(-1, h, w).cpu().numpy(),
                rollout=None if rollout is None else rollout[b].reshape(h, w).cpu().numpy(),
                predictions={task: dict(zip(self.heads[task].classes, map(float, p[b])))
                             for task, p in predictions.items()},
                heatmaps={task: m[b].reshape(h, w).cpu().numpy() for task, m in heatmaps.items()}))
        return outputs

    def _heads(self, cls: Tensor, patches: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        predictions, heatmaps = {}, {}
        for name, head in self.heads.items():
            if head.on == "image":
                predictions[name] = head(image_features(cls, patches)).softmax(-1).cpu()
            else:
                heatmaps[name] = head(patches).softmax(-1)[..., -1]
        return predictions, heatmaps


def _same_shape_batches(items: list[Prepared], max_batch: int = 8) -> Iterable[list[Prepared]]:
    batch: list[Prepared] = []
    for item in items:
        if batch and (item.pixels.shape != batch[0].pixels.shape or len(batch) == max_batch):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


@contextlib.contextmanager
def attention_probabilities(blocks: Sequence[nn.Module]):
    """Collect the softmax attention (B, heads, N, N) of ``blocks`` during a forward pass. timm computes
    it explicitly (instead of its fused kernel) only when ``fused_attn`` is off, and passes it through
    ``attn_drop``: the hook reads it there, so only the watched blocks pay for it."""
    maps: list[Tensor] = []
    saved = []
    for block in blocks:
        attn = block.attn
        saved.append((attn, attn.fused_attn, attn.attn_drop.register_forward_hook(
            lambda module, args, output: maps.append(output.detach()))))
        attn.fused_attn = False
    try:
        yield maps
    finally:
        for attn, fused, hook in saved:
            attn.fused_attn = fused
            hook.remove()


def attention_rollout(maps: Sequence[Tensor]) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020): heads averaged, the residual added as identity, rows
    renormalised, and the layers multiplied; (B, N, N)."""
    result = None
    for attn in maps:
        a = attn.float().mean(1)
        a = a + torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    return result


# --- loading and saving ----------------------------------------------------------------------------

def load_encoder(spec: str | Path | None = None, device: str | torch.device = "cpu") -> Encoder:
    """An :class:`Encoder` from ``spec`` (see the module docstring); bad specs raise one line."""
    if spec is None or str(spec) == "demo":
        if not DEMO_CHECKPOINT.is_file():
            raise MammoInputError(f"the demo encoder is missing ({DEMO_CHECKPOINT}); reinstall the package "
                                  f"or pass --checkpoint")
        return _from_file(DEMO_CHECKPOINT).to(device)
    text = str(spec)
    if text.startswith("random:"):
        return random_encoder(text[len("random:"):]).to(device)
    path = Path(text)
    if not path.exists():
        raise MammoInputError(f"--checkpoint {path}: no such file (a .safetensors checkpoint, 'random:ARCH' "
                              f"or nothing for the demo encoder)")
    if path.is_dir():
        from training.runs import RunFolder

        last = RunFolder(path).last_checkpoint
        if not last.is_file():
            raise MammoInputError(f"--checkpoint {path}: a folder must be a training run with "
                                  f"checkpoints/last.safetensors")
        path = last
    return _from_file(path).to(device)


def random_encoder(spec: str, seed: int = 0) -> Encoder:
    """``ARCH`` or ``ARCH/PATCH`` (e.g. ``small/14``), or the model of a pretraining preset or config file
    (``cpu-tiny``, ``runs/my.json``: the baseline of an ablation), with random weights, the same for a
    given seed."""
    from training.ssl.presets import PRESETS_DIR, load_config

    match = re.fullmatch(r"(\w+)(?:/(\d+))?", spec)
    if (PRESETS_DIR / f"{spec}.json").is_file() or spec.endswith(".json"):
        config = load_config(spec).model  # a preset or a pretraining config file
    elif match is not None and match.group(1) in ARCHS:
        patch = int(match.group(2) or 14)
        config = ModelConfig(arch=match.group(1), patch_size=patch, img_size=16 * patch, drop_path_rate=0.0,
                             dino_head=HeadConfig(n_prototypes=16, hidden_dim=16, bottleneck_dim=16))
    else:
        raise MammoInputError(f"random:{spec}: expected random:ARCH, random:ARCH/PATCH (ARCH one of "
                              f"{sorted(ARCHS)}) or random:PRESET")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = ViTBackbone(config)
    return Encoder(backbone, source=f"random:{spec}", meta={"kind": "random", "seed": seed})


def _from_file(path: Path) -> Encoder:
    meta = read_metadata(path)
    if meta.get("format") == FORMAT and meta.get("kind") == "encoder":
        return encoder_from_state(meta, load_tensors(path)[0], path)
    if meta.get("format") == FORMAT and "config" in meta and "step" in meta:  # a pretraining checkpoint
        tensors, _ = load_tensors(path)
        config = ModelConfig.from_dict(meta["model"])
        backbone = ViTBackbone(config)
        load_state(backbone, unprefixed("model.teacher.backbone", tensors), path)
        sampler = meta["config"].get("sampler", {})
        pre = {"intensity_percentiles": sampler.get("intensity_percentiles", DEFAULT_PERCENTILES)}
        return Encoder(backbone, meta={**meta, "preprocess": pre}, source=f"{path} (teacher, step {meta['step']})")
    if meta:
        raise MammoInputError(f"{path.name}: a MammoDINO file of another kind ({meta.get('kind', 'unknown')}); "
                              f"expected a pretraining checkpoint or an encoder")
    backbone = ViTBackbone(config_from_weights(path))
    report = load_backbone_weights(backbone, path)
    return Encoder(backbone, meta={"kind": "external", "load": report}, source=f"{path} ({report['layout']})")


def encoder_from_state(meta: dict[str, Any], tensors: dict[str, Tensor], path: Path) -> Encoder:
    """The :class:`Encoder` of an encoder file whose metadata and tensors are already read (a CLIP file
    holds its text tower beside them, read from the same tensors)."""
    backbone = backbone_of(meta["model"])
    load_state(backbone, unprefixed("backbone", tensors), path)
    heads = {}
    for name, info in (meta.get("heads") or {}).items():
        head = TaskHead(int(info["in_dim"]), info["classes"], info["on"])
        load_state(head, unprefixed(f"heads.{name}", tensors), path)
        heads[name] = head
    return Encoder(backbone, heads, meta, source=str(path))


def backbone_of(model: dict[str, Any]) -> ViTBackbone | TimmBackbone:
    """A backbone with random weights from an encoder file's ``model`` metadata: the project's ViT, or
    a timm student (``"timm": name``) rebuilt from its name (nothing is downloaded)."""
    if "timm" in model:
        return TimmBackbone(StudentConfig.from_dict(model))
    return ViTBackbone(ModelConfig.from_dict(model))


def load_state(module: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    """Load ``state`` into ``module``; names or shapes that differ are one line (a damaged or edited file)."""
    own = module.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise MammoInputError(f"{path.name}: its weights do not match the model its metadata describes "
                              f"(damaged or edited file)")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def config_from_weights(path: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` of a foreign ViT weights file (timm, DINOv2 or Hugging Face layout),
    read from its tensor names and shapes."""
    from training.checkpoint import read_header

    shapes = {k: v["shape"] for k, v in read_header(path).items() if k != "__metadata__"}
    for prefix in ("module.", "dinov2.", "backbone.", "model."):
        if shapes and all(k.startswith(prefix) for k in shapes):
            shapes = {k[len(prefix):]: v for k, v in shapes.items()}
    huggingface = any(k.startswith("embeddings.") for k in shapes)
    patch_key = "embeddings.patch_embeddings.projection.weight" if huggingface else "patch_embed.proj.weight"
    block = re.compile(r"encoder\.layer\.(\d+)\." if huggingface else r"blocks\.(\d+)\.")
    depths = {int(m.group(1)) for k in shapes if (m := block.match(k))}
    if patch_key not in shapes or not depths:
        raise MammoInputError(f"{Path(path).name}: not a ViT weights file (no patch embedding or blocks found)")
    dim, patch = int(shapes[patch_key][0]), int(shapes[patch_key][-1])
    arch = next((name for name, dims in ARCHS.items() if dims[0] == dim), None)
    if arch is None:
        raise MammoInputError(f"{Path(path).name}: embedding width {dim} is not one of the ViT sizes "
                              f"{ {n: d[0] for n, d in ARCHS.items()} }")
    reg_key = "embeddings.register_tokens" if huggingface else "register_tokens"
    regs = int(shapes[reg_key][1]) if reg_key in shapes else 0
    if not regs and "reg_token" in shapes:
        regs = int(shapes["reg_token"][1])
    layerscale = any("ls1" in k or "layer_scale1" in k for k in shapes)
    return ModelConfig(arch=arch, patch_size=patch, img_size=37 * patch, reg_tokens=regs,
                       depth=max(depths) + 1, layerscale=1e-5 if layerscale else None, drop_path_rate=0.0,
                       dino_head=HeadConfig(n_prototypes=16, hidden_dim=16, bottleneck_dim=16))


def save_encoder(path: str | Path, encoder: Encoder, meta: dict[str, Any] | None = None,
                 dtype: torch.dtype = torch.float32, extra: dict[str, Tensor] | None = None) -> Path:
    """Write ``encoder`` (backbone + task heads) as an encoder file: safetensors (``dtype``, e.g. fp16
    for a small shipped model) with its model config, heads, pre-processing and ``meta`` as JSON;
    ``extra`` tensors ride along (their names must not start with ``backbone.`` or ``heads.``)."""
    tensors = prefixed("backbone", encoder.backbone.state_dict())
    for name, head in encoder.heads.items():
        tensors.update(prefixed(f"heads.{name}", head.state_dict()))
    tensors.update(extra or {})  # e.g. a CLIP file's text tower, a checkpoint's optimiser state
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype) for k, v in tensors.items()}
    tensors.update(extra or {})
    info = {**(meta or {}), "kind": "encoder", "model": encoder.config.to_dict(),
            "heads": {name: head.describe() for name, head in encoder.heads.items()},
            "preprocess": {"resolution": encoder.resolution, "intensity_percentiles": list(encoder.percentiles),
                           "region": "tissue bounding box", "photometric": "MONOCHROME2"}}
    return save_checkpoint(path, tensors, info)
