"""OBS formulas against brute force on tiny quadratics (exact Hessian, float64)."""

from __future__ import annotations

import itertools

import pytest
import torch

from mfac.fisher import DenseInverseFisher, StaticInverseFisher
from mfac.prune.scores import (
    fisher_cross_product,
    independent_update,
    joint_loss_increase,
    joint_update,
    obs_saliency,
    restricted_joint_update,
)
from tests.references import block_diagonal_inverse, dense_fisher

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(d: int = 10, m: int = 6, damp: float = 0.05, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(m, d, generator=gen, dtype=DT)
    # correlated coordinates make the joint and the independent updates differ clearly
    grads[:, 1] += 0.9 * grads[:, 0]
    grads[:, 5] -= 0.7 * grads[:, 4]
    w = torch.randn(d, generator=gen, dtype=DT)
    return grads, w, damp


def _hessian(grads: torch.Tensor, damp: float, block: int | None = None) -> torch.Tensor:
    if block is None:
        return dense_fisher(grads, damp)
    return torch.linalg.inv(block_diagonal_inverse(grads, damp, block))


def _brute_force(hessian: torch.Tensor, w: torch.Tensor, removed: list[int]):
    """Minimise 1/2 dw^T H dw subject to (w + dw)_S = 0 in the primal: solve H_KK dw_K = -H_KS
    dw_S."""
    d = w.numel()
    s = torch.tensor(removed, dtype=torch.long)
    keep = torch.tensor([i for i in range(d) if i not in removed], dtype=torch.long)
    dw = torch.zeros(d, dtype=DT)
    dw[s] = -w[s]
    if keep.numel():
        h_kk = hessian[keep][:, keep]
        h_ks = hessian[keep][:, s]
        dw[keep] = torch.linalg.solve(h_kk, -h_ks @ dw[s])
    loss = 0.5 * float(dw @ hessian @ dw)
    return dw, loss


@pytest.mark.parametrize("route", ["dense", "woodbury", "direct"])
def test_single_weight_choice_matches_enumeration(route):
    d, m = (6, 10) if route == "direct" else (10, 6)
    grads, w, damp = _problem(d=d, m=m)
    hessian = _hessian(grads, damp)
    if route == "dense":
        finv = DenseInverseFisher(grads, damp)
    else:
        finv = StaticInverseFisher(grads, damp, block_size=d)  # B = d: direct iff d <= m
        assert finv.route == route
    rho = obs_saliency(w, finv)
    losses, updates = [], []
    for q in range(w.numel()):
        dw, loss = _brute_force(hessian, w, [q])
        losses.append(loss)
        updates.append(dw)
    losses_t = torch.tensor(losses, dtype=DT)
    torch.testing.assert_close(rho, losses_t, rtol=1e-10, atol=1e-12)
    best = int(torch.argmin(losses_t))
    assert int(torch.argmin(rho)) == best
    for q in range(w.numel()):  # single removal: independent == joint == brute force
        torch.testing.assert_close(independent_update(w, finv, torch.tensor([q])), updates[q])
        torch.testing.assert_close(joint_update(w, finv, torch.tensor([q])), updates[q])


@pytest.mark.parametrize("size", [2, 3, 5])
def test_joint_update_matches_enumeration_over_all_subsets(size):
    grads, w, damp = _problem()
    hessian = _hessian(grads, damp)
    dense = DenseInverseFisher(grads, damp)
    static = StaticInverseFisher(grads, damp)
    best_brute, best_ours = (None, float("inf")), (None, float("inf"))
    for subset in itertools.combinations(range(w.numel()), size):
        removed = list(subset)
        dw_ref, loss_ref = _brute_force(hessian, w, removed)
        idx = torch.tensor(removed)
        for finv in (dense, static):
            torch.testing.assert_close(joint_update(w, finv, idx), dw_ref, rtol=1e-9, atol=1e-10)
        loss = joint_loss_increase(w, static, idx)
        assert loss == pytest.approx(loss_ref, rel=1e-9)
        # the Fisher route (restricted rebuild), bool-mask form
        mask = torch.zeros(w.numel(), dtype=torch.bool)
        mask[idx] = True
        torch.testing.assert_close(
            restricted_joint_update(w, grads, damp, mask), dw_ref, rtol=1e-9, atol=1e-10
        )
        # the independent update is never better than the joint one on the quadratic
        dw_ind = independent_update(w, static, idx)
        assert 0.5 * float(dw_ind @ hessian @ dw_ind) >= loss_ref * (1 - 1e-12)
        if loss_ref < best_brute[1]:
            best_brute = (subset, loss_ref)
        if loss < best_ours[1]:
            best_ours = (subset, loss)
    assert best_ours[0] == best_brute[0]


@pytest.mark.parametrize("block", [3, 4, 8])
@pytest.mark.parametrize("m", [2, 6])
def test_block_diagonal_joint_update_matches_enumeration(block, m):
    """Woodbury (B > m) and direct (B <= m) routes; the joint system decouples per block."""
    grads, w, damp = _problem(d=11, m=m, seed=1)
    hessian = _hessian(grads, damp, block)
    finv = StaticInverseFisher(grads, damp, block_size=block)
    for subset in [(0, 1, 4), (2, 3, 9, 10), (5,), tuple(range(0, 11, 2))]:
        removed = list(subset)
        dw_ref, loss_ref = _brute_force(hessian, w, removed)
        idx = torch.tensor(removed)
        torch.testing.assert_close(joint_update(w, finv, idx), dw_ref, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(
            restricted_joint_update(w, grads, damp, idx, block_size=block),
            dw_ref,
            rtol=1e-9,
            atol=1e-10,
        )
        assert joint_loss_increase(w, finv, idx) == pytest.approx(loss_ref, rel=1e-9)


def test_fisher_proportional_to_identity_is_magnitude():
    """G^T G / m = a^2 I (orthogonal gradients): saliency prop. to w^2, no compensation of kept
    weights."""
    d = 8
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=DT, generator=torch.Generator().manual_seed(3)))
    grads = 1.5 * (d**0.5) * q  # (m = d, d): G^T G / m = 2.25 I
    w = torch.randn(d, dtype=DT, generator=torch.Generator().manual_seed(4))
    damp = 0.1
    finv = StaticInverseFisher(grads, damp)
    rho = obs_saliency(w, finv)
    torch.testing.assert_close(rho, w.square() * (damp + 2.25) / 2)
    idx = torch.argsort(rho)[:3]
    assert set(idx.tolist()) == set(torch.argsort(w.abs())[:3].tolist())
    for dw in (
        joint_update(w, finv, idx),
        restricted_joint_update(w, grads, damp, idx),
        independent_update(w, finv, idx),
    ):
        expected = torch.zeros(d, dtype=DT)
        expected[idx] = -w[idx]
        torch.testing.assert_close(dw, expected, atol=1e-12, rtol=0)


def test_recompute_semantics_kept_space_equals_full_space_with_zeros():
    """Removing S from the kept space == jointly removing S and the earlier-pruned P (w_P = 0)."""
    grads, w, damp = _problem(d=12, m=5, seed=2)
    pruned = torch.tensor([1, 6, 7])
    w[pruned] = 0.0
    kept = torch.tensor([i for i in range(12) if i not in pruned.tolist()])
    new = torch.tensor([0, 4, 10])  # coordinates in the full space
    full = joint_update(w, StaticInverseFisher(grads, damp), torch.cat([pruned, new]))
    local_new = torch.searchsorted(kept, new)
    kept_dw = restricted_joint_update(w[kept], grads[:, kept].clone(), damp, local_new)
    expected = torch.zeros(12, dtype=DT)
    expected[kept] = kept_dw
    torch.testing.assert_close(full, expected, rtol=1e-9, atol=1e-12)
    assert torch.all(full[pruned] == 0)


def test_fisher_cross_product_blocks():
    grads, w, _ = _problem(d=11, m=4)
    for block in (None, 3, 11, 20):
        ref = torch.zeros(11, dtype=DT)
        b = 11 if block is None else min(block, 11)
        for start in range(0, 11, b):
            g = grads[:, start : start + b]
            ref[start : start + b] = g.T @ (g @ w[start : start + b]) / 4
        torch.testing.assert_close(fisher_cross_product(grads, w, block_size=block, chunk=4), ref)


def test_float32_restricted_matches_float64():
    grads, w, damp = _problem(d=64, m=16, damp=1e-2)
    idx = torch.arange(0, 64, 3)
    ref = restricted_joint_update(w, grads, damp, idx)
    got = restricted_joint_update(w.float(), grads.float(), damp, idx)
    assert (got.double() - ref).abs().max() / ref.abs().max() < 1e-4


def test_overwrite_destroys_only_when_asked():
    grads, w, damp = _problem()
    before = grads.clone()
    restricted_joint_update(w, grads, damp, torch.tensor([0, 1]))
    assert torch.equal(grads, before)
    restricted_joint_update(w, grads, damp, torch.tensor([0, 1]), overwrite=True)
    assert not torch.equal(grads, before)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda w, f, g: obs_saliency(w[:3], f), ValueError, "must have shape"),
        (lambda w, f, g: obs_saliency(w.float(), f), TypeError, "dtype"),
        (lambda w, f, g: joint_update(w, f, torch.tensor([0.5])), TypeError, "integer index"),
        (lambda w, f, g: joint_update(w, f, torch.tensor([99])), IndexError, r"\[0, 10\)"),
        (
            lambda w, f, g: independent_update(w, f, torch.ones(3, dtype=torch.bool)),
            ValueError,
            "shape",
        ),
        (
            lambda w, f, g: restricted_joint_update(w, g, -1.0, torch.tensor([0])),
            ValueError,
            "damp",
        ),
    ],
)
def test_bad_inputs(call, error, match):
    grads, w, damp = _problem()
    with pytest.raises(error, match=match):
        call(w, StaticInverseFisher(grads, damp), grads)
