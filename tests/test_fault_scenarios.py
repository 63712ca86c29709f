"""Faults and bad states: whatever raises leaves the operator, optimizer, model and mask hooks bit-identical.

Each scenario snapshots everything the call could touch (parameters, ``.grad``, optimizer state, the
window, hooks), provokes the error, and compares bit for bit. Where a fault is meant to be survivable
(``skip_nonfinite``) the run must continue exactly like one that never saw the fault.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

import mfac
from mfac import prune as mprune
from tests.references import ce_loss, tiny_batches, tiny_mlp

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(dtype=torch.float64) -> nn.Module:
    return tiny_mlp(dtype)


def _data(n: int = 16, dtype=torch.float64):
    return tiny_batches(n, dtype)


loss_fn = ce_loss


def snapshot(obj):
    """Deep, bit-exact copy of tensors inside dicts/lists (other leaves as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


def assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), path


def model_state(net):
    return {
        "params": {n: p.detach().clone() for n, p in net.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()},
        "hooks": {n: len(p._backward_hooks or {}) for n, p in net.named_parameters()},
    }


def _train(net, opt, steps, start=0):
    data = _data(dtype=next(net.parameters()).dtype)
    for t in range(start, start + steps):
        opt.zero_grad()
        loss_fn(net, data[t % len(data)]).backward()
        opt.step()


# ------------------------------------------------------------------------------------ operators
def _window():
    op = mfac.SlidingInverseFisher(6, 3, 1e-3)
    for g in torch.randn(5, 6, generator=torch.Generator().manual_seed(0)):
        op.update(g)
    return op


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda s: s["grads"].__setitem__((0, 0), math.nan),
        lambda s: s["gram"].mul_(2.0),
        lambda s: s["inv"].__setitem__((1, 1), math.inf),
        lambda s: s.update(num_seen=-2),
        lambda s: s.update(since_refactor=99),
        lambda s: s.pop("inv"),
        lambda s: s.update(grads=s["grads"][:2]),
    ],
    ids=["NaN window", "Gram of another window", "inf inverse", "negative count", "refactor counter",
         "missing key", "short window"],
)
def test_corrupt_window_state_is_refused_and_nothing_is_copied(corrupt):
    op = _window()
    before = snapshot(op.state_dict())
    state = snapshot(_window().state_dict())
    other = mfac.SlidingInverseFisher(6, 3, 1e-3)
    other.update(torch.ones(6))
    corrupt(state)
    target = snapshot(other.state_dict())
    with pytest.raises(ValueError):
        other.load_state_dict(state)
    assert_same(snapshot(other.state_dict()), target)
    assert_same(snapshot(op.state_dict()), before)
    other.update(torch.ones(6))  # still usable
    assert other.num_seen == 2


def test_a_valid_window_state_still_loads_bit_exactly():
    op = _window()
    copy = mfac.SlidingInverseFisher(6, 3, 1e-3)
    copy.load_state_dict(snapshot(op.state_dict()))
    g = torch.randn(6)
    assert torch.equal(op.update_mul(g), copy.update_mul(g))


# ------------------------------------------------------------------------------------ optimizer
@pytest.mark.parametrize(
    "corrupt",
    [
        lambda s: s["state"][0].update(momentum_buffer=s["state"][0]["momentum_buffer"].reshape(4, 4).T.reshape(16)),
        lambda s: s["state"][0].update(momentum_buffer=s["state"][0]["momentum_buffer"].reshape(2, 8)),
        lambda s: s["state"][2]["momentum_buffer"].fill_(math.nan),
        lambda s: s["state"][0]["mfac"]["fisher"]["grads"][1].mul_(5.0),
        lambda s: s["state"][0]["mfac"]["fisher"].update(num_seen=-1),
        lambda s: s["state"][0]["mfac"].update(num_steps=-1),
        lambda s: s.pop("param_groups"),
    ],
    ids=["flat momentum", "reshaped momentum", "NaN momentum", "window row changed", "negative counter",
         "negative steps", "no param groups"],
)
def test_corrupt_optimizer_checkpoint_is_refused_before_anything_changes(corrupt):
    net = _model()
    opt = mfac.MFAC(net.parameters(), lr=0.05, ngrads=4, damp=1e-2, momentum=0.5)
    _train(net, opt, 6)
    saved = snapshot(opt.state_dict())
    corrupt(saved)

    fresh = _model()
    target = mfac.MFAC(fresh.parameters(), lr=0.05, ngrads=4, damp=1e-2, momentum=0.5)
    _train(fresh, target, 2)
    before, params_before = snapshot(target.state_dict()), model_state(fresh)
    with pytest.raises(ValueError):
        target.load_state_dict(saved)
    assert_same(snapshot(target.state_dict()), before)
    assert_same(model_state(fresh), params_before)
    _train(fresh, target, 1, start=2)  # the next step works and the window takes one gradient
    assert target.inverse_fisher.num_seen == 3


@pytest.mark.parametrize("value", [math.nan, 1e30], ids=["NaN", "finite with overflowing norm"])
def test_nonfinite_steps_raise_or_skip_and_change_nothing(value, caplog):
    net = _model(torch.float32)
    opt = mfac.MFAC(net.parameters(), lr=0.05, ngrads=4, damp=1e-2, momentum=0.5)
    _train(net, opt, 3)
    before, params_before = snapshot(opt.state_dict()), model_state(net)
    net[2].weight.grad.fill_(value)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[2\] \(shape \(3, 4\)\)"):
        opt.step()
    assert_same(snapshot(opt.state_dict()), before)

    opt.skip_nonfinite = True
    with caplog.at_level(logging.DEBUG, logger="mfac.optim.mfac"):
        opt.step()
    assert "param_groups[0]['params'][2]" in caplog.text  # the skip names the parameter
    assert opt.num_skipped == 1
    after = snapshot(opt.state_dict())
    glob_before, glob_after = before["state"][0].pop("mfac"), after["state"][0].pop("mfac")
    assert glob_after["num_skipped"] == glob_before["num_skipped"] + 1
    glob_after["num_skipped"] = glob_before["num_skipped"]
    assert_same(after, before)
    assert_same(glob_after, glob_before)
    assert_same(model_state(net)["params"], params_before["params"])


def test_skipping_a_bad_step_continues_exactly_like_a_run_without_it():
    """skip_nonfinite: the run with an overflowing step in the middle equals the run without it."""
    nets, opts = [], []
    for _ in range(2):
        net = _model(torch.float32)
        nets.append(net)
        opts.append(mfac.MFAC(net.parameters(), lr=0.05, ngrads=3, damp=1e-2, momentum=0.5, skip_nonfinite=True))
    _train(nets[0], opts[0], 4)
    _train(nets[1], opts[1], 4)
    for p in nets[1].parameters():
        p.grad = torch.full_like(p, 3e19)  # finite, |g|^2 overflows float32
    opts[1].step()
    _train(nets[0], opts[0], 4, start=4)
    _train(nets[1], opts[1], 4, start=4)
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(a, b)
    assert opts[1].num_skipped == 1 and opts[1].num_steps == opts[0].num_steps == 8


def test_too_small_damp_at_the_first_step_changes_nothing():
    net = _model(torch.float32)
    opt = mfac.MFAC(net.parameters(), lr=0.05, ngrads=3, damp=1e-39)
    loss_fn(net, _data(dtype=torch.float32)[0]).backward()
    before = model_state(net)
    with pytest.raises(ValueError, match=r"too small for torch\.float32"):
        opt.step()
    assert opt.inverse_fisher is None and opt.num_steps == 0
    assert_same(model_state(net), before)


def test_bad_param_group_leaves_the_groups_as_they_were():
    net = _model()
    opt = mfac.MFAC(net.parameters(), lr=0.05, ngrads=3, damp=1e-2)
    groups = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match=r"meta device|one device"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, device="meta"))]})
    with pytest.raises(ValueError, match="lr must be >= 0"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64))], "lr": -1.0})
    assert [dict(g) for g in opt.param_groups] == groups


# ------------------------------------------------------------------------------------ masks
def test_apply_masks_with_bad_optimizers_zeroes_nothing_and_hooks_nothing():
    net = _model()
    loss_fn(net, _data()[0]).backward()
    before = model_state(net)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    for bad in ("sgd", [3], 3):
        with pytest.raises(TypeError, match="optimizer"):
            mprune.apply_masks(net, {"0.weight": mask}, optimizers=bad)
        assert_same(model_state(net), before)


def test_mask_update_with_one_bad_mask_changes_nothing():
    net = _model()
    handle = mprune.apply_masks(net, {"0.weight": torch.rand(4, 4, generator=torch.Generator().manual_seed(0)) > 0.5})
    masks, before = snapshot(handle.masks), model_state(net)
    new = {"0.weight": torch.zeros(4, 4, dtype=torch.bool), "2.weight": torch.ones(3, 4)}  # the second is float
    with pytest.raises(TypeError, match=r"mask of .2\.weight. must have dtype torch\.bool"):
        handle.update(new)
    assert_same(snapshot(handle.masks), masks)
    assert_same(model_state(net), before)


@pytest.mark.parametrize(
    "kwargs",
    [{"damp": -1.0}, {"dampp": 1.0}, {"recompute": "abc"}, {"update": "exact"}, {"optimizers": ["sgd"]},
     {"params": ["0.weight", "x"]}],
    ids=["damp", "unknown keyword", "recompute", "update", "optimizers", "params"],
)
def test_gradual_pruner_refuses_bad_settings_before_touching_the_model(kwargs):
    net = _model()
    before = model_state(net)
    settings = {"ngrads": 4, "damp": 1e-2} | kwargs
    with pytest.raises((TypeError, ValueError)):
        mprune.GradualPruner(net, loss_fn, _data(), mprune.CubicSchedule(0.5, 0, 2), **settings)
    assert_same(model_state(net), before)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sparsity": {"0.weight": 0.5, "2.weihgt": 0.5}},
        {"sparsity": True},
        {"recompute": "abc"},
        {"masks": {"0.weight": torch.ones(4, 4)}},
        {"loss": lambda n, b: loss_fn(n, b).detach()},
        {"data": 5},
        {"pattern": "2:3"},
    ],
    ids=["unknown name", "bool sparsity", "recompute", "float mask", "detached loss", "data", "pattern rows"],
)
def test_prune_oneshot_refuses_bad_arguments_before_touching_the_model(kwargs):
    net = _model()
    before = model_state(net)
    loss = kwargs.pop("loss", loss_fn)
    data = kwargs.pop("data", _data())
    sparsity = kwargs.pop("sparsity", None if "pattern" in kwargs else 0.5)
    with pytest.raises((TypeError, ValueError)):
        mprune.prune_oneshot(net, loss, data, sparsity, ngrads=4, damp=1e-2, **kwargs)
    assert_same(model_state(net), before)


def test_half_precision_model_prunes_through_float32_operators():
    """bf16 / fp16 gradients: the static operator computes in float32 instead of crashing in torch."""
    for dtype in (torch.bfloat16, torch.float16):
        net = _model(dtype)
        masks = mprune.prune_oneshot(net, loss_fn, _data(dtype=dtype), 0.5, ngrads=4, damp=1e-2, recompute=2)
        assert mprune.mask_sparsity(masks) == pytest.approx(0.5, abs=0.02)
        for name, mask in masks.items():
            weight = net.get_parameter(name)
            assert weight.dtype == dtype and bool((weight[~mask] == 0).all())
            assert bool(torch.isfinite(weight).all())


def test_torch_prune_bridge_checks_every_mask_before_reparametrizing_any_module():
    net = _model()
    before = model_state(net)
    masks = {"0.weight": torch.ones(4, 4, dtype=torch.bool), "2.weight": torch.ones(3, 4)}  # second: float
    with pytest.raises(TypeError, match=r"mask of '2\.weight' must have dtype torch\.bool"):
        mprune.apply_torch_prune(net, masks)
    assert_same(model_state(net), before)
    assert not hasattr(net[0], "weight_orig") and "weight_mask" not in net[0]._buffers
