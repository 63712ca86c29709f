"""Mechanics that results alone do not show: what each pruning step sees, and how the window is kept.

Each test pins one behaviour a plausible bug breaks while every other test still passes: the
intermediate sparsities of recomputation, the independent update's formula, pruned weights kept at zero
under an optimizer whose state is not shaped like the parameters, the gradual pruner's masks reaching
the next event, window growth in the middle of the layout, float64 accumulation of Gram products, and
the refactor cadence of the sliding window.
"""

from __future__ import annotations

import itertools
import re
import warnings

import pytest
import torch
from references import dense_inverse
from torch import nn

import mfac
from mfac import prune as mprune
from mfac.collect import collect_grads
from mfac.numerics import accumulated_matmul
from mfac.prune.masks import prune_count
from tests.references import ce_loss, tiny_batches, tiny_mlp

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["0.weight", "2.weight"]


def _model(dtype=torch.float64) -> nn.Module:
    return tiny_mlp(dtype)


def _data(n: int = 32, dtype=torch.float64):
    return tiny_batches(n, dtype)


loss_fn = ce_loss


class Recording(mprune.IdentityCurvature):
    """Magnitude pruning that records how many coordinates each (re)computation step is given."""

    def __init__(self) -> None:
        self.kept: list[int] = []

    def prepare(self, model, space) -> None:
        self.kept.append(space.kept_dim)


# ------------------------------------------------------------------------------------ pruning
@pytest.mark.parametrize("recompute", [3, [0.3, 0.6, 0.9]], ids=["geometric", "explicit"])
def test_recomputation_steps_reach_their_own_intermediate_sparsities(recompute):
    net, source = _model(), Recording()
    masks = mprune.prune_oneshot(net, None, None, 0.9, curvature=source, recompute=recompute, update="none")
    n = 16 + 12
    steps = mprune.recompute_steps(0.0, 0.9, 3) if isinstance(recompute, int) else recompute
    assert steps[0] < steps[1] < steps[2] == 0.9
    # step j prunes to steps[j - 1]: the next step starts from what is left
    expected = [n] + [n - prune_count(n, s) for s in steps[:-1]]
    assert source.kept == expected
    assert sum(int(m.sum()) for m in masks.values()) == n - prune_count(n, 0.9)


def test_independent_update_follows_its_formula():
    """dw = -F^{-1} v, v_q = w_q / [F^{-1}]_qq on the removed set S, then w_S = 0 (dense float64)."""
    net, data = _model(), _data()
    params = dict(net.named_parameters())
    w = torch.cat([params[n].detach().reshape(-1) for n in NAMES])
    grads = collect_grads(net, loss_fn, data, 8, params=NAMES)
    finv = dense_inverse(grads, 1e-2)
    saliency = w.square() / (2 * finv.diagonal())
    removed = torch.zeros_like(w, dtype=torch.bool)
    removed[torch.argsort(saliency, stable=True)[: prune_count(w.numel(), 0.5)]] = True
    v = torch.where(removed, w / finv.diagonal(), torch.zeros_like(w))
    expected = w - finv @ v
    expected[removed] = 0.0

    masks = mprune.prune_oneshot(net, loss_fn, data, 0.5, ngrads=8, damp=1e-2, update="independent")
    got = torch.cat([params[n].detach().reshape(-1) for n in NAMES])
    assert torch.equal(~torch.cat([masks[n].reshape(-1) for n in NAMES]), removed)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got[~removed], w[~removed])  # the kept weights did move


def test_pruned_weights_stay_zero_under_an_mfac_window_filled_before_pruning():
    """M-FAC's window holds pre-pruning gradients (state not shaped like the parameters): the handle's
    post-step hook must zero the pruned weights again after every step."""
    net, data = _model(), _data()
    opt = mfac.MFAC(net.parameters(), lr=0.1, ngrads=4, damp=1e-3)
    for batch in data[:6]:
        opt.zero_grad()
        loss_fn(net, batch).backward()
        opt.step()
    masks = mprune.magnitude_prune(net, 0.5, params=NAMES)
    handle = mprune.apply_masks(net, masks, optimizers=opt)
    moved = False
    for batch in data[6:12]:
        opt.zero_grad()
        loss_fn(net, batch).backward()
        before = {n: net.get_parameter(n).detach().clone() for n in NAMES}
        opt.step()
        for n in NAMES:
            p = net.get_parameter(n)
            assert bool((p[~masks[n]] == 0).all()), n
            moved |= not torch.equal(p[masks[n]], before[n][masks[n]])
    assert moved  # the kept weights trained
    handle.remove()


def test_gradual_pruner_hands_its_masks_to_the_next_event():
    net, source = _model(), Recording()
    schedule = mprune.StepSchedule([(0, 0.5), (1, 0.75), (2, 0.9)])
    pruner = mprune.GradualPruner(net, None, None, schedule, curvature=source, update="none")
    pruned = []
    for step in range(3):
        assert pruner.step(step)
        pruned.append({n: ~m for n, m in pruner.masks.items()})
    n = 16 + 12
    assert source.kept == [n, n - prune_count(n, 0.5), n - prune_count(n, 0.75)]
    for earlier, later in itertools.pairwise(pruned):
        for name in NAMES:
            assert bool((later[name] | ~earlier[name]).all())  # pruned stays pruned


def test_window_grows_when_a_parameter_joins_in_the_middle_of_the_layout():
    """A, B, C with B's first gradient at step 3: the directions equal a window over (A, B, C) whose
    B columns were zero before (exact: zero columns do not change the Gram matrix)."""
    gen = torch.Generator().manual_seed(0)
    a, b, c = (nn.Parameter(torch.randn(*s, generator=gen, dtype=torch.float64)) for s in [(2, 3), (4,), (3,)])
    precond = mfac.MFACPreconditioner([a, b, c], ngrads=3, damp=1e-2)
    reference = mfac.SlidingInverseFisher(13, 3, 1e-2, dtype=torch.float64)
    for step in range(7):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in (a, b, c)]
        if step < 2:
            grads[1] = None
        for p, g in zip((a, b, c), grads, strict=True):
            p.grad = g
        flat = torch.cat([torch.zeros(p.numel(), dtype=torch.float64) if g is None else g.reshape(-1)
                          for p, g in zip((a, b, c), grads, strict=True)])
        expected = reference.update_mul(flat)
        precond.step()
        got = torch.cat([torch.zeros(p.numel(), dtype=torch.float64) if p.grad is None else p.grad.reshape(-1)
                         for p in (a, b, c)])
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=f"step {step}")
    assert precond.inverse_fisher.dim == 13


# ------------------------------------------------------------------------------------ numerics
def test_accumulated_matmul_sums_the_partial_products_in_float64():
    """One large entry in the first chunk, a 1.0 in each later chunk: every partial product is exact in
    float32, their float64 sum is exact, a float32 sum (1e8 + 1 == 1e8) is not."""
    chunk, nchunks = 64, 64
    d = chunk * nchunks
    a = torch.zeros(2, d)
    a[0, 0] = 1e8
    a[0, chunk::chunk] = 1.0
    a[1, 5] = 3.0
    b = torch.ones(d, 1)
    out = accumulated_matmul(a, b, chunk=chunk)
    assert out.dtype == torch.float64
    assert out.shape == (2, 1)
    assert out[0, 0].item() == 1e8 + (nchunks - 1) and out[1, 0].item() == 3.0
    batched = accumulated_matmul(a.unsqueeze(0).expand(3, -1, -1), b.expand(3, -1, -1), chunk=chunk)
    assert batched.dtype == torch.float64 and bool((batched[:, 0, 0] == 1e8 + nchunks - 1).all())
    small = accumulated_matmul(a[:, :chunk], b[:chunk], chunk=chunk)  # one chunk: one matmul
    assert small.dtype == torch.float64 and small[0, 0].item() == 1e8


@pytest.mark.parametrize("average_over", ["seen", "ngrads"])
def test_sliding_window_refactors_every_m_rank_one_updates(average_over, monkeypatch):
    """While filling with "seen" every step refactors (the scale changes); once full, m accepted
    rank-one updates, then one refactor, and so on: a window that never refactors, or whose rank-one
    update is always rejected (O(m^3) per step, correct results), fails here."""
    m, steps = 4, 30
    calls = []
    staged, after = mfac.SlidingInverseFisher._refactored, mfac.SlidingInverseFisher._refactor

    def counting_staged(self, row, n, scale):  # P refactored while the step is staged
        calls.append(self.num_seen + 1)  # the step's number (num_seen counts it once committed)
        return staged(self, row, n, scale)

    def counting_after(self):  # P refactored after a rejected rank-one update
        calls.append(self.num_seen)
        after(self)

    monkeypatch.setattr(mfac.SlidingInverseFisher, "_refactored", counting_staged)
    monkeypatch.setattr(mfac.SlidingInverseFisher, "_refactor", counting_after)
    gen = torch.Generator().manual_seed(0)
    stream = torch.randn(steps, 12, generator=gen, dtype=torch.float64)
    op = mfac.SlidingInverseFisher(12, m, 1e-1, dtype=torch.float64, average_over=average_over)
    for t, g in enumerate(stream):
        y = op.update_mul(g)
        window = stream[max(0, t + 1 - m) : t + 1]
        scale = m if average_over == "ngrads" else window.shape[0]
        torch.testing.assert_close(y, dense_inverse(window, 1e-1, scale) @ g, rtol=1e-9, atol=1e-12)
    fill = list(range(1, m + 1))  # the first m steps refactor (the window is not full yet)
    steady = list(range(2 * m + 1, steps + 1, m + 1))  # then after every m rank-one updates
    assert calls == fill + steady


@pytest.mark.parametrize("damp", [1e-6, 1e-7])
def test_repeated_gradients_warn_that_accuracy_is_lost(damp):
    """m copies of one float32 gradient: F^-1 g = g / (damp + |g|^2) is a combination of window rows
    that cancels by 1e9 or more; the float32 Gram's rounding makes the result unreliable: say so."""
    g = torch.randn(2000, generator=torch.Generator().manual_seed(0))
    op = mfac.SlidingInverseFisher(2000, 8, damp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", mfac.NumericalWarning)  # the jittered Cholesky warns too
        for _ in range(3 * 8):
            op.update_mul(g)
    messages = [str(w.message) for w in caught if issubclass(w.category, mfac.NumericalWarning)]
    assert any(re.search(r"nearly\) collinear .* cancels by", m) for m in messages), messages


def test_ordinary_windows_at_tiny_damp_do_not_warn():
    gen = torch.Generator().manual_seed(1)
    op = mfac.SlidingInverseFisher(3000, 8, 1e-8)
    ref = mfac.SlidingInverseFisher(3000, 8, 1e-8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mfac.NumericalWarning)
        for _ in range(20):
            g = torch.randn(3000, generator=gen)
            y, expected = op.update_mul(g), ref.update_mul(g.double())
            assert ((y.double() - expected).norm() / expected.norm()).item() <= 1e-5
