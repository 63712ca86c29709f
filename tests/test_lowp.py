"""The bfloat16 window against float64 dense references of the bfloat16-rounded gradients."""

from __future__ import annotations

import copy
import io
import pickle
import types

import pytest
import torch
from references import dense_fisher, dense_inverse, rel_err

import mfac
from mfac.fisher.lowp import LowPrecisionSlidingInverseFisher, check_window_dtype
from mfac.numerics import NonFiniteGradientError

pytestmark = pytest.mark.usefixtures("one_thread")

BF16, F64 = torch.bfloat16, torch.float64
#: float32 work over the rounded rows: the error of a float32 window (measured <= 3e-7 here)
TOL32 = 5e-6


def _stream(d: int, steps: int, seed: int = 0, scale: float = 0.1) -> torch.Tensor:
    """Correlated float32 gradients (a shared direction plus noise, as in training)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(1, d, generator=gen)
    return scale * (0.5 * base + torch.randn(steps, d, generator=gen))


def _window(d: int = 600, m: int = 5, damp: float = 1e-3, **kw) -> LowPrecisionSlidingInverseFisher:
    # tile_bytes for 256 columns: d = 600 gives tiles of 256, 256 and 88 columns
    kw.setdefault("tile_bytes", m * 4 * 256)
    return LowPrecisionSlidingInverseFisher(d, m, damp, **kw)


def _solve(fisher: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``F^{-1} x`` in float64 by Cholesky (the dense reference)."""
    return torch.cholesky_solve(x[:, None], torch.linalg.cholesky(fisher))[:, 0]


def _rounded(rows: torch.Tensor) -> torch.Tensor:
    return rows.to(BF16).to(F64)


@pytest.mark.parametrize("average_over", ["seen", "ngrads"])
def test_update_mul_is_the_exact_step_of_the_rounded_gradients(average_over):
    m, damp = 5, 1e-3
    stream = _stream(600, 4 * m)  # three wrap-arounds
    op = _window(m=m, damp=damp, average_over=average_over)
    assert op.tile_cols == 256
    for t, g in enumerate(stream):
        u = op.update_mul(g)
        window = _rounded(stream[max(0, t + 1 - m) : t + 1])
        scale = m if average_over == "ngrads" else window.shape[0]
        assert u.dtype == torch.float32
        expected = _solve(dense_fisher(window, damp, scale), _rounded(g))
        assert rel_err(u, expected) <= TOL32, f"step {t}"
        if t % m == 0:  # the reference can tell: unrounded gradients give another step (~1e-3 apart)
            unrounded = stream[max(0, t + 1 - m) : t + 1].to(F64)
            exact = _solve(dense_fisher(unrounded, damp, scale), g.to(F64))
            assert rel_err(u, exact) > 20 * TOL32


def test_float64_compute_is_exact_to_float64():
    m, damp = 4, 1e-4
    stream = _stream(600, 3 * m, seed=1).to(F64)
    op = _window(600, m, damp, dtype=F64)
    for t, g in enumerate(stream):
        u = op.update_mul(g)
        window = _rounded(stream[max(0, t + 1 - m) : t + 1])
        assert u.dtype == F64
        assert rel_err(u, _solve(dense_fisher(window, damp), _rounded(g))) <= 1e-10


def test_gram_products_accumulate_in_float32_not_bfloat16():
    # torch's bfloat16 mv rounds every partial sum to bf16: a relative error ~4e-3 on the Gram entries
    m, d = 6, 5000
    stream = _stream(d, 2 * m, seed=2)
    op = _window(d, m)
    for g in stream:
        op.update(g)
    window = _rounded(stream[m:])
    order = [t % m for t in range(m, 2 * m)]  # ring slot of each of the last m gradients
    gram = torch.zeros(m, m, dtype=F64)
    gram[torch.tensor(order)[:, None], torch.tensor(order)[None, :]] = window @ window.T
    assert rel_err(op._gram, gram) <= 1e-6
    naive = (op.window @ op.window.T).to(F64)  # what bf16 products give
    assert rel_err(naive, gram) > 1e-4


def test_mul_diag_submatrix_of_the_rounded_fisher():
    m, d, damp = 5, 600, 1e-2
    stream = _stream(d, 2 * m + 2, seed=3)
    op = _window(d, m, damp)
    for g in stream:
        op.update(g)
    inv = dense_inverse(_rounded(stream[-m:]), damp)
    x = torch.randn(3, d)
    assert rel_err(op.mul(x), x.to(F64) @ inv) <= TOL32
    assert rel_err(op.diag(), inv.diagonal()) <= TOL32
    idx = torch.tensor([3, 599, 256, 3, 255])
    assert rel_err(op.submatrix(idx), inv[idx][:, idx]) <= TOL32


def test_exactly_representable_gradients_give_the_float32_window():
    m, d, damp = 4, 900, 1e-3
    stream = _rounded(_stream(d, 3 * m, seed=4)).float()
    low, full = _window(d, m, damp), mfac.SlidingInverseFisher(d, m, damp)
    for g in stream:
        assert rel_err(low.update_mul(g), full.update_mul(g)) <= 1e-6
    assert torch.equal(low.window.float(), full.window)


def test_window_is_stored_in_bfloat16_half_the_bytes():
    op = _window(1000, 8)
    assert op.window_dtype == BF16 and op.window.dtype == BF16
    assert op.state_dict()["grads"].dtype == BF16
    full = mfac.SlidingInverseFisher(1000, 8, 1e-3)
    assert op._grads.numel() * op._grads.element_size() * 2 == full._grads.numel() * 4


def test_checkpoint_resumes_bit_for_bit():
    m = 4
    stream = _stream(600, 5 * m, seed=5)
    op = _window(m=m)
    for g in stream[:6]:
        op.update_mul(g)
    buf = io.BytesIO()
    torch.save(op.state_dict(), buf)
    buf.seek(0)
    resumed = _window(m=m)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    twin = pickle.loads(pickle.dumps(op))
    deep = copy.deepcopy(op)
    for g in stream[6:]:
        u = op.update_mul(g)
        for other in (resumed, twin, deep):
            assert torch.equal(other.update_mul(g), u)
    for key, value in op.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]) if isinstance(value, torch.Tensor) else (
            value == resumed.state_dict()[key])


def test_nonfinite_gradient_leaves_the_window_untouched():
    op = _window()
    for g in _stream(600, 7, seed=6):
        op.update_mul(g)
    before = copy.deepcopy(op.state_dict())
    bad = _stream(600, 1, seed=7)[0]
    bad[500] = float("nan")
    with pytest.raises(NonFiniteGradientError, match="1 NaN"):
        op.update_mul(bad)
    after = op.state_dict()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"window_dtype": torch.float16}, ValueError, r"float16's range"),
        ({"window_dtype": torch.int8}, ValueError, r"window_dtype must be None .* or one of"),
        ({"window_dtype": "bfloat16"}, TypeError, r"window_dtype must be a torch.dtype"),
        ({"window_dtype": None}, ValueError, r"use SlidingInverseFisher"),
        ({"window_dtype": torch.float32}, ValueError, r"use SlidingInverseFisher"),
        ({"dtype": torch.float16}, ValueError, r"computes in float32 or float64, got dtype=torch.float16"),
        ({"tile_bytes": 0}, ValueError, r"tile_bytes"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LowPrecisionSlidingInverseFisher(10, 2, 1e-3, **kwargs)


def test_check_window_dtype_normalises():
    assert check_window_dtype(None, torch.float32) is None
    assert check_window_dtype(torch.float32, torch.float32) is None
    assert check_window_dtype(BF16, torch.float64) is BF16


def test_states_of_another_window_dtype_are_refused_and_change_nothing():
    op = _window()
    for g in _stream(600, 3, seed=8):
        op.update(g)
    mine = copy.deepcopy(op.state_dict())
    full = mfac.SlidingInverseFisher(600, 5, 1e-3)
    for g in _stream(600, 3, seed=9):
        full.update(g)
    with pytest.raises(ValueError, match=r"window_dtype=None, this operator window_dtype=torch.bfloat16"):
        op.load_state_dict(full.state_dict())
    with pytest.raises(ValueError, match=r"state_dict\['grads'\] must be torch.bfloat16, got torch.float32"):
        op.load_state_dict({**full.state_dict(), "window_dtype": BF16})
    after = op.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in mine.items() if isinstance(v, torch.Tensor))


# ---------------------------------------------------------------------- the optimizer


def _model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x, y = torch.randn(32, 12), torch.randint(0, 3, (32,))
    return model, x, y


def _train(model, opt, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("cls", [mfac.MFAC, mfac.MFACPreconditioner])
def test_optimizer_bfloat16_window_resumes_bit_for_bit(cls):
    model, x, y = _model_and_data()
    kw = {"ngrads": 6, "damp": 1e-3, "window_dtype": BF16}
    if cls is mfac.MFAC:
        kw.update(lr=1e-2, momentum=0.9)
    opt = cls(model.parameters(), **kw)
    inner = torch.optim.SGD(model.parameters(), lr=1e-2) if cls is mfac.MFACPreconditioner else None

    def step(m, o, i):
        o.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()
        if i is not None:
            i.step()

    for _ in range(8):
        step(model, opt, inner)
    assert isinstance(opt.inverse_fisher, mfac.LowPrecisionSlidingInverseFisher)
    assert opt.inverse_fisher.window.dtype == BF16
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    twin = copy.deepcopy(model)
    opt2 = cls(twin.parameters(), **kw)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    inner2 = torch.optim.SGD(twin.parameters(), lr=1e-2) if inner is not None else None
    for _ in range(7):
        step(model, opt, inner)
        step(twin, opt2, inner2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))


def test_optimizer_checkpoint_of_another_window_dtype_is_refused():
    model, x, y = _model_and_data()
    opt = mfac.MFAC(model.parameters(), ngrads=4, window_dtype=BF16)
    _train(model, opt, x, y, 2)
    plain = mfac.MFAC(model.parameters(), ngrads=4)
    with pytest.raises(ValueError, match=r"saved with window_dtype=torch.bfloat16, this optimizer has "
                                         r"window_dtype=None"):
        plain.load_state_dict(opt.state_dict())
    _train(model, plain, x, y, 1)
    with pytest.raises(ValueError, match="saved with window_dtype=None"):
        opt.load_state_dict(plain.state_dict())


def test_optimizer_bad_window_dtype_and_combinations():
    model, _, _ = _model_and_data()
    with pytest.raises(ValueError, match=r"window_dtype .* must be None or one of \(torch.bfloat16,\), got "
                                         r"torch.float16"):
        mfac.MFAC(model.parameters(), window_dtype=torch.float16)
    with pytest.raises(TypeError, match=r"window_dtype must be a torch.dtype or None, got str"):
        mfac.MFACPreconditioner(model.parameters(), window_dtype="bfloat16")
    fake = types.SimpleNamespace(local=None, new_fisher=None, update_mul=None, all_finite=None)
    with pytest.raises(ValueError, match="cannot be combined with distributed"):
        mfac.MFAC(model.parameters(), window_dtype=BF16, distributed=fake)


def test_optimizer_compressed_window_stores_bfloat16_values():
    model, x, y = _model_and_data()
    opt = mfac.MFAC(model.parameters(), ngrads=4, density=0.25, window_dtype=BF16)
    _train(model, opt, x, y, 3)
    assert isinstance(opt.inverse_fisher, mfac.CompressedSlidingInverseFisher)
    assert opt.inverse_fisher.values_dtype == BF16


def test_optimizer_window_grows_in_bfloat16():
    model, x, y = _model_and_data()
    head = model[2]
    head.weight.requires_grad_(False)
    opt = mfac.MFAC(model.parameters(), lr=1e-2, ngrads=4, window_dtype=BF16)
    _train(model, opt, x, y, 5)
    before = opt.inverse_fisher.dim
    old = opt.inverse_fisher.window.clone()
    head.weight.requires_grad_(True)
    _train(model, opt, x, y, 1)
    fisher = opt.inverse_fisher
    assert fisher.dim == before + head.weight.numel()
    assert isinstance(fisher, mfac.LowPrecisionSlidingInverseFisher) and fisher.window.dtype == BF16
    # the older rows are kept exactly, with zero columns for the new parameter (the newest row, 5 % 4,
    # has the new gradient)
    kept = [r for r in range(4) if r != 5 % 4]
    norms = torch.linalg.vector_norm(fisher.window[kept], dim=1, dtype=F64)
    assert torch.equal(norms, torch.linalg.vector_norm(old[kept], dim=1, dtype=F64))
