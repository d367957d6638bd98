"""How fast a pretraining run uses its hardware: model FLOPs per image and model-FLOPs utilisation.

* FLOPs per image (:func:`flops_per_image`): counted, not estimated, by running one image's multi-crop
  step (student forward on the global and local crops with iBOT masks, backward, teacher forward on
  the global crops) under ``torch.utils.flop_counter.FlopCounterMode``, which counts every matrix
  product, convolution and attention kernel. Element-wise work (norms, GELU, softmax) is left out,
  as in the usual MFU definition (PaLM, Chowdhery et al. 2022, appendix B).
* MFU (:func:`mfu`): achieved model FLOPs per second over the accelerator's dense peak for the
  run's precision. Peaks are the vendors' datasheet figures for dense (not sparse) tensor-core math;
  an unknown device gives ``None`` rather than a made-up figure.
"""

from __future__ import annotations

from typing import Any

import torch

# Dense peak FLOP/s by (device-name fragment, precision), from the vendors' datasheets.
PEAK_FLOPS: dict[tuple[str, str], float] = {
    ("H200", "bf16"): 989.4e12, ("H200", "fp32"): 67e12,
    ("H100", "bf16"): 989.4e12, ("H100", "fp32"): 67e12,     # SXM; the PCIe card is lower (756 bf16)
    ("A100", "bf16"): 312e12, ("A100", "fp32"): 19.5e12,
    ("L40S", "bf16"): 362e12, ("L40S", "fp32"): 91.6e12,
}


def flops_per_image(config: Any) -> float:
    """Model FLOPs of one image's training step for a :class:`training.ssl.presets.PretrainConfig`
    (forward + backward of the student on all crops, forward of the teacher on the global crops)."""
    from torch.utils.flop_counter import FlopCounterMode

    from training.ssl.models import StudentTeacher

    s = config.sampler
    with torch.random.fork_rng(devices=[]):
        model = StudentTeacher(config.model)
    model.train()
    grid = s.global_size // s.patch_size
    global_crops = torch.rand(s.n_global, 1, s.global_size, s.global_size)
    local_crops = torch.rand(s.n_local, 1, s.local_size, s.local_size)
    masks = torch.zeros(s.n_global, grid, grid, dtype=torch.bool)
    masks[:, : grid // 2] = True  # iBOT runs the head on masked tokens: count a typical half-masked crop
    with FlopCounterMode(display=False) as counter:
        out = model.student(global_crops, local_crops, masks, mask_inputs=True)
        total = sum(value.float().sum() for value in out.values())
        total.backward()
        with torch.no_grad():
            model.forward_teacher(global_crops, masks)
    return float(counter.get_total_flops())


def peak_flops(device: str | torch.device, precision: str) -> float | None:
    """The dense peak FLOP/s of ``device`` at ``precision`` ("bf16" or "fp32"), or None when unknown
    (CPUs, unlisted GPUs)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_of(torch.cuda.get_device_name(device), precision)


def peak_flops_of(name: str, precision: str) -> float | None:
    """The dense peak FLOP/s of the accelerator a run recorded (``device_name``, e.g. "cuda: NVIDIA H200"),
    so that a run's MFU can be worked out on any machine, not only the one that trained it."""
    for (fragment, kind), value in PEAK_FLOPS.items():
        if fragment in name and kind == precision:
            return value
    return None


def mfu(flops_image: float, images_per_s: float, peak: float | None) -> float | None:
    """Model-FLOPs utilisation: achieved model FLOP/s over the peak (None without a known peak)."""
    if not peak or images_per_s <= 0:
        return None
    return flops_image * images_per_s / peak


def device_name(device: str | torch.device) -> str:
    """What a run trains on, in words: the GPU's name, or the CPU and its core count."""
    import os
    import platform

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
