"""The layer-wise solvers against float64 oracles written here from the definitions (no shared code)."""

from __future__ import annotations

import itertools

import pytest
import torch

from mfac.prune._layer_solvers import (
    block_counts,
    magnitude_mask,
    obc,
    prepare_hessian,
    reconstruction_error,
    sparsegpt,
    wanda_mask,
)

pytestmark = pytest.mark.usefixtures("one_thread")
D = torch.float64


def _problem(rows, cols, seed=0, samples=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples or 3 * cols, cols, generator=gen, dtype=D)
    x = x @ torch.randn(cols, cols, generator=gen, dtype=D) * 0.5 + x  # correlated inputs
    w = torch.randn(rows, cols, generator=gen, dtype=D)
    h = 2 * x.T @ x / x.shape[0]
    return w, prepare_hessian(h, 0.01)[0], h


# --------------------------------------------------------------------------- SparseGPT oracle
def _sweep_oracle(w, h, prune_at):
    """Column-by-column OBS elimination: at column j, the remaining set is j..c-1 with its own inverse
    ``inv(H[j:, j:])``; a pruned w_j is removed with the OBS update restricted to j..c-1.

    ``prune_at(j, w)`` returns the columns to prune that become decided at j (or None): it sees the
    current weights."""
    w = w.clone()
    c = w.numel()
    pruned = torch.zeros(c, dtype=torch.bool)
    for j in range(c):
        decided = prune_at(j, w)
        if decided is not None:
            pruned[decided] = True
        if pruned[j]:
            hinv = torch.linalg.inv(h[j:, j:])
            w[j:] -= w[j] / hinv[0, 0] * hinv[:, 0]
            w[j] = 0.0
    return w, ~pruned


def _sweep_scores(w, h, start, stop):
    """OBS error of pruning w_j first at step j: w_j^2 / inv(H[j:, j:])[0, 0]."""
    return torch.stack([w[j] ** 2 / torch.linalg.inv(h[j:, j:])[0, 0] for j in range(start, stop)])


@pytest.mark.parametrize("blocksize", [12, 1, 3, 5, 64])
def test_sparsegpt_one_mask_equals_oracle(blocksize):
    w, h, _ = _problem(1, 12)
    count = 5

    def prune_at(j, cur):
        if j == 0:
            return torch.argsort(_sweep_scores(cur, h, 0, 12), stable=True)[:count]
        return None

    want_w, want_kept = _sweep_oracle(w[0], h, prune_at)
    got_w, got_kept = sparsegpt(w, h, sparsity=count / 12, blocksize=blocksize, mask_blocksize=12)
    assert torch.equal(got_kept[0], want_kept)
    torch.testing.assert_close(got_w[0], want_w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("blocksize", "mask_blocksize"), [(4, 4), (3, 4), (8, 4), (5, 3)])
def test_sparsegpt_adaptive_mask_equals_oracle(blocksize, mask_blocksize):
    cols = 12
    w, h, _ = _problem(1, cols, seed=1)
    sizes = [min(mask_blocksize, cols - s) for s in range(0, cols, mask_blocksize)]
    counts = block_counts(cols, sizes, 0.5)

    def prune_at(j, cur):
        if j % mask_blocksize:
            return None
        stop = min(j + mask_blocksize, cols)
        order = torch.argsort(_sweep_scores(cur, h, j, stop), stable=True)
        return j + order[: counts[j // mask_blocksize]]

    want_w, want_kept = _sweep_oracle(w[0], h, prune_at)
    got_w, got_kept = sparsegpt(w, h, sparsity=0.5, blocksize=blocksize, mask_blocksize=mask_blocksize)
    assert torch.equal(got_kept[0], want_kept)
    torch.testing.assert_close(got_w[0], want_w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("n", "m", "blocksize"), [(2, 4, 16), (2, 4, 3), (1, 4, 5), (4, 8, 16)])
def test_sparsegpt_nm_equals_oracle(n, m, blocksize):
    cols = 16
    w, h, _ = _problem(1, cols, seed=2)

    def prune_at(j, cur):
        if j % m:
            return None
        return j + torch.argsort(_sweep_scores(cur, h, j, j + m), stable=True)[: m - n]

    want_w, want_kept = _sweep_oracle(w[0], h, prune_at)
    got_w, got_kept = sparsegpt(w, h, nm=(n, m), blocksize=blocksize)
    assert torch.equal(got_kept[0], want_kept)
    assert (got_kept.reshape(-1, m).sum(1) == n).all()
    torch.testing.assert_close(got_w[0], want_w, rtol=1e-10, atol=1e-10)


def test_sparsegpt_rows_are_independent_and_count_is_exact():
    w, h, _ = _problem(7, 10, seed=3)
    got_w, kept = sparsegpt(w, h, sparsity=0.37, blocksize=4, mask_blocksize=10)
    assert int((~kept).sum()) == round(0.37 * 70)
    assert (got_w[~kept] == 0).all()
    # one mask block over all rows: each row then equals the oracle sweep with its own pruned set
    for i in range(7):
        cols = torch.nonzero(~kept[i]).flatten()
        want, _ = _sweep_oracle(w[i], h, lambda j, cur, cols=cols: cols if j == 0 else None)
        torch.testing.assert_close(got_w[i], want, rtol=1e-10, atol=1e-10)


def test_sparsegpt_dead_inputs_are_pruned_first():
    w, _, raw = _problem(4, 8, seed=4)
    x_dead = raw.clone()
    x_dead[2, :] = 0
    x_dead[:, 2] = 0
    h, dead = prepare_hessian(x_dead, 0.01)
    assert dead.tolist() == [j == 2 for j in range(8)]
    _, kept = sparsegpt(w, h, sparsity=0.25, dead=dead)
    assert not kept[:, 2].any()
    assert int((~kept).sum()) == 8


# --------------------------------------------------------------------------- OBC vs brute force
def _joint_removal(w, h, pruned):
    """Optimal w' with w'_S = 0 for min (w - w')^T H (w - w'), and its loss (from the definitions)."""
    hinv = torch.linalg.inv(h)
    s = torch.nonzero(pruned).flatten()
    if s.numel() == 0:
        return w.clone(), 0.0
    sub = hinv[s][:, s]
    coef = torch.linalg.solve(sub, w[s])
    new = w - hinv[:, s] @ coef
    new[s] = 0.0
    return new, float(w[s] @ coef)


def test_obc_follows_the_greedy_brute_force_path():
    w, h, _ = _problem(3, 8, seed=5)
    got_w, kept = obc(w, h, sparsity=0.5, rows_per_batch=2)
    for i in range(3):
        pruned = torch.zeros(8, dtype=torch.bool)
        for _ in range(4):  # greedy: the removal of least exact joint loss given the set so far
            losses = []
            for q in range(8):
                trial = pruned.clone()
                trial[q] = True
                losses.append(float("inf") if pruned[q] else _joint_removal(w[i], h, trial)[1])
            pruned[int(torch.tensor(losses).argmin())] = True
        assert torch.equal(~kept[i], pruned)
        want, _ = _joint_removal(w[i], h, pruned)
        torch.testing.assert_close(got_w[i], want, rtol=1e-9, atol=1e-9)


def test_obc_single_removal_is_the_exhaustive_optimum_and_beats_sparsegpt():
    w, h, _ = _problem(5, 6, seed=6)
    got_w, _ = obc(w, h, sparsity=1 / 6)
    for i in range(5):
        best = min(_joint_removal(w[i], h, torch.arange(6) == q)[1] for q in range(6))
        dw = w[i] - got_w[i]
        assert float(dw @ h @ dw) == pytest.approx(best, rel=1e-9)
    # the exhaustive optimum over all 3-of-6 masks bounds both greedy solvers from below
    for i in range(5):
        opt = min(_joint_removal(w[i], h, torch.isin(torch.arange(6), torch.tensor(s)))[1]
                  for s in itertools.combinations(range(6), 3))
        for solver in (obc, sparsegpt):
            new, _ = solver(w[i : i + 1], h, sparsity=0.5)
            dw = w[i] - new[0]
            assert float(dw @ h @ dw) >= opt * (1 - 1e-9)


def test_obc_nm_keeps_n_per_group():
    w, h, _ = _problem(4, 16, seed=7)
    new_w, kept = obc(w, h, nm=(2, 4))
    assert (kept.reshape(-1, 4).sum(1) == 2).all()
    for i in range(4):
        want, _ = _joint_removal(w[i], h, ~kept[i])
        torch.testing.assert_close(new_w[i], want, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- baselines, helpers
def test_wanda_and_magnitude_masks():
    w = torch.tensor([[1.0, -4.0, 2.0, 0.5], [3.0, 0.1, -0.2, 5.0]], dtype=D)
    norms = torch.tensor([16.0, 0.01, 1.0, 1.0], dtype=D)  # sqrt: 4, 0.1, 1, 1
    kept = wanda_mask(w, norms, sparsity=0.5)
    assert kept.tolist() == [[True, False, True, False], [True, False, False, True]]
    assert magnitude_mask(w, sparsity=0.5).tolist() == [[False, True, True, False], [True, False, False, True]]
    assert magnitude_mask(w, nm=(1, 2)).tolist() == [[False, True, True, False], [True, False, False, True]]


def test_block_counts_sum_exactly():
    for total, parts, s in [(100, [30, 30, 40], 0.33), (7, [1] * 7, 0.5), (10, [10], 0.0)]:
        counts = block_counts(total, parts, s)
        assert sum(counts) == round(s * total)
        assert all(0 <= c <= p for c, p in zip(counts, parts, strict=True))


def test_reconstruction_error_matches_its_definition():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(40, 6, generator=gen, dtype=D)
    w = torch.randn(3, 6, generator=gen, dtype=D)
    w2 = w.clone()
    w2[:, :2] = 0
    h = 2 * x.T @ x / 40
    want = float(((w - w2) @ x.T).square().sum() / (w @ x.T).square().sum())
    assert reconstruction_error(h, w, w2) == pytest.approx(want, rel=1e-12)
