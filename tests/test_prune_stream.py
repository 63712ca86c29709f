"""The pruner on the streaming route: same results as the materialised route, no m x d tensor, all-or-nothing
steps when the data runs out, the up-front memory check, gradient streams, and group OBS."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as nnf
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import mfac.numerics
from mfac.collect import collect_grads, stream_grads
from mfac.prune import (
    FisherCurvature,
    GradualPruner,
    StepSchedule,
    group_labels,
    obs_scores,
    prune_oneshot,
    select_groups,
)

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ["0.weight", "2.weight"]


def _model(seed: int = 0, dtype=torch.float64, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 4)).to(dtype)


def _data(n: int = 64, batch: int = 4, dtype=torch.float64, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen, dtype=dtype)
    y = torch.randint(0, 4, (n,), generator=gen)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def loss_fn(model, batch):
    x, y = batch
    return nnf.cross_entropy(model(x), y)


class Materialised(FisherCurvature):
    """The same Fisher through ``G`` and ``StaticInverseFisher`` (the route before streaming existed)."""

    def streams(self, kept: int) -> bool:
        return False


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------- routes
def test_streaming_route_is_taken_and_equals_the_materialised_one():
    data = _data()
    curv = FisherCurvature(loss_fn, data, ngrads=16, damp=1e-2, block_size=6)
    assert curv.streams(100) and not FisherCurvature(loss_fn, data, ngrads=4, damp=1e-2, block_size=6).streams(100)
    for update in ("joint", "independent"):
        for recompute in (1, 3):
            results = []
            for cls in (FisherCurvature, Materialised):
                model = _model()
                source = cls(loss_fn, data, ngrads=16, damp=1e-2, block_size=6, relative_damp=True)
                masks = prune_oneshot(model, None, None, 0.6, params=NAMES, curvature=source,
                                      update=update, recompute=recompute)
                results.append((masks, _weights(model)))
            (ms, ws), (mm, wm) = results
            for n in NAMES:
                assert torch.equal(ms[n], mm[n]), (update, recompute, n)
                torch.testing.assert_close(ws[n], wm[n], rtol=1e-9, atol=1e-11)
    streamed = obs_scores(_model(), loss_fn, data, ngrads=16, damp=1e-2, block_size=6)
    source = Materialised(loss_fn, data, ngrads=16, damp=1e-2, block_size=6)
    from mfac.params import ParamSpace

    model = _model()
    space = ParamSpace.from_module(model, NAMES)
    source.prepare(model, space)
    flat = source.saliency(space.param_vector())
    torch.testing.assert_close(torch.cat([streamed[n].reshape(-1) for n in NAMES]), flat)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation creates."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("update", ["joint", "independent"])
def test_the_streaming_route_creates_no_m_by_d_tensor(update):
    """d = 2080 pruned weights, m = 64: G has 133k entries; the stream's largest tensor is far smaller."""
    model = _model(width=256, dtype=torch.float32)
    data = _data(n=256, batch=4, dtype=torch.float32)
    m, d, block = 64, 8 * 256 + 256 * 4, 8
    with LargestTensor() as probe:
        prune_oneshot(model, loss_fn, data, 0.5, params=NAMES, ngrads=m, damp=1e-3, block_size=block,
                      update=update, recompute=2)
    assert probe.largest < m * d / 4, probe.largest  # statistics d * B, a chunk of 8 rows
    with LargestTensor() as probe:  # the check can fail: the Woodbury route does build G
        prune_oneshot(_model(width=256, dtype=torch.float32), loss_fn, data, 0.5, params=NAMES, ngrads=m,
                      damp=1e-3, block_size=None, update=update)
    assert probe.largest >= m * d


# ---------------------------------------------------------------------------------------- failures
def test_data_running_out_midway_restores_the_weights():
    model = _model()
    before = _weights(model)
    gen = (b for b in _data(n=4 * 24))  # a one-shot iterator of 24 batches; 2 steps x 16 needed
    with pytest.raises(ValueError, match=r"data ran out.*restored"):
        prune_oneshot(model, loss_fn, gen, 0.7, params=NAMES, ngrads=16, damp=1e-2, block_size=4, recompute=2)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_too_few_batches_are_refused_before_any_gradient():
    calls = []

    def counting_loss(model, batch):
        calls.append(1)
        return loss_fn(model, batch)

    model = _model()
    with pytest.raises(ValueError, match=r"has 8 batches.*ngrads=16.*nothing was changed"):
        prune_oneshot(model, counting_loss, _data(n=32), 0.5, params=NAMES, ngrads=16, damp=1e-2,
                      block_size=4)
    assert not calls
    # with cycle the same data is fine
    prune_oneshot(model, counting_loss, _data(n=32), 0.5, params=NAMES, ngrads=16, damp=1e-2, block_size=4,
                  collect={"cycle": True})
    assert calls


def test_gradual_pruner_keeps_its_masks_when_a_step_fails():
    model = _model()
    pruner = GradualPruner(model, loss_fn, (b for b in _data(n=4 * 10)), StepSchedule([(0, 0.5)]),
                           ngrads=16, damp=1e-2, block_size=4, params=NAMES)
    before = _weights(model)
    with pytest.raises(ValueError, match="restored"):
        pruner.step(0)
    assert pruner.sparsity == 0.0
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])


def test_woodbury_memory_is_checked_up_front(monkeypatch):
    monkeypatch.setattr(mfac.numerics, "available_memory", lambda device=None: 10_000)
    calls = []

    def counting_loss(model, batch):
        calls.append(1)
        return loss_fn(model, batch)

    model = _model()
    before = _weights(model)
    with pytest.raises(MemoryError, match=r"needs .* only 9.77 KiB .*block_size <= ngrads.*mfac.distributed"):
        prune_oneshot(model, counting_loss, _data(), 0.5, params=NAMES, ngrads=16, damp=1e-2)
    with pytest.raises(MemoryError, match="streaming block Fisher"):
        obs_scores(model, counting_loss, _data(), ngrads=16, damp=1e-2, block_size=8, params=NAMES)
    assert not calls
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])


# ---------------------------------------------------------------------------------------- streams
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 7, 50])
def test_stream_grads_concatenate_to_collect_grads(per_sample, chunk):
    model, data = _model(), _data(n=40, batch=3)
    expected = collect_grads(model, loss_fn, data, 11, params=NAMES, per_sample=per_sample)
    parts = [c.clone() for c in stream_grads(model, loss_fn, data, 11, chunk=chunk, params=NAMES,
                                             per_sample=per_sample)]
    assert all(p.shape[0] <= chunk for p in parts)
    torch.testing.assert_close(torch.cat(parts), expected)


def test_stream_grads_checks_arguments_eagerly_and_restores_the_mode():
    model = _model()
    with pytest.raises(ValueError, match="chunk"):
        stream_grads(model, loss_fn, _data(), 4, chunk=0)
    model.train()
    stream = stream_grads(model, loss_fn, _data(), 4, chunk=2, train=False)
    next(stream)
    assert not model.training
    stream.close()
    assert model.training


# ---------------------------------------------------------------------------------------- groups
def test_group_labels_specs():
    params = {"a": torch.zeros(3, 8), "b": torch.zeros(2, 4)}
    labels = group_labels(params, "block:4")
    assert labels["a"].tolist()[0] == [0, 0, 0, 0, 1, 1, 1, 1] and int(labels["b"].min()) == 6
    rows = group_labels(params, {"a": "rows"})  # b: unstructured
    assert rows["a"][:, 0].tolist() == [0, 1, 2] and rows["b"].unique().numel() == 8
    heads = torch.tensor([[5, 5, 9, 9]] * 2)
    assert group_labels({"b": torch.zeros(2, 4)}, heads)["b"].tolist() == [[0, 0, 1, 1]] * 2
    with pytest.raises(ValueError, match="divisible by 3"):
        group_labels(params, "block:3")
    with pytest.raises(ValueError, match="group spec"):
        group_labels(params, "cols")
    with pytest.raises(ValueError, match="not pruned here"):
        group_labels(params, {"c": "rows"})


def test_select_groups_removes_whole_groups_nearest_the_target():
    labels = {"a": torch.arange(12).reshape(3, 4) // 4}  # rows
    scores = {"a": torch.tensor([[3.0] * 4, [1.0] * 4, [2.0] * 4])}
    out = select_groups(scores, labels, 0.5)  # target 6 weights: one row (4) is nearer than two (8)
    assert out["a"].tolist() == [[True] * 4, [False] * 4, [True] * 4]
    out = select_groups(scores, labels, 0.6, keep=out)  # 7.2 -> 7: 4 already, one more row (8) is nearer
    assert out["a"].tolist() == [[True] * 4, [False] * 4, [False] * 4]


@pytest.mark.parametrize("groups", ["block:4", "rows", {"0.weight": "rows"}])
@pytest.mark.parametrize("update", ["joint", "independent"])
def test_group_pruning_removes_whole_groups(groups, update):
    model, data = _model(), _data()
    masks = prune_oneshot(model, loss_fn, data, 0.5, params=NAMES, ngrads=16, damp=1e-2, block_size=4,
                          groups=groups, update=update, recompute=2)
    labels = group_labels(dict(model.named_parameters()), groups)
    for n in NAMES:
        lab, keep = labels[n].reshape(-1), masks[n].reshape(-1)
        for q in lab.unique():
            assert keep[lab == q].all() or not keep[lab == q].any(), (n, q)
        assert bool((dict(model.named_parameters())[n].detach()[~masks[n]] == 0).all())
    total = sum(m.numel() for m in masks.values())
    assert abs(sum(int((~m).sum()) for m in masks.values()) - 0.5 * total) <= 8  # one row/group of slack
    scores = obs_scores(_model(), loss_fn, data, ngrads=16, damp=1e-2, block_size=4, params=NAMES, groups=groups)
    for n in NAMES:
        lab = labels[n].reshape(-1)
        for q in lab.unique():
            vals = scores[n].reshape(-1)[lab == q]
            assert torch.all(vals == vals[0])


def test_identity_curvature_groups_are_group_magnitude():
    model = _model()
    masks = prune_oneshot(model, None, None, 0.5, params=["0.weight"], curvature="identity", groups="rows",
                          update="none")
    w = dict(_model().named_parameters())["0.weight"].detach()
    order = torch.argsort(w.square().sum(1))
    assert (~masks["0.weight"]).all(1).nonzero().squeeze(1).sort().values.tolist() == order[:4].sort().values.tolist()
    with pytest.raises(ValueError, match="pattern"):
        prune_oneshot(_model(), None, None, None, params=NAMES, curvature="identity", groups="rows", pattern="2:4")
