"""Storage of the compressed window: int16 offsets inside blocks and bfloat16 values.

Each storage must give the same operator as the reference it claims: the int16 offsets decode to the
int32 window's indices exactly (so the steps are bit-identical), bfloat16 values are the float64
Gram matrix of the rounded rows, and checkpoints round-trip bit-exactly.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import mfac.fisher.compressed as compressed
from mfac.fisher.compressed import CompressedSlidingInverseFisher
from mfac.fisher.sliding import SlidingInverseFisher
from mfac.optim import MFAC, MFACPreconditioner
from tests.references import dense_inverse, rel_err

F64 = torch.float64
BF16, I16, I32 = torch.bfloat16, torch.int16, torch.int32
STORAGES = [(None, I16), (BF16, I32), (BF16, I16)]


def _stream(d: int, steps: int, seed: int = 0, dtype=F64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=gen, dtype=dtype)
    return [base + torch.randn(d, generator=gen, dtype=dtype) for _ in range(steps)]


def _window(d=200, m=5, damp=1e-2, density=0.1, block=32, **kw) -> CompressedSlidingInverseFisher:
    kw.setdefault("dtype", F64)
    return CompressedSlidingInverseFisher(d, m, damp, density=density, block=block, **kw)


def _block_starts(d: int, block: int, density: float) -> list[int]:
    """Start of the block of each entry of a row, from the documented layout (not the operator's)."""
    starts = []
    for lo in range(0, d, block):
        starts += [lo] * math.ceil(min(block, d - lo) * density)
    return starts


def _explicit_rows(op: CompressedSlidingInverseFisher) -> torch.Tensor:
    """The stored rows rebuilt by a plain loop from the stored values and indices (or offsets)."""
    starts = _block_starts(op.dim, op.block, op.density)
    assert len(starts) == op.row_size
    rows = torch.zeros(op.num_stored, op.dim, dtype=F64)
    for i in range(op.num_stored):
        stored = op._indices[i].tolist()
        for j, (v, s) in enumerate(zip(op._values[i].tolist(), stored, strict=True)):
            index = s + starts[j] if op.index_dtype == I16 else s
            if op.index_dtype == I16:
                assert 0 <= s < op.block
            rows[i, index] += v
    return rows


@pytest.mark.parametrize(("values_dtype", "index_dtype"), STORAGES)
def test_sparse_gram_and_step_equal_the_float64_dense_reference_of_the_stored_rows(values_dtype, index_dtype):
    d, m, damp = 200, 5, 1e-3
    op = _window(d=d, m=m, damp=damp, values_dtype=values_dtype, index_dtype=index_dtype)
    assert op._indices.dtype == index_dtype and op._values.dtype == (values_dtype or F64)
    for t, g in enumerate(_stream(d, 12, seed=1)):  # wraps the ring twice
        before = op.error.clone()
        u = op.update_mul(g)
        rows = _explicit_rows(op)
        sent = before + g - op.error  # g' exactly (conservation, bfloat16 rounding included)
        assert torch.equal(sent, rows[t % m]), t
        assert torch.allclose(op._gram[:m, :m][: op.num_stored, : op.num_stored], rows @ rows.T,
                              rtol=1e-13, atol=1e-13)
        reference = dense_inverse(rows, damp, scale=op.scale) @ sent
        assert rel_err(u, reference) < 1e-9, t
    assert torch.equal(op.window, rows)
    x = torch.randn(3, d, dtype=F64)
    reference = dense_inverse(rows, damp, scale=op.scale)
    assert rel_err(op.mul(x), x @ reference) < 1e-9
    assert rel_err(op.diag(), reference.diagonal()) < 1e-9


@pytest.mark.parametrize("values_dtype", [None, BF16])
def test_int16_offsets_give_bit_identical_steps_to_int32_indices(values_dtype, monkeypatch):
    # decoded chunk by chunk (a chunk of 2 rows here) or in one piece: the same sums in the same order
    monkeypatch.setattr(compressed, "_CHUNK_ENTRIES", 50)
    ops = [_window(dtype=torch.float32, values_dtype=values_dtype, index_dtype=i, block=64, density=0.2)
           for i in (I32, I16)]
    assert ops[1]._row_chunks(5) == [slice(0, 1), slice(1, 2), slice(2, 3), slice(3, 4), slice(4, 5)]
    for g in _stream(200, 9, seed=2, dtype=torch.float32):
        a, b = (op.update_mul(g) for op in ops)
        assert torch.equal(a, b)
    x = torch.randn(2, 200)
    assert torch.equal(ops[0].mul(x), ops[1].mul(x))
    assert torch.equal(ops[0]._absolute(slice(0, 5)), ops[1]._absolute(slice(0, 5)))
    assert torch.equal(ops[0].window, ops[1].window)


@pytest.mark.parametrize("index_dtype", [I32, I16])
def test_density_one_equals_the_dense_window(index_dtype):
    d, m = 120, 5
    op = _window(d=d, m=m, density=1.0, block=50, damp=1e-3, index_dtype=index_dtype)
    dense = SlidingInverseFisher(d, m, 1e-3, dtype=F64)
    for g in _stream(d, 12, seed=3):
        assert rel_err(op.update_mul(g), dense.update_mul(g)) < 1e-12
    assert op.error.abs().max() == 0
    # int16: offsets inside the 50-wide blocks (the last block: 20 wide); int32: absolute indices
    assert int(op._indices.max()) == (49 if index_dtype == I16 else 119)


@pytest.mark.parametrize(("values_dtype", "index_dtype"), STORAGES)
def test_resume_is_bit_exact(values_dtype, index_dtype):
    kw = {"dtype": torch.float32, "values_dtype": values_dtype, "index_dtype": index_dtype}
    a = _window(**kw)
    grads = _stream(200, 12, seed=6, dtype=torch.float32)
    for g in grads[:7]:
        a.update_mul(g)
    state = copy.deepcopy(a.state_dict())
    assert state["indices"].dtype == index_dtype and state["index_dtype"] == index_dtype
    b = _window(**kw)
    b.load_state_dict(state)
    for g in grads[7:]:
        assert torch.equal(a.update_mul(g), b.update_mul(g))
    assert torch.equal(a.error, b.error)


def test_checkpoints_of_another_index_dtype_or_bad_offsets_are_refused_before_anything_changes():
    a = _window(index_dtype=I16)
    for g in _stream(200, 3):
        a.update(g)
    b = _window(index_dtype=I32)
    with pytest.raises(ValueError, match=r"index_dtype=torch.int16, this operator index_dtype=torch.int32"):
        b.load_state_dict(a.state_dict())
    old = a.state_dict()
    old.pop("index_dtype")  # a state without the key has int32 indices
    c = _window(index_dtype=I16)
    with pytest.raises(ValueError, match=r"index_dtype=torch.int32, this operator index_dtype=torch.int16"):
        c.load_state_dict(old)
    bad = copy.deepcopy(a.state_dict())
    bad["indices"][1, -1] = 8  # the tail block of d = 200 and block 32 is 8 wide: offsets 0..7
    with pytest.raises(ValueError, match=r"int16 offsets\) must lie in \[0, length of their block\)"):
        c.load_state_dict(bad)
    bad["indices"][1, -1] = -1
    with pytest.raises(ValueError, match=r"int16 offsets"):
        c.load_state_dict(bad)
    assert c.num_seen == 0 and c.error.abs().max() == 0


def test_int16_window_cannot_take_new_coordinates():
    a = _window(index_dtype=I16)
    a.update(_stream(200, 1)[0])
    with pytest.raises(NotImplementedError, match=r"int16 cannot take new coordinates"):
        CompressedSlidingInverseFisher.remap_state(a.state_dict(), torch.arange(200) + 5, 205, 30)


def test_memory_of_each_storage_is_values_indices_and_accumulator():
    d, m = 1_000_000, 256
    mm = 2 * m * m * 8
    dense = m * d * 4
    expected = {(None, I32): 8, (None, I16): 6, (BF16, I16): 4}
    ratios = {}
    for (values_dtype, index_dtype), per_entry in expected.items():
        op = CompressedSlidingInverseFisher(d, m, 1e-4, density=0.01, values_dtype=values_dtype,
                                            index_dtype=index_dtype, dtype=torch.float32)
        k = op.row_size
        assert k == 244 * 41 + math.ceil(576 * 0.01)
        assert op.nbytes == m * k * per_entry + d * 4 + mm
        ratios[per_entry] = dense / op.nbytes
    # d = 1e6 (the m x m matrices' 1 MiB included): 1/40 (int32), 1/50 (int16), 1/67 (bfloat16 + int16)
    assert 39 < ratios[8] < 42 < 48 < ratios[6] < 53 < 64 < ratios[4] < 70, ratios


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"index_dtype": torch.int64}, ValueError, r"index_dtype must be torch.int32 or torch.int16"),
        ({"index_dtype": I16, "block": 2**15 + 1}, ValueError, r"block must be <= 32768, got 32769"),
    ],
)
def test_bad_storage_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        CompressedSlidingInverseFisher(10, 2, 1e-3, density=0.1, **kwargs)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3))


def _backward(model, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = None
    x, y = torch.randn(16, 12, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    nn.functional.cross_entropy(model(x), y).backward()


def test_optimizer_storage_options_reach_the_window_and_resume_bit_exactly():
    models = [_model() for _ in range(3)]
    opts = [MFAC(models[0].parameters(), lr=0.05, ngrads=4, damp=1e-2, momentum=0.5, density=0.2),
            MFAC(models[1].parameters(), lr=0.05, ngrads=4, damp=1e-2, momentum=0.5, density=0.2,
                 index_dtype=I16),
            MFAC(models[2].parameters(), lr=0.05, ngrads=4, damp=1e-2, momentum=0.5, density=0.2,
                 index_dtype=I16, values_dtype=BF16)]
    for t in range(6):
        for model, opt in zip(models, opts, strict=True):
            _backward(model, t)
            opt.step()
    fishers = [opt.inverse_fisher for opt in opts]
    assert [f.index_dtype for f in fishers] == [I32, I16, I16]
    assert [f.values_dtype for f in fishers] == [torch.float32, torch.float32, BF16]
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)  # int16 offsets: the same steps, bit for bit
    assert fishers[2].nbytes < fishers[1].nbytes < fishers[0].nbytes
    # resume the bfloat16 + int16 optimizer
    saved_model, saved = copy.deepcopy(models[2].state_dict()), copy.deepcopy(opts[2].state_dict())
    twin = _model()
    twin.load_state_dict(saved_model)
    resumed = MFAC(twin.parameters(), lr=0.05, ngrads=4, damp=1e-2, momentum=0.5, density=0.2,
                   index_dtype=I16, values_dtype=BF16)
    resumed.load_state_dict(saved)
    for t in range(6, 9):
        for model, opt in ((models[2], opts[2]), (twin, resumed)):
            _backward(model, t)
            opt.step()
    for a, b in zip(models[2].parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    # a checkpoint of another storage is refused, naming it
    other = MFAC(_model().parameters(), ngrads=4, damp=1e-2, density=0.2)
    with pytest.raises(ValueError, match=r"values_dtype=torch.bfloat16, this operator values_dtype=torch.float32"):
        other.load_state_dict(saved)


def test_int16_optimizer_window_refuses_to_grow_and_stays_usable():
    model = _model()
    opt = MFAC(model.parameters(), lr=0.1, ngrads=4, damp=1e-3, density=0.2, index_dtype=I16)
    _backward(model, 0)
    model[0].weight.grad = model[0].bias.grad = None  # the first layer: no gradient yet
    opt.step()
    before = copy.deepcopy(opt.inverse_fisher.state_dict())
    _backward(model, 1)
    with pytest.raises(NotImplementedError, match=r"int16 cannot take new coordinates"):
        opt.step()
    after = opt.inverse_fisher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in ("values", "indices", "error", "gram"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"values_dtype": BF16}, r"need density < 1"),
        ({"density": 1.0, "index_dtype": I16}, r"need density < 1"),
        ({"density": 0.1, "values_dtype": torch.float16}, r"values_dtype must be None or torch.bfloat16"),
        ({"density": 0.1, "index_dtype": torch.uint8}, r"index_dtype must be None, torch.int32 or torch.int16"),
    ],
)
@pytest.mark.parametrize("cls", [MFAC, MFACPreconditioner])
def test_optimizer_storage_arguments_are_checked_at_construction(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(_model().parameters(), **kwargs)
