"""The pretraining losses against small cases computed by hand or with plain numpy."""

from __future__ import annotations

import itertools
import math
import threading

import numpy as np
import pytest
import torch

from training.errors import MammoInputError
from training.ssl.losses import (LossConfig, MammoDINOLoss, TeacherTargets, dbt_pair_loss, dino_loss,
    ibot_loss, koleo_loss, marginal_entropy, mean_entropy, sinkhorn_knopp, symmetric_infonce)

torch.set_num_threads(2)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(np_log_softmax(x))


# --- DINO ------------------------------------------------------------------------------------------

def test_dino_loss_two_globals_by_hand():
    # Teacher targets one-hot; student view 0 uniform, view 1 softmax([ln 3, 0]) = [3/4, 1/4] at tau 0.1.
    tau = 0.1
    teacher = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])            # (G=2, B=1, K=2)
    student = torch.tensor([[[0.0, 0.0]], [[tau * math.log(3), 0.0]]])
    # Pairs (v=1, g=0): -ln 3/4 and (v=0, g=1): -ln 1/2; same-view pairs skipped.
    expected = 0.5 * (math.log(4 / 3) + math.log(2))
    assert dino_loss(student, teacher, tau).item() == pytest.approx(expected, rel=1e-6)


def test_dino_loss_with_locals_against_numpy_loops():
    rng = np.random.default_rng(0)
    n_global, n_local, batch, k, tau = 2, 3, 4, 7, 0.1
    student = rng.normal(size=(n_global + n_local, batch, k)).astype(np.float32)
    teacher = np_softmax(rng.normal(size=(n_global, batch, k)) / 0.05).astype(np.float32)
    terms = []
    for g in range(n_global):
        for v in range(n_global + n_local):
            if v == g:
                continue
            terms.append(np.mean([-(teacher[g, b] * np_log_softmax(student[v, b] / tau)).sum() for b in range(batch)]))
    assert len(terms) == n_global * (n_global - 1) + n_global * n_local
    got = dino_loss(torch.from_numpy(student), torch.from_numpy(teacher), tau).item()
    assert got == pytest.approx(float(np.mean(terms)), rel=1e-5)


def test_dino_loss_needs_two_views():
    with pytest.raises(ValueError, match="two views"):
        dino_loss(torch.zeros(1, 2, 3), torch.full((1, 2, 3), 1 / 3))


# --- iBOT ------------------------------------------------------------------------------------------

def test_ibot_loss_normalised_per_image_by_hand():
    rng = np.random.default_rng(1)
    masks = np.zeros((3, 2, 2), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True   # image 0: two masked patches
    masks[2, 0, 1] = True                    # image 1: none; image 2: one
    student = rng.normal(size=(3, 5)).astype(np.float32)
    teacher = np_softmax(rng.normal(size=(3, 5)) / 0.1).astype(np.float32)
    ce = [-(teacher[i] * np_log_softmax(student[i] / 0.1)).sum() for i in range(3)]
    expected = (ce[0] / 2 + ce[1] / 2 + ce[2] / 1) / 3   # each masked image counts once, N = 3 crops
    got = ibot_loss(torch.from_numpy(student), torch.from_numpy(teacher), torch.from_numpy(masks), 0.1)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_ibot_loss_without_masked_patches_is_zero_and_differentiable():
    logits = torch.zeros(0, 4, requires_grad=True)
    loss = ibot_loss(logits, torch.zeros(0, 4), torch.zeros(2, 3, 3, dtype=bool))
    assert loss.item() == 0.0
    loss.backward()
    with pytest.raises(ValueError, match="masked patches"):
        ibot_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 3, 3, dtype=bool))


# --- teacher targets -------------------------------------------------------------------------------

def test_sinkhorn_rows_are_distributions_and_columns_even_out():
    torch.manual_seed(0)
    logits = torch.randn(32, 8) * 0.5
    q = sinkhorn_knopp(logits, 0.1, n_iterations=3)
    assert torch.allclose(q.sum(dim=1), torch.ones(32), atol=1e-5)
    assert (q >= 0).all()
    converged = sinkhorn_knopp(logits, 0.1, n_iterations=300)
    assert torch.allclose(converged.sum(dim=0), torch.full((8,), 32 / 8), rtol=1e-3)
    assert torch.allclose(converged.sum(dim=1), torch.ones(32), atol=1e-5)


def test_sinkhorn_matches_a_numpy_transcription_of_the_swav_algorithm():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(10, 6))
    q = np.exp(logits / 0.07).T            # K x B, as in the SwAV/DINOv2 papers
    q /= q.sum()
    k, b = q.shape
    for _ in range(3):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * b
    expected = (q * b).T
    got = sinkhorn_knopp(torch.from_numpy(logits).float(), 0.07, 3).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_sinkhorn_neither_overflows_nor_loses_a_row_at_low_temperature():
    # exp(100 / 0.04) overflows float32, and a row 250 nats below another underflows to all zeros
    # in the linear domain; the log-domain iterations keep every row a distribution.
    logits = torch.tensor([[100.0, -100.0, 0.0], [90.0, 80.0, -50.0]])
    q = sinkhorn_knopp(logits, 0.04)
    assert torch.isfinite(q).all() and torch.allclose(q.sum(dim=1), torch.ones(2))
    # Equipartition: the second sample is pushed off prototype 0, which the first scores higher.
    assert q[1, 1] > 0.99 and q[0, 0] > 0.4 and q[1, 0] < 1e-6


def test_softmax_centre_uses_the_old_centre_then_moves_it():
    targets = TeacherTargets(3, "softmax_center", momentum=0.9)
    x = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0, 0.0, 6.0]])
    first = targets(x, 0.5)
    np.testing.assert_allclose(first.numpy(), np_softmax(x.numpy() / 0.5), rtol=1e-6)   # centre was 0
    centre = 0.1 * x.numpy().mean(axis=0)
    np.testing.assert_allclose(targets.center.numpy()[0], centre, rtol=1e-6)
    second = targets(x, 0.5)
    np.testing.assert_allclose(second.numpy(), np_softmax((x.numpy() - centre) / 0.5), rtol=1e-5)
    assert "center" in targets.state_dict()


def test_unknown_centering_is_a_user_error():
    with pytest.raises(MammoInputError, match="centering"):
        TeacherTargets(3, "kmeans")


class _TwoProcesses:
    """An all-reduce between two threads, to check that the split computation equals the whole one."""

    def __init__(self):
        self.barrier = threading.Barrier(2)
        self.slots: list = [None, None]

    def reducer(self, rank: int):
        def reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            both = self.slots[0], self.slots[1]
            combined = both[0] + both[1] if op == "sum" else torch.maximum(*both)
            self.barrier.wait()
            tensor.copy_(combined)
            return tensor
        return reduce


def test_sinkhorn_and_centre_split_over_two_processes_equal_one_process():
    torch.manual_seed(3)
    logits = torch.randn(12, 5) * 2
    whole = sinkhorn_knopp(logits, 0.1)
    centre_whole = TeacherTargets(5, momentum=0.5)
    centre_whole.update_center(logits)
    group, results, centres = _TwoProcesses(), [None, None], [TeacherTargets(5, momentum=0.5) for _ in range(2)]

    def work(rank: int) -> None:
        part = logits[:7] if rank == 0 else logits[7:]   # unequal shares, as a last batch may be
        results[rank] = sinkhorn_knopp(part, 0.1, reduce=group.reducer(rank))
        centres[rank].update_center(part, group.reducer(rank))

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.allclose(torch.cat(results), whole, atol=1e-6)
    for c in centres:
        assert torch.allclose(c.center, centre_whole.center, atol=1e-6)


# --- KoLeo -----------------------------------------------------------------------------------------

def test_koleo_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]) * torch.tensor([[2.0], [0.5], [3.0]])  # norms differ
    # Normalised: e1, e2, (e1+e2)/sqrt2; every nearest-neighbour distance is sqrt(2 - sqrt2).
    expected = -0.5 * math.log(2 - math.sqrt(2))
    assert koleo_loss(x).item() == pytest.approx(expected, rel=1e-5)


def test_koleo_is_finite_on_duplicates_and_single_samples():
    base = torch.randn(4, 16)
    x = torch.cat([base, base[:2]]).requires_grad_()          # two exact duplicates
    loss = koleo_loss(x, eps=1e-8)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    collapsed = torch.ones(5, 8, requires_grad=True)          # a fully collapsed batch
    value = koleo_loss(collapsed, eps=1e-8)
    value.backward()
    assert value.item() == pytest.approx(-math.log(1e-8), rel=1e-4)
    assert torch.isfinite(collapsed.grad).all()
    single = torch.randn(1, 8, requires_grad=True)
    assert koleo_loss(single).item() == 0.0
    half = torch.cat([base, base]).to(torch.bfloat16)          # low precision input is computed in float32
    assert torch.isfinite(koleo_loss(half))


# --- DBT InfoNCE -----------------------------------------------------------------------------------

def test_infonce_by_hand_and_symmetric():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # normalised: e1, (e1+e2)/sqrt2
    tau = 0.5
    s = np.array([[1.0, 1 / math.sqrt(2)], [0.0, 1 / math.sqrt(2)]]) / tau   # s[p, q] = a_p . b_q / tau
    rows = [-(s[p, p] - np.log(np.exp(s[p]).sum())) for p in range(2)]
    cols = [-(s[p, p] - np.log(np.exp(s[:, p]).sum())) for p in range(2)]
    expected = 0.5 * (np.mean(rows) + np.mean(cols))
    got = symmetric_infonce(a, b, tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert symmetric_infonce(b, a, tau).item() == pytest.approx(got.item(), rel=1e-6)


def test_infonce_is_lowest_when_each_slice_meets_its_own_partner():
    torch.manual_seed(4)
    a = torch.randn(4, 8)
    partners = a + 0.05 * torch.randn(4, 8)
    aligned = symmetric_infonce(a, partners, 0.1).item()
    for perm in itertools.permutations(range(4)):
        if perm != (0, 1, 2, 3):
            assert symmetric_infonce(a, partners[list(perm)], 0.1).item() > aligned
    orthonormal = torch.eye(4)
    assert symmetric_infonce(orthonormal, orthonormal, 0.01).item() < 1e-6


def test_same_volume_pairs_are_not_negatives():
    a, b = torch.randn(2, 8), torch.randn(2, 8)
    assert symmetric_infonce(a, b, 0.1, groups=torch.tensor([7, 7])).item() == pytest.approx(0.0, abs=1e-7)
    three = torch.randn(3, 8)
    separate = symmetric_infonce(three, three.flip(0), 0.1, groups=torch.tensor([0, 1, 2]))
    merged = symmetric_infonce(three, three.flip(0), 0.1, groups=torch.tensor([0, 0, 2]))
    assert merged.item() != pytest.approx(separate.item())


def test_dbt_loss_only_where_pairs_exist():
    torch.manual_seed(5)
    embeddings = torch.randn(6, 8, requires_grad=True)  # rows 0-1 and 3-4 are DBT pairs; 2, 5 are FFDM crops
    pairs = torch.tensor([[0, 1], [3, 4]])
    got = dbt_pair_loss(embeddings, pairs, 0.2)
    assert got.item() == pytest.approx(symmetric_infonce(embeddings[[0, 3]], embeddings[[1, 4]], 0.2).item())
    got.backward()
    assert embeddings.grad[[2, 5]].abs().sum() == 0 and embeddings.grad[[0, 1, 3, 4]].abs().sum() > 0
    none = dbt_pair_loss(embeddings, torch.zeros(0, 2, dtype=torch.long))
    assert none.item() == 0.0 and none.requires_grad


# --- monitoring and the combination ----------------------------------------------------------------

def test_entropies():
    uniform = torch.full((4, 8), 1 / 8)
    assert mean_entropy(uniform).item() == pytest.approx(math.log(8), rel=1e-6)
    collapsed = torch.zeros(4, 8)
    collapsed[:, 3] = 1
    assert mean_entropy(collapsed).item() == 0.0 and marginal_entropy(collapsed).item() == 0.0
    spread = torch.eye(8)
    assert mean_entropy(spread).item() == 0.0 and marginal_entropy(spread).item() == pytest.approx(math.log(8))


def _outputs(n_global=2, n_local=2, batch=3, k=6, dim=5, masked=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = {
        "global_dino": torch.randn(n_global * batch, k, generator=g, requires_grad=True),
        "local_dino": torch.randn(n_local * batch, k, generator=g, requires_grad=True),
        "global_cls": torch.randn(n_global * batch, dim, generator=g, requires_grad=True),
        "global_patch_mean": torch.randn(n_global * batch, dim, generator=g),
        "ibot": torch.randn(masked, k, generator=g, requires_grad=True),
    }
    teacher = {"global_dino": torch.randn(n_global * batch, k, generator=g),
               "ibot": torch.randn(masked, k, generator=g)}
    masks = torch.zeros(n_global * batch, 2, 2, dtype=torch.bool)
    masks[0, 0, :] = True
    masks[4, 1, :] = True
    return student, teacher, masks


def test_combined_loss_is_the_weighted_sum_of_its_terms():
    config = LossConfig(dino_weight=1.0, ibot_weight=0.5, koleo_weight=0.1, dbt_weight=2.0, centering="sinkhorn_knopp")
    criterion = MammoDINOLoss(config, 6)
    student, teacher, masks = _outputs()
    pairs = torch.tensor([[0, 1], [3, 4]])
    out = criterion(student, teacher, n_global=2, teacher_temp=0.04, masks=masks, dbt_pairs=pairs)
    expected = out["dino"] + 0.5 * out["ibot"] + 0.1 * out["koleo"] + 2.0 * out["dbt"]
    assert out["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    targets = sinkhorn_knopp(teacher["global_dino"], 0.04).reshape(2, 3, 6)
    views = torch.cat([student["global_dino"].reshape(2, 3, 6), student["local_dino"].reshape(2, 3, 6)])
    assert out["dino"].item() == pytest.approx(dino_loss(views, targets).item(), rel=1e-6)
    koleo = sum(koleo_loss(v) for v in student["global_cls"].reshape(2, 3, 5))
    assert out["koleo"].item() == pytest.approx(koleo.item(), rel=1e-6)
    assert out["dbt"].item() == pytest.approx(dbt_pair_loss(student["global_cls"], pairs, 0.1).item(), rel=1e-6)
    out["total"].backward()
    assert all(torch.isfinite(t.grad).all() for t in student.values() if t.requires_grad)
    assert 0 <= out["teacher_entropy"].item() <= math.log(6) + 1e-6


def test_combined_loss_without_masks_or_pairs_reports_zero_terms():
    criterion = MammoDINOLoss(LossConfig(koleo_weight=0.0), 6)
    student, teacher, _ = _outputs()
    out = criterion(student, teacher, n_global=2, teacher_temp=0.07)
    assert out["ibot"].item() == 0.0 and out["dbt"].item() == 0.0 and out["koleo"].item() == 0.0
    assert out["total"].item() == pytest.approx(out["dino"].item())
    assert criterion.dino_targets.center.abs().sum() > 0   # softmax centring moved its centre


def test_loss_config_checks_and_round_trips():
    config = LossConfig(dbt_embedding="patch_mean", centering="sinkhorn_knopp")
    assert LossConfig.from_dict(config.to_dict()) == config
    with pytest.raises(MammoInputError, match="student_temp"):
        LossConfig(student_temp=0)
    with pytest.raises(MammoInputError, match="centering"):
        LossConfig.from_dict({"centering": "kmeans"})
