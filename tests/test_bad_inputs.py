"""Bad inputs across the public API: each gives its exception type and a message naming the value and the rule.

The rules (mfac/numerics.py): ``TypeError`` for a wrong type or dtype (not a tensor, a bool where a number
is needed, a float mask, an unsupported window dtype, an unknown keyword); ``ValueError`` for a wrong value
(range, finiteness, shape, unknown name, device, meta tensors, malformed or corrupt state dicts, whatever
the bad entry's type);
``IndexError`` for indices out of range; ``MemoryError`` with the size for allocations that cannot fit.
Every case is built fresh (no state shared between cases). Fault scenarios (nothing changed before an
error) are in ``test_fault_scenarios.py``.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch import nn

import mfac
from mfac import prune as mprune
from mfac.numerics import NonFiniteGradientError
from tests.references import ce_loss, tiny_batches, tiny_mlp

pytestmark = pytest.mark.usefixtures("one_thread")

NAN = math.nan
INF = math.inf


# ---------------------------------------------------------------------------------------- fixtures
def G(m: int = 4, d: int = 6, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(m, d, generator=torch.Generator().manual_seed(0), dtype=dtype)


def with_value(t: torch.Tensor, value: float, where=(1, 2)) -> torch.Tensor:
    t = t.clone()
    t[where] = value
    return t


def static(**kw):
    return mfac.StaticInverseFisher(kw.pop("grads", G()), kw.pop("damp", 1e-2), **kw)


def sliding(**kw):
    args = {"dim": 6, "ngrads": 3, "damp": 1e-3} | kw
    return mfac.SlidingInverseFisher(**args)


def filled(steps: int = 4) -> mfac.SlidingInverseFisher:
    op = sliding()
    for g in G(steps):
        op.update(g)
    return op


def sliding_state(**changes):
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in filled().state_dict().items()}
    for key, value in changes.items():
        if value is _DROP:
            del state[key]
        elif callable(value):
            state[key] = value(state[key])
        else:
            state[key] = value
    return state


_DROP = object()


def model(dtype=torch.float64) -> nn.Module:
    return tiny_mlp(dtype)


def data(n: int = 8, dtype=torch.float64):
    return tiny_batches(n, dtype)


loss_fn = ce_loss


NAMES = ["0.weight", "2.weight"]
FISHER = {"ngrads": 4, "damp": 1e-2}


def oneshot(*args, **kw):
    net = kw.pop("net", None) or model()
    loss = kw.pop("loss", loss_fn)
    batches = kw.pop("batches", None) or data()
    sparsity = args[0] if args else kw.pop("sparsity", 0.5)
    return mprune.prune_oneshot(net, loss, batches, sparsity, **({**FISHER, **kw}))


def scores(**kw):
    net = kw.pop("net", None) or model()
    return mprune.obs_scores(net, kw.pop("loss", loss_fn), kw.pop("batches", None) or data(), **({**FISHER, **kw}))


def gradual(**kw):
    net = kw.pop("net", None) or model()
    schedule = kw.pop("schedule", mprune.CubicSchedule(0.5, 0, 2))
    return mprune.GradualPruner(net, loss_fn, data(), schedule, **({**FISHER, **kw}))


def collect(**kw):
    net = kw.pop("net", None) or model()
    return mfac.collect_grads(net, kw.pop("loss", loss_fn), kw.pop("batches", None) or data(), kw.pop("n", 2), **kw)


def params():
    torch.manual_seed(0)
    return list(nn.Linear(3, 2).parameters())


def optimizer(cls=mfac.MFAC, **kw):
    ps = params()
    return cls(ps, **({"ngrads": 3, "damp": 1e-2} | kw)), ps


def stepped(cls=mfac.MFAC, steps: int = 4, **kw):
    opt, ps = optimizer(cls, **kw)
    for t in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(t))
        opt.step()
    return opt, ps


def opt_state(mutate):
    opt, _ = stepped(momentum=0.5)
    state = opt.state_dict()
    mutate(state)
    fresh, _ = optimizer(momentum=0.5)
    return fresh.load_state_dict(state)


def glob_of(state):
    return state["state"][0]["mfac"]


def set_grads(opt_ps, value):
    opt, ps = opt_ps
    for p in ps:
        p.grad = torch.full_like(p, value)
    return opt.step()


def handle(masks=None, **kw):
    net = model()
    masks = {"0.weight": torch.ones(4, 4, dtype=torch.bool)} if masks is None else masks
    return mprune.apply_masks(net, masks, **kw)


def space(**kw):
    return mfac.ParamSpace.from_module(model(), **kw)


BOOL44 = torch.ones(4, 4, dtype=torch.bool)
SCORES = {"a": torch.rand(2, 4), "b": torch.rand(3, 4)}

# ---------------------------------------------------------------------------------------- the table
# (id, call, error type, message regex)
CASES = [
    # --- damp, everywhere it is taken
    ("static damp 0", lambda: static(damp=0.0), ValueError, r"damp must be finite and > 0, got 0.0"),
    ("static damp -1", lambda: static(damp=-1.0), ValueError, r"damp must be finite and > 0, got -1.0"),
    ("static damp inf", lambda: static(damp=INF), ValueError, r"damp must be finite and > 0, got inf"),
    ("static damp nan", lambda: static(damp=NAN), ValueError, r"damp must be finite and > 0, got nan"),
    ("static damp str", lambda: static(damp="a"), TypeError, r"damp must be a real number, got str 'a'"),
    ("static damp None", lambda: static(damp=None), TypeError, r"damp must be a real number, got NoneType"),
    ("static damp True", lambda: static(damp=True), TypeError, r"damp must be a real number, got the bool True"),
    ("static damp tensor(2)", lambda: static(damp=torch.ones(2)), ValueError, r"damp must be a scalar"),
    ("static damp bool tensor", lambda: static(damp=torch.tensor(True)), TypeError, r"damp must be a real number"),
    ("static damp 1e-39 f32", lambda: static(damp=1e-39), ValueError,
     r"damp=1e-39 is too small for torch.float32: 1/damp = 1e\+39 overflows"),
    ("static damp 1e-5 f16", lambda: static(grads=G().half(), damp=1e-5), ValueError,
     r"too small for torch.float16"),
    ("dense damp True", lambda: mfac.DenseInverseFisher(G(), True), TypeError, r"got the bool True"),
    ("dense damp 0", lambda: mfac.DenseInverseFisher(G(), 0), ValueError, r"damp must be finite and > 0, got 0"),
    ("dense damp 1e-300 f32", lambda: mfac.DenseInverseFisher(G(), 1e-300), ValueError, r"too small for torch.float32"),
    ("sliding damp False", lambda: sliding(damp=False), TypeError, r"got the bool False"),
    ("sliding damp -1e-5", lambda: sliding(damp=-1e-5), ValueError, r"damp must be finite and > 0, got -1e-05"),
    ("sliding damp 1e-39", lambda: sliding(damp=1e-39), ValueError, r"too small for torch.float32"),
    ("MFAC damp True", lambda: optimizer(damp=True), TypeError, r"damp must be a real number, got the bool"),
    ("MFAC damp 0", lambda: optimizer(damp=0.0), ValueError, r"damp must be finite and > 0"),
    ("precond damp nan", lambda: optimizer(mfac.MFACPreconditioner, damp=NAN), ValueError, r"damp must be finite"),
    ("prune damp True", lambda: oneshot(damp=True), TypeError, r"damp must be a real number, got the bool"),
    ("prune damp -1", lambda: oneshot(damp=-1.0), ValueError, r"damp must be finite and > 0, got -1.0"),
    ("prune no damp", lambda: oneshot(damp=None), TypeError, r"needs ngrads and damp"),
    ("scores damp 0", lambda: scores(damp=0), ValueError, r"damp must be finite and > 0"),
    ("restricted damp 0", lambda: mprune.restricted_joint_update(torch.zeros(6), G(), 0.0, torch.tensor([0])),
     ValueError, r"damp must be finite and > 0"),
    # --- gradient matrices of the static and dense operators
    ("static 1-D grads", lambda: static(grads=G()[0]), ValueError, r"grads must have shape \(m, d\), got \(6,\)"),
    ("static 3-D grads", lambda: static(grads=G().reshape(2, 2, 6)), ValueError, r"grads must have shape \(m, d\)"),
    ("static int grads", lambda: static(grads=G().long()), TypeError, r"grads must be a floating tensor, got dtype torch.int64"),
    ("static complex grads", lambda: static(grads=G().to(torch.complex64)), TypeError, r"grads must be a floating tensor"),
    ("static numpy grads", lambda: static(grads=G().numpy()), TypeError, r"grads must be a torch.Tensor"),
    ("static list grads", lambda: static(grads=[[1.0]]), TypeError, r"grads must be a torch.Tensor"),
    ("static d = 0", lambda: static(grads=torch.zeros(3, 0)), ValueError, r"grads must have d >= 1 columns"),
    ("static NaN grads", lambda: static(grads=with_value(G(), NAN)), ValueError, r"grads must be finite, got 1 NaN and 0 inf"),
    ("static inf grads", lambda: static(grads=with_value(G(), -INF)), ValueError, r"got 0 NaN and 1 inf"),
    ("static overflowing norm", lambda: static(grads=with_value(G(), 1e20)), ValueError, r"squared norms overflow"),
    ("static NaN, blocks", lambda: static(grads=with_value(G(), NAN), block_size=2), ValueError, r"grads must be finite"),
    ("static meta grads", lambda: static(grads=torch.zeros(3, 4, device="meta")), ValueError, r"meta device"),
    ("static block_size 0", lambda: static(block_size=0), ValueError, r"block_size must be >= 1, got 0"),
    ("static block_size 2.5", lambda: static(block_size=2.5), TypeError, r"block_size must be an int, got float"),
    ("static block_size True", lambda: static(block_size=True), TypeError, r"block_size must be an int, got bool"),
    ("static chunk 0", lambda: static(chunk=0), ValueError, r"chunk must be >= 1"),
    ("static overwrite str", lambda: static(overwrite="yes"), TypeError, r"overwrite must be a bool"),
    ("dense NaN grads", lambda: mfac.DenseInverseFisher(with_value(G(), NAN), 1.0), ValueError, r"grads must be finite"),
    ("dense int grads", lambda: mfac.DenseInverseFisher(G().int(), 1.0), TypeError, r"floating tensor"),
    ("dense meta grads", lambda: mfac.DenseInverseFisher(torch.zeros(2, 3, device="meta"), 1.0), ValueError, r"meta"),
    ("dense huge d", lambda: mfac.DenseInverseFisher(torch.zeros(0, 10**7), 1.0), MemoryError,
     r"cannot allocate the dense d x d Fisher of shape \(10000000, 10000000\).*TiB asked for"),
    # --- sliding window construction
    ("sliding ngrads 0", lambda: sliding(ngrads=0), ValueError, r"ngrads must be >= 1, got 0"),
    ("sliding ngrads 2.0", lambda: sliding(ngrads=2.0), TypeError, r"ngrads must be an int, got float"),
    ("sliding dim 0", lambda: sliding(dim=0), ValueError, r"dim must be >= 1, got 0"),
    ("sliding dim True", lambda: sliding(dim=True), TypeError, r"dim must be an int, got bool"),
    ("sliding dtype int32", lambda: sliding(dtype=torch.int32), TypeError, r"dtype must be a floating torch.dtype"),
    ("sliding dtype str", lambda: sliding(dtype="float32"), TypeError, r"dtype must be a floating torch.dtype"),
    ("sliding average_over", lambda: sliding(average_over="all"), ValueError, r"average_over must be one of \('seen', 'ngrads'\)"),
    ("sliding device meta", lambda: sliding(device="meta"), ValueError, r"device='meta' holds no values"),
    ("sliding device int", lambda: sliding(device=3.5), TypeError, r"device must be a torch.device"),
    ("sliding chunk -1", lambda: sliding(chunk=-1), ValueError, r"chunk must be >= 1, got -1"),
    ("sliding huge window", lambda: sliding(dim=10**7, ngrads=10**6), MemoryError,
     r"gradient window of shape \(1000000, 10000000\).*36.38 TiB asked for on cpu"),
    ("sliding huge m x m", lambda: sliding(dim=1, ngrads=10**6), MemoryError,
     r"cannot allocate the m x m Gram matrix of shape \(1000000, 1000000\) \(torch.float64\): 7.28 TiB"),
    # --- operator calls
    ("mul wrong d", lambda: static().mul(torch.randn(5)), ValueError, r"x must have shape \(6,\) or \(k, 6\), got \(5,\)"),
    ("mul 3-D", lambda: static().mul(torch.randn(2, 3, 6)), ValueError, r"got \(2, 3, 6\)"),
    ("mul float64 x", lambda: static().mul(torch.randn(6, dtype=torch.float64)), TypeError,
     r"x must have dtype torch.float32 \(the operator's\), got torch.float64"),
    ("mul list", lambda: static().mul([1.0] * 6), TypeError, r"x must be a torch.Tensor, got list"),
    ("mul half op float x", lambda: static(grads=G().bfloat16()).mul(torch.randn(6)), TypeError,
     r"x must have dtype torch.bfloat16"),
    ("mul meta x", lambda: static().mul(torch.zeros(6, device="meta")), ValueError, r"x must be on device cpu"),
    ("sliding mul wrong d", lambda: filled().mul(torch.randn(7)), ValueError, r"x must have shape \(6,\)"),
    ("dense mul dtype", lambda: mfac.DenseInverseFisher(G(), 1.0).mul(torch.randn(6).double()), TypeError, r"x must have dtype"),
    ("submatrix out of range", lambda: static().submatrix(torch.tensor([0, 6])), IndexError,
     r"idx must lie in \[0, 6\), got values in \[0, 6\]"),
    ("submatrix negative", lambda: filled().submatrix(torch.tensor([-1])), IndexError, r"idx must lie in \[0, 6\)"),
    ("submatrix 2-D", lambda: static().submatrix(torch.tensor([[0]])), ValueError, r"idx must be 1-D, got shape \(1, 1\)"),
    ("submatrix bool", lambda: static().submatrix(torch.tensor([True, False])), TypeError, r"integer index tensor"),
    ("submatrix float", lambda: static(block_size=2).submatrix(torch.tensor([0.0])), TypeError, r"integer index tensor"),
    ("update wrong d", lambda: filled().update(torch.randn(5)), ValueError, r"grad must have shape \(6,\), got \(5,\)"),
    ("update 2-D", lambda: filled().update(torch.randn(1, 6)), ValueError, r"grad must have shape \(6,\), got \(1, 6\)"),
    ("update float64", lambda: filled().update(torch.randn(6).double()), TypeError, r"grad must have dtype torch.float32"),
    ("update list", lambda: filled().update([0.0] * 6), TypeError, r"grad must be a torch.Tensor, got list"),
    ("update NaN", lambda: filled().update(with_value(torch.ones(6), NAN, 2)), NonFiniteGradientError, r"grad must be finite, got 1 NaN and 0 inf"),
    ("update_mul inf", lambda: filled().update_mul(with_value(torch.ones(6), INF, 0)), NonFiniteGradientError, r"0 NaN and 1 inf"),
    ("update overflow", lambda: filled().update(torch.full((6,), 1e20)), NonFiniteGradientError, r"squared norm overflows torch.float32"),
    ("update meta", lambda: filled().update(torch.zeros(6, device="meta")), ValueError, r"grad must be on device cpu"),
    # --- sliding load_state_dict: malformed, corrupt or foreign
    ("state not a dict", lambda: sliding().load_state_dict([1, 2]), TypeError, r"state_dict must be a dict, got list"),
    ("state missing num_seen", lambda: sliding().load_state_dict(sliding_state(num_seen=_DROP)), ValueError,
     r"state_dict is missing \['num_seen'\]"),
    ("state missing grads", lambda: sliding().load_state_dict(sliding_state(grads=_DROP)), ValueError,
     r"state_dict is missing \['grads'\]"),
    ("state other ngrads", lambda: sliding(ngrads=4).load_state_dict(sliding_state()), ValueError,
     r"state_dict has ngrads=3, this operator ngrads=4"),
    ("state other damp", lambda: sliding(damp=1e-2).load_state_dict(sliding_state()), ValueError, r"state_dict has damp="),
    ("state other average_over", lambda: sliding(average_over="ngrads").load_state_dict(sliding_state()), ValueError,
     r"average_over='seen'"),
    ("state negative num_seen", lambda: sliding().load_state_dict(sliding_state(num_seen=-1)), ValueError,
     r"state_dict\['num_seen'\] must be >= 0, got -1"),
    ("state float num_seen", lambda: sliding().load_state_dict(sliding_state(num_seen=2.0)), ValueError,
     r"state_dict\['num_seen'\] must be an int, got float"),
    ("state since_refactor > m", lambda: sliding().load_state_dict(sliding_state(since_refactor=9)), ValueError,
     r"since_refactor'\] must lie in \[0, ngrads=3\], got 9"),
    ("state negative jitter", lambda: sliding().load_state_dict(sliding_state(jitter=-1.0)), ValueError,
     r"jitter'\] must be a finite float >= 0"),
    ("state NaN jitter", lambda: sliding().load_state_dict(sliding_state(jitter=NAN)), ValueError, r"jitter"),
    ("state grads list", lambda: sliding().load_state_dict(sliding_state(grads=[[0.0]])), ValueError,
     r"state_dict\['grads'\] must be a torch.Tensor"),
    ("state gram int", lambda: sliding().load_state_dict(sliding_state(gram=lambda t: t.long())), ValueError,
     r"state_dict\['gram'\] must be a floating tensor"),
    ("state grads shape", lambda: sliding().load_state_dict(sliding_state(grads=lambda t: t.reshape(6, 3))), ValueError,
     r"state_dict\['grads'\] has shape \(6, 3\), expected \(3, 6\)"),
    ("state NaN gram", lambda: sliding().load_state_dict(sliding_state(gram=lambda t: with_value(t, NAN, (0, 1)))),
     ValueError, r"state_dict\['gram'\] must be finite"),
    ("state inf inv", lambda: sliding().load_state_dict(sliding_state(inv=lambda t: with_value(t, INF, (0, 0)))),
     ValueError, r"state_dict\['inv'\] must be finite"),
    ("state NaN window", lambda: sliding().load_state_dict(sliding_state(grads=lambda t: with_value(t, NAN, (0, 1)))),
     ValueError, r"state_dict\['grads'\] must be finite"),
    ("state gram of another window", lambda: sliding().load_state_dict(sliding_state(gram=lambda t: 2 * t)), ValueError,
     r"state_dict\['gram'\] does not match state_dict\['grads'\]: Gram diagonal"),
    ("state window of another run", lambda: sliding().load_state_dict(sliding_state(grads=lambda t: t.flip(1) * 3)),
     ValueError, r"does not match"),
    ("state asymmetric gram", lambda: sliding().load_state_dict(sliding_state(gram=lambda t: with_value(t, 5.0, (0, 1)))),
     ValueError, r"must be symmetric"),
    ("state gram beyond num_seen", lambda: sliding().load_state_dict(sliding_state(num_seen=1)), ValueError,
     r"nonzero entries beyond the 1 stored gradients"),
    # --- MFAC / MFACPreconditioner hyper-parameters
    ("MFAC lr -1", lambda: optimizer(lr=-1.0), ValueError, r"lr must be >= 0, got -1.0"),
    ("MFAC lr nan", lambda: optimizer(lr=NAN), ValueError, r"lr must be finite, got nan"),
    ("MFAC lr str", lambda: optimizer(lr="0.1"), TypeError, r"lr must be a real number, got str"),
    ("MFAC lr True", lambda: optimizer(lr=True), TypeError, r"lr must be a real number, got bool"),
    ("MFAC lr tensor", lambda: optimizer(lr=torch.tensor(0.1)), TypeError, r"lr must be a float"),
    ("MFAC ngrads 0", lambda: optimizer(ngrads=0), ValueError, r"ngrads must be >= 1, got 0"),
    ("MFAC ngrads 2.5", lambda: optimizer(ngrads=2.5), TypeError, r"ngrads must be an int, got float 2.5"),
    ("MFAC ngrads True", lambda: optimizer(ngrads=True), TypeError, r"ngrads must be an int, got bool"),
    ("MFAC momentum 1", lambda: optimizer(momentum=1.0), ValueError, r"momentum must be in \[0, 1\), got 1.0"),
    ("MFAC momentum -0.1", lambda: optimizer(momentum=-0.1), ValueError, r"momentum must be in \[0, 1\)"),
    ("MFAC momentum True", lambda: optimizer(momentum=True), TypeError, r"momentum must be a real number"),
    ("MFAC weight_decay -1", lambda: optimizer(weight_decay=-1e-3), ValueError, r"weight_decay must be >= 0, got -0.001"),
    ("precond weight_decay inf", lambda: optimizer(mfac.MFACPreconditioner, weight_decay=INF), ValueError,
     r"weight_decay must be finite"),
    ("MFAC average_over", lambda: optimizer(average_over="all"), ValueError, r"average_over must be one of"),
    ("MFAC dtype bf16", lambda: optimizer(dtype=torch.bfloat16), TypeError, r"dtype \(of the gradient window\) must be one of"),
    ("precond dtype int", lambda: optimizer(mfac.MFACPreconditioner, dtype=torch.int64), TypeError, r"dtype \(of the gradient window\)"),
    ("MFAC save_window str", lambda: optimizer(save_window="no"), TypeError, r"save_window must be a bool"),
    ("MFAC skip_nonfinite int", lambda: optimizer(skip_nonfinite=1), TypeError, r"skip_nonfinite must be a bool"),
    ("MFAC distributed junk", lambda: optimizer(distributed=object()), TypeError, r"distributed must be a mfac.distributed"),
    ("MFAC complex params", lambda: mfac.MFAC([nn.Parameter(torch.zeros(2, dtype=torch.complex64))]), TypeError,
     r"real floating point"),
    ("MFAC meta params", lambda: mfac.MFAC([nn.Parameter(torch.zeros(2, device="meta"))]), ValueError, r"meta device"),
    ("MFAC two devices", lambda: mfac.MFAC([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, device="meta"))]),
     ValueError, r"one device"),
    ("MFAC group ngrads differs", lambda: mfac.MFAC([{"params": params()}, {"params": params(), "ngrads": 7}]),
     ValueError, r"ngrads is global to the M-FAC window"),
    ("add_param_group not dict", lambda: optimizer()[0].add_param_group([params()]), TypeError, r"param_group must be a dict"),
    ("add_param_group lr", lambda: optimizer()[0].add_param_group({"params": params(), "lr": -0.5}), ValueError,
     r"lr must be >= 0"),
    # --- MFAC masks
    ("MFAC masks list", lambda: mfac.MFAC(params(), masks=[1]), TypeError, r"masks must be a mapping"),
    ("MFAC masks by name", lambda: mfac.MFAC(params(), masks={"weight": torch.ones(2, 3, dtype=torch.bool)}), TypeError,
     r"keyed by the parameter tensors of this optimizer, got the name 'weight'.*param_masks"),
    ("MFAC masks foreign key", lambda: mfac.MFAC(params(), masks={torch.zeros(2, 3): torch.ones(2, 3, dtype=torch.bool)}),
     ValueError, r"a key of shape \(2, 3\) is not one of them"),
    ("MFAC masks int key", lambda: mfac.MFAC(params(), masks={0: torch.ones(2, 3, dtype=torch.bool)}), TypeError,
     r"got a key of type int"),
    ("MFAC mask float", lambda: _with_mask(torch.ones(2, 3)), TypeError,
     r"must have dtype torch.bool .*convert with .bool\(\)"),
    ("MFAC mask shape", lambda: _with_mask(torch.ones(3, 3, dtype=torch.bool)), ValueError,
     r"must have the parameter's shape \(2, 3\), got \(3, 3\)"),
    ("MFAC mask list", lambda: _with_mask([[True] * 3] * 2), TypeError,
     r"must be a torch.bool tensor"),
    ("MFAC mask meta", lambda: _with_mask(torch.ones(2, 3, dtype=torch.bool, device="meta")),
     ValueError, r"must be on cpu, got meta"),
    # --- MFAC step
    ("MFAC NaN grad", lambda: set_grads(optimizer(), NAN), ValueError,
     r"gradient \(plus weight_decay \* parameter\) must be finite.*param_groups\[0\]\['params'\]\[0\]"),
    ("MFAC overflowing grad", lambda: set_grads(optimizer(), 1e30), ValueError,
     r"overflowing norm in param_groups\[0\]\['params'\]\[0\] \(shape \(2, 3\)\)"),
    ("MFAC damp changed to a bad value", lambda: _damp_changed(-1.0), ValueError, r"damp must be finite and > 0, got -1\.0"),
    ("MFAC damp too small at step", lambda: set_grads(optimizer(damp=1e-39), 1.0), ValueError, r"too small for torch.float32"),
    ("MFAC sparse grad", lambda: _sparse_step(), TypeError, r"does not support sparse gradients"),
    # --- MFAC load_state_dict
    ("opt state not dict", lambda: optimizer()[0].load_state_dict(3), TypeError, r"state_dict must be a dict, got int"),
    ("opt state missing state", lambda: optimizer()[0].load_state_dict({"param_groups": []}), ValueError,
     r"state_dict is missing \['state'\]"),
    ("opt state other model", lambda: opt_state(lambda s: s["param_groups"][0]["params"].pop()), ValueError,
     r"state_dict has 1 parameters, this optimizer 2"),
    ("opt momentum reshaped", lambda: opt_state(lambda s: s["state"][0].update(momentum_buffer=s["state"][0]["momentum_buffer"].reshape(3, 2))),
     ValueError, r"'momentum_buffer' has shape \(3, 2\), the parameter \(2, 3\)"),
    ("opt momentum NaN", lambda: opt_state(lambda s: s["state"][1]["momentum_buffer"].fill_(NAN)), ValueError,
     r"'momentum_buffer' must be finite"),
    ("opt momentum int", lambda: opt_state(lambda s: s["state"][1].update(momentum_buffer=torch.zeros(2, dtype=torch.int64))),
     ValueError, r"must be a floating tensor"),
    ("opt negative num_steps", lambda: opt_state(lambda s: glob_of(s).update(num_steps=-3)), ValueError,
     r"num_steps=-3; it must be an int >= 0"),
    ("opt missing fisher", lambda: opt_state(lambda s: glob_of(s).pop("fisher")), ValueError, r"is missing \['fisher'\]"),
    ("opt version", lambda: opt_state(lambda s: glob_of(s).update(version=99)), ValueError, r"unsupported M-FAC state version 99"),
    ("opt window dtype", lambda: opt_state(lambda s: glob_of(s).update(window_dtype=torch.int8)), ValueError,
     r"window_dtype=torch.int8"),
    ("opt NaN window", lambda: opt_state(lambda s: glob_of(s)["fisher"]["grads"][0, 0].fill_(NAN)), ValueError,
     r"state_dict\['grads'\] must be finite"),
    ("opt corrupt gram", lambda: opt_state(lambda s: glob_of(s)["fisher"]["gram"].mul_(3)), ValueError,
     r"does not match state_dict\['grads'\]"),
    ("opt negative counter", lambda: opt_state(lambda s: glob_of(s)["fisher"].update(num_seen=-1)), ValueError,
     r"num_seen'\] must be >= 0"),
    # --- ParamSpace
    ("space no params", lambda: mfac.ParamSpace([]), ValueError, r"needs at least one parameter"),
    ("space not pairs", lambda: mfac.ParamSpace([torch.zeros(2)]), TypeError, r"must hold \(name, tensor\) pairs"),
    ("space name int", lambda: mfac.ParamSpace([(1, torch.zeros(2))]), TypeError, r"parameter names must be str"),
    ("space not tensor", lambda: mfac.ParamSpace([("a", [1.0])]), TypeError, r"parameter 'a' must be a torch.Tensor"),
    ("space duplicate name", lambda: mfac.ParamSpace([("a", torch.zeros(2)), ("a", torch.zeros(2))]), ValueError, r"appears twice"),
    ("space int param", lambda: mfac.ParamSpace([("a", torch.zeros(2, dtype=torch.long))]), TypeError, r"must be floating point"),
    ("space mixed dtypes", lambda: mfac.ParamSpace([("a", torch.zeros(2)), ("b", torch.zeros(2).double())]), TypeError,
     r"share one dtype"),
    ("space two devices", lambda: mfac.ParamSpace([("a", torch.zeros(2)), ("b", torch.zeros(2, device="meta"))]), ValueError,
     r"on one device"),
    ("space mask float", lambda: space(masks={"0.weight": torch.ones(4, 4)}), TypeError, r"must have dtype torch.bool"),
    ("space mask shape", lambda: space(masks={"0.weight": torch.ones(4, 3, dtype=torch.bool)}), ValueError,
     r"must have the parameter's shape \(4, 4\)"),
    ("space mask unknown", lambda: space(masks={"nope": BOOL44}), ValueError, r"masks given for unknown parameters \['nope'\]"),
    ("space unknown name", lambda: mfac.ParamSpace.from_module(model(), ["nope"]), ValueError, r"nope"),
    ("space flatten one tensor", lambda: space().flatten(torch.zeros(3)), TypeError, r"got one tensor"),
    ("space flatten dtype", lambda: space().flatten([torch.zeros(p.shape) for p in model().parameters()]), TypeError,
     r"must have dtype torch.float64 \(the parameters'\)"),
    ("space add_ wrong length", lambda: space().add_(torch.zeros(5, dtype=torch.float64)), ValueError, r"vec must have shape"),
    ("space grad None", lambda: space().grad_vector(), ValueError, r"have .grad None"),
    ("default_prunable not module", lambda: mfac.default_prunable("model"), TypeError, r"model must be a torch.nn.Module"),
    # --- collect_grads / evaluate_loss
    ("collect ngrads 0", lambda: collect(n=0), ValueError, r"ngrads must be >= 1, got 0"),
    ("collect ngrads float", lambda: collect(n=2.0), TypeError, r"ngrads must be an int"),
    ("collect model not module", lambda: mfac.collect_grads("m", loss_fn, data(), 2), TypeError, r"model must be a torch.nn.Module"),
    ("collect loss not callable", lambda: collect(loss=3), TypeError, r"loss_fn must be callable"),
    ("collect data not iterable", lambda: collect(batches=3), TypeError, r"data must be an iterable of batches"),
    ("collect empty data", lambda: mfac.collect_grads(model(), loss_fn, [], 2), ValueError, r"data yielded no gradients"),
    ("collect loss float", lambda: collect(loss=lambda n, b: 1.0), TypeError, r"loss_fn must return a scalar torch.Tensor, got float"),
    ("collect loss vector", lambda: collect(loss=lambda n, b: n(b[0]).sum(0)), ValueError, r"must return a scalar loss, got shape \(3,\)"),
    ("collect loss NaN", lambda: collect(loss=lambda n, b: loss_fn(n, b) * NAN), ValueError, r"loss of gradient row 0 is nan"),
    ("collect detached loss", lambda: collect(loss=lambda n, b: loss_fn(n, b).detach()), ValueError,
     r"does not require grad: loss_fn returned a detached loss"),
    ("collect per-sample detached loss",  # torch.func would return zero gradients without the check
     lambda: collect(loss=lambda n, b: loss_fn(n, b).detach(), per_sample=True), ValueError,
     r"a per-sample loss does not require grad: loss_fn returned a detached loss"),
    ("collect per-sample loss float", lambda: collect(loss=lambda n, b: 1.0, per_sample=True), TypeError,
     r"loss_fn must return a scalar torch.Tensor, got float"),
    ("collect per-sample batch int", lambda: collect(batches=[3], per_sample=True), TypeError, r"a batch must be a tensor"),
    ("collect frozen param", lambda: collect(net=_frozen(), params=["0.weight"]), ValueError, r"requires_grad=False"),
    ("collect masked without masks", lambda: collect(masked=True), ValueError, r"masked=True needs params to be a ParamSpace"),
    ("evaluate loss float", lambda: mfac.evaluate_loss(model(), lambda n, b: 1.0, data()), TypeError,
     r"loss_fn must return a scalar torch.Tensor, got float"),
    ("evaluate loss vector", lambda: mfac.evaluate_loss(model(), lambda n, b: n(b[0]), data()), ValueError,
     r"scalar loss, got shape \(2, 3\)"),
    ("evaluate empty", lambda: mfac.evaluate_loss(model(), loss_fn, []), ValueError, r"no batches"),
    ("evaluate max_batches 0", lambda: mfac.evaluate_loss(model(), loss_fn, data(), 0), ValueError, r"max_batches must be >= 1"),
    # --- prune_oneshot / obs_scores
    ("prune sparsity True", lambda: oneshot(True), TypeError, r"sparsity must be a float in \[0, 1\], got the bool True"),
    ("prune sparsity 1.5", lambda: oneshot(1.5), ValueError, r"sparsity must lie in \[0, 1\], got 1.5"),
    ("prune sparsity -0.1", lambda: oneshot(-0.1), ValueError, r"sparsity must lie in \[0, 1\], got -0.1"),
    ("prune sparsity str", lambda: oneshot("0.5"), TypeError, r"sparsity must be a float in \[0, 1\], got str"),
    ("prune sparsity None", lambda: oneshot(None), ValueError, r"give a target sparsity or an N:M pattern"),
    ("prune dict unknown name", lambda: oneshot({"0.weight": 0.5, "2.weihgt": 0.5, "2.weight": 0.5}), ValueError,
     r"unknown names \['2.weihgt'\], missing \[\]"),
    ("prune dict missing name", lambda: oneshot({"0.weight": 0.5}), ValueError, r"missing \['2.weight'\]"),
    ("prune dict sparsity > 1", lambda: oneshot({"0.weight": 0.5, "2.weight": 1.5}), ValueError,
     r"sparsity\['2.weight'\] must lie in \[0, 1\], got 1.5"),
    ("prune dict sparsity bool", lambda: oneshot({"0.weight": True, "2.weight": 0.5}), TypeError, r"sparsity\['0.weight'\]"),
    ("prune recompute abc", lambda: oneshot(recompute="abc"), TypeError, r"recompute must be an int >= 1 or a list of sparsities, got str 'abc'"),
    ("prune recompute 0", lambda: oneshot(recompute=0), ValueError, r"recompute must be >= 1, got 0"),
    ("prune recompute True", lambda: oneshot(recompute=True), TypeError, r"recompute must be an int"),
    ("prune recompute 2.5", lambda: oneshot(recompute=2.5), TypeError, r"recompute must be an int"),
    ("prune recompute list > 1", lambda: oneshot(recompute=[0.3, 1.2]), ValueError, r"recompute\[1\] must lie in \[0, 1\]"),
    ("prune recompute decreasing", lambda: oneshot(recompute=[0.4, 0.3, 0.5]), ValueError, r"must not decrease"),
    ("prune recompute wrong end", lambda: oneshot(recompute=[0.2, 0.4]), ValueError, r"last recompute sparsity must be the target"),
    ("prune recompute list of str", lambda: oneshot(recompute=["a"]), TypeError, r"recompute\[0\] must be a float"),
    ("prune update", lambda: oneshot(update="exact"), ValueError, r"update must be one of \('joint', 'independent', 'none'\)"),
    ("prune scope", lambda: oneshot(scope="model"), ValueError, r"scope must be one of \('global', 'layer'\)"),
    ("prune curvature", lambda: oneshot(curvature="hessian"), ValueError, r"curvature must be 'fisher', 'diagonal'"),
    ("prune pattern", lambda: oneshot(None, pattern="2-4"), ValueError, r"pattern must look like 'N:M'"),
    ("prune pattern 4:2", lambda: oneshot(None, pattern="4:2"), ValueError, r"needs 1 <= N < M"),
    ("prune pattern list", lambda: oneshot(None, pattern=[2, 4]), TypeError, r"pattern must be a string 'N:M' or a tuple"),
    ("prune pattern vs sparsity", lambda: oneshot(0.3, pattern="2:4"), ValueError, r"pattern 2:4 means sparsity 0.5"),
    ("prune params str", lambda: oneshot(params="0.weight"), TypeError, r"params must be a list of parameter names, got the string"),
    ("prune params unknown", lambda: oneshot(params=["0.weight", "9.weight"]), ValueError, r"'9.weight' is not a parameter"),
    ("prune params empty", lambda: oneshot(params=[]), ValueError, r"params must name at least one parameter"),
    ("prune params twice", lambda: oneshot(params=["0.weight", "0.weight"]), ValueError, r"each parameter once"),
    ("prune model not module", lambda: mprune.prune_oneshot("m", loss_fn, data(), 0.5, **FISHER), TypeError,
     r"model must be a torch.nn.Module"),
    ("prune no prunable", lambda: mprune.prune_oneshot(nn.Tanh(), loss_fn, data(), 0.5, **FISHER), ValueError,
     r"has no Linear or Conv weights"),
    ("prune meta model", lambda: oneshot(net=model().to("meta")), ValueError, r"parameter '0.weight' is on the meta device"),
    ("prune masks list", lambda: oneshot(masks=[BOOL44]), TypeError, r"masks must be a dict"),
    ("prune masks float", lambda: oneshot(masks={"0.weight": torch.ones(4, 4)}), TypeError, r"mask of '0.weight' must have dtype torch.bool"),
    ("prune masks shape", lambda: oneshot(masks={"0.weight": torch.ones(4, 3, dtype=torch.bool)}), ValueError,
     r"mask of '0.weight' must have the parameter's shape \(4, 4\)"),
    ("prune masks unknown", lambda: oneshot(masks={"1.weight": BOOL44}), ValueError, r"not pruned here: \['1.weight'\]"),
    ("prune loss not callable", lambda: oneshot(loss=None), TypeError, r"loss_fn must be callable"),
    ("prune data None", lambda: oneshot(batches=3), TypeError, r"data must be an iterable of batches"),
    ("prune ngrads 0", lambda: oneshot(ngrads=0), ValueError, r"ngrads must be >= 1, got 0"),
    ("prune block_size 0", lambda: oneshot(block_size=0), ValueError, r"block_size must be >= 1"),
    ("prune collect params", lambda: oneshot(collect={"params": ["x"]}), ValueError, r"collect may not set 'params'"),
    ("prune relative_damp custom", lambda: oneshot(curvature=mprune.IdentityCurvature(), relative_damp=True), ValueError,
     r"relative_damp is an option of the built-in curvatures"),
    ("prune half model damp", lambda: oneshot(net=model(torch.float16), batches=data(dtype=torch.float16), damp=1e-6),
     ValueError, r"too small for torch.float16"),
    ("prune detached loss", lambda: oneshot(loss=lambda n, b: loss_fn(n, b).detach()), ValueError, r"does not require grad"),
    ("scores params unknown", lambda: scores(params=["x"]), ValueError, r"'x' is not a parameter"),
    ("scores curvature", lambda: scores(curvature=3), ValueError, r"curvature must be"),
    ("scores masks bool list", lambda: scores(masks={"0.weight": [[True]]}), TypeError, r"must be a torch.bool tensor"),
    # --- GradualPruner: everything checked in __init__
    ("gradual schedule", lambda: mprune.GradualPruner(model(), loss_fn, data(), 0.5), TypeError, r"schedule must be a PruningSchedule"),
    ("gradual unknown kwarg", lambda: gradual(dampp=1e-2), TypeError, r"unknown keyword arguments \['dampp'\]"),
    ("gradual sparsity kwarg", lambda: gradual(sparsity=0.5), TypeError, r"GradualPruner sets 'sparsity' itself"),
    ("gradual damp -1", lambda: gradual(damp=-1.0), ValueError, r"damp must be finite and > 0, got -1.0"),
    ("gradual damp True", lambda: gradual(damp=True), TypeError, r"got the bool True"),
    ("gradual ngrads 0", lambda: gradual(ngrads=0), ValueError, r"ngrads must be >= 1"),
    ("gradual update", lambda: gradual(update="exact"), ValueError, r"update must be one of"),
    ("gradual recompute abc", lambda: gradual(recompute="abc"), TypeError, r"recompute must be an int >= 1 or a list"),
    ("gradual scope", lambda: gradual(scope="x"), ValueError, r"scope must be one of"),
    ("gradual curvature", lambda: gradual(curvature="x"), ValueError, r"curvature must be"),
    ("gradual params", lambda: gradual(params=["nope"]), ValueError, r"'nope' is not a parameter"),
    ("gradual optimizers", lambda: gradual(optimizers=["sgd"]), TypeError, r"optimizers must be torch.optim.Optimizer"),
    # --- schedules
    ("cubic final 1", lambda: mprune.CubicSchedule(1.0, 0, 10), ValueError, r"final_sparsity must lie in \[0, 1\), got 1.0"),
    ("cubic final True", lambda: mprune.CubicSchedule(True, 0, 10), TypeError, r"final_sparsity must be a float"),
    ("cubic initial > final", lambda: mprune.CubicSchedule(0.5, 0, 10, initial_sparsity=0.6), ValueError, r"must be <= final_sparsity"),
    ("cubic end < begin", lambda: mprune.CubicSchedule(0.5, 10, 5), ValueError, r"end_step must be >= begin_step"),
    ("cubic begin -1", lambda: mprune.CubicSchedule(0.5, -1, 5), ValueError, r"begin_step must be >= 0, got -1"),
    ("cubic begin float", lambda: mprune.CubicSchedule(0.5, 1.5, 5), TypeError, r"begin_step must be an int"),
    ("cubic frequency 0", lambda: mprune.CubicSchedule(0.5, 0, 10, frequency=0), ValueError, r"frequency must be >= 1"),
    ("cubic not multiple", lambda: mprune.CubicSchedule(0.5, 0, 10, frequency=3), ValueError, r"must be a multiple of frequency"),
    ("step schedule empty", lambda: mprune.StepSchedule([]), ValueError, r"needs at least one \(step, sparsity\) pair"),
    ("step schedule int", lambda: mprune.StepSchedule(5), TypeError, r"steps must be an iterable of \(step, sparsity\) pairs, got int"),
    ("step schedule dict", lambda: mprune.StepSchedule({10: 0.5}), TypeError, r"got dict"),
    ("step schedule single", lambda: mprune.StepSchedule([(10,)]), TypeError, r"steps\[0\] must be a \(step, sparsity\) pair, got \(10,\)"),
    ("step schedule triple", lambda: mprune.StepSchedule([(10, 0.5), (20, 0.6, 1)]), TypeError, r"steps\[1\] must be a \(step, sparsity\) pair"),
    ("step schedule float step", lambda: mprune.StepSchedule([(1.5, 0.2)]), TypeError, r"steps\[0\] step must be an int"),
    ("step schedule sparsity 1", lambda: mprune.StepSchedule([(1, 1.0)]), ValueError, r"steps\[0\] sparsity must lie in \[0, 1\)"),
    ("step schedule decreasing", lambda: mprune.StepSchedule([(1, 0.5), (2, 0.4)]), ValueError, r"sparsities must not decrease"),
    ("step schedule same step", lambda: mprune.StepSchedule([(1, 0.2), (1, 0.4)]), ValueError, r"steps must increase"),
    ("recompute_steps k 0", lambda: mprune.recompute_steps(0.0, 0.5, 0), ValueError, r"must be an int >= 1, got 0"),
    ("recompute_steps k 2.5", lambda: mprune.recompute_steps(0.0, 0.5, 2.5), TypeError, r"must be an int >= 1, got float"),
    ("recompute_steps start > target", lambda: mprune.recompute_steps(0.6, 0.5, 2), ValueError, r"start <= target"),
    # --- masks kept through training
    ("apply_masks optimizers str", lambda: handle(optimizers="sgd"), TypeError,
     r"optimizers must be a torch.optim.Optimizer or an iterable of them, got str"),
    ("apply_masks optimizer list item", lambda: handle(optimizers=[3]), TypeError, r"got int"),
    ("apply_masks masks list", lambda: handle(masks=[BOOL44]), TypeError, r"masks must be a dict"),
    ("apply_masks float mask", lambda: handle(masks={"0.weight": torch.ones(4, 4)}), TypeError, r"must have dtype torch.bool"),
    ("apply_masks shape", lambda: handle(masks={"0.weight": torch.ones(2, 2, dtype=torch.bool)}), ValueError,
     r"must have the parameter's shape \(4, 4\)"),
    ("apply_masks unknown name", lambda: handle(masks={"x.weight": BOOL44}), ValueError, r"'x.weight' is not a parameter"),
    ("apply_masks model", lambda: mprune.apply_masks("m", {}), TypeError, r"model must be a torch.nn.Module"),
    ("torch prune float mask", lambda: mprune.apply_torch_prune(model(), {"0.weight": torch.ones(4, 4)}), TypeError,
     r"mask of '0.weight' must have dtype torch.bool"),
    ("torch prune shape", lambda: mprune.apply_torch_prune(model(), {"0.weight": BOOL44[:2]}), ValueError,
     r"mask of '0.weight' must have the parameter's shape \(4, 4\)"),
    ("attach not optimizer", lambda: handle().attach("sgd"), TypeError, r"optimizer must be a torch.optim.Optimizer"),
    # --- selection
    ("select_global sparsity 2", lambda: mprune.select_global(SCORES, 2.0), ValueError, r"sparsity must lie in \[0, 1\], got 2.0"),
    ("select_global sparsity True", lambda: mprune.select_global(SCORES, True), TypeError, r"sparsity must be a float"),
    ("select_global empty", lambda: mprune.select_global({}, 0.5), ValueError, r"scores must be a non-empty dict"),
    ("select_per_layer empty", lambda: mprune.select_per_layer({}, 0.5), ValueError, r"non-empty dict.*got \{\}"),
    ("select_global list", lambda: mprune.select_global([], 0.5), TypeError, r"scores must be a dict.*got list"),
    ("select_global NaN score", lambda: mprune.select_global({"a": torch.tensor([NAN, 1.0])}, 0.5), ValueError, r"score of 'a' has NaN"),
    ("select_global keep unknown", lambda: mprune.select_global(SCORES, 0.5, keep={"c": torch.ones(1, dtype=torch.bool)}),
     ValueError, r"keep masks given for parameters without scores: \['c'\]"),
    ("select_global keep float", lambda: mprune.select_global(SCORES, 0.5, keep={"a": torch.ones(2, 4)}), TypeError,
     r"keep mask of 'a' must have dtype torch.bool .*got torch.float32; convert with .bool\(\)"),
    ("select_per_layer dict extra", lambda: mprune.select_per_layer(SCORES, {"a": 0.5, "b": 0.5, "c": 0.5}), ValueError,
     r"extra \['c'\]"),
    ("select_per_layer dict > 1", lambda: mprune.select_per_layer(SCORES, {"a": 0.5, "b": 1.5}), ValueError, r"sparsity\['b'\]"),
    ("select_nm rows", lambda: mprune.select_nm({"a": torch.rand(2, 3)}, 2, 4), ValueError, r"divisible by 4"),
    ("parse_pattern 0:4", lambda: mprune.parse_pattern("0:4"), ValueError, r"needs 1 <= N < M"),
    ("parse_pattern int", lambda: mprune.parse_pattern(4), TypeError, r"pattern must be a string"),
    # --- OBS formulas on an operator
    ("saliency w shape", lambda: mprune.obs_saliency(torch.zeros(5), static()), ValueError, r"w must have shape \(6,\)"),
    ("saliency w dtype", lambda: mprune.obs_saliency(torch.zeros(6).double(), static()), TypeError,
     r"w must have dtype torch.float32 \(the operator's\)"),
    ("saliency w list", lambda: mprune.obs_saliency([0.0] * 6, static()), TypeError, r"w must be a torch.Tensor"),
    ("independent removed float", lambda: mprune.independent_update(torch.zeros(6), static(), torch.zeros(2)), TypeError,
     r"removed must be a 1-D integer index tensor"),
    ("independent removed mask shape", lambda: mprune.independent_update(torch.zeros(6), static(), torch.ones(5, dtype=torch.bool)),
     ValueError, r"boolean removed mask must have shape \(6,\)"),
    ("joint removed out of range", lambda: mprune.joint_update(torch.zeros(6), static(), torch.tensor([7])), IndexError,
     r"removed indices must lie in \[0, 6\)"),
    ("restricted w dtype", lambda: mprune.restricted_joint_update(torch.zeros(6).double(), G(), 1e-2, torch.tensor([0])),
     TypeError, r"w must have dtype torch.float32"),
    ("restricted w shape", lambda: mprune.restricted_joint_update(torch.zeros(5), G(), 1e-2, torch.tensor([0])),
     ValueError, r"w must have shape \(6,\)"),
    ("restricted w list", lambda: mprune.restricted_joint_update([0.0], G(), 1e-2, torch.tensor([0])), TypeError,
     r"w must be a torch.Tensor"),
    ("restricted grads NaN", lambda: mprune.restricted_joint_update(torch.zeros(6), with_value(G(), NAN), 1e-2, torch.tensor([0])),
     ValueError, r"grads must be finite"),
]


def _with_mask(mask):
    ps = params()
    return mfac.MFAC(ps, masks={ps[0]: mask})


def _frozen():
    net = model()
    net[0].weight.requires_grad_(False)
    return net


def _damp_changed(damp):
    opt, ps = stepped(steps=1)
    opt.param_groups[0]["damp"] = damp
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()


def _sparse_step():
    emb = nn.Embedding(5, 2, sparse=True)
    opt = mfac.MFAC(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()


def test_the_table_is_large_and_ids_are_unique():
    ids = Counter(case[0] for case in CASES)
    assert not [i for i, n in ids.items() if n > 1]
    assert len(CASES) >= 150


@pytest.mark.parametrize(("call", "error", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message) as info:
        call()
    assert type(info.value) is error  # the exact type, not a subclass (KeyError is not a ValueError)


def test_collect_refuses_meta_parameters():
    with pytest.raises(ValueError, match=r"parameter '0.weight' is on the meta device"):
        collect(net=model().to("meta"))


# ---------------------------------------------------------------------------------------- one mask contract
def _mfac_with(mask):
    net = model()
    return mfac.MFAC(net.parameters(), masks={net[0].weight: mask})


def _select_groups_with(mask):
    scores_ = {"0.weight": torch.rand(4, 4)}
    labels = mprune.group_labels(scores_, "block:2")
    return mprune.select_groups(scores_, labels, 0.5, keep={"0.weight": mask})


#: every public entry point that takes masks, each given the mask of "0.weight" (shape (4, 4))
MASK_ENTRY_POINTS = {
    "ParamSpace": lambda m: space(masks={"0.weight": m}),
    "MFAC": _mfac_with,
    "prune_oneshot": lambda m: oneshot(masks={"0.weight": m}),
    "obs_scores": lambda m: scores(masks={"0.weight": m}),
    "apply_masks": lambda m: handle(masks={"0.weight": m}),
    "apply_torch_prune": lambda m: mprune.apply_torch_prune(model(), {"0.weight": m}),
    "select_global keep": lambda m: mprune.select_global({"0.weight": torch.rand(4, 4)}, 0.5, keep={"0.weight": m}),
    "select_groups keep": _select_groups_with,
}
BAD_MASKS = {
    "0/1 float": (lambda: torch.ones(4, 4), TypeError, r"must have dtype torch.bool \(True = kept\), got torch.float32"),
    "nested list": (lambda: [[True] * 4] * 4, TypeError, r"must be a torch.bool tensor \(True = kept\), got list"),
    "wrong shape": (lambda: torch.ones(4, 3, dtype=torch.bool), ValueError, r"shape \(4, 4\), got \(4, 3\)"),
    "meta": (lambda: torch.ones(4, 4, dtype=torch.bool, device="meta"), ValueError, r"meta"),
}


@pytest.mark.parametrize("bad", BAD_MASKS.values(), ids=BAD_MASKS.keys())
@pytest.mark.parametrize("entry", MASK_ENTRY_POINTS.values(), ids=MASK_ENTRY_POINTS.keys())
def test_one_mask_contract_at_every_entry_point(entry, bad):
    make, error, message = bad
    with pytest.raises(error, match=message) as info:
        entry(make())
    assert type(info.value) is error


@pytest.mark.parametrize("entry", MASK_ENTRY_POINTS.values(), ids=MASK_ENTRY_POINTS.keys())
def test_every_mask_entry_point_accepts_a_good_mask(entry):
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[0, :2] = False
    entry(keep)  # the contract's positive side: no entry point refuses a valid bool mask


def test_name_keyed_entry_points_refuse_a_non_mapping_the_same_way():
    for call in (lambda: space(masks=[BOOL44]), lambda: oneshot(masks=[BOOL44]), lambda: handle(masks=[BOOL44]),
                 lambda: mprune.apply_torch_prune(model(), [BOOL44])):
        with pytest.raises(TypeError, match=r"masks must be a dict \{name: bool tensor\}, got list"):
            call()


def test_apply_torch_prune_checks_every_mask_before_reparametrizing():
    net = model()
    with pytest.raises(TypeError, match=r"mask of '2.weight'"):
        mprune.apply_torch_prune(net, {"0.weight": BOOL44, "2.weight": torch.ones(3, 4)})
    assert "weight_mask" not in net[0]._buffers and "weight_orig" not in net[0]._parameters
