"""MFAC and MFACPreconditioner: reductions, the dense reference, the torch.optim contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mfac.optim import MFAC, MFACPreconditioner


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def batch(step, dtype=torch.float32):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 5, generator=gen, dtype=dtype), torch.randint(0, 3, (8,), generator=gen)


def backward(model, step):
    x, y = batch(step, next(model.parameters()).dtype)
    for p in model.parameters():
        p.grad = None
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def dense_inverse(rows, damp, scale):
    """Explicit float64 ``(damp I + (1/scale) G^T G)^{-1}``."""
    g = torch.stack(rows).to(torch.float64)
    fisher = damp * torch.eye(g.shape[1], dtype=torch.float64) + g.T @ g / scale
    return torch.linalg.inv(fisher)


# ------------------------------------------------------------------------------ reductions
@pytest.mark.parametrize("average_over", ["seen", "ngrads"])
def test_first_step_is_sherman_morrison_sgd(average_over):
    model = make_model(torch.float64)
    lr, damp, m = 0.3, 1e-3, 8
    opt = MFAC(model.parameters(), lr=lr, ngrads=m, damp=damp, average_over=average_over)
    before = flat(p.detach().clone() for p in model.parameters())
    backward(model, 0)
    g = flat(p.grad for p in model.parameters())
    opt.step()
    after = flat(p.detach() for p in model.parameters())
    m_eff = 1 if average_over == "seen" else m
    expected = before - lr / (damp + g.dot(g) / m_eff) * g
    torch.testing.assert_close(after, expected, rtol=1e-12, atol=1e-14)


def test_steps_match_dense_reference_with_groups():
    """Teacher-forced: every step's parameter change equals the explicit float64 inverse's."""
    model = make_model(torch.float64)
    first, second = model[0], model[2]
    m, damp = 3, 1e-2
    settings = [
        {"lr": 0.5, "weight_decay": 0.1, "momentum": 0.0},
        {"lr": 0.2, "weight_decay": 0.0, "momentum": 0.7},
    ]
    opt = MFAC(
        [
            {"params": first.parameters(), **settings[0]},
            {"params": second.parameters(), **settings[1]},
        ],
        ngrads=m,
        damp=damp,
    )
    params = [list(first.parameters()), list(second.parameters())]
    rows, velocity = (
        [],
        [torch.zeros(sum(p.numel() for p in ps), dtype=torch.float64) for ps in params],
    )
    for step in range(8):  # wraps the ring twice
        backward(model, step)
        w = [flat(p.detach().clone() for p in ps) for ps in params]
        g = [
            flat(p.grad for p in ps) + s["weight_decay"] * wi
            for ps, s, wi in zip(params, settings, w, strict=True)
        ]
        rows = ([*rows, torch.cat(g)])[-m:]
        u = dense_inverse(rows, damp, len(rows)) @ rows[-1]
        parts = u.split([velocity[0].numel(), velocity[1].numel()])
        opt.step()
        for k in range(2):
            mu = settings[k]["momentum"]
            velocity[k] = mu * velocity[k] + (1 - mu) * parts[k]
            change = flat(p.detach() for p in params[k]) - w[k]
            torch.testing.assert_close(
                change, -settings[k]["lr"] * velocity[k], rtol=1e-9, atol=1e-12
            )
    assert opt.num_steps == 8
    assert opt.inverse_fisher.num_seen == 8


def test_preconditioner_then_sgd_equals_mfac_bit_for_bit():
    a, b = make_model(), make_model()
    opt_a = MFAC(a.parameters(), lr=0.05, ngrads=4, damp=1e-3, weight_decay=1e-2)
    precond = MFACPreconditioner(b.parameters(), ngrads=4, damp=1e-3, weight_decay=1e-2)
    sgd = torch.optim.SGD(b.parameters(), lr=0.05)
    for step in range(7):
        backward(a, step)
        opt_a.step()
        backward(b, step)
        precond.step()
        sgd.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_preconditioner_writes_inverse_fisher_times_gradient():
    model = make_model(torch.float64)
    precond = MFACPreconditioner(model.parameters(), ngrads=3, damp=1e-2)
    rows = []
    for step in range(5):
        backward(model, step)
        g = flat(p.grad.clone() for p in model.parameters())
        rows = [*rows, g][-3:]
        grads_before = [p.grad for p in model.parameters()]
        precond.step()
        expected = dense_inverse(rows, 1e-2, len(rows)) @ g
        torch.testing.assert_close(
            flat(p.grad for p in model.parameters()), expected, rtol=1e-9, atol=1e-12
        )
        # in place: the same tensors
        assert all(p.grad is q for p, q in zip(model.parameters(), grads_before, strict=True))
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad


def test_preconditioner_with_adamw_trains():
    model = make_model()
    precond = MFACPreconditioner(model.parameters(), ngrads=8, damp=1e-3)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    first = None
    for step in range(30):
        loss = backward(model, step % 3)
        first = first if first is not None else loss.item()
        precond.step()
        adamw.step()
    assert loss.item() < first


# ------------------------------------------------------------------------- torch.optim contract
def test_closure_evaluated_once_with_grad_enabled():
    model = make_model()
    opt = MFAC(model.parameters(), lr=0.1, ngrads=4, damp=1e-3)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        return backward(model, 0)

    with torch.no_grad():
        loss = opt.step(closure)
    assert calls == [True]
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert opt.step() is None  # gradients still there: a plain step works too


def test_lr_scheduler_drives_the_step():
    a, b = make_model(), make_model()
    opt_a = MFAC(a.parameters(), lr=0.2, ngrads=4, damp=1e-3, momentum=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt_a, step_size=2, gamma=0.3)
    opt_b = MFAC(b.parameters(), lr=0.2, ngrads=4, damp=1e-3, momentum=0.5)
    for step in range(6):
        backward(a, step)
        opt_a.step()
        sched.step()
        backward(b, step)
        opt_b.step()
        opt_b.param_groups[0]["lr"] = 0.2 * 0.3 ** ((step + 1) // 2)
    assert opt_a.param_groups[0]["lr"] == pytest.approx(0.2 * 0.3**3)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_zero_grad_sets_none():
    model = make_model()
    opt = MFAC(model.parameters(), lr=0.1, ngrads=4, damp=1e-3)
    backward(model, 0)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.step()  # no gradients at all: nothing happens
    assert opt.num_steps == 0 and opt.inverse_fisher is None


def test_named_parameters_and_defaults():
    model = make_model()
    opt = MFAC(model.named_parameters(), lr=0.1, ngrads=4, damp=1e-3)
    assert opt.param_groups[0]["param_names"][0] == "0.weight"
    assert opt.defaults["ngrads"] == 4 and opt.defaults["damp"] == 1e-3
    backward(model, 0)
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'0\.weight'"):
        opt.step()


# the same x every step: nearly collinear gradients, float32 steps 4-5 off by ~2e-3: the warning is right
@pytest.mark.filterwarnings("ignore:update_mul:mfac.NumericalWarning")
def test_unused_head_is_skipped_but_counted_as_zero():
    torch.manual_seed(0)
    body, head_a, head_b = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(4, 2)
    params = [*body.parameters(), *head_a.parameters(), *head_b.parameters()]
    opt = MFAC(params, lr=0.1, ngrads=4, damp=1e-3, momentum=0.9)
    x = torch.randn(6, 4)
    for step in range(6):
        use_b = step % 2 == 0
        for p in params:
            p.grad = None
        out = head_a(body(x)).sum() + (head_b(body(x)).sum() if use_b else 0)
        out.backward()
        before = [p.detach().clone() for p in head_b.parameters()]
        buffers = [opt.state[p].get("momentum_buffer") for p in head_b.parameters()]
        buffers = [None if b is None else b.clone() for b in buffers]
        opt.step()
        if not use_b:
            for p, q, buf in zip(head_b.parameters(), before, buffers, strict=True):
                assert torch.equal(p, q)  # not updated
                assert torch.equal(opt.state[p]["momentum_buffer"], buf)  # momentum not decayed
    assert opt.inverse_fisher.dim == sum(p.numel() for p in params)  # head_b was in the first step


def test_parameter_joining_later_is_exact():
    """A parameter getting its first gradient late joins with zero columns: as if zeros before."""
    torch.manual_seed(1)
    a0, b0 = nn.Linear(3, 3).double(), nn.Linear(3, 2).double()
    a1, b1 = [nn.Linear(3, 3).double(), nn.Linear(3, 2).double()]
    a1.load_state_dict(a0.state_dict())
    b1.load_state_dict(b0.state_dict())
    late = MFAC(a0.parameters(), lr=0.1, ngrads=3, damp=1e-2, momentum=0.5)
    full = MFAC([*a1.parameters(), *b1.parameters()], lr=0.1, ngrads=3, damp=1e-2, momentum=0.5)
    x = torch.randn(5, 3, dtype=torch.float64)
    for step in range(7):
        for a, b, opt in ((a0, b0, late), (a1, b1, full)):
            for p in [*a.parameters(), *b.parameters()]:
                p.grad = None
            train_b = step >= 3
            loss = a(x).square().sum() + (b(a(x)).square().sum() if train_b else 0)
            loss.backward()
            if not train_b and opt is full:
                for p in b.parameters():
                    p.grad = torch.zeros_like(p)
            if step == 3 and opt is late:
                opt.add_param_group({"params": b.parameters()})
            opt.step()
    assert late.inverse_fisher.dim == full.inverse_fisher.dim
    late_params = [*a0.parameters(), *b0.parameters()]
    full_params = [*a1.parameters(), *b1.parameters()]
    for p, q in zip(late_params, full_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)  # Gram sums in another order


def test_frozen_parameters_cost_nothing():
    model = make_model()
    model[0].requires_grad_(False)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    opt = MFAC(model.parameters(), lr=0.1, ngrads=4, damp=1e-3)
    for step in range(3):
        backward(model, step)
        opt.step()
    assert opt.inverse_fisher.dim == sum(p.numel() for p in model[2].parameters())
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), frozen, strict=True))


# ------------------------------------------------------------------------------ masks
def test_masks_keep_pruned_weights_at_zero_and_out_of_the_window():
    model = make_model()
    w = model[0].weight
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    opt = MFAC(
        model.parameters(),
        lr=0.1,
        ngrads=4,
        damp=1e-3,
        momentum=0.9,
        weight_decay=1e-2,
        masks={w: mask},
    )
    for step in range(5):
        backward(model, step)
        opt.step()
        assert torch.all(w[~mask] == 0)  # zeroed at the first step, zero ever after
    d = sum(p.numel() for p in model.parameters())
    assert opt.inverse_fisher.dim == d - int((~mask).sum())
    assert torch.all(opt.state[w]["momentum_buffer"][~mask] == 0)


def test_preconditioner_masks_zero_the_gradient_and_adam_keeps_zeros():
    model = make_model()
    w = model[2].weight
    mask = torch.ones_like(w)
    mask[:, :2] = 0  # a 0/1 float mask (as torch.nn.utils.prune stores them): masks are bool
    with torch.no_grad():
        w.mul_(mask)
    with pytest.raises(TypeError, match=r"must have dtype torch.bool .* convert with .bool\(\)"):
        MFACPreconditioner(model.parameters(), ngrads=4, damp=1e-3, masks={w: mask})
    precond = MFACPreconditioner(model.parameters(), ngrads=4, damp=1e-3, masks={w: mask.bool()})
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(4):
        backward(model, step)
        precond.step()
        assert torch.all(w.grad[:, :2] == 0)
        adam.step()
    assert torch.all(w[:, :2] == 0)


# ------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize(
    ("dtype", "window"),
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.bfloat16, torch.float32),
    ],
)
def test_dtypes_and_window_dtype(dtype, window):
    model = make_model(dtype)
    opt = MFAC(model.parameters(), lr=0.05, ngrads=8, damp=1e-2, momentum=0.5)
    losses = []
    for step in range(20):
        losses.append(backward(model, step % 2).item())
        opt.step()
    assert opt.inverse_fisher.dtype == window
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(opt.state[p]["momentum_buffer"].dtype == window for p in model.parameters())
    assert losses[-1] < losses[0]


def test_mixed_parameter_dtypes_use_the_widest_window():
    a = nn.Linear(3, 2)
    b = nn.Linear(2, 2).double()
    opt = MFAC([*a.parameters(), *b.parameters()], lr=0.1, ngrads=2, damp=1e-2)
    x = torch.randn(4, 3)
    b(a(x).double()).sum().backward()
    opt.step()
    assert opt.inverse_fisher.dtype == torch.float64
    assert a.weight.dtype == torch.float32


# ------------------------------------------------------------------------- non-finite gradients
@pytest.mark.parametrize("cls", [MFAC, MFACPreconditioner])
def test_nonfinite_gradient_raises_and_changes_nothing(cls):
    model = make_model()
    opt = cls(model.parameters(), ngrads=4, damp=1e-3)
    backward(model, 0)
    opt.step()
    window = {
        k: v.clone() if isinstance(v, torch.Tensor) else v
        for k, v in opt.inverse_fisher.state_dict().items()
    }
    backward(model, 1)
    model[2].bias.grad[1] = float("inf")
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"must be finite.*param_groups\[0\]\['params'\]\[3\]"):
        opt.step()
    after = opt.inverse_fisher.state_dict()
    for key, value in window.items():
        assert (
            torch.equal(after[key], value)
            if isinstance(value, torch.Tensor)
            else after[key] == value
        )
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    # p.grad untouched (inf == inf for torch.equal)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert opt.num_steps == 1


@pytest.mark.parametrize("cls", [MFAC, MFACPreconditioner])
def test_skip_nonfinite_skips_the_step(cls):
    model = make_model()
    opt = cls(model.parameters(), ngrads=4, damp=1e-3, skip_nonfinite=True)
    backward(model, 0)
    model[0].weight.grad[0, 0] = float("nan")
    params = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert opt.num_skipped == 1 and opt.num_steps == 0
    assert opt.inverse_fisher.num_seen == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    assert torch.isnan(
        model[0].weight.grad[0, 0]
    )  # the preconditioner leaves p.grad for GradScaler


# ---------------------------------------------------------------------------------- placement
class RecordingPlacement:
    """The local placement's behaviour, recording every call the optimizer makes (the protocol)."""

    def __init__(self, nonfinite_elsewhere_at: int | None = None):
        from mfac.optim._placement import LocalPlacement

        self._inner = LocalPlacement()
        self.calls: list[str] = []
        self.elsewhere_at = nonfinite_elsewhere_at

    def local(self, tensor):
        self.calls.append("local")
        return tensor

    def new_fisher(self, dim, ngrads, damp, **kwargs):
        self.calls.append("new_fisher")
        return self._inner.new_fisher(dim, ngrads, damp, **kwargs)

    def update_mul(self, fisher, flat, *, check_finite=True):
        from mfac.optim._placement import NonFiniteElsewhere

        self.calls.append("update_mul")
        if self.calls.count("update_mul") == self.elsewhere_at:
            raise NonFiniteElsewhere("another process's gradient is not finite")
        return self._inner.update_mul(fisher, flat, check_finite=check_finite)


def test_a_placement_is_driven_through_the_protocol_and_the_default_is_local():
    model, twin = make_model(), make_model()
    placement = RecordingPlacement()
    opt = MFAC(model.parameters(), lr=0.1, ngrads=3, damp=1e-2, momentum=0.5, distributed=placement)
    ref = MFAC(twin.parameters(), lr=0.1, ngrads=3, damp=1e-2, momentum=0.5)
    assert type(ref._placement).__name__ == "LocalPlacement"
    for step in range(5):
        backward(model, step)
        backward(twin, step)
        opt.step()
        ref.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters(), strict=True))
    assert placement.calls.count("new_fisher") == 1 and placement.calls.count("update_mul") == 5
    assert "local" in placement.calls


def test_a_vote_that_finds_a_nonfinite_gradient_elsewhere_skips_or_raises_everywhere():
    model = make_model()
    opt = MFAC(model.parameters(), lr=0.1, ngrads=3, damp=1e-2,
               distributed=RecordingPlacement(nonfinite_elsewhere_at=2))
    backward(model, 0)
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    backward(model, 1)
    with pytest.raises(ValueError, match="the part of the parameters another rank holds"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    skipping = MFAC(make_model().parameters(), ngrads=3, skip_nonfinite=True,
                    distributed=RecordingPlacement(nonfinite_elsewhere_at=1))
    backward(make_model(), 0)
    for p in skipping.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    skipping.step()
    assert (skipping.num_steps, skipping.num_skipped) == (0, 1)


def test_a_distributed_window_cannot_grow_and_says_why():
    from mfac.distributed import DistributedWindow

    model = make_model()
    opt = MFAC(model.parameters(), ngrads=3, damp=1e-2, distributed=DistributedWindow())
    backward(model, 0)
    model[2].weight.grad = None
    opt.step()
    backward(model, 1)
    with pytest.raises(NotImplementedError, match=r"cannot grow.*\(1 got their first one later\)"):
        opt.step()
    assert opt.inverse_fisher.dim == sum(p.numel() for p in model.parameters()) - model[2].weight.numel()
