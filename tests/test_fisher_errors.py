"""Bad inputs to the operators: each gives the error type and a message naming the value and the rule."""

from __future__ import annotations

import math

import pytest
import torch

import mfac

G = torch.randn(4, 6)
NAN_G = G.clone()
NAN_G[1, 2] = math.nan


def sliding(**kw):
    args = {"dim": 6, "ngrads": 3, "damp": 1e-3} | kw
    return mfac.SlidingInverseFisher(**args)


CONSTRUCTION = [
    # (callable, error type, message regex)
    (lambda: mfac.StaticInverseFisher(G, 0.0), ValueError, r"damp must be finite and > 0, got 0.0"),
    (lambda: mfac.StaticInverseFisher(G, -1.0), ValueError, r"damp must be finite and > 0, got -1.0"),
    (lambda: mfac.StaticInverseFisher(G, math.inf), ValueError, r"damp must be finite and > 0, got inf"),
    (lambda: mfac.StaticInverseFisher(G, math.nan), ValueError, r"damp must be finite and > 0, got nan"),
    (lambda: mfac.StaticInverseFisher(G, "a"), TypeError, r"damp must be a real number, got str 'a'"),
    (lambda: mfac.StaticInverseFisher(G[0], 1.0), ValueError, r"grads must have shape \(m, d\), got \(6,\)"),
    (lambda: mfac.StaticInverseFisher(G.long(), 1.0), TypeError, r"grads must be a floating tensor"),
    (lambda: mfac.StaticInverseFisher(G.numpy(), 1.0), TypeError, r"grads must be a torch.Tensor"),
    (lambda: mfac.StaticInverseFisher(NAN_G, 1.0), ValueError, r"grads must be finite, got 1 NaN and 0 inf"),
    (lambda: mfac.StaticInverseFisher(G, 1.0, block_size=0), ValueError, r"block_size must be >= 1, got 0"),
    (lambda: mfac.StaticInverseFisher(G, 1.0, block_size=2.5), TypeError, r"block_size must be an int"),
    (lambda: mfac.DenseInverseFisher(NAN_G, 1.0), ValueError, r"grads must be finite"),
    (lambda: mfac.DenseInverseFisher(G, 0), ValueError, r"damp must be finite and > 0, got 0"),
    (lambda: sliding(ngrads=0), ValueError, r"ngrads must be >= 1, got 0"),
    (lambda: sliding(dim=0), ValueError, r"dim must be >= 1, got 0"),
    (lambda: sliding(damp=-1e-5), ValueError, r"damp must be finite and > 0, got -1e-05"),
    (lambda: sliding(dtype=torch.int32), TypeError, r"dtype must be a floating torch.dtype"),
    (lambda: sliding(average_over="all"), ValueError, r"average_over must be one of \('seen', 'ngrads'\)"),
    (lambda: sliding(dim=10**7, ngrads=10**6), MemoryError,
     r"cannot allocate the gradient window of shape \(1000000, 10000000\).*36.38 TiB asked for on cpu"),
]


@pytest.mark.parametrize("make,error,message", CONSTRUCTION)
def test_bad_construction(make, error, message):
    with pytest.raises(error, match=message):
        make()


def _ops():
    static = mfac.StaticInverseFisher(G, 1e-2)
    window = sliding()
    window.update(G[0])
    return [static, window, mfac.DenseInverseFisher(G, 1e-2)]


@pytest.mark.parametrize("op", _ops(), ids=lambda op: type(op).__name__)
@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda op: op.mul(torch.randn(5)), ValueError, r"x must have shape \(6,\) or \(k, 6\), got \(5,\)"),
        (lambda op: op.mul(torch.randn(2, 3, 6)), ValueError, r"x must have shape .* got \(2, 3, 6\)"),
        (lambda op: op.mul(torch.randn(6, dtype=torch.float64)), TypeError,
         r"x must have dtype torch.float32 \(the operator's\), got torch.float64"),
        (lambda op: op.mul([1.0] * 6), TypeError, r"x must be a torch.Tensor, got list"),
        (lambda op: op.submatrix(torch.tensor([0, 6])), IndexError, r"idx must lie in \[0, 6\), got values in \[0, 6\]"),
        (lambda op: op.submatrix(torch.tensor([-1])), IndexError, r"idx must lie in \[0, 6\)"),
        (lambda op: op.submatrix(torch.tensor([[0]])), ValueError, r"idx must be 1-D, got shape \(1, 1\)"),
        (lambda op: op.submatrix(torch.tensor([True, False])), TypeError, r"idx must be an integer index tensor"),
        (lambda op: op.submatrix(torch.tensor([0.0])), TypeError, r"idx must be an integer index tensor"),
    ],
)
def test_bad_operator_calls(op, call, error, message):
    with pytest.raises(error, match=message):
        call(op)


@pytest.mark.parametrize(
    "grad,error,message",
    [
        (torch.randn(5), ValueError, r"grad must have shape \(6,\), got \(5,\)"),
        (torch.randn(1, 6), ValueError, r"grad must have shape \(6,\), got \(1, 6\)"),
        (torch.randn(6, dtype=torch.float64), TypeError, r"grad must have dtype torch.float32"),
        (torch.tensor([1.0, math.nan, 0, 0, 0, 0]), ValueError, r"grad must be finite, got 1 NaN and 0 inf"),
        (torch.tensor([1.0, math.inf, -math.inf, 0, 0, 0]), ValueError, r"grad must be finite, got 0 NaN and 2 inf"),
    ],
)
@pytest.mark.parametrize("method", ["update", "update_mul"])
def test_bad_gradients_leave_the_window_untouched(grad, error, message, method):
    op = sliding()
    op.update(G[0])
    before = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in op.state_dict().items()}
    with pytest.raises(error, match=message):
        getattr(op, method)(grad)
    after = op.state_dict()
    for key, value in before.items():
        if torch.is_tensor(value):
            assert torch.equal(value, after[key]), key
        else:
            assert value == after[key], key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch():
    op = sliding()
    with pytest.raises(ValueError, match=r"x must be on device cpu \(the operator's\), got cuda"):
        op.mul(torch.randn(6, device="cuda"))


@pytest.mark.parametrize(
    ("block_size", "route"), [(None, "woodbury"), (4, "woodbury"), (2, "direct")]
)
@pytest.mark.parametrize(("bad", "message"), [(math.nan, r"1 NaN and 0 inf"), (-math.inf, r"0 NaN and 1 inf")])
def test_static_nonfinite_found_on_every_route(block_size, route, bad, message):
    """The static build checks finiteness on the Gram diagonal it forms anyway, on every route."""
    grads = torch.randn(3, 7)
    grads[2, 5] = bad
    keep = grads.clone()
    with pytest.raises(ValueError, match=r"grads must be finite, got " + message):
        mfac.StaticInverseFisher(grads, 1e-2, block_size=block_size, overwrite=block_size is None)
    assert torch.equal(grads.isnan(), keep.isnan())  # the input is untouched even with overwrite=True
    assert torch.equal(grads.nan_to_num(), keep.nan_to_num())
    ok = grads.nan_to_num(0.0, 0.0, 0.0)
    assert mfac.StaticInverseFisher(ok, 1e-2, block_size=block_size).route == route


def test_static_nonfinite_message_names_the_rows():
    grads = torch.randn(12, 20)  # d > m: the Woodbury route, which checks row norms
    grads[3, 0] = math.nan
    grads[9, 4] = math.inf
    with pytest.raises(ValueError, match=r"1 NaN and 1 inf entries \(rows \[3, 9\]\)"):
        mfac.StaticInverseFisher(grads, 1e-2)


def test_static_overflowing_squared_norms_are_refused():
    """Finite float32 entries whose squares overflow float32 would poison the Gram matrix silently."""
    grads = torch.ones(2, 4)
    grads[1] = 1e20  # squares: 1e40 > float32 max
    with pytest.raises(ValueError, match=r"squared norms overflow torch.float32 \(rows \[1\]\)"):
        mfac.StaticInverseFisher(grads, 1e-2)
    op = mfac.StaticInverseFisher(grads.double(), 1e-2)  # fine in float64
    assert torch.isfinite(op.diag()).all()


def test_sliding_refuses_gradients_whose_squared_norm_overflows():
    op = sliding()
    with pytest.raises(ValueError, match=r"grad must be finite: its squared norm overflows torch.float32"):
        op.update(torch.full((6,), 1e20))  # finite entries, |g|^2 = 6e40 > float32 max
    assert op.num_seen == 0
    op64 = sliding(dtype=torch.float64)
    op64.update(torch.full((6,), 1e20, dtype=torch.float64))  # fine in float64
    assert op64.num_seen == 1
