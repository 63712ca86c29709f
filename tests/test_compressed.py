"""The compressed (error feedback + top-k) sliding window against float64 dense references."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mfac.fisher.compressed import CompressedSlidingInverseFisher
from mfac.fisher.dense import DenseInverseFisher
from mfac.fisher.sliding import SlidingInverseFisher
from tests.references import dense_fisher, dense_inverse, rel_err

F64 = torch.float64


def _stream(d: int, steps: int, seed: int = 0, dtype=F64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=gen, dtype=dtype)  # correlated gradients, as in training
    return [base + torch.randn(d, generator=gen, dtype=dtype) for _ in range(steps)]


def _window(d=200, m=5, damp=1e-2, density=0.1, block=32, **kw) -> CompressedSlidingInverseFisher:
    kw.setdefault("dtype", F64)
    return CompressedSlidingInverseFisher(d, m, damp, density=density, block=block, **kw)


def _explicit_rows(op: CompressedSlidingInverseFisher) -> torch.Tensor:
    """The stored rows rebuilt from values and indices by a plain loop (independent of ``_columns``)."""
    n = op.num_stored
    rows = torch.zeros(n, op.dim, dtype=F64)
    for i in range(n):
        for v, j in zip(op._values[i].tolist(), op._indices[i].tolist(), strict=True):
            rows[i, j] += v
    return rows


def test_row_size_and_selection_are_per_block():
    # d = 200, block 32: six full blocks keep ceil(3.2) = 4 each, the tail of 8 keeps ceil(0.8) = 1
    op = _window()
    assert op.row_size == 6 * 4 + 1
    g = torch.randn(200, dtype=F64, generator=torch.Generator().manual_seed(3))
    values, indices, _ = op.compress(g)
    idx = indices.long()
    assert torch.equal(idx, idx.sort().values)
    for b in range(7):
        lo, hi = 32 * b, min(32 * b + 32, 200)
        mine = idx[(idx >= lo) & (idx < hi)]
        expected = g[lo:hi].abs().topk(4 if b < 6 else 1).indices.sort().values + lo
        assert torch.equal(mine, expected), b
    assert torch.equal(values, g[idx])


@pytest.mark.parametrize("values_dtype", [None, torch.bfloat16])
def test_error_feedback_conserves_mass_exactly(values_dtype):
    op = _window(dtype=torch.float32, values_dtype=values_dtype, density=0.05)
    total_in = torch.zeros(200, dtype=torch.float32)
    total_sent = torch.zeros(200, dtype=torch.float32)
    for t, g in enumerate(_stream(200, 9, dtype=torch.float32)):
        g = torch.round(g * 8) / 8  # dyadic values: the running sums below are exact in float32
        before = op.error.clone()
        op.update(g)
        sent = _explicit_rows(op)[t % op.ngrads].float()  # the stored row, from values + indices
        # per step, bit for bit: fl(e + g) == g' + e_new
        assert torch.equal(before + g, sent + op.error)
        total_in += g
        total_sent += sent
    assert torch.equal(total_in, total_sent + op.error)
    assert op.error.abs().sum() > 0  # something was held back (the test can fail)


def test_sparse_gram_equals_dense_gram_of_the_compressed_rows():
    op = _window(m=4)
    for g in _stream(200, 7):  # wraps the ring
        op.update(g)
    rows = _explicit_rows(op)
    assert torch.allclose(op._gram[:4, :4], rows @ rows.T, rtol=1e-13, atol=1e-13)
    assert torch.equal(op.window, rows)


@pytest.mark.parametrize("average_over", ["seen", "ngrads"])
@pytest.mark.parametrize("density", [0.3, 0.02])
def test_step_equals_dense_float64_reference_of_the_same_rows(average_over, density):
    d, m, damp = 150, 6, 1e-3
    op = _window(d=d, m=m, damp=damp, density=density, block=40, average_over=average_over)
    for t, g in enumerate(_stream(d, 14, seed=1)):
        before = op.error.clone()
        u = op.update_mul(g)
        rows = _explicit_rows(op)
        sent = before + g - op.error  # g' (exact: conservation)
        assert torch.allclose(sent, rows[t % m], rtol=0, atol=1e-15)
        reference = dense_inverse(rows, damp, scale=op.scale) @ sent
        assert rel_err(u, reference) < 1e-9, t
    # and through DenseInverseFisher (built from the same rows), for mul / diag / submatrix
    dense = DenseInverseFisher(rows, damp)  # average over m rows: the window is full here
    x = torch.randn(3, d, dtype=F64)
    assert rel_err(op.mul(x), dense.mul(x)) < 1e-9
    assert rel_err(op.diag(), dense.diag()) < 1e-9
    idx = torch.tensor([5, 149, 5, 0, 77])
    assert rel_err(op.submatrix(idx), dense.submatrix(idx)) < 1e-9


def test_density_one_equals_the_dense_window():
    d, m = 120, 5
    op = _window(d=d, m=m, density=1.0, block=50, damp=1e-3)
    dense = SlidingInverseFisher(d, m, 1e-3, dtype=F64)
    for g in _stream(d, 12, seed=2):
        u, v = op.update_mul(g), dense.update_mul(g)
        assert rel_err(u, v) < 1e-12
        assert op.error.abs().max() == 0
    assert rel_err(op._gram, dense._gram) < 1e-14


def test_float32_window_and_long_rows_segmented():
    # k = 150 entries per row split into CSR segments of chunk = 32 (float64 sums of float32 partials)
    d, m = 600, 4
    op = _window(d=d, m=m, density=0.25, block=60, dtype=torch.float32, chunk=32, damp=1e-2)
    assert op.row_size == 150 and op._segments == 5
    for g in _stream(d, 6, seed=4, dtype=torch.float32):
        before = op.error.clone()
        u = op.update_mul(g)
    rows = _explicit_rows(op)
    sent = (before + g - op.error).double()
    assert rel_err(op._gram[:m, :m], rows @ rows.T) < 1e-6
    assert rel_err(u, torch.linalg.solve(dense_fisher(rows, 1e-2, scale=m), sent)) < 1e-4


def _sparse_gradient(d: int, block: int, per_block: int, seed: int) -> torch.Tensor:
    """A gradient with exactly ``per_block`` non-zeros per block: compression keeps all of it."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.zeros(d)
    for lo in range(0, d, block):
        g[lo + torch.randperm(block, generator=gen)[:per_block]] = torch.rand(per_block, generator=gen) + 1
    return g


def test_cancelling_combination_is_redone_in_float64(caplog, monkeypatch):
    # two nearly identical rows and c = (1e4, -1e4): the float32 sum of c_i v_i is mostly rounding
    import mfac.fisher.sliding as sliding

    d, block = 400, 100
    g = _sparse_gradient(d, block, 10, seed=5)
    coeff = torch.tensor([1e4, -1e4], dtype=F64)

    def error() -> float:
        op = _window(d=d, m=2, density=0.1, block=block, dtype=torch.float32)
        op.update(g)
        op.update(g * (1 + 1e-6))
        assert op.error.abs().max() == 0  # rows are g and g (1 + 1e-6), exactly as float32
        rows = _explicit_rows(op)
        return rel_err(op._combine_rows(coeff, None), coeff @ rows)  # None: check the bound here

    with caplog.at_level("DEBUG", logger="mfac.fisher.sliding"):
        guarded = error()
    assert "redone in float64" in caplog.text
    monkeypatch.setattr(sliding, "_CANCELLATION_LIMIT", math.inf)  # the float32 sum only
    plain = error()
    assert guarded < 1e-6 and plain > 1e-3, (guarded, plain)


def test_resume_is_bit_exact_and_state_round_trips():
    a = _window(dtype=torch.float32, values_dtype=torch.bfloat16)
    grads = _stream(200, 12, seed=6, dtype=torch.float32)
    for g in grads[:7]:
        a.update_mul(g)
    state = copy.deepcopy(a.state_dict())
    b = _window(dtype=torch.float32, values_dtype=torch.bfloat16)
    b.load_state_dict(state)
    for g in grads[7:]:
        assert torch.equal(a.update_mul(g), b.update_mul(g))
    assert torch.equal(a.error, b.error)
    assert state["values"].dtype == torch.bfloat16 and state["indices"].dtype == torch.int32


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"density": 0.0}, ValueError, r"density must be in \(0, 1\].*got 0.0"),
        ({"density": 1.5}, ValueError, r"density must be in \(0, 1\].*got 1.5"),
        ({"density": -0.1}, ValueError, r"density must be in \(0, 1\]"),
        ({"density": math.nan}, ValueError, r"density must be in \(0, 1\]"),
        ({"density": None}, ValueError, r"density must be in \(0, 1\] for a compressed window"),
        ({"density": "0.1"}, TypeError, r"density must be a real number.*str"),
        ({"density": True}, TypeError, r"density must be a real number.*bool"),
        ({"density": 0.1, "block": 0}, ValueError, r"block must be >= 1"),
        ({"density": 0.1, "values_dtype": torch.float16}, ValueError, r"values_dtype must be"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        CompressedSlidingInverseFisher(10, 2, 1e-3, **kwargs)


def test_checkpoint_mismatches_are_refused_before_anything_changes():
    a = _window()
    for g in _stream(200, 3):
        a.update(g)
    b = _window(density=0.2)
    with pytest.raises(ValueError, match=r"density=0.1, this operator density=0.2"):
        b.load_state_dict(a.state_dict())
    assert b.num_seen == 0
    dense = SlidingInverseFisher(200, 5, 1e-2, dtype=F64)
    with pytest.raises(ValueError, match=r"holds a dense window"):
        b.load_state_dict(dense.state_dict())


@pytest.mark.parametrize("bad_entries", [1, 10])  # 10 > the 4 a block sends: NaN still ranks first
def test_nonfinite_gradient_leaves_window_and_accumulator_untouched(bad_entries):
    op = _window()
    grads = _stream(200, 9)
    for g in grads[:7]:  # the ring has wrapped: the bad step would overwrite a stored row
        op.update(g)
    twin = copy.deepcopy(op)
    state = copy.deepcopy(op.state_dict())
    bad = grads[7].clone()
    bad[40 : 40 + bad_entries] = math.nan
    bad[100] = math.inf
    with pytest.raises(ValueError, match="grad must be finite"):
        op.update_mul(bad)
    for key in ("values", "indices", "error", "gram", "inv"):
        assert torch.equal(op.state_dict()[key], state[key]), key
    assert op.num_seen == 7
    assert torch.equal(op.update_mul(grads[8]), twin.update_mul(grads[8]))


def test_memory_is_values_indices_and_accumulator():
    d, m = 100_000, 256
    op = CompressedSlidingInverseFisher(d, m, 1e-4, density=0.01)
    k = op.row_size
    assert k == 24 * math.ceil(40.96) + math.ceil(1696 * 0.01)
    assert op.nbytes == m * k * (4 + 4) + d * 4 + 2 * m * m * 8
    dense_window = m * d * 4
    assert dense_window / (op.nbytes - 2 * m * m * 8) > 40
