"""The streaming block-diagonal inverse Fisher against the materialised route and dense float64 blocks."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mfac
from mfac.fisher import BlockFisherAccumulator, BlockInverseFisher, StaticInverseFisher
from mfac.prune.scores import (
    group_independent_update,
    group_saliency,
    joint_loss_increase,
    joint_update,
    restricted_joint_update,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def per_block_inverse(grads: torch.Tensor, damp: float, block: int) -> torch.Tensor:
    """The block-diagonal ``F^{-1}`` written out: ``inv(damp I + G_b^T G_b / m)`` per block, float64."""
    g = grads.to(torch.float64)
    m, d = g.shape
    out = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, d, block):
        gb = g[:, start : start + block]
        fb = damp * torch.eye(gb.shape[1], dtype=torch.float64) + gb.T @ gb / m
        out[start : start + block, start : start + block] = torch.linalg.inv(fb)
    return out


def streamed(grads: torch.Tensor, damp: float, block: int, order, cuts, **kwargs) -> BlockInverseFisher:
    acc = BlockFisherAccumulator(grads.shape[1], block, dtype=grads.dtype, **kwargs)
    rows = grads[list(order)]
    bounds = [0, *sorted(set(cuts)), rows.shape[0]]
    for lo, hi in itertools.pairwise(bounds):
        if hi > lo:
            acc.add(rows[lo:hi] if hi - lo > 1 else rows[lo])  # a single row as (d,)
    assert acc.ngrads == grads.shape[0]
    return acc.finalize(damp)


@given(
    d=st.integers(1, 23),
    block=st.integers(1, 9),
    extra=st.integers(0, 6),
    damp=st.sampled_from([1e-3, 0.1, 2.0]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_stream_equals_static_and_dense_blocks(d, block, extra, damp, seed, data):
    """Any order of arrival and any chunking give the per-block inverse; d % B != 0 gives a short block."""
    m = min(block, d) + extra  # direct route: B <= m
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(m, d, generator=gen, dtype=torch.float64)
    order = data.draw(st.permutations(range(m)))
    cuts = data.draw(st.lists(st.integers(0, m), max_size=4))
    op = streamed(grads, damp, block, order, cuts)
    static = StaticInverseFisher(grads, damp, block_size=block)
    assert static.route == "direct" and op.num_blocks == static.num_blocks
    ref = per_block_inverse(grads, damp, min(block, d))
    tol = dict(rtol=1e-9, atol=1e-9 / damp)
    torch.testing.assert_close(op.to_dense(), ref, **tol)
    torch.testing.assert_close(static.to_dense(), ref, **tol)
    x = torch.randn(3, d, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(op.mul(x), x @ ref, **tol)
    torch.testing.assert_close(op.mul(x[0]), ref @ x[0], **tol)
    torch.testing.assert_close(op.diag(), ref.diagonal(), **tol)
    idx = torch.randint(0, d, (min(d, 6),), generator=gen)
    torch.testing.assert_close(op.submatrix(idx), ref[idx][:, idx], **tol)
    # the scipy view
    y = op.to_scipy().matvec(x[0].numpy())
    torch.testing.assert_close(torch.as_tensor(y), ref @ x[0], **tol)


@given(d=st.integers(2, 20), block=st.integers(1, 7), seed=st.integers(0, 2**16), data=st.data())
def test_group_solve_equals_dense_solves(d, block, seed, data):
    """c_Q = ([F^-1]_QQ)^{-1} x_Q for arbitrary groups, also groups spanning blocks; -1 = in no group."""
    gen = torch.Generator().manual_seed(seed)
    m = block + 2
    grads = torch.randn(m, d, generator=gen, dtype=torch.float64)
    labels = torch.tensor(data.draw(st.lists(st.integers(-1, 3), min_size=d, max_size=d)))
    x = torch.randn(d, generator=gen, dtype=torch.float64)
    ref = per_block_inverse(grads, 0.1, min(block, d))
    expected = torch.zeros(d, dtype=torch.float64)
    for q in labels.unique().tolist():
        if q < 0:
            continue
        idx = (labels == q).nonzero().squeeze(1)
        expected[idx] = torch.linalg.solve(ref[idx][:, idx], x[idx])
    ops = [
        streamed(grads, 0.1, block, range(m), []),
        StaticInverseFisher(grads, 0.1, block_size=block),  # direct
    ]
    width = min(block, d)  # the block size used; m = width - 1 gradients take the Woodbury route
    ops.append(StaticInverseFisher(grads[: width - 1], 0.1, block_size=block) if width > 1 else None)
    for op in ops[:2]:
        torch.testing.assert_close(op.group_solve(x, labels), expected, rtol=1e-8, atol=1e-8)
    if ops[2] is not None:  # the Woodbury route (B > m), same formula
        ref_w = per_block_inverse(grads[: width - 1], 0.1, width)
        exp_w = torch.zeros(d, dtype=torch.float64)
        for q in labels.unique().tolist():
            if q >= 0:
                idx = (labels == q).nonzero().squeeze(1)
                exp_w[idx] = torch.linalg.solve(ref_w[idx][:, idx], x[idx])
        assert ops[2].route == "woodbury"
        torch.testing.assert_close(ops[2].group_solve(x, labels), exp_w, rtol=1e-8, atol=1e-8)


def test_scores_and_both_updates_equal_the_materialised_route():
    torch.manual_seed(3)
    m, d, block, damp = 12, 17, 5, 0.05
    grads = torch.randn(m, d, dtype=torch.float64)
    w = torch.randn(d, dtype=torch.float64)
    removed = torch.zeros(d, dtype=torch.bool)
    removed[[0, 3, 4, 9, 15, 16]] = True
    op = streamed(grads, damp, block, reversed(range(m)), [4, 7])
    static = StaticInverseFisher(grads, damp, block_size=block)
    ref = per_block_inverse(grads, damp, block)
    # saliency
    torch.testing.assert_close(mfac.prune.obs_saliency(w, op), w**2 / (2 * ref.diagonal()))
    # independent update: -F^-1 v, v_q = w_q / [F^-1]_qq on S
    v = torch.where(removed, w / ref.diagonal(), torch.zeros_like(w))
    expected = -(ref @ v)
    expected[removed] = -w[removed]
    torch.testing.assert_close(mfac.prune.independent_update(w, op, removed), expected)
    # joint update: per-block solves on the explicit blocks == rebuild with zeroed columns == dense formula
    s = removed.nonzero().squeeze(1)
    coeff = torch.linalg.solve(ref[s][:, s], w[s])
    dense = -(ref[:, s] @ coeff)
    dense[s] = -w[s]
    torch.testing.assert_close(joint_update(w, op, removed), dense)
    torch.testing.assert_close(joint_update(w, static, removed), dense)
    torch.testing.assert_close(restricted_joint_update(w, grads, damp, removed, block_size=block), dense)
    assert joint_loss_increase(w, op, removed) == pytest.approx(0.5 * float(w[s] @ coeff))


def test_float32_statistics_match_float64_accumulation():
    """Both accumulation dtypes agree with the float64 reference to float32 round-off."""
    torch.manual_seed(0)
    m, d, block = 96, 203, 50
    grads = torch.randn(m, d) * torch.logspace(-2, 1, d)  # columns of different scales
    ref = per_block_inverse(grads.double(), 1e-2, block)
    x = torch.randn(d)
    for acc in (torch.float32, torch.float64):
        op = streamed(grads, 1e-2, block, range(m), range(0, m, 8), accumulate_dtype=acc)
        assert op.dtype == torch.float32
        err = ((op.mul(x).double() - ref @ x.double()).norm() / (ref @ x.double()).norm()).item()
        assert err < 1e-4, (acc, err)


def test_accumulator_errors_leave_the_statistics_unchanged():
    acc = BlockFisherAccumulator(6, 4, dtype=torch.float64)
    good = torch.randn(3, 6, dtype=torch.float64)
    acc.add(good)
    bad = good.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        acc.add(bad)
    with pytest.raises(ValueError, match="6 columns"):
        acc.add(torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="float64"):
        acc.add(torch.randn(2, 6))
    assert acc.ngrads == 3
    torch.testing.assert_close(
        acc.finalize(0.5).to_dense(), per_block_inverse(good, 0.5, 4), rtol=1e-12, atol=1e-12
    )
    with pytest.raises(RuntimeError, match="used up"):
        acc.add(good)
    with pytest.raises(RuntimeError, match="already"):
        acc.finalize(0.5)
    with pytest.raises(ValueError, match="no gradients"):
        BlockFisherAccumulator(6, 4).finalize(0.5)
    with pytest.raises(ValueError, match="damp"):
        BlockFisherAccumulator(6, 4).finalize(0.0)
    with pytest.raises(ValueError, match="block_size"):
        BlockFisherAccumulator(6, 0)


def test_finalize_keep_sweeps_damps_from_one_pass_and_can_go_on_adding():
    """``keep=True``: each damp's operator equals a fresh accumulator's; the statistics stay usable.

    Catches: keep still finalizing in place (the second damp would invert an inverse), the statistics
    divided by ``m`` or damped in place, ``ngrads`` reset.
    """
    torch.manual_seed(3)
    d, block, m = 11, 4, 7
    grads = torch.randn(m + 2, d, dtype=torch.float64)
    acc = BlockFisherAccumulator(d, block, dtype=torch.float64)
    acc.add(grads[:m])
    before = acc._stats.clone()
    for damp in (1e-3, 0.5, 10.0):
        op = acc.finalize(damp, keep=True)
        torch.testing.assert_close(op.to_dense(), per_block_inverse(grads[:m], damp, block), rtol=1e-12, atol=0)
        assert op.ngrads == m
    torch.testing.assert_close(acc._stats, before, rtol=0, atol=0)
    acc.add(grads[m:])
    torch.testing.assert_close(
        acc.finalize(0.5).to_dense(), per_block_inverse(grads, 0.5, block), rtol=1e-12, atol=0
    )
    with pytest.raises(RuntimeError, match="already"):
        acc.finalize(0.5)


def test_finalize_overflow_leaves_the_accumulator_usable():
    """Squares that overflow float32 statistics: ``ValueError`` before the in-place inversion starts."""
    acc = BlockFisherAccumulator(6, 4)  # float32 statistics, finalized in place
    acc.add(torch.full((2, 6), 3e19))  # 9e38 * 2 overflows float32
    for keep in (False, True):  # one message, whether or not the statistics are kept
        with pytest.raises(ValueError, match=r"statistics' diagonal .* overflowed torch.float32"):
            acc.finalize(0.5, keep=keep)
    assert acc.nbytes > 0 and acc.ngrads == 2  # not used up: the statistics are intact
    assert bool(torch.isinf(acc._stats.diagonal(dim1=-2, dim2=-1)).any())


def test_group_saliency_and_updates_on_a_quadratic_equal_brute_force():
    """Loss 1/2 dw^T F dw: removing group Q (dw_Q = -w_Q, the rest free) costs min over the rest; the
    group score is that minimum, its argmin the best group, the update the minimiser. Every choice of one
    group and of two groups is enumerated and minimised directly through F (never F^-1)."""
    torch.manual_seed(5)
    m, d, block = 9, 12, 6
    grads = torch.randn(m, d, dtype=torch.float64)
    fisher = torch.block_diag(*[
        0.1 * torch.eye(block, dtype=torch.float64) + grads[:, b : b + block].T @ grads[:, b : b + block] / m
        for b in range(0, d, block)
    ])
    w = torch.randn(d, dtype=torch.float64)
    labels = torch.arange(d) // 4  # three groups of 4; group 1 spans both blocks
    op = streamed(grads, 0.1, block, range(m), [3])

    def brute(groups) -> tuple[float, torch.Tensor]:
        s = torch.isin(labels, torch.tensor(groups))
        k = ~s
        dw = torch.zeros(d, dtype=torch.float64)
        dw[s] = -w[s]
        dw[k] = -torch.linalg.solve(fisher[k][:, k], fisher[k][:, s] @ dw[s])  # stationary point over K
        return 0.5 * float(dw @ fisher @ dw), dw

    scores = group_saliency(w, op, labels)
    singles = [brute([q])[0] for q in range(3)]
    torch.testing.assert_close(scores, torch.tensor(singles, dtype=torch.float64))
    assert int(scores.argmin()) == min(range(3), key=singles.__getitem__)
    for q in range(3):
        upd = group_independent_update(w, op, labels == q, labels)  # one group: exact
        torch.testing.assert_close(upd, brute([q])[1])
    for pair in itertools.combinations(range(3), 2):
        removed = torch.isin(labels, torch.tensor(pair))
        loss, dw = brute(list(pair))
        torch.testing.assert_close(joint_update(w, op, removed), dw)
        assert joint_loss_increase(w, op, removed) == pytest.approx(loss, rel=1e-9)
        # the independent sum of the two single-group corrections is not the joint minimiser
        approx = group_independent_update(w, op, removed, labels)
        assert 0.5 * float(approx @ fisher @ approx) >= loss - 1e-12


def test_group_solve_input_errors():
    op = streamed(torch.randn(6, 5, dtype=torch.float64), 0.1, 2, range(6), [])
    x = torch.randn(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="labels must be an integer tensor of shape"):
        op.group_solve(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be an integer"):
        op.group_solve(x, torch.zeros(5))
    with pytest.raises(TypeError, match="dtype"):
        op.group_solve(x.float(), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=">= 0"):
        group_saliency(x, op, torch.tensor([0, 1, -1, 0, 1]))
