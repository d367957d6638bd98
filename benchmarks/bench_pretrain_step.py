"""One MammoDINO pretraining step against lightly's DINOv2 recipe, same backbone, same inputs.

What is timed, for each variant, is one whole optimiser step as ``training.ssl.pretrain.pretrain_steps``
does it: student forward (2 global crops with iBOT masks + N local crops), teacher forward (global
crops), losses, backward, per-part gradient clipping (3.0, backbone and head apart, as DINOv2),
AdamW step, EMA update of the teacher. Data loading is not timed: both get the same random tensors.

* ``ours``: ``training.ssl.step.train_step``, the very function ``pretrain_steps`` calls each step
  (schedules, forward, losses, backward, clipping, AdamW, EMA), on the model, loss and AdamW (layer-wise
  lr decay groups) of ``training.ssl.pretrain.build_training``; minus data loading and logging.
* ``lightly``: lightly's documented DINOv2 example (``examples/pytorch/dinov2.py`` of lightly 1.6):
  ``MaskedVisionTransformerTIMM`` around a timm ``VisionTransformer``, ``DINOv2ProjectionHead`` for
  DINO and iBOT (shared head, DINOv2's default), ``DINOLoss``, ``IBOTPatchLoss``, ``KoLeoLoss``
  (weight 0.1 per global view), ``update_momentum``; AdamW over the student's parameters, with the
  same gradient clipping added (lightly's example has none; DINOv2 clips).

Equivalence established (checked by :func:`check_equivalence` at start-up, which copies our student
weights into lightly's and compares the three loss values on one batch):

* Backbone: the same timm ``VisionTransformer`` (``--arch`` tiny/small/base, ``--patch``), one input
  channel, layer scale 1e-5, ``dynamic_img_size=True``, class token, no registers, uniform drop path
  ``--drop-path`` in the student, teacher in eval mode; lightly resamples the position embeddings
  without antialiasing (``antialias=False``, as its example), as timm does for ours. A mask token
  replaces the masked patch embeddings in both. Pixel normalisation (mean 0.449, std 0.226) is inside
  our model; for lightly it is done on the batch inside the timed step.
* Heads: 3-layer MLP (embed -> ``--hidden`` -> ``--hidden`` -> ``--bottleneck``), L2 norm,
  weight-normalised prototypes (``--prototypes``) with a learnable gain; one head shared by DINO
  and iBOT. Ours calls the head once on [global cls, local cls, masked patches] concatenated,
  lightly's example three times (student) and twice (teacher).
* Losses: DINO (student temp 0.1, every (student view, teacher global view) pair except a view with
  itself, mean over pairs), iBOT (masked patches only, each image's patches weigh 1/|M_n|, sum / N
  global crops), KoLeo (0.1 x sum over the 2 global views). Teacher targets: softmax with a running
  centre (momentum 0.9) for both; teacher temperature 0.04.
* Not in lightly, so not in the common step: Sinkhorn-Knopp centring (DINOv2's, our presets' choice;
  ``--centering sinkhorn_knopp`` times ours with it against lightly's centring, for information)
  and our DBT adjacent-slice InfoNCE (``--dbt-pairs P`` adds a third variant, ``ours+dbt``: ours
  with the DBT term on P pairs of the global crops).

Masks: ``lightly.models.utils.random_block_mask`` (DINOv2's block masks: half the global crops
masked, 10-50% of their patches), drawn once with a fixed seed and given to both.

Measurement: (1) time, in one process, both variants built side by side, ``--warmup`` steps each,
then ``--steps`` steps interleaved (A B A B ...) so that the other processes on this shared machine
slow both alike; median and p90 of wall seconds per step, and the median CPU seconds of this process
(all threads), which other processes disturb less than wall time. (2) memory: each variant alone in a
fresh subprocess, ``--mem-repeats`` times alternated, medians: peak resident set (``VmHWM`` from
/proc) after ``--mem-steps`` steps, and that peak minus the resident set just before the first step
(the step's own working memory: activations, gradients, optimiser state). tracemalloc does not see
torch's allocations; VmHWM does.

KoLeo differs by about 1e-4 relative in the start-up check: on random crops the untrained class
tokens are near-duplicates (nearest-neighbour distances ~1e-3), where lightly's ``PairwiseDistance``
(eps added to the difference, then log(d + eps)) and our log(sqrt(d^2 + eps^2)) round differently.

    .venv/bin/python benchmarks/bench_pretrain_step.py                    # ~2 min on 2 cores
    .venv/bin/python benchmarks/bench_pretrain_step.py --json
    .venv/bin/python benchmarks/bench_pretrain_step.py --profile ours     # torch profiler table
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
import warnings
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# lightly's heads use torch.nn.utils.weight_norm, which torch deprecates: not ours to fix, keep the output clean.
warnings.filterwarnings("ignore", message=".*weight_norm.*deprecated", category=FutureWarning)
from torch import Tensor, nn  # noqa: E402

ARCH_DIMS = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}
PIXEL_MEAN, PIXEL_STD = 0.449, 0.226
CLIP = 3.0
TEACHER_TEMP = 0.04
MOMENTUM = 0.994


# --- inputs ----------------------------------------------------------------------------------------

def make_batch(args: argparse.Namespace) -> dict[str, Tensor]:
    """Random crops with the sampler's shapes (view-major), block masks on half the global crops."""
    from lightly.models.utils import random_block_mask

    gen = torch.Generator().manual_seed(0)
    n_global_rows = 2 * args.batch
    grid = args.global_size // args.patch
    torch.manual_seed(0)  # random_block_mask uses the global RNG
    masks = random_block_mask(size=(n_global_rows, grid, grid))
    pairs = torch.arange(min(args.dbt_pairs, args.batch))
    return {
        "global": torch.rand(n_global_rows, 1, args.global_size, args.global_size, generator=gen),
        "local": torch.rand(args.n_local * args.batch, 1, args.local_size, args.local_size, generator=gen),
        "masks": masks, "n_images": args.batch,
        # DBT pairs (only for ours+dbt): image p's first global crop with its second, one volume each.
        "dbt_pairs": torch.stack([pairs, pairs + args.batch], dim=1), "dbt_volumes": pairs,
    }


# --- the two steps ---------------------------------------------------------------------------------

def ours_config(args: argparse.Namespace, dbt: bool = False) -> Any:
    """The benchmark's settings as a pretraining config: constant teacher temperature, no warm-ups."""
    from training.ssl.presets import PretrainConfig
    from training.ssl.presets import TrainConfig
    from training.ssl.losses import LossConfig
    from training.ssl.models import HeadConfig, ModelConfig
    from training.sampler.sampler import SamplerConfig
    from training.ssl.schedules import ScheduleConfig

    head = HeadConfig(n_prototypes=args.prototypes, hidden_dim=args.hidden, bottleneck_dim=args.bottleneck)
    return PretrainConfig(
        model=ModelConfig(arch=args.arch, patch_size=args.patch, img_size=args.global_size,
                          drop_path_rate=args.drop_path, dino_head=head),
        loss=LossConfig(centering=args.centering, dbt_weight=1.0 if dbt else 0.0),
        schedule=ScheduleConfig(total_steps=1000, warmup_steps=0, freeze_last_layer_steps=0,
                                teacher_temp_warmup=TEACHER_TEMP, teacher_temp=TEACHER_TEMP,
                                momentum_teacher=MOMENTUM, clip_grad=CLIP),
        sampler=SamplerConfig(global_size=args.global_size, local_size=args.local_size, n_global=2,
                              n_local=args.n_local, patch_size=args.patch),
        train=TrainConfig(batch_size=args.batch))


def build_ours(args: argparse.Namespace, dbt: bool = False) -> Callable[[dict[str, Tensor], int], float]:
    """Our step is the training loop's own: ``training.ssl.step.train_step`` on a model, loss and AdamW
    from ``training.ssl.pretrain.build_training``."""
    from training.ssl.pretrain import build_training
    from training.ssl.step import train_step

    config = ours_config(args, dbt)
    torch.manual_seed(1)
    model, loss, optimizer = build_training(config)
    model.train()

    def step(batch: dict[str, Tensor], i: int) -> float:
        return train_step(model, loss, optimizer, config, batch, i).scalars["total"]

    step.model = model  # type: ignore[attr-defined]  (for check_equivalence)
    step.loss = loss  # type: ignore[attr-defined]
    return step


class _LightlyDINOv2(nn.Module):
    """lightly's DINOv2 example network: masked timm ViT + one DINOv2 head (DINO and iBOT) per side."""

    def __init__(self, args: argparse.Namespace):
        super().__init__()
        from lightly.models.modules import DINOv2ProjectionHead, MaskedVisionTransformerTIMM
        from lightly.models.utils import update_drop_path_rate
        from timm.models.vision_transformer import VisionTransformer
        import copy

        dim, depth, heads = ARCH_DIMS[args.arch]
        vit = VisionTransformer(img_size=args.global_size, patch_size=args.patch, in_chans=1, num_classes=0,
                                embed_dim=dim, depth=depth, num_heads=heads, init_values=1e-5,
                                dynamic_img_size=True)
        self.teacher_backbone = MaskedVisionTransformerTIMM(vit=vit, antialias=False,
                                                            pos_embed_initialization="skip")
        self.student_backbone = copy.deepcopy(self.teacher_backbone)
        update_drop_path_rate(self.student_backbone.vit, drop_path_rate=args.drop_path, mode="uniform")
        self.student_head = DINOv2ProjectionHead(dim, args.hidden, args.bottleneck, args.prototypes)
        self.teacher_head = DINOv2ProjectionHead(dim, args.hidden, args.bottleneck, args.prototypes)
        self.teacher_head.load_state_dict(self.student_head.state_dict())  # weight_norm defeats deepcopy
        for module in (self.teacher_backbone, self.teacher_head):
            for p in module.parameters():
                p.requires_grad = False
            module.eval()


def build_lightly(args: argparse.Namespace) -> Callable[[dict[str, Tensor], int], float]:
    from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
    from lightly.models.utils import update_momentum

    torch.manual_seed(1)
    model = _LightlyDINOv2(args)
    dino_criterion = DINOLoss(output_dim=args.prototypes, teacher_temp=TEACHER_TEMP)
    ibot_criterion = IBOTPatchLoss(output_dim=args.prototypes, teacher_temp=TEACHER_TEMP)
    koleo_criterion = KoLeoLoss()
    student_params = [p for m in (model.student_backbone, model.student_head) for p in m.parameters()
                      if p.requires_grad]
    optimizer = torch.optim.AdamW(student_params, lr=1e-4, weight_decay=0.04)
    model.student_backbone.train()
    model.student_head.train()
    n_views = 2 + args.n_local

    def step(batch: dict[str, Tensor], i: int) -> float:
        global_views = (batch["global"] - PIXEL_MEAN) / PIXEL_STD
        local_views = (batch["local"] - PIXEL_MEAN) / PIXEL_STD
        block_mask = batch["masks"]
        mask = torch.zeros(block_mask.shape[0], 1 + block_mask[0].numel(), dtype=torch.bool)
        mask[:, 1:] = block_mask.flatten(start_dim=1)
        with torch.no_grad():
            teacher_features = model.teacher_backbone.encode(global_views)
            teacher_cls_out = model.teacher_head(teacher_features[:, 0])
            teacher_masked_out = model.teacher_head(teacher_features[mask])
        student_features = model.student_backbone.encode(global_views, mask=mask)
        student_global_cls = student_features[:, 0]
        student_global_cls_out = model.student_head(student_global_cls)
        student_masked_out = model.student_head(student_features[mask])
        student_local_cls_out = model.student_head(model.student_backbone.encode(local_views)[:, 0])
        student_cls_out = torch.cat([student_global_cls_out, student_local_cls_out])
        loss = (dino_criterion(teacher_out=teacher_cls_out.chunk(2), student_out=student_cls_out.chunk(n_views),
                               teacher_temp=TEACHER_TEMP)
                + ibot_criterion(teacher_out=teacher_masked_out, student_out=student_masked_out,
                                 mask=block_mask, teacher_temp=TEACHER_TEMP)
                + 0.1 * sum(koleo_criterion(t) for t in student_global_cls.chunk(2)))
        total = float(loss.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for part in (model.student_backbone, model.student_head):
            torch.nn.utils.clip_grad_norm_([p for p in part.parameters() if p.grad is not None], CLIP)
        optimizer.step()
        update_momentum(model.student_backbone, model.teacher_backbone, m=MOMENTUM)
        update_momentum(model.student_head, model.teacher_head, m=MOMENTUM)
        return total

    step.model = model  # type: ignore[attr-defined]
    return step


def build(name: str, args: argparse.Namespace) -> Callable[[dict[str, Tensor], int], float]:
    if name == "lightly":
        return build_lightly(args)
    return build_ours(args, dbt=name == "ours+dbt")


# --- equivalence -----------------------------------------------------------------------------------

@torch.no_grad()
def check_equivalence(args: argparse.Namespace, batch: dict[str, Tensor]) -> dict[str, float]:
    """Copy our student into lightly's student and teacher (drop path off) and compare DINO, iBOT and
    KoLeo on one batch. Returns the largest absolute difference of each term."""
    from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
    from training.ssl.losses import LossConfig, MammoDINOLoss

    no_drop = argparse.Namespace(**{**vars(args), "drop_path": 0.0})
    ours = build_ours(no_drop).model  # type: ignore[attr-defined]
    lightly = build_lightly(no_drop).model  # type: ignore[attr-defined]
    backbone = {k: v for k, v in ours.student.backbone.state_dict().items() if k != "mask_token"}
    for side in (lightly.student_backbone, lightly.teacher_backbone):
        side.vit.load_state_dict(backbone)
        side.mask_token.copy_(ours.student.backbone.mask_token.reshape(1, 1, -1))
    head = ours.student.dino_head
    for side in (lightly.student_head, lightly.teacher_head):
        for a, b in zip([m for m in side.layers if isinstance(m, nn.Linear)],
                        [m for m in head.mlp if isinstance(m, nn.Linear)]):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
        side.last_layer.weight_v.copy_(head.last_layer_v)
        side.last_layer.weight_g.copy_(head.last_layer_g)
    ours.teacher.load_state_dict(ours.student.state_dict())
    ours.eval()
    lightly.eval()
    masks = batch["masks"]
    student = ours.forward_student(batch["global"], batch["local"], masks)
    teacher = ours.forward_teacher(batch["global"], masks)
    mine = MammoDINOLoss(LossConfig(centering="softmax_center"), args.prototypes)(
        student, teacher, 2, TEACHER_TEMP, masks)
    g = (batch["global"] - PIXEL_MEAN) / PIXEL_STD
    lo = (batch["local"] - PIXEL_MEAN) / PIXEL_STD
    mask = torch.cat([torch.zeros(masks.shape[0], 1, dtype=torch.bool), masks.flatten(1)], dim=1)
    t_feat = lightly.teacher_backbone.encode(g)
    s_feat = lightly.student_backbone.encode(g, mask=mask)
    s_cls = torch.cat([lightly.student_head(s_feat[:, 0]),
                       lightly.student_head(lightly.student_backbone.encode(lo)[:, 0])])
    theirs = {
        "dino": DINOLoss(args.prototypes)(lightly.teacher_head(t_feat[:, 0]).chunk(2),
                                          s_cls.chunk(2 + args.n_local), teacher_temp=TEACHER_TEMP),
        "ibot": IBOTPatchLoss(args.prototypes)(lightly.teacher_head(t_feat[mask]),
                                               lightly.student_head(s_feat[mask]), masks, TEACHER_TEMP),
        "koleo": sum(KoLeoLoss()(t) for t in s_feat[:, 0].chunk(2)),
    }
    return {name: abs(float(mine[name]) - float(theirs[name])) for name in theirs}


# --- measurement -----------------------------------------------------------------------------------

def rss_kib(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process, KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def memory_worker(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: build one variant, then peak RSS over a few steps."""
    batch = make_batch(args)
    step = build(name, args)
    before = rss_kib("VmRSS")
    for i in range(args.mem_steps):
        step(batch, i)
    peak = rss_kib("VmHWM")
    return {"peak_rss_mib": peak / 1024, "step_peak_mib": (peak - before) / 1024, "rss_before_mib": before / 1024}


def time_interleaved(names: list[str], args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds (this process, all threads) of each step, variants interleaved."""
    batch = make_batch(args)
    steps = {name: build(name, args) for name in names}
    for i in range(args.warmup):
        for name in names:
            steps[name](batch, i)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for i in range(args.steps):
        order = names if i % 2 == 0 else names[::-1]  # neither variant always runs first
        for name in order:
            wall, cpu = time.perf_counter(), time.process_time()
            steps[name](batch, args.warmup + i)
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    return times


def profile(name: str, args: argparse.Namespace) -> str:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    batch = make_batch(args)
    step = build(name, args)
    for i in range(args.warmup):
        step(batch, i)
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for i in range(3):
            step(batch, args.warmup + i)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCH_DIMS), default="tiny")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--global-size", type=int, default=112)
    parser.add_argument("--local-size", type=int, default=48)
    parser.add_argument("--n-local", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="images per step (each gives 2 + n-local crops)")
    parser.add_argument("--prototypes", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--bottleneck", type=int, default=256)
    parser.add_argument("--drop-path", type=float, default=0.1)
    parser.add_argument("--centering", choices=["softmax_center", "sinkhorn_knopp"], default="softmax_center",
                        help="ours only; lightly has running-centre softmax only (the equivalent is softmax_center)")
    parser.add_argument("--dbt-pairs", type=int, default=0, help="also time ours with the DBT loss on P pairs")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (interleaved)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mem-steps", type=int, default=3, help="steps per memory subprocess")
    parser.add_argument("--mem-repeats", type=int, default=3, help="memory subprocesses per variant (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", choices=["ours", "lightly", "ours+dbt"], help="print a torch profiler table")
    parser.add_argument("--no-check", action="store_true", help="skip the loss-equivalence check")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--_memory-worker", dest="memory_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.global_size % args.patch or args.local_size % args.patch:
        parser.error(f"crop sizes must be multiples of the patch size {args.patch}")
    torch.set_num_threads(args.threads)

    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args)))
        return 0
    if args.profile:
        print(profile(args.profile, args))
        return 0

    names = ["ours", "lightly"] + (["ours+dbt"] if args.dbt_pairs else [])
    result: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                              "torch": torch.__version__, "threads": args.threads,
                              "settings": {k: v for k, v in vars(args).items()
                                           if k not in ("json", "memory_worker", "profile", "no_check")}}
    import lightly
    result["lightly"] = lightly.__version__
    result["load_before"] = load_average()
    if not args.no_check:
        result["loss_abs_diff"] = check_equivalence(args, make_batch(args))
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for _ in range(args.mem_repeats):  # alternated, fresh process each: RSS peaks vary a little run to run
        for name in names:
            out = subprocess.run([sys.executable, __file__, *forwarded, "--_memory-worker", name],
                                 capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    memory = {name: {key: statistics.median(r[key] for r in runs[name]) for key in runs[name][0]}
              for name in names}
    times = time_interleaved(names, args)
    result["load_after"] = load_average()
    result["variants"] = {name: {"median_s": statistics.median(times[name]["wall"]), "p90_s": p90(times[name]["wall"]),
                                 "cpu_median_s": statistics.median(times[name]["cpu"]),
                                 "images_per_s": args.batch / statistics.median(times[name]["wall"]), **memory[name],
                                 "step_peak_runs_mib": [round(r["step_peak_mib"]) for r in runs[name]]}
                          for name in names}
    v = result["variants"]
    result["ratio_ours_over_lightly"] = {
        "median_time": v["ours"]["median_s"] / v["lightly"]["median_s"],
        "cpu_time": v["ours"]["cpu_median_s"] / v["lightly"]["cpu_median_s"],
        "p90_time": v["ours"]["p90_s"] / v["lightly"]["p90_s"],
        "peak_rss": v["ours"]["peak_rss_mib"] / v["lightly"]["peak_rss_mib"],
        "step_peak": v["ours"]["step_peak_mib"] / v["lightly"]["step_peak_mib"],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    s = result["settings"]
    print(f"{result['machine']}, torch {result['torch']}, lightly {result['lightly']}, {args.threads} threads; "
          f"load average before {result['load_before']}, after {result['load_after']}")
    print(f"ViT-{s['arch']}/{s['patch']}, batch {s['batch']}: 2 x {s['global_size']} px + {s['n_local']} x "
          f"{s['local_size']} px crops, head {s['hidden']}/{s['bottleneck']}/{s['prototypes']}, "
          f"ours centring {s['centering']}; {s['steps']} interleaved steps after {s['warmup']} warm-up")
    if "loss_abs_diff" in result:
        print("loss |ours - lightly| on identical weights: "
              + ", ".join(f"{k} {d:.1e}" for k, d in result["loss_abs_diff"].items()))
    print(f"{'variant':<10} {'median s':>9} {'p90 s':>8} {'CPU s':>7} {'img/s':>7} {'peak RSS MiB':>13} "
          f"{'step peak MiB':>14}")
    for name, r in v.items():
        print(f"{name:<10} {r['median_s']:>9.3f} {r['p90_s']:>8.3f} {r['cpu_median_s']:>7.3f} "
              f"{r['images_per_s']:>7.1f} {r['peak_rss_mib']:>13.0f} {r['step_peak_mib']:>14.0f}")
    ratio = result["ratio_ours_over_lightly"]
    print(f"ours / lightly: time median {ratio['median_time']:.2f}x, p90 {ratio['p90_time']:.2f}x, "
          f"CPU {ratio['cpu_time']:.2f}x; "
          f"peak RSS {ratio['peak_rss']:.2f}x, step peak {ratio['step_peak']:.2f}x  (goal <= 1.0x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
