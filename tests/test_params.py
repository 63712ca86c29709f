"""Tests of mfac.params: parameters <-> one flat vector."""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune as prune
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from mfac._reparam import (
    base_leaf,
    is_reparametrized,
    mask_buffer,
    reparametrized_leaves,
    user_leaf,
    writable,
    write_mask,
)
from mfac.params import (
    ParamSpace,
    default_prunable,
    named_writable_parameters,
    prune_masks,
    writable_parameter,
)

DT = torch.float64


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)


def concat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


# ------------------------------------------------------------------------------- layout
def test_layout_follows_named_parameters():
    model = small_mlp()
    space = ParamSpace.from_module(model)
    assert space.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert space.numels == [12, 4, 8, 2]
    assert space.offsets == [0, 12, 16, 24]
    assert space.shapes == [(4, 3), (4,), (2, 4), (2,)]
    assert space.dim == space.kept_dim == 26
    assert space.dtype == DT and space.device == torch.device("cpu")
    assert space.named_slices() == {
        "0.weight": slice(0, 12), "0.bias": slice(12, 16),
        "2.weight": slice(16, 24), "2.bias": slice(24, 26),
    }
    assert all(a is b for a, b in zip(space.params, model.parameters(), strict=True))
    assert len(space) == 4 and "0.bias" in space and "nope" not in space
    assert "dim=26" in repr(space)


def test_from_module_names_use_model_order_and_requires_grad():
    model = small_mlp()
    space = ParamSpace.from_module(model, ["2.bias", "0.weight"])
    assert space.names == ["0.weight", "2.bias"]
    model[0].bias.requires_grad_(False)
    assert "0.bias" not in ParamSpace.from_module(model)
    assert "0.bias" in ParamSpace.from_module(model, requires_grad_only=False)
    assert "0.bias" in ParamSpace.from_module(model, ["0.bias"])  # named explicitly


def test_flatten_unflatten_round_trip_and_views():
    model = small_mlp()
    space = ParamSpace.from_module(model)
    vec = space.param_vector()
    assert torch.equal(vec, concat(model.parameters()))
    views = space.unflatten(vec)
    for v, p in zip(views, model.parameters(), strict=True):
        assert v.shape == p.shape and torch.equal(v, p)
    views[1][0] = 123.0  # views write through to vec
    assert vec[12] == 123.0
    assert torch.equal(space.flatten(views), vec)
    named = space.named_unflatten(vec)
    assert list(named) == space.names
    assert torch.equal(space.flatten(named), vec)  # dicts work too
    vec[0] = -7.0
    assert model[0].weight[0, 0] != -7.0  # param_vector is a copy


def test_flatten_batched_and_out():
    space = ParamSpace.from_module(small_mlp())
    batch = torch.randn(5, space.dim, dtype=DT)
    parts = space.unflatten(batch)
    assert parts[0].shape == (5, 4, 3)
    out = torch.empty(5, space.dim, dtype=DT)
    assert space.flatten(parts, out=out) is out
    assert torch.equal(out, batch)


def test_channels_last_parameter():
    conv = nn.Conv2d(3, 4, 3).to(DT).to(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    space = ParamSpace.from_module(conv)
    vec = space.param_vector()
    assert torch.equal(vec[: conv.weight.numel()], conv.weight.reshape(-1))  # logical order
    delta = torch.randn(space.dim, dtype=DT)
    expected = vec + 0.5 * delta
    space.add_(delta, alpha=0.5)
    assert torch.allclose(space.param_vector(), expected)
    space.copy_(vec)
    assert torch.equal(space.param_vector(), vec)


# ------------------------------------------------------------------------------- grads
def test_grad_vector_none_handling():
    model = small_mlp()
    space = ParamSpace.from_module(model)
    model(torch.randn(2, 3, dtype=DT)).sum().backward()
    assert torch.equal(space.grad_vector(), concat(p.grad for p in model.parameters()))
    model[2].bias.grad = None
    with pytest.raises(ValueError, match=r"\['2.bias'\] have .grad None"):
        space.grad_vector()
    g = space.grad_vector(zero_for_none=True)
    assert torch.equal(g[24:], torch.zeros(2, dtype=DT))
    # skipping consistently: a smaller space
    kept = space.select([n for n, p in space.named_params() if p.grad is not None])
    assert kept.names == ["0.weight", "0.bias", "2.weight"]
    assert torch.equal(kept.grad_vector(), g[:24])


# ------------------------------------------------------------------------------- writes
@pytest.mark.parametrize("no_grad", [True, False])
def test_add_in_place(no_grad):
    model = small_mlp()
    space = ParamSpace.from_module(model)
    before = space.param_vector()
    ptrs = [p.data_ptr() for p in model.parameters()]
    ids = [id(p) for p in model.parameters()]
    delta = torch.randn(space.dim, dtype=DT)
    if no_grad:
        with torch.no_grad():
            space.add_(delta, alpha=-0.25)
    else:
        space.add_(delta, alpha=-0.25)
    assert torch.allclose(space.param_vector(), before - 0.25 * delta)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert [id(p) for p in model.parameters()] == ids
    assert all(p.requires_grad and p.grad_fn is None for p in model.parameters())


def test_copy():
    model = small_mlp()
    space = ParamSpace.from_module(model)
    new = torch.arange(space.dim, dtype=DT)
    space.copy_(new)
    assert torch.equal(concat(model.parameters()).detach(), new)


# ------------------------------------------------------------------------------- masks
def make_masked_space():
    model = small_mlp()
    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[0, 1] = mask[2, 0] = mask[3, 2] = True
    return model, ParamSpace.from_module(model, masks={"0.weight": mask}), mask


def test_masks_kept_indices_and_slices():
    _, space, mask = make_masked_space()
    assert space.has_masks and space.kept_dim == 3 + 4 + 8 + 2
    assert space.kept_indices()[:4].tolist() == [1, 6, 11, 12]
    assert space.named_slices(masked=True)["0.bias"] == slice(3, 7)
    assert torch.equal(space.masks["0.weight"], mask)
    mask[0, 0] = True  # the space keeps its own copy
    assert space.kept_dim == 17


def test_masked_flatten_unflatten_restrict_expand():
    model, space, mask = make_masked_space()
    full = space.param_vector()
    kept = space.param_vector(masked=True)
    assert torch.equal(kept, full[space.kept_indices()])
    assert torch.equal(space.masked_flatten(list(model.parameters())), kept)
    assert torch.equal(space.restrict(full), kept)
    back = space.masked_unflatten(kept)
    assert torch.equal(back[0], torch.where(mask, model[0].weight, 0.0))
    assert torch.equal(back[3], model[2].bias)
    expanded = space.expand(kept, fill=float("nan"))
    assert expanded.isnan().sum() == 9
    assert space.restrict(torch.randn(3, space.dim, dtype=DT)).shape == (3, space.kept_dim)
    plain = ParamSpace.from_module(model)
    assert plain.restrict(full) is full and plain.expand(full) is full
    assert torch.equal(plain.kept_indices(), torch.arange(plain.dim))


def test_masked_writes_leave_pruned_coordinates():
    model, space, mask = make_masked_space()
    w_before = model[0].weight.detach().clone()
    space.add_(torch.ones(space.kept_dim, dtype=DT), alpha=2.0, masked=True)
    assert torch.equal(model[0].weight[~mask], w_before[~mask])
    assert torch.equal(model[0].weight[mask], w_before[mask] + 2.0)
    space.copy_(torch.zeros(space.kept_dim, dtype=DT), masked=True)
    assert torch.equal(model[0].weight[~mask], w_before[~mask])
    assert torch.equal(model[0].weight[mask], torch.zeros(3, dtype=DT))
    assert torch.equal(model[2].weight, torch.zeros(2, 4, dtype=DT))
    assert space.with_masks(None).kept_dim == space.dim
    assert space.select(["0.weight"]).kept_dim == 3


# ------------------------------------------------------------------------------- prune
def pruned_model():
    model = small_mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    return model


def test_prune_reparametrization_names_and_writes():
    model = pruned_model()
    orig = model[0].weight_orig
    assert writable_parameter(model, "0.weight") is orig
    assert writable_parameter(model, "0.weight_orig") is orig
    assert writable_parameter(model, "2.weight") is model[2].weight
    names = [n for n, _ in named_writable_parameters(model)]
    assert sorted(names) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert default_prunable(model) == ["0.weight", "2.weight"]
    masks = prune_masks(model)
    assert list(masks) == ["0.weight"] and masks["0.weight"].dtype == torch.bool

    space = ParamSpace.from_module(model, ["0.weight"], masks=masks)
    assert space.params[0] is orig and space.kept_dim == 6
    space.add_(torch.ones(6, dtype=DT), masked=True)
    x = torch.randn(2, 3, dtype=DT)
    model(x)  # the pre-hook recomputes weight = weight_orig * weight_mask
    assert torch.equal(model[0].weight, orig * model[0].weight_mask)
    # gradients read from weight_orig are the masked gradients of weight
    model(x).sum().backward()
    g = space.grad_vector()
    assert torch.equal(g.view(4, 3)[~masks["0.weight"]], torch.zeros(6, dtype=DT))


def test_masks_as_pairs_are_accepted_and_anything_else_is_a_type_error():
    model = small_mlp()
    mask = torch.rand(4, 3) > 0.5
    by_pairs = ParamSpace.from_module(model, masks=[("0.weight", mask)])
    assert torch.equal(by_pairs.kept_indices(), ParamSpace.from_module(model, masks={"0.weight": mask}).kept_indices())
    for bad in ([mask], 3):
        with pytest.raises(TypeError, match=r"masks must be a dict \{name: bool tensor\}"):
            ParamSpace.from_module(model, masks=bad)


def test_reparametrization_decoder_on_a_pruned_and_unpruned_mix():
    """One decoder of torch.nn.utils.prune's ``_orig``/``_mask``: pruned, unpruned and look-alike leaves."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)).to(DT)
    prune.l1_unstructured(model[0], "weight", amount=0.5)  # pruned weight, unpruned bias
    prune.custom_from_mask(model[2], "bias", torch.tensor([True, False]))  # a pruned bias
    # a look-alike: a parameter named like an _orig, with no _mask buffer (not a reparametrization)
    model[1].register_parameter("scale_orig", nn.Parameter(torch.ones(4, dtype=DT)))
    pruned, plain, alike = model[0], model[1], model[1]

    assert is_reparametrized(pruned, "weight") and not is_reparametrized(pruned, "bias")
    assert is_reparametrized(model[2], "bias") and not is_reparametrized(model[2], "weight")
    assert not is_reparametrized(alike, "scale") and not is_reparametrized(plain, "weight")
    assert base_leaf(pruned, "weight_orig") == "weight" and base_leaf(alike, "scale_orig") is None
    assert base_leaf(pruned, "weight") is None and base_leaf(pruned, "_orig") is None
    assert user_leaf(pruned, "weight_orig") == "weight" and user_leaf(alike, "scale_orig") == "scale_orig"
    assert writable(pruned, "weight") is pruned.weight_orig and writable(pruned, "bias") is pruned.bias
    assert writable(alike, "scale") is None and writable(alike, "scale_orig") is alike.scale_orig
    assert mask_buffer(pruned, "weight") is pruned.weight_mask and mask_buffer(pruned, "bias") is None
    assert reparametrized_leaves(pruned) == ["weight"] and reparametrized_leaves(plain) == []
    assert reparametrized_leaves(model[2]) == ["bias"] and reparametrized_leaves(model) == []

    # the public names built on it
    names = [n for n, _ in named_writable_parameters(model)]
    assert names == ["0.bias", "0.weight", "1.weight", "1.bias", "1.scale_orig", "2.weight", "2.bias"]
    assert writable_parameter(model, "0.weight") is pruned.weight_orig
    assert writable_parameter(model, "2.bias") is model[2].bias_orig
    assert writable_parameter(model, "1.scale_orig") is alike.scale_orig
    with pytest.raises(ValueError, match="not a parameter"):
        writable_parameter(model, "1.scale")
    masks = prune_masks(model)
    assert list(masks) == ["0.weight", "2.bias"]
    assert torch.equal(masks["0.weight"], pruned.weight_mask.bool())
    assert default_prunable(model) == ["0.weight", "1.weight", "2.weight"]

    # write_mask: the buffer (in its 0/1 dtype) and the recomputed attribute
    write_mask(model[2], "bias", torch.tensor([False, True]))
    assert model[2].bias_mask.dtype == DT and model[2].bias_mask.tolist() == [0.0, 1.0]
    assert torch.equal(model[2].bias, model[2].bias_orig * model[2].bias_mask)
    write_mask(pruned, "weight", torch.ones(4, 3, dtype=torch.bool))
    assert torch.equal(pruned.weight, pruned.weight_orig)


def test_default_prunable():
    model = nn.Sequential(
        nn.Conv1d(2, 2, 1), nn.Conv2d(2, 2, 1), nn.Conv3d(2, 2, 1), nn.BatchNorm1d(2),
        nn.LayerNorm(2), nn.Embedding(4, 2), nn.Linear(2, 2), nn.Linear(2, 2, bias=False),
    )
    assert default_prunable(model) == ["0.weight", "1.weight", "2.weight", "6.weight", "7.weight"]


class _TiedHead(nn.Module):
    """An embedding, one hidden projection, and a head whose weight is the embedding's."""

    def __init__(self, copy_parameter: bool = False):
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.hidden = nn.Linear(3, 3)
        self.head = nn.Linear(3, 5, bias=False)
        # the same Parameter object (transformers' tie_weights), or a second Parameter viewing
        # the same memory (nn.Parameter(tensor) shares it)
        self.head.weight = nn.Parameter(self.embed.weight) if copy_parameter else self.embed.weight

    def forward(self, idx):
        return self.head(self.hidden(self.embed(idx)))


@pytest.mark.parametrize("copy_parameter", [False, True], ids=["same-object", "shared-memory"])
def test_default_prunable_never_selects_a_weight_tied_to_an_embedding(copy_parameter):
    model = _TiedHead(copy_parameter)
    assert default_prunable(model) == ["hidden.weight"]


def test_default_prunable_keeps_an_untied_head_and_a_tie_between_projections():
    model = _TiedHead()
    model.head.weight = nn.Parameter(torch.randn(5, 3))  # untied: an ordinary projection
    assert default_prunable(model) == ["hidden.weight", "head.weight"]
    shared = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3))
    shared[2].weight = shared[0].weight  # weight sharing between layers (ALBERT-style)
    assert default_prunable(shared) == ["0.weight"]


def test_default_prunable_views_of_one_flat_buffer_are_not_ties():
    # parameters that are views into one flat buffer (as FSDP lays them out) share a storage
    flat = torch.zeros(5 * 3 + 3 * 3)
    model = _TiedHead()
    model.head.weight = nn.Parameter(torch.randn(5, 3))
    with torch.no_grad():
        model.embed.weight = nn.Parameter(flat[:15].view(5, 3))
        model.hidden.weight = nn.Parameter(flat[15:].view(3, 3))
    assert model.embed.weight.untyped_storage().data_ptr() == model.hidden.weight.untyped_storage().data_ptr()
    assert default_prunable(model) == ["hidden.weight", "head.weight"]


# ------------------------------------------------------------------------------- errors
def _w(model):
    return model[0].weight


def _b(model):
    return model[0].bias


ERROR_CASES = {
    "empty": (lambda m, s: ParamSpace([]), ValueError, "at least one parameter"),
    "dup name": (lambda m, s: ParamSpace([("a", _w(m)), ("a", _b(m))]), ValueError,
                 "'a' appears twice"),
    "tied": (lambda m, s: ParamSpace([("a", _w(m)), ("b", _w(m))]), ValueError,
             "'b' is the same tensor as 'a'"),
    "mixed dtype": (lambda m, s: ParamSpace([("a", _w(m)), ("b", _b(m).float())]), TypeError,
                    r"share one dtype.*'a' is torch.float64 but 'b' is torch.float32"),
    "int param": (lambda m, s: ParamSpace([("a", torch.zeros(2, dtype=torch.long))]), TypeError,
                  "floating point"),
    "not tensor": (lambda m, s: ParamSpace([("a", [1.0])]), TypeError,
                   "'a' must be a torch.Tensor"),
    "mask unknown": (lambda m, s: ParamSpace([("a", _w(m))], masks={"b": _w(m) > 0}),
                     ValueError, r"unknown parameters \['b'\]"),
    "mask float": (lambda m, s: ParamSpace([("a", _w(m))], masks={"a": torch.ones(4, 3)}),
                   TypeError, "must have dtype torch.bool"),
    "mask shape": (lambda m, s: ParamSpace([("a", _w(m))], masks={"a": _w(m).T > 0}),
                   ValueError, r"mask of 'a' must have the parameter's shape \(4, 3\)"),
    "unknown name": (lambda m, s: ParamSpace.from_module(m, ["0.weight", "oops"]), ValueError,
                     r"unknown parameter names \['oops'\]"),
    "repeated name": (lambda m, s: ParamSpace.from_module(m, ["0.bias", "0.bias"]), ValueError,
                      "more than once"),
    "names str": (lambda m, s: ParamSpace.from_module(m, "0.bias"), TypeError,
                  "list of parameter names"),
    "unflatten width": (lambda m, s: s.unflatten(torch.zeros(25, dtype=DT)), ValueError,
                        r"shape \(\.\.\., 26\)"),
    "unflatten dtype": (lambda m, s: s.unflatten(torch.zeros(26)), TypeError,
                        "dtype torch.float64"),
    "add_ batched": (lambda m, s: s.add_(torch.zeros(2, 26, dtype=DT)), ValueError,
                     r"shape \(26,\)"),
    "add_ masked width": (
        lambda m, s: s.with_masks({"0.bias": torch.tensor([True, False, True, True])}).add_(
            torch.zeros(26, dtype=DT), masked=True),
        ValueError, r"shape \(25,\)"),
    "flatten count": (lambda m, s: s.flatten([_w(m), _b(m)]), ValueError, "must hold 4 tensors"),
    "flatten tensor": (lambda m, s: s.flatten(torch.zeros(26, dtype=DT)), TypeError,
                       "got one tensor"),
    "flatten keys": (lambda m, s: s.flatten({"0.weight": _w(m)}), ValueError, "missing"),
    "flatten shape": (lambda m, s: s.flatten([_w(m), _b(m), _w(m), _b(m)]), ValueError,
                      r"'2.weight' must have shape"),
    "select unknown": (lambda m, s: s.select(["zz"]), ValueError,
                       r"unknown parameter names \['zz'\]"),
    "writable leaf": (lambda m, s: writable_parameter(m, "0.nothing"), ValueError,
                      "not a parameter"),
    "writable module": (lambda m, s: writable_parameter(m, "9.weight"), ValueError,
                        "not a parameter"),
}


@pytest.mark.parametrize("case", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_error_table(case):
    fn, exc, pattern = case
    model = small_mlp()
    space = ParamSpace.from_module(model)
    with pytest.raises(exc, match=pattern):
        fn(model, space)


# ------------------------------------------------------------------------------- properties
shapes = st.lists(st.lists(st.integers(1, 3), min_size=0, max_size=3), min_size=1, max_size=4)


@given(shapes=shapes, seed=st.integers(0, 2**16))
def test_round_trip_property(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(tuple(s), generator=gen, dtype=DT) for s in shapes]
    masks = {
        f"p{i}": torch.rand(tuple(s), generator=gen) < 0.5 for i, s in enumerate(shapes) if i % 2
    }
    space = ParamSpace([(f"p{i}", p) for i, p in enumerate(params)], masks=masks)
    vec = space.param_vector()
    assert space.dim == sum(p.numel() for p in params)
    assert torch.equal(space.flatten(space.unflatten(vec)), vec)
    kept = space.restrict(vec)
    assert kept.numel() == space.kept_dim
    assert torch.equal(space.restrict(space.expand(kept)), kept)
    assert torch.equal(space.masked_flatten(space.masked_unflatten(kept)), kept)
