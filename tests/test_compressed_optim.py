"""MFAC / MFACPreconditioner with ``density=``: the compressed window inside the torch.optim contract."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from mfac.fisher.compressed import CompressedSlidingInverseFisher
from mfac.fisher.sliding import SlidingInverseFisher
from mfac.optim import MFAC, MFACPreconditioner


def make_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3)).to(dtype)


def backward(model, step):
    gen = torch.Generator().manual_seed(100 + step)
    dtype = next(model.parameters()).dtype
    x, y = torch.randn(16, 12, generator=gen, dtype=dtype), torch.randint(0, 3, (16,), generator=gen)
    for p in model.parameters():
        p.grad = None
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def reference_top_k(acc: torch.Tensor, density: float, block: int) -> torch.Tensor:
    """Independent top-k per block (a Python loop over blocks): the kept part of ``acc``."""
    kept = torch.zeros_like(acc)
    for lo in range(0, acc.numel(), block):
        part = acc[lo : lo + block]
        idx = part.abs().topk(math.ceil(part.numel() * density)).indices + lo
        kept[idx] = acc[idx]
    return kept


@pytest.mark.parametrize("density", [None, 1.0])
@pytest.mark.parametrize("cls", [MFAC, MFACPreconditioner])
def test_density_none_or_one_is_the_dense_optimizer(density, cls):
    a, b = make_model(torch.float32), make_model(torch.float32)
    kw = {"ngrads": 4, "damp": 1e-3, "weight_decay": 1e-2}
    if cls is MFAC:
        kw.update(lr=0.1, momentum=0.5)
    opt_a, opt_b = cls(a.parameters(), **kw), cls(b.parameters(), density=density, **kw)
    for t in range(7):
        backward(a, t)
        backward(b, t)
        opt_a.step()
        opt_b.step()
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
    assert type(opt_b.inverse_fisher) is SlidingInverseFisher


@pytest.mark.parametrize("average_over", ["seen", "ngrads"])
def test_steps_match_an_explicit_float64_efcp_reference(average_over):
    """Teacher-forced: e += g; g' = top-k(e) per block; e -= g'; w -= lr v, v = mu v + (1-mu) F'^{-1} g'."""
    model = make_model()
    lr, damp, m, density, mu, wd = 0.2, 1e-2, 4, 0.2, 0.5, 1e-3
    opt = MFAC(model.parameters(), lr=lr, ngrads=m, damp=damp, momentum=mu, weight_decay=wd,
               density=density, average_over=average_over)
    d = sum(p.numel() for p in model.parameters())
    block = 4096  # the optimizer's block: one (tail) block covers this tiny model
    error, rows, velocity = torch.zeros(d, dtype=torch.float64), [], torch.zeros(d, dtype=torch.float64)
    for t in range(9):
        backward(model, t)
        w = flat(p.detach().clone() for p in model.parameters())
        g = flat(p.grad for p in model.parameters()) + wd * w
        error = error + g
        sent = reference_top_k(error, density, block)
        error = error - sent
        rows = [*rows, sent][-m:]
        g_rows = torch.stack(rows)
        scale = len(rows) if average_over == "seen" else m
        fisher = damp * torch.eye(d, dtype=torch.float64) + g_rows.T @ g_rows / scale
        velocity = mu * velocity + (1 - mu) * torch.linalg.solve(fisher, sent)
        opt.step()
        after = flat(p.detach() for p in model.parameters())
        torch.testing.assert_close(after, w - lr * velocity, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(opt.inverse_fisher.error, error, rtol=0, atol=1e-15)


def test_resume_is_bit_exact_with_masks_and_momentum():
    def build(model):
        masks = {model[0].weight: torch.rand(model[0].weight.shape, generator=gen) > 0.3}
        return MFAC(model.parameters(), lr=0.1, ngrads=4, damp=1e-3, momentum=0.9, masks=masks,
                    density=0.1)

    gen = torch.Generator().manual_seed(0)
    a = make_model(torch.float32)
    opt_a = build(a)
    for t in range(6):
        backward(a, t)
        opt_a.step()
    saved_model, saved_opt = copy.deepcopy(a.state_dict()), copy.deepcopy(opt_a.state_dict())
    glob = saved_opt["state"][0]["mfac"]
    assert glob["density"] == 0.1
    assert {"values", "indices", "error"} <= glob["fisher"].keys()
    assert "grads" not in glob["fisher"]
    b = make_model(torch.float32, seed=1)
    b.load_state_dict(saved_model)
    gen = torch.Generator().manual_seed(0)  # the same masks
    opt_b = build(b)
    opt_b.load_state_dict(saved_opt)
    for t in range(6, 12):
        backward(a, t)
        backward(b, t)
        opt_a.step()
        opt_b.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(opt_a.inverse_fisher.error, opt_b.inverse_fisher.error)
    masked = ~opt_a._masks[a[0].weight]
    assert (a[0].weight[masked] == 0).all()


def test_skip_nonfinite_leaves_accumulator_window_and_parameters():
    model = make_model()
    opt = MFAC(model.parameters(), lr=0.1, ngrads=4, damp=1e-3, density=0.1, skip_nonfinite=True)
    backward(model, 0)
    opt.step()
    before = copy.deepcopy(opt.inverse_fisher.state_dict()), flat(p.detach().clone() for p in model.parameters())
    backward(model, 1)
    model[0].weight.grad[0, 0] = math.nan
    opt.step()
    assert opt.num_skipped == 1
    after = opt.inverse_fisher.state_dict()
    for key in ("values", "indices", "error", "gram", "inv"):
        assert torch.equal(before[0][key], after[key]), key
    assert torch.equal(before[1], flat(p.detach() for p in model.parameters()))


def test_closure_scheduler_and_preconditioner():
    model = make_model()
    opt = MFAC(model.parameters(), lr=0.1, ngrads=4, damp=1e-3, density=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    losses = []
    for t in range(4):
        losses.append(opt.step(lambda t=t: backward(model, t)).item())
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.1 / 16 and all(math.isfinite(v) for v in losses)
    # the preconditioner writes F'^{-1} g' into p.grad
    model = make_model()
    pre = MFACPreconditioner(model.parameters(), ngrads=4, damp=1e-3, density=0.05)
    backward(model, 0)
    g = flat(p.grad.clone() for p in model.parameters())
    pre.step()
    fisher = pre.inverse_fisher
    sent = g - fisher.error
    expected = sent / (1e-3 + sent.dot(sent))  # one row: Sherman-Morrison on g'
    torch.testing.assert_close(flat(p.grad for p in model.parameters()), expected, rtol=1e-10, atol=0)
    assert (sent != 0).sum() == fisher.row_size


def test_window_grows_when_a_parameter_gets_its_first_gradient():
    model = make_model()
    opt = MFAC(model.parameters(), lr=0.1, ngrads=4, damp=1e-3, density=0.2)
    head = model[2]
    for t in range(3):  # the first layer is frozen: no gradient
        backward(model, t)
        model[0].weight.grad = model[0].bias.grad = None
        opt.step()
    old = opt.inverse_fisher
    old_rows, old_error, old_gram = old.window.clone(), old.error.clone(), old._gram.clone()
    assert old.dim == head.weight.numel() + head.bias.numel()
    backward(model, 3)
    state = old.state_dict()
    new = CompressedSlidingInverseFisher.remap_state(
        state, torch.arange(old.dim) + 130, 130 + old.dim, old.row_size + 26
    )
    assert torch.equal(new["error"][130:], old_error)
    opt.step()  # now all parameters: the window grows to 130 + 33 coordinates
    fisher = opt.inverse_fisher
    assert fisher.dim == 163 and fisher.num_stored == 4
    grown = fisher.window
    assert torch.equal(grown[:3, 130:], old_rows[:3]) and (grown[:3, :130] == 0).all()
    assert torch.equal(fisher._gram[:3, :3], old_gram[:3, :3])


@pytest.mark.parametrize(
    ("density", "error", "match"),
    [
        (0.0, ValueError, r"density must be in \(0, 1\].*got 0.0"),
        (2.0, ValueError, r"density must be in \(0, 1\].*got 2.0"),
        ("0.1", TypeError, r"density must be a real number"),
    ],
)
def test_bad_density_is_refused(density, error, match):
    with pytest.raises(error, match=match):
        MFAC(make_model().parameters(), density=density)


def test_distributed_is_refused_and_checkpoint_density_must_match():
    class Placement:  # quacks like a DistributedWindow
        local = new_fisher = update_mul = all_finite = None

    with pytest.raises(ValueError, match=r"density=0.1.*cannot be combined with distributed"):
        MFAC(make_model().parameters(), density=0.1, distributed=Placement())
    model = make_model()
    opt = MFAC(model.parameters(), ngrads=4, density=0.1)
    backward(model, 0)
    opt.step()
    other = MFAC(make_model().parameters(), ngrads=4)
    with pytest.raises(ValueError, match=r"saved with density=0.1, this optimizer has density=None"):
        other.load_state_dict(opt.state_dict())
    assert other.inverse_fisher is None
