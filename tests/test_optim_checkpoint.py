"""Checkpoints of MFAC / MFACPreconditioner: save -> load -> step equals an uninterrupted run."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from mfac.optim import MFAC, MFACPreconditioner


class TwoHeads(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.body = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)
        self.aux = nn.Linear(5, 2)  # used only in some steps: its .grad is None in the others
        self.frozen = nn.Linear(5, 5)
        self.frozen.requires_grad_(False)
        self.to(dtype)

    def loss(self, step):
        gen = torch.Generator().manual_seed(step)
        dtype = self.body.weight.dtype
        x = torch.randn(8, 6, generator=gen).to(dtype)
        y = torch.randint(0, 3, (8,), generator=gen)
        h = torch.tanh(self.frozen(self.body(x)))
        loss = nn.functional.cross_entropy(self.head(h).float(), y)
        if step % 3 == 0:
            loss = loss + self.aux(h).float().square().mean()
        return loss


def build(dtype, cls=MFAC, save_window=True):
    torch.manual_seed(0)
    model = TwoHeads(dtype)
    mask = torch.ones_like(model.body.weight, dtype=torch.bool)
    mask[::2, 1::2] = False
    groups = [
        {"params": [*model.body.parameters(), *model.frozen.parameters()]},
        {"params": [*model.head.parameters(), *model.aux.parameters()], "weight_decay": 0.0},
    ]
    kwargs = {
        "ngrads": 4,
        "damp": 1e-3,
        "weight_decay": 1e-2,
        "masks": {model.body.weight: mask},
        "save_window": save_window,
    }
    if cls is MFAC:
        groups[1]["momentum"] = 0.0
        opt = MFAC(groups, lr=0.05, momentum=0.9, **kwargs)
        return model, opt, [opt]
    precond = MFACPreconditioner(groups, **kwargs)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, precond, [precond, sgd]


def train(model, opts, steps):
    for step in steps:
        for opt in opts:
            opt.zero_grad()
        model.loss(step).backward()
        for opt in opts:
            opt.step()


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("cls", [MFAC, MFACPreconditioner])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_resume_is_bit_exact(dtype, cls):
    k = 7  # past the window size: the ring has wrapped and rank-one updates are in use
    ref_model, _, ref_opts = build(dtype, cls)
    train(ref_model, ref_opts, range(2 * k))

    model, _, opts = build(dtype, cls)
    train(model, opts, range(k))
    saved = roundtrip({"model": model.state_dict(), "opts": [o.state_dict() for o in opts]})

    fresh, fresh_opt, fresh_opts = build(dtype, cls)
    fresh.load_state_dict(saved["model"])
    for o, s in zip(fresh_opts, saved["opts"], strict=True):
        o.load_state_dict(s)
    window = fresh_opt.inverse_fisher
    assert window.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert window.num_seen == k
    if cls is MFAC:
        assert fresh_opt.state[fresh.body.weight]["momentum_buffer"].dtype == window.dtype
    train(fresh, fresh_opts, range(k, 2 * k))

    for name, p in ref_model.named_parameters():
        assert torch.equal(p, dict(fresh.named_parameters())[name]), name
    assert fresh_opt.num_steps == 2 * k


def test_checkpoint_layout():
    model, opt, opts = build(torch.float32)
    train(model, opts, range(2))
    glob = opt.state_dict()["state"][0]["mfac"]
    assert glob["active"] == [0, 1, 4, 5, 6, 7]  # frozen (2, 3) never had a gradient
    assert glob["window_dtype"] == torch.float32
    assert set(glob["masks"]) == {0}
    assert glob["fisher"]["grads"].shape == (4, opt.inverse_fisher.dim)
    assert glob["num_steps"] == 2


def test_window_free_checkpoint():
    model, opt, opts = build(torch.float32, save_window=False)
    train(model, opts, range(5))
    saved = roundtrip(opt.state_dict())
    glob = saved["state"][0]["mfac"]
    assert glob["fisher"] is None
    assert (
        len(roundtrip_bytes(saved))
        < len(roundtrip_bytes(build(torch.float32)[1].state_dict())) + 4096
    )

    fresh, fresh_opt, fresh_opts = build(torch.float32)
    fresh.load_state_dict(model.state_dict())
    fresh_opt.load_state_dict(saved)
    assert fresh_opt.num_steps == 5
    assert fresh_opt.inverse_fisher.num_seen == 0  # restarts empty
    assert fresh_opt.inverse_fisher.dim == opt.inverse_fisher.dim
    assert torch.equal(
        fresh_opt.state[fresh.body.weight]["momentum_buffer"],
        opt.state[model.body.weight]["momentum_buffer"],
    )
    train(fresh, fresh_opts, range(5, 8))
    assert fresh_opt.inverse_fisher.num_seen == 3


def roundtrip_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_checkpoint_before_first_step():
    model, opt, opts = build(torch.float32)
    saved = roundtrip(opt.state_dict())
    assert saved["state"][0]["mfac"]["active"] is None
    train(model, opts, range(2))
    opt.load_state_dict(saved)  # back to no window
    assert opt.inverse_fisher is None and opt.num_steps == 0


def test_loaded_state_does_not_alias_the_checkpoint():
    model, opt, opts = build(torch.float32)
    train(model, opts, range(3))
    saved = roundtrip(opt.state_dict())
    fresh, fresh_opt, fresh_opts = build(torch.float32)
    fresh_opt.load_state_dict(saved)
    before = saved["state"][0]["mfac"]["fisher"]["grads"].clone()
    train(fresh, fresh_opts, range(3, 6))
    assert torch.equal(saved["state"][0]["mfac"]["fisher"]["grads"], before)


def test_mask_mismatch_is_refused_before_anything_changes():
    model, opt, opts = build(torch.float32)
    train(model, opts, range(3))
    saved = opt.state_dict()
    other = MFAC(model.parameters(), lr=0.05, ngrads=4, damp=1e-3)
    with pytest.raises(ValueError, match="same masks"):
        other.load_state_dict(saved)
    assert other.inverse_fisher is None and other.param_groups[0]["lr"] == 0.05


def test_different_ngrads_is_refused():
    model, opt, opts = build(torch.float32)
    train(model, opts, range(3))
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group["ngrads"] = 8
    _fresh, fresh_opt, _ = build(torch.float32)
    with pytest.raises(ValueError, match="ngrads"):
        fresh_opt.load_state_dict(saved)


def test_deepcopy_carries_the_window():
    model, opt, opts = build(torch.float32)
    train(model, opts, range(5))
    twin_model, twin_opt = copy.deepcopy((model, opt))
    assert twin_opt.inverse_fisher is not opt.inverse_fisher
    train(model, opts, range(5, 9))
    train(twin_model, [twin_opt], range(5, 9))
    for p, q in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(p, q)
