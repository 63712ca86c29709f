"""The pruner on small models: scores, one-shot pruning, recomputation, N:M, masks through training,
the torch.nn.utils.prune bridge, baselines, the gradual pruner."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as nnf
from torch import nn
from torch.nn.utils import prune as torch_prune

from mfac.collect import collect_grads
from mfac.prune import (
    CubicSchedule,
    GradualPruner,
    StepSchedule,
    apply_masks,
    apply_torch_prune,
    check_nm,
    diagonal_fisher_scores,
    magnitude_prune,
    magnitude_scores,
    mask_sparsity,
    obs_scores,
    prune_oneshot,
    restricted_joint_update,
    select_global,
)

NAMES = ["0.weight", "2.weight"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).to(dtype)


def _data(n: int = 96, batch: int = 4, dtype=torch.float64, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen, dtype=dtype)
    y = torch.randint(0, 4, (n,), generator=gen)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def loss_fn(model, batch):
    x, y = batch
    return nnf.cross_entropy(model(x), y)


def _copy(model: nn.Module) -> nn.Module:
    clone = _model(dtype=next(model.parameters()).dtype)
    clone.load_state_dict(model.state_dict())
    return clone


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------- scores
def test_obs_scores_keys_shapes_values():
    model, data = _model(), _data()
    scores = obs_scores(model, loss_fn, data, ngrads=16, damp=1e-2)
    params = dict(model.named_parameters())
    assert list(scores) == NAMES
    for n, s in scores.items():
        assert s.shape == params[n].shape and bool((s >= 0).all())
    # against the dense float64 formula
    grads = collect_grads(model, loss_fn, data, 16, params=NAMES)
    fisher = 1e-2 * torch.eye(grads.shape[1], dtype=torch.float64) + grads.T @ grads / 16
    w = torch.cat([params[n].detach().reshape(-1) for n in NAMES])
    expected = w.square() / (2 * torch.linalg.inv(fisher).diagonal())
    torch.testing.assert_close(torch.cat([scores[n].reshape(-1) for n in NAMES]), expected)
    # block-diagonal scores differ from full ones, parameters unchanged
    before = _weights(model)
    blocked = obs_scores(model, loss_fn, data, ngrads=16, damp=1e-2, block_size=8)
    assert not torch.allclose(blocked["0.weight"], scores["0.weight"])
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_baseline_scores():
    model, data = _model(), _data()
    params = dict(model.named_parameters())
    mag = magnitude_scores(model)
    for n in NAMES:
        torch.testing.assert_close(mag[n], params[n].detach().abs())
    diag = diagonal_fisher_scores(model, loss_fn, data, ngrads=16, damp=1e-2)
    grads = collect_grads(model, loss_fn, data, 16, params=NAMES)
    fdiag = 1e-2 + grads.square().mean(0)
    w = torch.cat([params[n].detach().reshape(-1) for n in NAMES])
    torch.testing.assert_close(torch.cat([diag[n].reshape(-1) for n in NAMES]), w.square() * fdiag / 2)


# ---------------------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("update", ["joint", "independent", "none"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_fisher_proportional_to_identity_reduces_to_magnitude(update, scope):
    """Zero gradients: F = damp I. OBS picks the smallest |w| and leaves the kept weights alone."""
    model, data = _model(), _data()

    def zero_loss(m, batch):
        return 0.0 * m(batch[0]).sum()

    reference = _copy(model)
    expected = magnitude_prune(reference, 0.6, scope=scope)
    before = _weights(model)
    masks = prune_oneshot(model, zero_loss, data, 0.6, ngrads=8, damp=0.5, update=update, scope=scope)
    for n in NAMES:
        assert torch.equal(masks[n], expected[n])
        p = dict(model.named_parameters())[n].detach()
        torch.testing.assert_close(p, before[n] * masks[n], rtol=0, atol=1e-15)


def test_joint_update_of_the_pruner_is_the_restricted_formula():
    model, data = _model(), _data()
    grads = collect_grads(model, loss_fn, data, 16, params=NAMES)
    params = dict(model.named_parameters())
    w = torch.cat([params[n].detach().reshape(-1) for n in NAMES])
    scores = obs_scores(model, loss_fn, data, ngrads=16, damp=1e-2)
    masks_ref = select_global(scores, 0.5)
    removed = ~torch.cat([masks_ref[n].reshape(-1) for n in NAMES])
    expected = w + restricted_joint_update(w, grads, 1e-2, removed)
    masks = prune_oneshot(model, loss_fn, data, 0.5, ngrads=16, damp=1e-2, update="joint")
    got = torch.cat([params[n].detach().reshape(-1) for n in NAMES])
    assert all(torch.equal(masks[n], masks_ref[n]) for n in NAMES)
    torch.testing.assert_close(got, expected)
    assert bool((got[removed] == 0).all())


@pytest.mark.parametrize(
    ("kwargs"),
    [
        {"recompute": 3},
        {"recompute": [0.2, 0.5, 0.8]},
        {"block_size": 8, "recompute": 2},
        {"block_size": 64},  # B > m: Woodbury blocks
        {"update": "independent", "recompute": 2},
        {"scope": "layer", "recompute": 2},
        {"curvature": "diagonal"},
    ],
)
def test_exact_sparsity_and_zeros(kwargs):
    model, data = _model(dtype=torch.float32), _data(dtype=torch.float32)
    masks = prune_oneshot(model, loss_fn, data, 0.8, ngrads=16, damp=1e-2, **kwargs)
    params = dict(model.named_parameters())
    total = sum(params[n].numel() for n in NAMES)
    pruned = sum(int((~masks[n]).sum()) for n in NAMES)
    if kwargs.get("scope") == "layer":
        assert [int((~masks[n]).sum()) for n in NAMES] == [round(0.8 * 64), round(0.8 * 32)]
    else:
        assert pruned == round(0.8 * total)
    for n in NAMES:
        assert bool((params[n][~masks[n]] == 0).all())
        assert bool(torch.isfinite(params[n]).all())
    assert torch.equal(params["0.bias"], _model(dtype=torch.float32)[0].bias)  # biases untouched


def test_recompute_collects_fresh_gradients_each_step():
    model, data = _model(), _data()
    calls = []

    def counting_loss(m, batch):
        calls.append(1)
        return loss_fn(m, batch)

    prune_oneshot(model, counting_loss, data, 0.7, ngrads=10, damp=1e-2, recompute=3)
    assert len(calls) == 30


def test_earlier_masks_stay_pruned():
    model, data = _model(), _data()
    first = prune_oneshot(model, loss_fn, data, 0.4, ngrads=16, damp=1e-2)
    second = prune_oneshot(model, loss_fn, data, 0.7, ngrads=16, damp=1e-2, masks=first)
    for n in NAMES:
        assert not bool((second[n] & ~first[n]).any())
    assert mask_sparsity(second) == pytest.approx(round(0.7 * 96) / 96)
    # asking for less than what is pruned changes nothing
    before = _weights(model)
    third = prune_oneshot(model, loss_fn, data, 0.5, ngrads=16, damp=1e-2, masks=second)
    assert all(torch.equal(third[n], second[n]) for n in NAMES)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("recompute", [1, 2])
def test_nm_pattern(pattern, recompute):
    model, data = _model(), _data()
    masks = prune_oneshot(model, loss_fn, data, pattern=pattern, ngrads=16, damp=1e-2, recompute=recompute)
    n, m = (int(v) for v in pattern.split(":"))
    params = dict(model.named_parameters())
    for name in NAMES:
        assert bool((masks[name].reshape(-1, m).sum(1) == n).all())
        assert check_nm(masks[name], n, m)
        assert bool((params[name][~masks[name]] == 0).all())
    with pytest.raises(ValueError, match=r"means sparsity 0\.5"):
        prune_oneshot(_model(), loss_fn, data, 0.7, pattern=pattern, ngrads=4, damp=1e-2)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"update": "exact"}, ValueError, "update must be one of"),
        ({"scope": "local"}, ValueError, "scope must be one of"),
        ({"ngrads": None}, TypeError, "needs ngrads and damp"),
        ({"damp": 0.0}, ValueError, "damp must be"),
        ({"params": ["0.weight", "nope"]}, ValueError, "nope"),
        ({"masks": {"0.weight": torch.ones(3, dtype=torch.bool)}}, ValueError, "shape"),
        ({"recompute": 0}, ValueError, "recompute"),
        ({"sparsity": 1.5}, ValueError, r"\[0, 1\]"),
        ({"curvature": "hessian"}, ValueError, "curvature must be"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    call = {"sparsity": 0.5, "ngrads": 4, "damp": 1e-2, **kwargs}
    sparsity = call.pop("sparsity")
    with pytest.raises(error, match=match):
        prune_oneshot(_model(), loss_fn, _data(), sparsity, **call)


# ---------------------------------------------------------------------------------------- masks persist
def _train(model, optimizer, data, steps=6):
    for batch in data[:steps]:
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
        lambda p: torch.optim.Adam(p, lr=0.01),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
        lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5),
    ],
)
def test_masks_survive_optimizer_steps(make_opt):
    model, data = _model(), _data()
    opt = make_opt(model.parameters())
    _train(model, opt, data)  # momentum / running averages built before pruning
    masks = prune_oneshot(model, loss_fn, data, 0.7, ngrads=16, damp=1e-2)
    handle = apply_masks(model, masks, optimizers=opt)
    _train(model, opt, data[6:], steps=10)
    params = dict(model.named_parameters())
    for n in NAMES:
        assert bool((params[n][~masks[n]] == 0).all()), n
        for value in opt.state[params[n]].values():
            if isinstance(value, torch.Tensor) and value.shape == params[n].shape:
                assert bool((value[~masks[n]] == 0).all())
    # gradients written by hand are masked before the step too
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(bool((params[n][~masks[n]] == 0).all()) for n in NAMES)
    # autograd gradients are masked as they are produced
    opt.zero_grad()
    loss_fn(model, data[0]).backward()
    assert all(bool((params[n].grad[~masks[n]] == 0).all()) for n in NAMES)
    # releasing the handle releases the hooks
    handle.remove()
    opt.zero_grad()
    loss_fn(model, data[0]).backward()
    assert any(bool((params[n].grad[~masks[n]] != 0).any()) for n in NAMES)


def test_masks_with_mfac_optimizer_sparse_mode():
    optim = pytest.importorskip("mfac.optim")
    model, data = _model(), _data()
    masks = prune_oneshot(model, loss_fn, data, 0.7, ngrads=16, damp=1e-2)
    handle = apply_masks(model, masks)
    opt = optim.MFAC(model.parameters(), lr=0.05, ngrads=8, damp=1e-2, masks=handle.param_masks())
    handle.attach(opt)
    _train(model, opt, data, steps=12)
    params = dict(model.named_parameters())
    assert all(bool((params[n][~masks[n]] == 0).all()) for n in NAMES)
    assert any(not torch.equal(params[n][masks[n]], params[n][masks[n]] * 0) for n in NAMES)


# ---------------------------------------------------------------------------------------- bridge
def test_apply_torch_prune_reparametrizes():
    model, data = _model(), _data()
    reference = _copy(model)
    masks = prune_oneshot(model, loss_fn, data, 0.6, ngrads=16, damp=1e-2)
    apply_torch_prune(model, masks)
    assert torch_prune.is_pruned(model)
    for n in NAMES:
        module = model.get_submodule(n.split(".")[0])
        assert torch.equal(module.weight_mask.bool(), masks[n])
    x = data[0][0]
    masks_ref = prune_oneshot(reference, loss_fn, data, 0.6, ngrads=16, damp=1e-2)
    assert all(torch.equal(masks_ref[n], masks[n]) for n in NAMES)
    torch.testing.assert_close(model(x), reference(x))


def test_prune_oneshot_on_torch_pruned_model_writes_weight_orig():
    model, data = _model(), _data()
    torch_prune.l1_unstructured(model[0], "weight", amount=0.3)
    old = model[0].weight_mask.bool().clone()
    plain = _model()
    plain.load_state_dict(
        {k.replace("_orig", ""): v for k, v in model.state_dict().items() if not k.endswith("_mask")}
    )
    with torch.no_grad():
        plain[0].weight.mul_(old)
    masks = prune_oneshot(model, loss_fn, data, 0.6, ngrads=16, damp=1e-2)
    assert not bool((masks["0.weight"] & ~old).any())  # torch's pruned entries stay pruned
    assert torch.equal(model[0].weight_mask.bool(), masks["0.weight"])  # its mask follows ours
    assert bool((model[0].weight_orig[~masks["0.weight"]] == 0).all())
    # same result as pruning the plain model that starts from the same masks
    masks_plain = prune_oneshot(plain, loss_fn, data, 0.6, ngrads=16, damp=1e-2, masks={"0.weight": old})
    assert all(torch.equal(masks_plain[n], masks[n]) for n in NAMES)
    torch.testing.assert_close(model[0].weight_orig.detach(), plain[0].weight.detach())
    x = data[0][0]
    torch.testing.assert_close(model(x), plain(x))
    # gradients through the reparametrization stay masked during fine-tuning
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    apply_masks(model, masks, optimizers=opt)
    _train(model, opt, data, steps=5)
    assert bool((model[0].weight_orig[~masks["0.weight"]] == 0).all())


# ---------------------------------------------------------------------------------------- gradual
@pytest.mark.parametrize(
    "schedule",
    [StepSchedule([(2, 0.3), (5, 0.6), (8, 0.8)]), CubicSchedule(0.8, 2, 8, frequency=3)],
)
def test_gradual_pruner_in_a_training_loop(schedule):
    model, data = _model(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = GradualPruner(model, loss_fn, data, schedule, ngrads=8, damp=1e-2, optimizers=[opt])
    events = []
    for step, batch in enumerate(data[:14]):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
        if pruner.step(step):
            events.append((step, pruner.sparsity))
    assert [e[0] for e in events] == schedule.pruning_steps
    assert pruner.sparsity == pytest.approx(round(0.8 * 96) / 96)
    params = dict(model.named_parameters())
    assert all(bool((params[n][~pruner.masks[n]] == 0).all()) for n in NAMES)


# ---------------------------------------------------------------------------------------- devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prune_on_device(device, dtype):
    """Everything stays on the model's device and dtype (CUDA runs when available)."""
    model = _model(dtype=dtype).to(device)
    data = [(x.to(device), y.to(device)) for x, y in _data(dtype=dtype)]
    masks = prune_oneshot(model, loss_fn, data, 0.6, ngrads=16, damp=1e-2, recompute=2, block_size=16)
    params = dict(model.named_parameters())
    for n in NAMES:
        assert masks[n].device == params[n].device and params[n].dtype == dtype
        assert bool((params[n][~masks[n]] == 0).all())
    nm = prune_oneshot(_model(dtype=dtype).to(device), loss_fn, data, pattern="2:4", ngrads=8, damp=1e-2)
    assert all(check_nm(m, 2, 4) and m.device == params[n].device for n, m in nm.items())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    apply_masks(model, masks, optimizers=opt)
    _train(model, opt, data, steps=3)
    assert all(bool((params[n][~masks[n]] == 0).all()) for n in NAMES)


@pytest.mark.parametrize("curvature", ["fisher", "diagonal"])
@pytest.mark.parametrize("update", ["joint", "independent"])
def test_relative_damp_is_damp_times_the_mean_fisher_diagonal(curvature, update):
    """``relative_damp=True`` equals the absolute damp ``damp * mean(G^2)`` of the same gradients."""
    data, m = _data(), 16
    model = _model()
    grads = collect_grads(model, loss_fn, data, m, params=NAMES)
    mu = grads.square().mean().item()  # the mean diagonal entry of (1/m) G^T G
    rel, ab = _copy(model), _copy(model)
    kw = {"ngrads": m, "update": update, "curvature": curvature, "params": NAMES}
    masks_rel = prune_oneshot(rel, loss_fn, data, 0.5, damp=0.3, relative_damp=True, **kw)
    masks_abs = prune_oneshot(ab, loss_fn, data, 0.5, damp=0.3 * mu, **kw)
    for name in NAMES:
        assert torch.equal(masks_rel[name], masks_abs[name])
    for p, q in zip(rel.parameters(), ab.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    s_rel = obs_scores(model, loss_fn, data, ngrads=m, damp=0.3, relative_damp=True, params=NAMES)
    s_abs = obs_scores(model, loss_fn, data, ngrads=m, damp=0.3 * mu, params=NAMES)
    for name in NAMES:
        torch.testing.assert_close(s_rel[name], s_abs[name], rtol=1e-10, atol=0.0)
    # and it differs from reading 0.3 as absolute (the test can fail)
    s_plain = obs_scores(model, loss_fn, data, ngrads=m, damp=0.3, params=NAMES)
    assert not torch.allclose(s_plain[NAMES[0]], s_rel[NAMES[0]], rtol=1e-3)


def test_relative_damp_refuses_zero_gradients_and_custom_curvatures():
    model = _model()
    zero = [(torch.zeros(4, 8, dtype=torch.float64), torch.zeros(4, dtype=torch.long))] * 8

    def flat(model, batch):  # a loss with zero gradient everywhere
        return 0.0 * loss_fn(model, batch)

    with pytest.raises(ValueError, match="relative_damp needs gradients with a finite, positive mean"):
        prune_oneshot(model, flat, zero, 0.5, ngrads=8, damp=0.1, relative_damp=True)
    from mfac.prune import IdentityCurvature

    with pytest.raises(ValueError, match="relative_damp is an option of the built-in curvatures"):
        prune_oneshot(model, loss_fn, _data(), 0.5, curvature=IdentityCurvature(), relative_damp=True)
