"""The one flattener (mfac._flat.FlatLayout) against a brute-force reference: python loops over entries."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mfac._flat import FlatLayout
from mfac.optim._layout import Layout
from mfac.params import ParamSpace

F64 = torch.float64


# ---------------------------------------------------------------------------------------- reference
def ref_kept_indices(masks, numels):
    """Global kept indices, one python int at a time."""
    out, offset = [], 0
    for mask, n in zip(masks, numels, strict=True):
        for j in range(n):
            if mask is None or bool(mask.reshape(-1)[j]):
                out.append(offset + j)
        offset += n
    return out


def ref_flatten(tensors, masks, numels=None):
    """The kept vector built one entry at a time; a None tensor gives zeros (``numels`` says how many)."""
    numels = numels or [m.numel() if m is not None else t.numel() for t, m in zip(tensors, masks, strict=True)]
    out = []
    for t, mask, n in zip(tensors, masks, numels, strict=True):
        for j in range(n):
            if mask is not None and not bool(mask.reshape(-1)[j]):
                continue
            out.append(0.0 if t is None else float(t.reshape(-1)[j]))
    return torch.tensor(out, dtype=F64)


def ref_scatter(vec, masks, shapes, index, fill=0.0):
    """Tensor ``index`` rebuilt from the kept vector one entry at a time."""
    offset = sum(
        int(m.sum()) if m is not None else torch.Size(s).numel()
        for m, s in zip(masks[:index], shapes[:index], strict=True)
    )
    n = torch.Size(shapes[index]).numel()
    mask = masks[index]
    out = torch.full((n,), fill, dtype=vec.dtype)
    for j in range(n):
        if mask is None or bool(mask.reshape(-1)[j]):
            out[j] = vec[offset]
            offset += 1
    return out.reshape(shapes[index])


# ---------------------------------------------------------------------------------------- cases
def noncontiguous(shape, gen):
    """A tensor of ``shape`` that is a transposed (non-contiguous) view when it has >= 2 dims."""
    if len(shape) >= 2:
        base = torch.randn(tuple(shape[::-1]), dtype=F64, generator=gen)
        return base.permute(*reversed(range(len(shape))))
    return torch.randn(tuple(shape), dtype=F64, generator=gen)


SHAPES = [(3, 4), (5,), (), (2, 0), (2, 3, 2), (1,)]


def mixed_case(seed, *, masked=True, empty_mask=False):
    gen = torch.Generator().manual_seed(seed)
    tensors = [noncontiguous(s, gen) for s in SHAPES]
    assert not tensors[0].is_contiguous()
    masks = []
    for i, s in enumerate(SHAPES):
        if not masked or i % 2 == 1:
            masks.append(None)
        elif empty_mask and i == 0:
            masks.append(torch.zeros(s, dtype=torch.bool))
        else:
            masks.append(torch.rand(s, generator=gen) > 0.5)
    return tensors, masks


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("empty_mask", [False, True])
def test_offsets_and_kept_indices_match_reference(masked, empty_mask):
    tensors, masks = mixed_case(0, masked=masked, empty_mask=empty_mask)
    numels = [t.numel() for t in tensors]
    flat = FlatLayout.from_masks(masks, numels)
    assert flat.numels == numels
    assert flat.offsets == [sum(numels[:i]) for i in range(len(numels))]
    sizes = [n if m is None else int(m.sum()) for m, n in zip(masks, numels, strict=True)]
    assert flat.sizes == sizes
    assert flat.kept_offsets == [sum(sizes[:i]) for i in range(len(sizes))]
    assert flat.dim == sum(numels) and flat.kept_dim == sum(sizes)
    assert flat.masked == masked
    idx = flat.kept_indices()
    if masked:
        assert idx.tolist() == ref_kept_indices(masks, numels)
        assert idx is flat.kept_indices()  # cached
    else:
        assert idx is None
    if empty_mask and masked:
        assert flat.sizes[0] == 0 and flat.kept_offsets[1] == 0


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("empty_mask", [False, True])
def test_gather_scatter_restrict_expand_match_reference(masked, empty_mask):
    tensors, masks = mixed_case(1, masked=masked, empty_mask=empty_mask)
    shapes = [t.shape for t in tensors]
    flat = FlatLayout.from_masks(masks, [t.numel() for t in tensors])
    kept = flat.gather(tensors, torch.empty(flat.kept_dim, dtype=F64))
    assert torch.equal(kept, ref_flatten(tensors, masks))
    full = flat.gather(tensors, torch.empty(flat.dim, dtype=F64), masked=False)
    assert torch.equal(full, ref_flatten(tensors, [None] * len(masks)))
    assert torch.equal(flat.restrict(full), kept)
    expanded = flat.expand(kept, fill=-7.0)
    for i, t in enumerate(tensors):
        want = ref_scatter(kept, masks, shapes, i, fill=-7.0)
        assert torch.equal(flat.scatter(kept, i, shapes[i], fill=-7.0), want)
        assert torch.equal(flat.unflatten(expanded, shapes)[i], want)
        assert torch.equal(flat.unflatten(full, shapes)[i], t)
    if not masked:
        assert flat.restrict(full) is full and flat.expand(full) is full


def test_batched_gather_and_views():
    gen = torch.Generator().manual_seed(2)
    shapes = [(3, 2), (4,), (2, 0)]
    batch = (2, 3)
    tensors = [noncontiguous((*batch, *s), gen) for s in shapes]
    masks = [torch.rand(3, 2, generator=gen) > 0.3, None, None]
    flat = FlatLayout.from_masks(masks, [6, 4, 0])
    out = flat.gather(tensors, torch.empty(*batch, flat.kept_dim, dtype=F64))
    for b0 in range(2):
        for b1 in range(3):
            row = ref_flatten([t[b0, b1] for t in tensors], masks)
            assert torch.equal(out[b0, b1], row)
    assert torch.equal(flat.restrict(flat.expand(out)), out)
    view = flat.scatter(out, 1, (4,))
    assert view.shape == (*batch, 4) and view.data_ptr() == out[..., flat.kept_offsets[1]].data_ptr()


def test_gather_none_cast_and_axpy():
    gen = torch.Generator().manual_seed(3)
    tensors = [torch.randn(4, 3, dtype=F64, generator=gen), None, torch.randn(5, dtype=F64, generator=gen)]
    base = [torch.randn(4, 3, dtype=F64, generator=gen), torch.randn(2, dtype=F64), torch.randn(5, dtype=F64)]
    masks = [torch.rand(4, 3, generator=gen) > 0.5, None, None]
    flat = FlatLayout.from_masks(masks, [12, 2, 5])
    numels = [12, 2, 5]
    alpha = [0.25, 3.0, 0.0]
    calls = []

    def addend(i):
        calls.append(i)
        return base[i]

    out = flat.gather(tensors, torch.full((flat.kept_dim,), float("nan"), dtype=torch.float32),
                      alpha=alpha, addend=addend)
    assert calls == [0]  # only where alpha != 0 and the tensor is not None
    want = []
    for t, b, m, a in zip(tensors, base, masks, alpha, strict=True):
        for j in range(b.numel()):
            if m is not None and not bool(m.reshape(-1)[j]):
                continue
            want.append(0.0 if t is None else float(t.reshape(-1)[j].float() + a * b.reshape(-1)[j].float()))
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor(want, dtype=torch.float32), rtol=1e-6, atol=0)
    # the cast happens in the copy: equal to the float32 rounding of the float64 values
    plain = flat.gather(tensors, torch.empty(flat.kept_dim, dtype=torch.float32))
    assert torch.equal(plain, ref_flatten(tensors, masks, numels).float())


def test_no_tensors_and_bad_arguments():
    flat = FlatLayout([])
    assert flat.dim == flat.kept_dim == 0 and not flat.masked
    assert flat.gather([], torch.empty(0)).shape == (0,)
    with pytest.raises(ValueError, match="one entry per tensor"):
        FlatLayout([3, 4], [None])
    with pytest.raises(ValueError, match="numels are needed"):
        FlatLayout.from_masks([None])
    assert FlatLayout.from_masks([torch.zeros(0, dtype=torch.bool)]).kept_indices().numel() == 0


def test_views_are_writable_under_autograd():
    # a vector made under no_grad, written from tensors that require grad: each view taken at its write
    params = [torch.randn(3, dtype=F64, requires_grad=True), torch.randn(2, 2, dtype=F64, requires_grad=True)]
    flat = FlatLayout([3, 4])
    with torch.no_grad():
        out = torch.empty(7, dtype=F64)
    flat.gather(params, out, masked=False)
    assert torch.equal(out.detach(), torch.cat([p.detach().reshape(-1) for p in params]))


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 4), max_size=3).map(tuple), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
    density=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_property_round_trips(shapes, seed, density):
    gen = torch.Generator().manual_seed(seed)
    tensors = [noncontiguous(s, gen) for s in shapes]
    masks = [None if i % 2 else torch.rand(s, generator=gen) < density for i, s in enumerate(shapes)]
    flat = FlatLayout.from_masks(masks, [t.numel() for t in tensors])
    kept = flat.gather(tensors, torch.empty(flat.kept_dim, dtype=F64))
    assert torch.equal(kept, ref_flatten(tensors, masks))
    for i, s in enumerate(shapes):
        assert torch.equal(flat.scatter(kept, i, s), ref_scatter(kept, masks, shapes, i))


# ---------------------------------------------------------------------------------------- layers on it
def test_paramspace_and_layout_agree_with_the_engine():
    tensors, masks = mixed_case(4)
    params = [t.clone().requires_grad_() for t in tensors]
    names = [f"p{i}" for i in range(len(params))]
    space = ParamSpace(list(zip(names, params, strict=True)),
                       masks={n: m for n, m in zip(names, masks, strict=True) if m is not None})
    layout = Layout(params, {p: m for p, m in zip(params, masks, strict=True) if m is not None}, F64,
                    torch.device("cpu"))
    ref = ref_flatten(tensors, masks)
    assert torch.equal(space.param_vector(masked=True), ref)
    assert space.kept_indices().tolist() == ref_kept_indices(masks, [t.numel() for t in tensors])
    assert torch.equal(layout.gather(tensors, torch.empty(layout.dim, dtype=F64)), ref)
    for i, (p, s) in enumerate(zip(params, layout.slots, strict=True)):
        assert s.param is p and s.offset == space.named_slices(masked=True)[names[i]].start
        assert torch.equal(layout.scatter(ref, i), ref_scatter(ref, masks, [t.shape for t in tensors], i))


def local_flat_reference(tensors, *, dtype=None, sizes=None):
    """``local_flat`` written as a plain concatenation (its definition before it moved onto the engine)."""
    parts = [None if t is None else t.reshape(-1) for t in tensors]
    dtype = dtype or next((p.dtype for p in parts if p is not None), torch.float32)
    out = [torch.zeros(sizes[i], dtype=dtype) if p is None else p.to(dtype) for i, p in enumerate(parts)]
    return torch.cat(out) if out else torch.zeros(0, dtype=dtype)


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16])
def test_local_flat_on_the_engine_equals_the_concatenation(dtype):
    from mfac.distributed import local_flat

    gen = torch.Generator().manual_seed(5)
    tensors = [noncontiguous((3, 4), gen), None, torch.randn(5, dtype=F64, generator=gen), noncontiguous((2, 0), gen)]
    sizes = [12, 3, 5, 0]
    want = local_flat(tensors, dtype=dtype, sizes=sizes)
    got = local_flat_reference(tensors, dtype=dtype, sizes=sizes)
    assert got.dtype == want.dtype and torch.equal(got, want)  # bit-identical, the cast included
    present = [t for t in tensors if t is not None]
    assert torch.equal(local_flat_reference(present), local_flat(present))
    assert torch.equal(local_flat_reference([]), local_flat([]))
    with pytest.raises(ValueError, match="needs `sizes`"):
        local_flat(tensors)
    with pytest.raises(RuntimeError):  # a size that disagrees with the tensor: never a silent shift
        local_flat(tensors, sizes=[11, 3, 5, 0])
