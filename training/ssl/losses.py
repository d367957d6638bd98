r"""MammoDINO's losses, each a pure function of tensors, plus :class:`MammoDINOLoss` that combines them.

Notation: ``B`` images, ``K`` prototypes, student temperature :math:`\tau_s` (0.1), teacher temperature
:math:`\tau_t` (0.04 -> 0.07, see :mod:`training.ssl.schedules`), :math:`H(p, q) = -\sum_k p_k \log q_k`.

* DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"; DINOv2, Oquab
  et al. 2023). Student views :math:`v = 1..V` (the ``G`` global crops first, then the locals), teacher
  targets :math:`t^{g,b}` for the global crops :math:`g = 1..G`:

  .. math:: L_{dino} = \frac{1}{|P|} \sum_{(v,g) \in P} \frac{1}{B} \sum_b H\big(t^{g,b},
            \mathrm{softmax}(z_s^{v,b} / \tau_s)\big), \quad P = \{(v, g) : v \ne g\}

  so a global crop is never compared with itself; |P| = G(G-1) + G * n_local. This is DINOv2's sum
  of its "global" and "local" terms, each divided by that same count.
* Teacher targets, by centring (DINO): :math:`t = \mathrm{softmax}((z_t - c) / \tau_t)` with the centre
  :math:`c \leftarrow m c + (1 - m) \bar z_t` updated after use from the batch mean of the teacher
  logits (m = 0.9); or by Sinkhorn-Knopp (SwAV, Caron et al. 2020, as DINOv2 uses it): 3 alternating
  normalisations of :math:`\exp(z_t / \tau_t)` so that every prototype gets 1/K of the batch's mass
  and every sample's row sums to 1.
* iBOT (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer"), normalised per image
  as DINOv2's ``iBOTPatchLoss.forward_masked``: for the masked patches :math:`i \in M_n` of global crop
  :math:`n = 1..N` (N = G * B, unmasked crops included),

  .. math:: L_{ibot} = \frac{1}{N} \sum_n \frac{1}{|M_n|} \sum_{i \in M_n} H\big(t_i,
            \mathrm{softmax}(z_{s,i} / \tau_s)\big)

  so each masked crop counts once whatever its number of masked patches, and crops without a mask add 0.
* KoLeo (Sablayrolles et al. 2019, "Spreading vectors for similarity search"; DINOv2): on the
  L2-normalised student class tokens :math:`x_b` of one global view,
  :math:`L = -\frac{1}{B} \sum_b \log d_b`, :math:`d_b = \sqrt{\lVert x_b - x_{nn(b)} \rVert^2 +
  \epsilon^2}` with :math:`nn(b)` the nearest other sample. Summed over the G global views as DINOv2
  does (never across views of one image). Guards: computed in float32 outside autocast (DINOv2 users
  see ``inf`` when fp16 rounds a tiny distance to 0), the smoothed distance is at least
  :math:`\epsilon`, so duplicates (the same image twice, or a collapsed batch) give the finite value
  :math:`-\log \epsilon` and a zero, finite gradient; a batch of one has no neighbour and gives 0.
* DBT adjacent-slice InfoNCE (ours, for MammoDINO's tomosynthesis term; InfoNCE: van den Oord et al.
  2018, symmetric form as CLIP, Radford et al. 2021). For pairs :math:`p = 1..P` of embeddings
  :math:`a_p` (slice i) and :math:`b_p` (slice i +/- k, same crop box, same flips), L2-normalised,
  :math:`s_{pq} = a_p \cdot b_q / \tau`, and :math:`N_p = \{p\} \cup \{q : vol(q) \ne vol(p)\}`
  (the other volumes' slices in the batch are the negatives; other pairs of the same volume are left
  out, since they are not negatives):

  .. math:: L_{dbt} = \frac{1}{2P} \sum_p \Big[-\log \frac{e^{s_{pp}}}{\sum_{q \in N_p} e^{s_{pq}}}
            - \log \frac{e^{s_{pp}}}{\sum_{q \in N_p} e^{s_{qp}}}\Big]

  Applied only to the pairs given (a mixed FFDM/DBT batch passes the indices of its DBT pairs; none
  gives 0). With one pair (or one volume) there are no negatives and the loss is 0.
* Image-report contrastive loss (CLIP, Radford et al. 2021; Mammo-CLIP, Ghosh et al. 2024, whose
  multi-view idea makes the CC and MLO views of one breast positives of each other's report). Image
  :math:`u_i` and text :math:`w_j` embeddings, L2-normalised, :math:`s_{ij} = u_i \cdot w_j / \tau`,
  positives :math:`P_i = \{j : breast(j) = breast(i)\}` (just :math:`\{i\}` without breast ids):

  .. math:: L_{clip} = \frac{1}{2B} \sum_i \Big[-\frac{1}{|P_i|} \sum_{j \in P_i} \log
            \frac{e^{s_{ij}}}{\sum_k e^{s_{ik}}}\Big] + (\text{the same over texts})

  With one positive per row it is the symmetric InfoNCE above without excluded rows.

Distributed training: the centre and Sinkhorn-Knopp need sums over every process; they take a
``reduce(tensor, op)`` callable (``op`` is ``"sum"`` or ``"max"``, in place, returning the tensor) that
the training loop binds to ``torch.distributed.all_reduce``; the default keeps everything local.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.config import from_dict, to_dict
from training.errors import MammoInputError

Reduce = Callable[[Tensor, str], Tensor]


def local_reduce(tensor: Tensor, op: str) -> Tensor:
    """The single-process ``reduce``: nothing to combine."""
    return tensor


@dataclass(frozen=True)
class LossConfig:
    """Loss weights and settings. Defaults are DINOv2's (``ssl_default_config.yaml``) where it has one."""

    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1            # per global view, summed over views as DINOv2
    dbt_weight: float = 1.0              # ours: the DBT term weighs as much as DINO and iBOT
    student_temp: float = 0.1
    centering: Literal["softmax_center", "sinkhorn_knopp"] = "softmax_center"
    center_momentum: float = 0.9
    sinkhorn_iterations: int = 3
    koleo_eps: float = 1e-8
    dbt_temperature: float = 0.1
    dbt_embedding: Literal["cls", "patch_mean"] = "cls"

    def __post_init__(self) -> None:
        problems = [f"{n} must be >= 0" for n in ("dino_weight", "ibot_weight", "koleo_weight", "dbt_weight")
                    if getattr(self, n) < 0]
        problems += [f"{n} must be > 0" for n in ("student_temp", "dbt_temperature", "koleo_eps")
                     if getattr(self, n) <= 0]
        if not 0 <= self.center_momentum < 1:
            problems.append("center_momentum must be in [0, 1)")
        if self.sinkhorn_iterations < 1:
            problems.append("sinkhorn_iterations must be >= 1")
        if problems:
            raise MammoInputError("loss config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LossConfig":
        return from_dict(cls, values, "loss")


# --- cross-entropies -------------------------------------------------------------------------------

def soft_cross_entropy(targets: Tensor, student_logits: Tensor, student_temp: float) -> Tensor:
    """:math:`H(t, \\mathrm{softmax}(z / \\tau_s))` per row, in float32."""
    log_q = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(targets.float() * log_q).sum(dim=-1)


def dino_loss(student_logits: Tensor, teacher_probs: Tensor, student_temp: float = 0.1) -> Tensor:
    """DINO cross-view loss. ``student_logits`` (V, B, K): all views, the G global crops first, in the
    teacher's order; ``teacher_probs`` (G, B, K). Mean over the pairs (v, g) with v != g."""
    views, batch, _ = student_logits.shape
    n_global = teacher_probs.shape[0]
    if teacher_probs.shape[1:] != student_logits.shape[1:] or n_global > views:
        raise ValueError(f"teacher {tuple(teacher_probs.shape)} does not fit student {tuple(student_logits.shape)}")
    log_q = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    ce = -torch.einsum("gbk,vbk->gv", teacher_probs.float(), log_q) / batch  # (G, V) mean over images
    keep = torch.ones_like(ce)
    keep[torch.arange(n_global), torch.arange(n_global)] = 0  # a global crop is not its own target
    n_terms = keep.sum()
    if n_terms == 0:
        raise ValueError("the DINO loss needs at least two views (two global crops, or one and a local)")
    return (ce * keep).sum() / n_terms


def ibot_loss(student_logits: Tensor, teacher_probs: Tensor, masks: Tensor, student_temp: float = 0.1) -> Tensor:
    """iBOT masked-patch loss. ``masks`` (N, h, w) or (N, h*w) bool over the N global crops;
    ``student_logits``/``teacher_probs`` (M, K) for the M masked patches in ``masks.nonzero()`` order.
    Each crop's patches weigh 1/|M_n|; the sum is divided by N (DINOv2)."""
    flat = masks.reshape(masks.shape[0], -1).bool()
    per_image = flat.sum(dim=1)
    if student_logits.shape[0] != int(per_image.sum()) or teacher_probs.shape != student_logits.shape:
        raise ValueError(f"{int(per_image.sum())} masked patches but logits {tuple(student_logits.shape)} "
                         f"and targets {tuple(teacher_probs.shape)}")
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0  # no masked patch in this batch: 0, still part of the graph
    owner = torch.repeat_interleave(torch.arange(flat.shape[0], device=flat.device), per_image)
    weights = 1.0 / per_image[owner].clamp(min=1).float()
    ce = soft_cross_entropy(teacher_probs, student_logits, student_temp)
    return (ce * weights).sum() / flat.shape[0]


# --- teacher targets -------------------------------------------------------------------------------

@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, temperature: float, n_iterations: int = 3,
                   reduce: Reduce = local_reduce) -> Tensor:
    """Sinkhorn-Knopp targets (N, K): rows (samples) sum to 1, each prototype's column sums towards
    N/K (exactly so after the prototype step; the last step is the row one). N counts every process's
    samples through ``reduce``. The iterations of SwAV/DINOv2 are done in the log domain: the same
    values, but neither ``exp`` overflow nor a row underflowing to all zeros at low temperature."""
    log_q = teacher_logits.float() / temperature
    n_local, k = log_q.shape
    n = reduce(torch.tensor(float(n_local), device=log_q.device), "sum")
    log_k, log_n = math.log(k), torch.log(n)
    for _ in range(n_iterations):
        log_q = log_q - (_logsumexp_over_samples(log_q, reduce) + log_k)   # each prototype: 1/K of the mass
        log_q = log_q - (torch.logsumexp(log_q, dim=1, keepdim=True) + log_n)  # each sample: 1/N
    return torch.exp(log_q + log_n)


def _logsumexp_over_samples(x: Tensor, reduce: Reduce) -> Tensor:
    """log sum_n exp(x[n, k]) over the samples of every process: (N, K) -> (1, K)."""
    if x.shape[0]:
        peak = x.amax(dim=0, keepdim=True)
    else:
        peak = x.new_full((1, x.shape[1]), float("-inf"))
    peak = reduce(peak, "max")
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = reduce(torch.exp(x - peak).sum(dim=0, keepdim=True), "sum")
    return peak + torch.log(total)


class TeacherTargets(nn.Module):
    """Turns teacher logits into target distributions: running-centre softmax or Sinkhorn-Knopp. The
    centre is a buffer (it is saved in checkpoints and resumed)."""

    def __init__(self, n_prototypes: int, method: str = "softmax_center", momentum: float = 0.9,
                 sinkhorn_iterations: int = 3):
        super().__init__()
        if method not in ("softmax_center", "sinkhorn_knopp"):
            raise MammoInputError(f"centering must be 'softmax_center' or 'sinkhorn_knopp', not {method!r}")
        self.method, self.momentum, self.sinkhorn_iterations = method, momentum, sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, n_prototypes))

    @torch.no_grad()
    def forward(self, teacher_logits: Tensor, temperature: float, reduce: Reduce = local_reduce) -> Tensor:
        if self.method == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, temperature, self.sinkhorn_iterations, reduce)
        logits = teacher_logits.float()
        probs = F.softmax((logits - self.center) / temperature, dim=-1)
        self.update_center(logits, reduce)
        return probs

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor, reduce: Reduce = local_reduce) -> None:
        """c <- m c + (1 - m) * mean of the batch's teacher logits (over every process)."""
        total = reduce(teacher_logits.float().sum(dim=0, keepdim=True), "sum")
        count = reduce(torch.tensor(float(teacher_logits.shape[0]), device=teacher_logits.device), "sum")
        if count > 0:
            self.center.mul_(self.momentum).add_(total / count, alpha=1 - self.momentum)


# --- regularisers and the DBT term -----------------------------------------------------------------

def koleo_loss(embeddings: Tensor, eps: float = 1e-8) -> Tensor:
    """KoLeo on (B, D) embeddings (L2-normalised here): -mean log of each one's nearest-neighbour
    distance, smoothed as sqrt(d^2 + eps^2) so it stays finite on duplicates; 0 for B < 2."""
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        x = F.normalize(embeddings.float(), dim=-1, eps=eps)
        if x.shape[0] < 2:
            return x.sum() * 0.0
        with torch.no_grad():
            similarity = x @ x.T
            similarity.fill_diagonal_(-2.0)  # below any cosine: never one's own neighbour
            nearest = similarity.argmax(dim=1)
        squared = (x - x[nearest]).pow(2).sum(dim=-1)
        return -torch.log(torch.sqrt(squared + eps * eps)).mean()


def symmetric_infonce(anchors: Tensor, partners: Tensor, temperature: float = 0.1,
                      groups: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE between row p of ``anchors`` and row p of ``partners`` (P, D), the other rows as
    negatives except those of the same ``groups`` id (P,); see the module docstring for the formula."""
    if anchors.shape != partners.shape or anchors.ndim != 2:
        raise ValueError(f"anchors {tuple(anchors.shape)} and partners {tuple(partners.shape)} must be (P, D)")
    if anchors.shape[0] == 0:
        return (anchors.sum() + partners.sum()) * 0.0
    a = F.normalize(anchors.float(), dim=-1)
    b = F.normalize(partners.float(), dim=-1)
    logits = a @ b.T / temperature
    if groups is not None:
        same = groups.reshape(-1, 1) == groups.reshape(1, -1)
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))



def clip_loss(images: Tensor, texts: Tensor, temperature: Tensor | float = 0.07,
              breasts: Tensor | None = None) -> Tensor:
    """Symmetric image-report InfoNCE (module docstring): row i of ``images`` (B, D) and of ``texts``
    (B, D) describe the same image; rows with the same ``breasts`` id (B,) are positives too, each
    weighted 1/|P_i| (the CC and MLO views of one breast share their findings)."""
    if images.shape != texts.shape or images.ndim != 2:
        raise ValueError(f"images {tuple(images.shape)} and texts {tuple(texts.shape)} must be (B, D)")
    logits = F.normalize(images.float(), dim=-1) @ F.normalize(texts.float(), dim=-1).T / temperature
    if breasts is None:
        positives = torch.eye(len(logits), device=logits.device)
    else:
        ids = torch.as_tensor(breasts, device=logits.device).reshape(-1, 1)
        positives = (ids == ids.T).float()
    weights = positives / positives.sum(dim=1, keepdim=True)  # symmetric: the same for the texts' side
    image_side = -(weights * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    text_side = -(weights * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return 0.5 * (image_side + text_side)

def dbt_pair_loss(embeddings: Tensor, pairs: Tensor, temperature: float = 0.1,
                  volumes: Tensor | None = None) -> Tensor:
    """The DBT adjacent-slice loss on a mixed batch: ``embeddings`` (N, D) of every crop, ``pairs`` (P, 2)
    indices (slice i, slice i +/- k) into it, ``volumes`` (P,) the volume id of each pair (None: every
    pair is its own volume). No pairs: 0, still part of the graph."""
    pairs = torch.as_tensor(pairs, dtype=torch.long, device=embeddings.device).reshape(-1, 2)
    if pairs.shape[0] == 0:
        return embeddings.sum() * 0.0
    groups = None if volumes is None else torch.as_tensor(volumes, device=embeddings.device).reshape(-1)
    if groups is not None and groups.shape[0] != pairs.shape[0]:
        raise ValueError(f"{groups.shape[0]} volume ids for {pairs.shape[0]} pairs")
    return symmetric_infonce(embeddings[pairs[:, 0]], embeddings[pairs[:, 1]], temperature, groups)


# --- monitoring ------------------------------------------------------------------------------------

@torch.no_grad()
def mean_entropy(probs: Tensor) -> Tensor:
    """Mean entropy (nats) of the rows of ``probs``: near 0 when the teacher is one-hot per sample."""
    p = probs.float()
    return -torch.special.xlogy(p, p).sum(dim=-1).mean()


@torch.no_grad()
def marginal_entropy(probs: Tensor) -> Tensor:
    """Entropy of the batch-mean distribution: near 0 when every sample picks the same prototype
    (collapse), log K when the prototypes are used evenly."""
    p = probs.float().mean(dim=0)
    return -torch.special.xlogy(p, p).sum()


# --- everything together ---------------------------------------------------------------------------

class MammoDINOLoss(nn.Module):
    """DINO + iBOT + KoLeo + DBT on the outputs of :class:`training.ssl.models.SSLNetwork` (student and
    teacher), with the teacher centres as buffers."""

    def __init__(self, config: LossConfig, dino_prototypes: int, ibot_prototypes: int | None = None):
        super().__init__()
        self.config = config
        ibot_prototypes = ibot_prototypes or dino_prototypes
        self.dino_targets = TeacherTargets(dino_prototypes, config.centering, config.center_momentum,
                                           config.sinkhorn_iterations)
        self.ibot_targets = TeacherTargets(ibot_prototypes, config.centering, config.center_momentum,
                                           config.sinkhorn_iterations)

    def forward(self, student: dict[str, Tensor], teacher: dict[str, Tensor], n_global: int, teacher_temp: float,
                masks: Tensor | None = None, dbt_pairs: Tensor | None = None, dbt_volumes: Tensor | None = None,
                reduce: Reduce = local_reduce) -> dict[str, Tensor]:
        """Every term and the weighted ``total`` (the only one with a graph is what the terms carry).

        ``dbt_pairs`` (P, 2) index rows of the student's global crops (view-major, like everything else);
        ``dbt_volumes`` (P,) their volume ids. Also returns the teacher's ``teacher_entropy`` and
        ``teacher_marginal_entropy`` (DINO targets) for collapse monitoring."""
        c = self.config
        out = self.share_terms(student, teacher, n_global, teacher_temp, masks, reduce)
        out.update(self.batch_terms(student["global_cls"], student.get("global_patch_mean"), n_global,
                                    dbt_pairs, dbt_volumes))
        out["total"] = (c.dino_weight * out["dino"] + c.ibot_weight * out["ibot"]
                        + c.koleo_weight * out["koleo"] + c.dbt_weight * out["dbt"])
        return out

    def share_terms(self, student: dict[str, Tensor], teacher: dict[str, Tensor], n_global: int,
                    teacher_temp: float, masks: Tensor | None = None,
                    reduce: Reduce = local_reduce) -> dict[str, Tensor]:
        """DINO, iBOT and the teacher entropies: means over images, so a process may compute them on
        its share of the batch (the centres go through ``reduce``)."""
        c = self.config
        n_rows, k = student["global_dino"].shape
        if n_rows % n_global:
            raise ValueError(f"{n_rows} global crops are not {n_global} views of one batch")
        batch = n_rows // n_global
        targets = self.dino_targets(teacher["global_dino"], teacher_temp, reduce)
        views = [student["global_dino"].reshape(n_global, batch, k)]
        if "local_dino" in student:
            views.append(student["local_dino"].reshape(-1, batch, k))
        out: dict[str, Tensor] = {}
        out["dino"] = dino_loss(torch.cat(views), targets.reshape(n_global, batch, k), c.student_temp)
        if "ibot" in student and masks is not None and c.ibot_weight > 0:
            ibot_targets = self.ibot_targets(teacher["ibot"], teacher_temp, reduce)
            out["ibot"] = ibot_loss(student["ibot"], ibot_targets, masks, c.student_temp)
        else:
            out["ibot"] = student["global_dino"].sum() * 0.0
        out["teacher_entropy"] = mean_entropy(targets)
        out["teacher_marginal_entropy"] = marginal_entropy(targets)
        return out

    def batch_terms(self, global_cls: Tensor, global_patch_mean: Tensor | None, n_global: int,
                    dbt_pairs: Tensor | None = None, dbt_volumes: Tensor | None = None) -> dict[str, Tensor]:
        """KoLeo and the DBT InfoNCE: both compare each image with the batch's other images (nearest
        neighbour, negatives), so under DDP they take the whole batch's gathered embeddings
        (view-major rows, as the student gives them)."""
        c = self.config
        zero = global_cls.sum() * 0.0
        out = {"koleo": zero, "dbt": zero}
        if c.koleo_weight > 0:
            views = global_cls.reshape(n_global, -1, global_cls.shape[-1])
            out["koleo"] = sum((koleo_loss(view, c.koleo_eps) for view in views), zero)
        if dbt_pairs is not None and c.dbt_weight > 0:
            embedding = global_cls if c.dbt_embedding == "cls" else global_patch_mean
            out["dbt"] = dbt_pair_loss(embedding, dbt_pairs, c.dbt_temperature, dbt_volumes)
        return out
