"""Bad hyper-parameters and inputs of MFAC / MFACPreconditioner, each with its error and message."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mfac.optim import MFAC, MFACPreconditioner


def params():
    torch.manual_seed(0)
    return list(nn.Linear(3, 2).parameters())


BAD_KWARGS = [
    ({"lr": -1.0}, ValueError, r"lr must be >= 0, got -1.0"),
    ({"lr": float("nan")}, ValueError, r"lr must be finite, got nan"),
    ({"lr": "0.1"}, TypeError, r"lr must be a real number"),
    ({"lr": torch.tensor(0.1)}, TypeError, r"lr must be a float"),
    ({"damp": 0.0}, ValueError, r"damp must be finite and > 0, got 0.0"),
    ({"damp": -1e-4}, ValueError, r"damp must be finite and > 0, got -0.0001"),
    ({"damp": float("inf")}, ValueError, r"damp must be finite and > 0, got inf"),
    ({"ngrads": 0}, ValueError, r"ngrads must be >= 1, got 0"),
    ({"ngrads": 2.5}, TypeError, r"ngrads must be an int, got float 2.5"),
    ({"momentum": 1.0}, ValueError, r"momentum must be in \[0, 1\), got 1.0"),
    ({"momentum": -0.1}, ValueError, r"momentum must be in \[0, 1\), got -0.1"),
    ({"weight_decay": -1e-3}, ValueError, r"weight_decay must be >= 0, got -0.001"),
    ({"average_over": "all"}, ValueError, r"average_over must be one of \('seen', 'ngrads'\)"),
    ({"dtype": torch.bfloat16}, TypeError, r"dtype \(of the gradient window\) must be one of"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_KWARGS)
def test_bad_hyper_parameters(kwargs, error, message):
    with pytest.raises(error, match=message):
        MFAC(params(), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [(k, e, m) for k, e, m in BAD_KWARGS if not {"lr", "momentum"} & set(k)],
)
def test_bad_hyper_parameters_preconditioner(kwargs, error, message):
    with pytest.raises(error, match=message):
        MFACPreconditioner(params(), **kwargs)


@pytest.mark.parametrize("key", ["ngrads", "damp"])
def test_global_settings_cannot_differ_between_groups(key):
    a, b = params(), params()
    value = {"ngrads": 7, "damp": 1e-2}[key]
    with pytest.raises(ValueError, match=f"{key} is global to the M-FAC window"):
        MFAC([{"params": a}, {"params": b, key: value}])
    opt = MFAC(a)
    with pytest.raises(ValueError, match=f"{key} is global"):
        opt.add_param_group({"params": b, key: value})
    assert len(opt.param_groups) == 1


def test_bad_group_value_in_add_param_group():
    opt = MFAC(params())
    with pytest.raises(ValueError, match="lr must be >= 0"):
        opt.add_param_group({"params": params(), "lr": -0.5})
    assert len(opt.param_groups) == 1


def test_changing_ngrads_after_the_window_exists():
    ps = params()
    opt = MFAC(ps, ngrads=2, damp=1e-3)
    ps[0].grad = torch.ones_like(ps[0])
    opt.step()
    opt.param_groups[0]["ngrads"] = 3
    with pytest.raises(ValueError, match="ngrads cannot change once the window exists"):
        opt.step()


def test_bad_damp_in_a_schedule():
    ps = params()
    opt = MFAC(ps, ngrads=2, damp=1e-3)
    ps[0].grad = torch.ones_like(ps[0])
    opt.step()
    with pytest.raises(ValueError, match="damp must be finite and > 0, got -1"):
        opt.set_damp(-1.0)
    opt.param_groups[0]["damp"] = 0.0
    with pytest.raises(ValueError, match=r"damp must be finite and > 0, got 0\.0"):
        opt.step()


def test_parameters_on_two_devices():
    cpu = nn.Parameter(torch.zeros(3))
    meta = nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match=r"one device.*\['cpu', 'meta'\]"):
        MFAC([cpu, meta])
    opt = MFAC([cpu])
    with pytest.raises(ValueError, match="one device"):
        opt.add_param_group({"params": [meta]})
    assert len(opt.param_groups) == 1


def test_complex_parameters():
    with pytest.raises(TypeError, match="real floating point"):
        MFAC([nn.Parameter(torch.zeros(2, dtype=torch.complex64))])


def test_sparse_gradient():
    emb = nn.Embedding(5, 2, sparse=True)
    opt = MFAC(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse gradients"):
        opt.step()


@pytest.mark.parametrize(
    ("mask", "error", "message"),
    [
        (
            torch.ones(3, 3, dtype=torch.bool),
            ValueError,
            r"must have the parameter's shape \(2, 3\)",
        ),
        (torch.full((2, 3), 0.5), TypeError, r"must have dtype torch.bool"),
        ([[1, 1, 1], [1, 1, 1]], TypeError, r"must be a torch.bool tensor"),
    ],
)
def test_bad_masks(mask, error, message):
    ps = params()
    with pytest.raises(error, match=message):
        MFAC(ps, masks={ps[0]: mask})


def test_mask_for_a_tensor_that_is_not_a_parameter():
    ps = params()
    with pytest.raises(ValueError, match="keyed by parameters of this optimizer"):
        MFAC(ps, masks={torch.zeros(2, 3): torch.ones(2, 3, dtype=torch.bool)})
