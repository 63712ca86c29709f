"""Reductions to known cases, float32 accuracy, checkpoint round trips and breakdown recovery."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from references import block_diagonal_inverse, dense_inverse, rel_err

import mfac


def test_empty_window_is_x_over_damp():
    x = torch.randn(2, 7, dtype=torch.float64)
    sliding = mfac.SlidingInverseFisher(7, 4, 0.3, dtype=torch.float64)
    static = mfac.StaticInverseFisher(torch.zeros(0, 7, dtype=torch.float64), 0.3)
    for op in (sliding, static):
        torch.testing.assert_close(op.mul(x), x / 0.3, rtol=0, atol=0)
        torch.testing.assert_close(op.diag(), torch.full((7,), 1 / 0.3, dtype=torch.float64))
    assert sliding.num_stored == 0


@pytest.mark.parametrize("average_over", ["seen", "ngrads"])
def test_one_gradient_is_sherman_morrison(average_over):
    # F = damp I + g g^T / s  =>  F^{-1} x = x/damp - g (g.x) / (damp (s damp + |g|^2))
    torch.manual_seed(0)
    d, m, damp = 11, 5, 0.05
    g, x = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    s = 1 if average_over == "seen" else m
    expected_x = x / damp - g * (g @ x) / (damp * (s * damp + g @ g))
    expected_g = g / (damp + (g @ g) / s)
    op = mfac.SlidingInverseFisher(d, m, damp, dtype=torch.float64, average_over=average_over)
    assert rel_err(op.update_mul(g), expected_g) <= 1e-13
    assert rel_err(op.mul(x), expected_x) <= 1e-13
    static = mfac.StaticInverseFisher(g[None], damp)
    assert rel_err(static.mul(x), x / damp - g * (g @ x) / (damp * (damp + g @ g))) <= 1e-13


def test_static_equals_sliding_after_one_fill():
    torch.manual_seed(1)
    m, d, damp = 6, 20, 1e-3
    grads = torch.randn(m, d, dtype=torch.float64)
    sliding = mfac.SlidingInverseFisher(d, m, damp, dtype=torch.float64)
    for g in grads:
        sliding.update(g)
    static = mfac.StaticInverseFisher(grads, damp)
    x = torch.randn(3, d, dtype=torch.float64)
    assert rel_err(sliding.mul(x), static.mul(x)) <= 1e-10
    assert rel_err(sliding.diag(), static.diag()) <= 1e-10
    idx = torch.tensor([0, 5, 19])
    assert rel_err(sliding.submatrix(idx), static.submatrix(idx)) <= 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_state_dict_round_trip_continues_bit_for_bit(dtype):
    torch.manual_seed(2)
    d, m = 30, 4
    stream = torch.randn(23, d, dtype=dtype)
    a = mfac.SlidingInverseFisher(d, m, 1e-4, dtype=dtype)
    for g in stream[:10]:
        a.update(g)
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in a.state_dict().items()}
    b = mfac.SlidingInverseFisher(d, m, 1e-4, dtype=dtype)
    b.load_state_dict(state)
    for g in stream[10:]:
        assert torch.equal(a.update_mul(g), b.update_mul(g))
    x = torch.randn(d, dtype=dtype)
    assert torch.equal(a.mul(x), b.mul(x))
    assert a.num_seen == b.num_seen == 23


def test_load_state_dict_restores_dtype_even_from_cast_state():
    a = mfac.SlidingInverseFisher(5, 3, 1e-2, dtype=torch.float32)
    for _ in range(4):
        a.update(torch.randn(5))
    state = a.state_dict()
    cast = {k: (v.to(torch.bfloat16) if k == "grads" else v) for k, v in state.items()}
    cast["gram"] = state["gram"].float()  # as torch.optim would cast to a float32 parameter
    b = mfac.SlidingInverseFisher(5, 3, 1e-2, dtype=torch.float32)
    b.load_state_dict(cast)
    assert b.window.dtype == torch.float32 and b.state_dict()["gram"].dtype == torch.float64


def test_load_state_dict_rejects_other_settings():
    a = mfac.SlidingInverseFisher(5, 3, 1e-2)
    b = mfac.SlidingInverseFisher(5, 4, 1e-2)
    with pytest.raises(ValueError, match="ngrads=3, this operator ngrads=4"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("m,d", [(8, 5000), (32, 20000)])
def test_float32_update_mul_accuracy(m, d):
    """Guaranteed here: float32 ``update_mul`` within 1e-5 (max-norm relative) of float64 truth for
    independent gradients, damp 1e-2 .. 1e-8, after wrap-around (see the benchmark for larger sizes)."""
    torch.manual_seed(3)
    for damp in (1e-2, 1e-5, 1e-8):
        w32 = mfac.SlidingInverseFisher(d, m, damp, dtype=torch.float32)
        w64 = mfac.SlidingInverseFisher(d, m, damp, dtype=torch.float64)
        for _ in range(m + m // 2):
            g = torch.randn(d)
            y32, y64 = w32.update_mul(g), w64.update_mul(g.double())
        assert rel_err(y32, y64) <= 1e-5, damp


def test_paper_form_cancels_but_update_mul_does_not():
    """The generic form (x - G^T P G x)/damp loses digits for x in the window; update_mul does not."""
    torch.manual_seed(4)
    m, d, damp = 16, 4000, 1e-6
    w32 = mfac.SlidingInverseFisher(d, m, damp, dtype=torch.float32)
    w64 = mfac.SlidingInverseFisher(d, m, damp, dtype=torch.float64)
    for _ in range(m + 3):
        g = torch.randn(d)
        fast, truth = w32.update_mul(g), w64.update_mul(g.double())
    generic = w32.mul(g)
    assert rel_err(fast, truth) <= 1e-5
    assert rel_err(generic, truth) > 10 * rel_err(fast, truth)


def test_repeated_float32_gradients_recover_with_warning():
    """Identical gradients, tiny damp: the float32 Gram is indefinite; jitter + warning, never NaN."""
    torch.manual_seed(5)
    d, m = 50000, 16
    g = torch.randn(d)
    op = mfac.SlidingInverseFisher(d, m, 1e-5, dtype=torch.float32)
    with pytest.warns(mfac.NumericalWarning, match="not numerically positive definite"):
        for _ in range(2 * m):
            y = op.update_mul(g)
    assert torch.isfinite(y).all()
    # all-identical window: F^{-1} g = g / (damp + |g|^2). The float32 sum G^T c cancels here (its
    # terms are ~1e7 times the result), so update_mul redoes it in float64; what is left is the float32
    # rounding of the Gram matrix (about 1e-3 here; it was O(1) with the float32 sum).
    expected = g.double() / (1e-5 + g.double() @ g.double())
    assert rel_err(y, expected) <= 1e-2
    assert torch.nn.functional.cosine_similarity(y.double(), expected, dim=0) > 0.999
    assert op.jitter > 0


@pytest.mark.parametrize("block", [8, 13])
def test_static_block_routes_agree_with_each_other(block, monkeypatch):
    """The same block-diagonal operator through both routes (the choice forced): same numbers."""
    torch.manual_seed(6)
    grads = torch.randn(10, 37, dtype=torch.float64)
    natural = mfac.StaticInverseFisher(grads, 1e-2, block_size=block)
    assert natural.route == ("direct" if block <= 10 else "woodbury")  # B <= m: direct inverse
    assert natural.num_blocks == -(-37 // block)  # the last block is shorter
    forced_route = not (block <= 10)
    monkeypatch.setattr(mfac.StaticInverseFisher, "_use_direct_route", lambda self, b, m: forced_route)
    forced = mfac.StaticInverseFisher(grads, 1e-2, block_size=block)
    assert {natural.route, forced.route} == {"direct", "woodbury"}
    x = torch.randn(3, 37, dtype=torch.float64)
    idx = torch.tensor([0, 7, 8, 12, 13, 36, 7])
    reference = block_diagonal_inverse(grads, 1e-2, block)
    for op in (natural, forced):
        assert rel_err(op.mul(x), x @ reference) <= 1e-12
        assert rel_err(op.diag(), reference.diagonal()) <= 1e-12
        assert rel_err(op.submatrix(idx), reference[idx][:, idx]) <= 1e-12
    torch.testing.assert_close(natural.mul(x), forced.mul(x), rtol=1e-12, atol=0)
    torch.testing.assert_close(natural.diag(), forced.diag(), rtol=1e-12, atol=0)
    torch.testing.assert_close(natural.submatrix(idx), forced.submatrix(idx), rtol=1e-12, atol=1e-15)


def test_overwrite_reuses_input_memory():
    torch.manual_seed(7)
    grads = torch.randn(6, 40, dtype=torch.float64)
    keep = grads.clone()
    op = mfac.StaticInverseFisher(grads, 1e-2, overwrite=True)
    assert op._q.data_ptr() == grads.data_ptr()  # the factor lives in the input's memory
    x = torch.randn(40, dtype=torch.float64)
    assert rel_err(op.mul(x), dense_inverse(keep, 1e-2) @ x) <= 1e-10
    op2 = mfac.StaticInverseFisher(keep, 1e-2)  # default: input untouched
    assert op2._q.data_ptr() != keep.data_ptr()


def test_update_mul_redoes_a_cancelling_float32_sum_in_float64(caplog, monkeypatch):
    """Identical float32 gradients at small damp: the float32 G^T c is noise, update_mul's result is not."""
    import mfac.fisher.sliding as sliding

    torch.manual_seed(9)
    d, m, damp = 20000, 8, 1e-5
    g = torch.randn(d)
    expected = g.double() / (damp + g.double() @ g.double())  # every window: m copies of g

    def worst_error() -> float:
        op = mfac.SlidingInverseFisher(d, m, damp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mfac.NumericalWarning)
            return max(rel_err(op.update_mul(g), expected) for _ in range(3 * m))

    with caplog.at_level("DEBUG", logger="mfac.fisher.sliding"):
        guarded = worst_error()
    assert "redone in float64" in caplog.text
    monkeypatch.setattr(sliding, "_CANCELLATION_LIMIT", math.inf)  # the float32 sum only
    plain = worst_error()
    assert guarded <= 1e-2 and plain > 10 * guarded, (guarded, plain)
