"""Inference results on disk: maps as PNG overlays on the image and as arrays, with a JSON
summary."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from training.errors import MammoInputError
from training.evaluate.infer import (Attention, InferenceResult, TISSUE_PATCH, display_limits, infer_image,
                                     on_image_grid)


PNG_LONG_SIDE = 1536  # overlays of a full-field mammogram are written at most this size


OVERLAY_ALPHA = 0.8  # opacity of a map's top colour in the PNG overlays


def _background(result: InferenceResult, image: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The windowed image (what a radiologist sees, [0, 1]) at PNG size, and its pixel rows/cols."""
    if image is None:
        return None
    shape = result.prepared.image_shape
    step = max(1, int(np.ceil(max(shape) / PNG_LONG_SIDE)))
    rows, cols = np.arange(0, shape[0], step), np.arange(0, shape[1], step)
    if hasattr(image, "meta"):
        from training.dicom.display import to_display

        frame = result.frame
        values = image.frame(frame if frame is not None else 0)
        shown = to_display(values[::step, ::step], image.meta, frame=frame)
    else:
        values = np.asarray(image[result.frame] if np.ndim(image) == 3 else image, dtype=np.float32)[::step, ::step]
        lo, hi = np.percentile(values, (0.5, 99.5))
        shown = np.clip((values - lo) / max(hi - lo, 1e-6), 0, 1)
    if shown.shape != (len(rows), len(cols)):
        raise MammoInputError(f"export: the image {shape} is not the one these maps were computed on")
    return np.asarray(shown, dtype=np.float32), rows, cols


def _overlay(result: InferenceResult, image: Any, rgb_map: np.ndarray, alpha_map: np.ndarray) -> np.ndarray:
    """(h, w, 3) colours with (h, w) opacities blended over the image (or over the encoder's input)."""
    found = _background(result, image)
    if found is None:  # no image: draw on the encoder's own input at its resolution
        shown = result.prepared.pixels
        zoom = (shown.shape[0] // result.grid[0], shown.shape[1] // result.grid[1])
        colours = np.repeat(np.repeat(rgb_map, zoom[0], 0), zoom[1], 1)
        alpha = np.repeat(np.repeat(alpha_map, zoom[0], 0), zoom[1], 1)[..., None]
    else:
        shown, rows, cols = found
        colours = on_image_grid(result.prepared, rgb_map, rows, cols)
        alpha = on_image_grid(result.prepared, alpha_map, rows, cols)[..., None]
    grey = np.repeat(shown[..., None], 3, axis=-1)
    return np.clip(grey * (1 - alpha) + colours * alpha, 0, 1)


def export(result: InferenceResult, out_dir: str | Path, image: Any = None, prefix: str = "") -> dict[str, str]:
    """Write ``result`` into ``out_dir``: NPY maps (raw: attention sums to 1; none for an encoder without
    attention), PNG overlays on the windowed ``image`` (a MammoImage or array the result was computed on;
    without it, on the encoder's input) and JSON predictions. Returns {what: path}."""
    from matplotlib import colormaps
    from matplotlib.image import imsave

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MammoInputError(f"--out {out}: cannot create the folder ({exc})") from None
    files: dict[str, str] = {}

    def path(name: str) -> Path:
        target = out / f"{prefix}{name}"
        files[name] = str(target)
        return target

    try:
        if result.has_attention:
            np.save(path("attention.npy"), result.attention)
            np.save(path("attention_heads.npy"), result.head_attention)
        if result.rollout is not None:
            np.save(path("rollout.npy"), result.rollout)
        np.save(path("pca.npy"), result.pca)
        np.save(path("tissue.npy"), result.prepared.tissue.astype(np.float32))
        for task, heatmap in result.heatmaps.items():
            np.save(path(f"heatmap_{task}.npy"), heatmap)

        if result.has_attention:
            shown = result.map("attention")
            lo, hi = display_limits(shown)
            level = np.clip((shown - lo) / (hi - lo), 0, 1)
            # Opacity follows the map (like napari's additive blending): the image stays readable where
            # the model does not look more than its uniform share.
            imsave(path("attention.png"), _overlay(result, image, colormaps["inferno"](level)[..., :3],
                                                   OVERLAY_ALPHA * level))
        tissue = (result.prepared.tissue >= TISSUE_PATCH).astype(np.float32)
        imsave(path("pca.png"), _overlay(result, image, result.pca, 0.7 * tissue))
        for task, heatmap in result.heatmaps.items():
            imsave(path(f"heatmap_{task}.png"), _overlay(result, image, colormaps["magma"](heatmap)[..., :3],
                                                         OVERLAY_ALPHA * heatmap))
        target = path("predictions.json")
        target.write_text(json.dumps({**result.summary(), "files": dict(files)}, indent=1, default=str))
    except OSError as exc:
        raise MammoInputError(f"--out {out}: cannot write the results ({exc})") from None
    return files


def infer_command(path: str, checkpoint: str | None, out: str, frame: int | None = None, all_slices: bool = False,
                  resolution: int | None = None, rollout: bool = False,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``mammodino infer``: maps and predictions of one image (or each DBT slice) written to ``out``;
    returns the report (one JSON object)."""
    from training.evaluate.encoder import load_encoder
    from training.dicom.io import open_image

    if resolution is not None and resolution <= 0:
        raise MammoInputError(f"--resolution {resolution}: must be a positive number of pixels")
    start = time.perf_counter()
    encoder = load_encoder(checkpoint)
    image = open_image(path)
    if all_slices and not image.meta.is_volume:
        raise MammoInputError(f"--all-slices: {path} is a 2D image (one frame); drop --all-slices")
    attention: Attention = "rollout" if rollout else "last"
    report: dict[str, Any] = {"path": str(path), "kind": image.meta.kind, "attention": attention,
                              "encoder": encoder.describe()}
    if not all_slices:
        result = infer_image(encoder, image, frame, resolution, attention)
        files = export(result, out, image=image)
        report.update({k: v for k, v in result.summary().items() if k not in ("path", "encoder")})
        report["files"] = files
    else:
        slices = []
        n = image.data.shape[0]
        for index in range(n):
            result = infer_image(encoder, image, index, resolution, attention)
            files = export(result, out, image=image, prefix=f"slice{index:03d}_")
            share = result.attention_in_tissue
            slices.append({"frame": index, "predictions": result.predictions,
                           "attention_in_tissue": None if share is None else round(share, 6),
                           "tissue_share": round(result.tissue_share, 6), "files": files})
            if progress is not None:
                progress(f"slice {index + 1}/{n}")
        report["predictions"] = {  # the mean over slices of each class probability
            task: {c: float(np.mean([s["predictions"][task][c] for s in slices])) for c in classes}
            for task, classes in slices[0]["predictions"].items()}
        shares = [s["attention_in_tissue"] for s in slices if s["attention_in_tissue"] is not None]
        report["attention_in_tissue"] = float(np.mean(shares)) if shares else None
        report["tissue_share"] = float(np.mean([s["tissue_share"] for s in slices]))
        report["slices"] = slices
        report["files"] = {k: v for s in slices for k, v in
                           ((f"slice{s['frame']:03d}_{name}", p) for name, p in s["files"].items())}
    report["out"] = str(out)
    report["time_s"] = round(time.perf_counter() - start, 3)
    return report
