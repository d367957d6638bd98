"""How fast is the breast phantom simulator?

Goals (issue 3): one 2048 x 1664 FFDM in under 2 s, one 40-slice DBT at 0.2 mm in-plane in
under 30 s, on the project's 2-core machine. Each case runs once to warm up, then ``--repeat``
times; the median is reported, with the load average around it (other processes share the cores).

Cases and the baselines measured in the same run:

* **ffdm**: ``simulate_ffdm(seed)`` end to end (3D phantom, projection, noise, processing, ground
  truth) at 2048 x 1664, 0.1 mm. Baseline **floor**: what any detector simulation of that image
  must do at least: Poisson quantum noise on 3.4 Mpixels and one Gaussian detector blur.
* **dbt**: ``simulate_dbt(seed)`` end to end with the default SART reconstruction, 15 projections
  over 15 degrees, 40 slices of 1 mm at 1024 x 832 x 0.2 mm (the first seed whose drawn compressed
  thickness is 39-40 mm), and with ``recon="saa"``.
* **saa**: our Fourier-domain shift-and-add of 15 projections into 40 slices, against baseline
  **textbook**: the same shift-and-add in the image domain, ``scipy.ndimage.shift`` (linear
  interpolation) of every projection for every slice.

    .venv/bin/python benchmarks/bench_phantom.py            # about 2-3 minutes
    .venv/bin/python benchmarks/bench_phantom.py --json     # one JSON object
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.phantom import breast_spec, simulate_dbt, simulate_ffdm  # noqa: E402
from training.phantom.acquisition import reconstruct  # noqa: E402

GOAL_FFDM_S = 2.0
GOAL_DBT_S = 30.0


def timed(fn, repeat: int) -> tuple[float, list[float], tuple[float, float]]:
    fn()  # warm-up: imports, FFT plans, page faults
    load_before = os.getloadavg()[0]
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, (load_before, os.getloadavg()[0])


def seed_with_thickness(lo: float, hi: float, view: str = "CC") -> int:
    """The first seed whose left breast has a compressed thickness in (lo, hi] mm."""
    for seed in range(100_000):
        if lo < breast_spec(seed, "L", "B").thickness_mm[view] <= hi:
            return seed
    raise RuntimeError("no seed found")


def floor_ffdm(rng: np.random.Generator) -> None:
    expected = np.full((2048, 1664), 2500.0, np.float32)
    counts = rng.poisson(expected).astype(np.float32)
    ndimage.gaussian_filter(counts, 0.5)


def textbook_saa(projections: np.ndarray, tans: np.ndarray, heights: np.ndarray, pixel: float) -> np.ndarray:
    out = np.zeros((len(heights), *projections.shape[1:]), np.float32)
    for k, z in enumerate(heights):
        for a, t in enumerate(tans):
            out[k] += ndimage.shift(projections[a], (-z * t / pixel, 0), order=1, mode="constant")
    return out / len(tans)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: dict = {"python": platform.python_version(), "cpus": os.cpu_count(), "numpy": np.__version__}

    rng = np.random.default_rng(0)
    median, times, load = timed(lambda: simulate_ffdm(1, lesion="mass"), args.repeat)
    floor, _, _ = timed(lambda: floor_ffdm(rng), args.repeat)
    results["ffdm"] = {"shape": [2048, 1664], "median_s": median, "runs_s": times, "load": load,
                       "floor_s": floor, "x_floor": median / floor}

    seed = seed_with_thickness(39.0, 40.0)
    probe = simulate_dbt(seed, lesion="none", recon="saa")
    assert probe.pixels.shape[0] == 40, probe.pixels.shape
    dbt = {}
    for recon in ("sart", "saa"):
        m, t, ld = timed(lambda: simulate_dbt(seed, lesion="mass", recon=recon), args.repeat)
        dbt[recon] = {"median_s": m, "runs_s": t, "load": ld}
    results["dbt"] = {"seed": seed, "shape": list(probe.pixels.shape), "spacing_mm": list(probe.spacing_mm), **dbt}

    # Shift-and-add alone, on projections of the same size (15 x (1024 + padding) x 832).
    projections = np.random.default_rng(1).random((15, 1120, 832), dtype=np.float32)
    tans = np.tan(np.radians(np.linspace(-7.5, 7.5, 15)))
    heights = np.arange(40) + 0.5
    ours, _, _ = timed(lambda: reconstruct(projections, tans, heights, 1.0, 0.2, "saa"), args.repeat)
    book, _, _ = timed(lambda: textbook_saa(projections, tans, heights, 0.2), 1)
    results["saa"] = {"ours_s": ours, "textbook_s": book, "x_faster": book / ours}

    if args.json:
        print(json.dumps(results))
        return 0
    f, d = results["ffdm"], results["dbt"]
    print(f"Python {results['python']}, numpy {results['numpy']}, {results['cpus']} CPUs; "
          f"medians of {args.repeat} runs")
    print(f"{'case':34s} | {'median s':>9s} | {'runs s':24s} | load avg before/after | baseline")
    print("-" * 110)
    print(f"{'FFDM 2048x1664 (mass)':34s} | {f['median_s']:9.2f} | {', '.join(f'{x:.2f}' for x in f['runs_s']):24s} | "
          f"{f['load'][0]:.1f} / {f['load'][1]:.1f}          | "
          f"floor (Poisson + blur) {f['floor_s']:.2f} s: x{f['x_floor']:.1f}")
    for recon in ("sart", "saa"):
        r = d[recon]
        print(f"{'DBT %dx%dx%d %s (mass)' % (*d['shape'], recon):34s} | {r['median_s']:9.2f} | "
              f"{', '.join(f'{x:.2f}' for x in r['runs_s']):24s} | {r['load'][0]:.1f} / {r['load'][1]:.1f}          |")
    s = results["saa"]
    print(f"{'shift-and-add 15 -> 40 slices':34s} | {s['ours_s']:9.2f} | {'':24s} |                      | "
          f"textbook ndimage.shift {s['textbook_s']:.2f} s: x{s['x_faster']:.1f} faster")
    print()
    verdict = "PASS" if f["median_s"] < GOAL_FFDM_S else "FAIL"
    print(f"{verdict}  FFDM 2048 x 1664 < {GOAL_FFDM_S:.0f} s: {f['median_s']:.2f} s")
    verdict = "PASS" if d["sart"]["median_s"] < GOAL_DBT_S else "FAIL"
    print(f"{verdict}  DBT 40 slices at 0.2 mm (SART) < {GOAL_DBT_S:.0f} s: "
          f"{d['sart']['median_s']:.2f} s (seed {d['seed']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
