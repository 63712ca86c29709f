"""One contract suite, run over every inverse-Fisher operator against the dense float64 reference.

Each operator class says only how to build itself from gradients and which explicit ``F^{-1}`` it
must equal (``build`` returns both); every property below is checked for all of them, with
hypothesis drawing m, d, damp (1e-8 .. 1e2), gradient scale and conditioning. The sharded operators
of :mod:`mfac.distributed` run as a world of one process (no process group): the same public
methods over their placement hooks, so the same contract, bit for bit the single-process results.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from references import block_diagonal_inverse, dense_inverse, rel_err

import mfac
from mfac.distributed import ShardedSlidingInverseFisher, ShardedStaticInverseFisher

TOL = 1e-9  # relative (max-norm) error allowed against the dense float64 reference


@st.composite
def problems(draw, min_m: int = 0, max_m: int = 10, max_d: int = 24):
    """(grads, damp): float64 gradient rows with a drawn scale and a shared component (correlation)."""
    m = draw(st.integers(min_m, max_m))
    d = draw(st.integers(1, max_d))
    damp = 10.0 ** draw(st.floats(-8, 2))
    scale = 10.0 ** draw(st.floats(-3, 2))
    shared = draw(st.floats(0.0, 0.99))  # 0: independent rows, ->1: nearly collinear rows
    # Error model of the Woodbury forms in float64: the relative error of F^{-1} x is about
    # eps * r (d > m: F^{-1} has a null-space part 1/damp that dominates) and eps * r^2 (d <= m), with
    # r = |g|^2 / damp the curvature-to-damping ratio. Cap r so that both stay below TOL / 10; damp
    # itself still spans 1e-8 .. 1e2 (the gradient scale adapts).
    cap = 1e6 if d > m else 1e3
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    noise = torch.randn(m, d, generator=gen, dtype=torch.float64)
    common = torch.randn(1, d, generator=gen, dtype=torch.float64)
    grads = scale * (math.sqrt(1 - shared**2) * noise + shared * common)
    ratio = grads.square().sum(1).amax().item() / damp if m else 0.0  # r of the drawn rows, not nominal
    if ratio > cap:
        grads *= math.sqrt(cap / ratio)
    return grads, damp


class OperatorContract:
    """Subclasses implement ``build(grads, damp, data) -> (operator, dense F^{-1})``."""

    min_m = 0
    #: whether ``to_scipy`` is offered (a sharded operator's vectors live on several processes)
    scipy_view = True

    def build(self, grads, damp, data):
        raise NotImplementedError

    @given(problem=problems(), data=st.data())
    def test_mul_vector_and_rows(self, problem, data):
        grads, damp = problem
        assume(grads.shape[0] >= self.min_m)
        op, ref = self.build(grads, damp, data)
        d = grads.shape[1]
        x = torch.randn(3, d, dtype=torch.float64)
        assert rel_err(op.mul(x), x @ ref) <= TOL
        y = op.mul(x[0])
        assert y.shape == (d,)
        assert rel_err(y, ref @ x[0]) <= TOL

    @given(problem=problems(), data=st.data())
    def test_diag(self, problem, data):
        grads, damp = problem
        assume(grads.shape[0] >= self.min_m)
        op, ref = self.build(grads, damp, data)
        assert op.diag().shape == (grads.shape[1],)
        assert rel_err(op.diag(), ref.diagonal()) <= TOL

    @given(problem=problems(), data=st.data())
    def test_submatrix(self, problem, data):
        grads, damp = problem
        assume(grads.shape[0] >= self.min_m)
        op, ref = self.build(grads, damp, data)
        d = grads.shape[1]
        idx = torch.tensor(data.draw(st.lists(st.integers(0, d - 1), min_size=1, max_size=8)))
        sub = op.submatrix(idx)
        assert sub.shape == (len(idx), len(idx))
        assert rel_err(sub, ref[idx][:, idx]) <= TOL

    @given(problem=problems(max_d=12), data=st.data())
    def test_to_dense_and_scipy_view(self, problem, data):
        grads, damp = problem
        assume(grads.shape[0] >= self.min_m)
        op, ref = self.build(grads, damp, data)
        assert rel_err(op.to_dense(), ref) <= TOL
        if not self.scipy_view:
            with pytest.raises(NotImplementedError, match="scipy"):
                op.to_scipy()
            return
        lin = op.to_scipy()
        x = torch.randn(grads.shape[1], dtype=torch.float64)
        assert rel_err(torch.from_numpy(lin @ x.numpy()), ref @ x) <= TOL

    def test_float32_operator_is_float32(self):
        grads = torch.randn(6, 10)
        op, _ = self.build(grads.double(), 1e-1, None)
        op32, _ = self.build(grads, 1e-1, None)
        x = torch.randn(10)
        y = op32.mul(x)
        assert y.dtype == torch.float32
        assert rel_err(y, op.mul(x.double())) <= 1e-5
        with pytest.raises(TypeError, match="dtype"):
            op32.mul(x.double())


class TestDense(OperatorContract):
    def build(self, grads, damp, data):
        return mfac.DenseInverseFisher(grads, damp), dense_inverse(grads, damp)


class TestStaticFull(OperatorContract):
    static = mfac.StaticInverseFisher

    def build(self, grads, damp, data):
        return self.static(grads, damp), dense_inverse(grads, damp)


class TestShardedStaticFull(TestStaticFull):
    """Always the Woodbury route (also where one process inverts d x d directly, d <= m)."""

    static = ShardedStaticInverseFisher
    scipy_view = False


class TestStaticBlocks(OperatorContract):
    """Block-diagonal: both routes (direct B <= m, Woodbury B > m) and a shorter last block."""

    static = mfac.StaticInverseFisher

    def build(self, grads, damp, data):
        d = grads.shape[1]
        block = data.draw(st.integers(1, d)) if data is not None else max(1, d // 3)
        op = self.static(grads, damp, block_size=block)
        return op, block_diagonal_inverse(grads, damp, block)


class TestShardedStaticBlocks(TestStaticBlocks):
    static = ShardedStaticInverseFisher
    scipy_view = False


class TestSlidingAfterWraps(OperatorContract):
    """Sliding window after several full wrap-arounds equals the dense inverse of the last m rows."""

    min_m = 1
    window = mfac.SlidingInverseFisher

    def build(self, grads, damp, data):
        m, d = grads.shape
        wraps = data.draw(st.integers(0, 3)) if data is not None else 2
        extra = data.draw(st.integers(0, m)) if data is not None else 1
        gen = torch.Generator().manual_seed(m * 1000 + d)
        scale = grads.square().mean().sqrt().item() or 1.0  # older rows of the same r as the window's
        older = scale * torch.randn(wraps * m + extra, d, generator=gen, dtype=grads.dtype)
        op = self.window(d, m, damp, dtype=grads.dtype)
        for g in torch.cat([older, grads]):
            op.update(g)
        return op, dense_inverse(grads, damp)


class TestShardedSlidingAfterWraps(TestSlidingAfterWraps):
    window = ShardedSlidingInverseFisher
    scipy_view = False


WINDOWS = [mfac.SlidingInverseFisher, ShardedSlidingInverseFisher]


@pytest.mark.parametrize("window", WINDOWS, ids=["single", "sharded"])
class TestSlidingUpdateMul:
    """``update_mul`` returns F^{-1} g for the window that includes g, at every step of a long stream."""

    @given(problem=problems(min_m=1, max_m=8), average_over=st.sampled_from(["seen", "ngrads"]))
    def test_stream(self, window, problem, average_over):
        grads, damp = problem
        m, d = grads.shape
        stream = torch.cat([grads, grads.flip(0), grads * 0.5, grads])  # 4 m steps: 3 wraps
        op = window(d, m, damp, dtype=torch.float64, average_over=average_over)
        for t, g in enumerate(stream):
            window = stream[max(0, t + 1 - m) : t + 1]
            scale = m if average_over == "ngrads" else window.shape[0]
            expected = dense_inverse(window, damp, scale) @ g
            assert rel_err(op.update_mul(g), expected) <= TOL, f"step {t}"
            assert op.num_stored == window.shape[0]
            assert op.num_seen == t + 1

    def test_float32_cancelling_window_is_redone_in_float64(self, window, monkeypatch):
        """A repeated gradient at damp 1e-4: ``F^{-1} g`` is a combination of window rows that cancels.

        The float32 ``G^T c`` is then noise (relative error 0.16 here); the float64 redo of
        ``_combine_rows`` must fire at every such step and give the float64 reference to float32
        accuracy, for the sharded window exactly as for the single-process one (it once skipped it).
        """
        gen = torch.Generator().manual_seed(0)
        d, m, damp = 200, 4, 1e-4
        first = torch.randn(d, generator=gen)
        repeated = torch.randint(-3, 4, (d,), generator=gen).float()
        stream = [first] + [repeated] * 5
        op, single = window(d, m, damp), mfac.SlidingInverseFisher(d, m, damp)
        redone = []
        combine = op._combination_float64
        monkeypatch.setattr(op, "_combination_float64", lambda c: (redone.append(1), combine(c))[1])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for t, g in enumerate(stream):
                out = op.update_mul(g)
                kept = torch.stack(stream[max(0, t + 1 - m) : t + 1]).double()
                expected = dense_inverse(kept, damp, kept.shape[0]) @ g.double()
                assert rel_err(out, expected) <= 1e-6, t
                assert torch.equal(out, single.update_mul(g)), t
        assert len(redone) >= 3  # steps 3..5 cancel (each window holds the repeated row >= 3 times)
        assert any(issubclass(w.category, mfac.NumericalWarning) for w in caught)


class TestSlidingGrow:
    """``grow``: new coordinates are zero in every stored row; the m x m state is kept as it is."""

    def _stream(self, steps, d, seed=0):
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(steps, d, generator=gen, dtype=torch.float64)

    @pytest.mark.parametrize("average_over", ["seen", "ngrads"])
    def test_grown_window_equals_a_fresh_one_fed_the_padded_gradients(self, average_over):
        d_old, dim, m, damp = 7, 11, 3, 1e-3
        index = torch.tensor([0, 1, 3, 4, 5, 8, 9])
        before, after = self._stream(5, d_old), self._stream(4, dim, seed=1)  # 5 steps: one wrap
        op = mfac.SlidingInverseFisher(d_old, m, damp, dtype=torch.float64, average_over=average_over)
        for g in before[:2]:
            op.update(g)
        op.update_mul(before[2], check_finite=False)  # a pending unchecked step's checks are kept
        for g in before[3:]:
            op.update(g)
        gram, inv, seen = op._gram.clone(), op._inv.clone(), op.num_seen
        op.grow(dim, index)
        assert op.dim == dim and op.num_seen == seen
        assert torch.equal(op._gram, gram) and torch.equal(op._inv, inv)
        padded = torch.zeros(5, dim, dtype=torch.float64)
        padded[:, index] = before
        fresh = mfac.SlidingInverseFisher(dim, m, damp, dtype=torch.float64, average_over=average_over)
        for g in padded:
            fresh.update(g)
        x = self._stream(2, dim, seed=2)
        scale = m if average_over == "ngrads" else min(5, m)
        assert rel_err(op.mul(x), x @ dense_inverse(padded[-m:], damp, scale)) <= TOL
        assert rel_err(op.mul(x), fresh.mul(x)) <= TOL
        stream = torch.cat([padded, after])
        for t, g in enumerate(after, start=5):
            window = stream[t + 1 - m : t + 1]
            expected = dense_inverse(window, damp) @ g
            assert rel_err(op.update_mul(g), expected) <= TOL, t
            assert rel_err(fresh.update_mul(g), expected) <= TOL, t

    def test_compressed_window_grows_with_its_rows_remapped(self):
        d_old, dim, m, damp = 40, 70, 3, 1e-2
        index = torch.cat([torch.arange(0, 10), torch.arange(30, 60)])
        op = mfac.CompressedSlidingInverseFisher(d_old, m, damp, density=0.25, block=16, dtype=torch.float64)
        for g in self._stream(4, d_old):
            op.update(g)
        window, error, gram = op.window.clone(), op.error.clone(), op._gram.clone()
        op.grow(dim, index)
        assert op.row_size >= int(0.25 * dim) and torch.equal(op._gram, gram)
        grown = torch.zeros(m, dim, dtype=torch.float64)
        grown[:, index] = window
        assert torch.equal(op.window, grown) and torch.equal(op.error[index], error)
        x = self._stream(2, dim, seed=3)
        assert rel_err(op.mul(x), x @ dense_inverse(grown, damp)) <= TOL
        g = self._stream(1, dim, seed=4)[0]  # the next step compresses over the new layout
        out = op.update_mul(g)
        assert rel_err(out, dense_inverse(op.window, damp) @ op.window[op.next_row - 1]) <= TOL

    @pytest.mark.parametrize(
        ("dim", "index", "error", "match"),
        [
            (5, torch.arange(6), ValueError, r"dim must be >= the window's dim=6"),
            (9, torch.arange(5), ValueError, r"index must have shape \(6,\)"),
            (9, torch.tensor([0, 1, 2, 2, 3, 4]), ValueError, "strictly increasing"),
            (9, torch.tensor([0, 1, 2, 3, 4, 9]), ValueError, r"values in \[0, 9\)"),
            (9, torch.arange(6.0), TypeError, "index must be an integer tensor"),
            (9, [0, 1, 2, 3, 4, 5], TypeError, "index must be an integer tensor"),
        ],
    )
    def test_bad_growth_is_refused_before_anything_changes(self, dim, index, error, match):
        op = mfac.SlidingInverseFisher(6, 2, 1e-2, dtype=torch.float64)
        op.update(self._stream(1, 6)[0])
        window = op.window.clone()
        with pytest.raises(error, match=match):
            op.grow(dim, index)
        assert op.dim == 6 and torch.equal(op.window, window)

    def test_a_growth_that_does_not_fit_leaves_the_window_as_it_was(self):
        op = mfac.SlidingInverseFisher(6, 2, 1e-2, dtype=torch.float64)
        g = self._stream(1, 6)[0]
        expected = op.update_mul(g)
        with pytest.raises(MemoryError, match="gradient window"):
            op.grow(2**46, torch.arange(6))  # 2 * 2^46 float64: 1 PiB
        assert op.dim == 6 and torch.equal(op.window[0], g)
        op.reset()
        assert torch.equal(op.update_mul(g), expected)

    def test_a_sharded_window_cannot_grow(self):
        op = ShardedSlidingInverseFisher(6, 2, 1e-2, dtype=torch.float64)
        with pytest.raises(NotImplementedError, match="sharded window cannot grow"):
            op.grow(9, torch.arange(6))
