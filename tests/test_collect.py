"""Tests of mfac.collect: model + loss + data -> the (m, d) gradient matrix."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn
from torch.nn import functional as F

from mfac.collect import collect_grads, evaluate_loss
from mfac.params import ParamSpace

DT = torch.float64


class Net(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return Net().to(DT)


def make_data(nbatches: int, batch_size: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch_size, 4, generator=gen, dtype=DT),
         torch.randint(0, 3, (batch_size,), generator=gen))
        for _ in range(nbatches)
    ]


def ce_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def grads_by_hand(model, batches, names=None):
    """One row per batch: loss.backward(), then the grads of the chosen params in model order."""
    rows = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        ce_loss(model, batch).backward()
        rows.append(torch.cat([
            p.grad.reshape(-1) for n, p in model.named_parameters() if names is None or n in names
        ]))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


# ------------------------------------------------------------------------------- mini-batch
def test_mini_batch_rows_match_backward():
    model = make_model()
    data = make_data(6)
    G = collect_grads(model, ce_loss, data, 6)
    assert G.shape == (6, 5 * 4 + 5 + 3 * 5 + 3) and G.dtype == DT
    torch.testing.assert_close(G, grads_by_hand(model, data), rtol=0, atol=1e-14)


def test_params_subset_in_model_order():
    model = make_model()
    data = make_data(4)
    names = ["fc2.bias", "fc1.weight"]  # any order: columns follow named_parameters()
    G = collect_grads(model, ce_loss, data, 4, params=names)
    assert G.shape == (4, 20 + 3)
    torch.testing.assert_close(G, grads_by_hand(model, data, names), rtol=0, atol=1e-14)


def test_exactly_ngrads_rows_pulled_lazily():
    model = make_model()
    data = make_data(10)
    pulled = []

    def stream():
        for i, batch in enumerate(data):
            pulled.append(i)
            yield batch

    G = collect_grads(model, ce_loss, stream(), 4)
    assert G.shape[0] == 4 and pulled == [0, 1, 2, 3]  # not 3 rows (the paper's off-by-one), not 5
    torch.testing.assert_close(G, grads_by_hand(model, data[:4]), rtol=0, atol=1e-14)
    # ngrads == number of batches works
    assert collect_grads(model, ce_loss, data, 10).shape == (10, 43)


def test_cycle_restarts_data():
    model = make_model()
    data = make_data(3)
    G = collect_grads(model, ce_loss, data, 7, cycle=True)
    ref = grads_by_hand(model, data)
    torch.testing.assert_close(G, ref[[0, 1, 2, 0, 1, 2, 0]], rtol=0, atol=1e-14)


def test_unused_parameter_gives_zero_columns():
    model = make_model()
    model.unused = nn.Linear(2, 2).to(DT)
    G = collect_grads(model, ce_loss, make_data(2), 2)
    assert G.shape == (2, 43 + 6)
    assert torch.equal(G[:, 43:], torch.zeros(2, 6, dtype=DT))


def test_float32_output_and_masked_space():
    model = Net()
    data = [(x.float(), y) for x, y in make_data(3)]
    G = collect_grads(model, ce_loss, data, 3)
    assert G.dtype == torch.float32 and G.device == torch.device("cpu")
    mask = torch.rand(5, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    space = ParamSpace.from_module(model, masks={"fc1.weight": mask})
    Gk = collect_grads(model, ce_loss, data, 3, params=space, masked=True)
    assert Gk.shape == (3, space.kept_dim)
    assert torch.equal(Gk, space.restrict(G))


def test_pruned_module_reads_weight_orig():
    model = make_model()
    prune.random_unstructured(model.fc1, "weight", amount=0.5)
    data = make_data(3)
    G = collect_grads(model, ce_loss, data, 3, params=["fc1.weight"])
    mask = model.fc1.weight_mask.bool().reshape(-1)
    assert torch.equal(G[:, ~mask], torch.zeros(3, int((~mask).sum()), dtype=DT))
    ref = grads_by_hand(model, data, ["fc1.weight_orig"])
    torch.testing.assert_close(G, ref, rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------- per-sample
def per_sample_by_hand(model, batches, n):
    samples = [(x[i : i + 1], y[i : i + 1]) for x, y in batches for i in range(len(x))]
    return grads_by_hand(model, samples[:n])


def test_per_sample_matches_loop_with_partial_last_batch():
    model = make_model()
    data = make_data(3, batch_size=4)  # 12 samples, 10 asked: the last batch is used in part
    G = collect_grads(model, ce_loss, data, 10, per_sample=True)
    assert G.shape == (10, 43)
    torch.testing.assert_close(G, per_sample_by_hand(model, data, 10), rtol=0, atol=1e-13)


def test_per_sample_dict_batches_and_params():
    model = make_model()
    data = make_data(2, batch_size=3)
    dict_data = [{"x": x, "y": y} for x, y in data]

    def dict_loss(model, batch):
        return F.cross_entropy(model(batch["x"]), batch["y"])

    G = collect_grads(model, dict_loss, dict_data, 5, per_sample=True, params=["fc2.weight"])
    ref = per_sample_by_hand(model, data, 5)[:, 25:40]
    torch.testing.assert_close(G, ref, rtol=0, atol=1e-13)


def test_per_sample_with_pruned_module():
    model = make_model()
    prune.random_unstructured(model.fc1, "weight", amount=0.5)
    data = make_data(2, batch_size=3)
    G = collect_grads(model, ce_loss, data, 6, per_sample=True)
    torch.testing.assert_close(G, per_sample_by_hand(model, data, 6), rtol=0, atol=1e-13)
    # module.weight is a plain tensor again (no functorch wrapper left behind)
    assert not torch._C._functorch.is_functorch_wrapped_tensor(model.fc1.weight)
    assert torch.equal(model.fc1.weight, model.fc1.weight_orig * model.fc1.weight_mask)


def test_per_sample_dropout_in_train_mode():
    torch.manual_seed(0)
    model = Net(dropout=0.5).to(DT)
    G = collect_grads(model, ce_loss, make_data(2), 6, per_sample=True, train=True)
    assert G.shape == (6, 43) and bool(torch.isfinite(G).all())
    # rows differ from the dropout-free ones: dropout was applied
    assert not torch.allclose(G, per_sample_by_hand(model.eval(), make_data(2), 6))


def test_per_sample_vmap_failure_is_explained():
    model = make_model()

    def bad_loss(model, batch):
        loss = ce_loss(model, batch)
        if loss.item() > -1:  # data-dependent control flow: not vmap-compatible
            return loss
        return 2 * loss

    with pytest.raises(RuntimeError, match=r"per_sample=True: torch.func .*vmap-compatible"):
        collect_grads(model, bad_loss, make_data(2), 2, per_sample=True)


def test_per_sample_bad_batch():
    model = make_model()
    with pytest.raises(TypeError, match="first dimension indexes samples"):
        collect_grads(model, ce_loss, [(torch.zeros(2, 4, dtype=DT), "labels")], 1,
                      per_sample=True)
    with pytest.raises(ValueError, match=r"same number of samples.*\[2, 3\]"):
        collect_grads(model, ce_loss, [(torch.zeros(2, 4, dtype=DT), torch.zeros(3))], 1,
                      per_sample=True)


# ------------------------------------------------------------------------------- errors
def nan_loss(model, batch):
    return ce_loss(model, batch) * float("nan")


def nan_grad_loss(model, batch):
    # finite loss (0) whose gradient w.r.t. fc2.bias is 0 * inf = NaN
    return ce_loss(model, batch) * 0 + torch.sqrt(model.fc2.bias * 0).sum()


def one_shot():
    return iter(make_data(2))


ERROR_CASES = {
    "empty data": (dict(data=[]), ValueError, r"data yielded no gradients \(0 batches\)"),
    "empty cycle": (dict(data=[], cycle=True), ValueError, "must not be empty"),
    "too little data": (dict(data=make_data(3), ngrads=5), ValueError,
                        r"ran out after 3 gradients \(3 batches\), but ngrads=5"),
    "too few samples": (dict(data=make_data(2), ngrads=7, per_sample=True), ValueError,
                        "ran out after 6 gradients"),
    "one-shot cycle": (dict(data=one_shot(), ngrads=3, cycle=True), ValueError,
                       "one-shot iterator"),
    "nan loss": (dict(loss_fn=nan_loss), ValueError, "loss of gradient row 0 is nan"),
    "nan loss per-sample": (dict(loss_fn=nan_loss, per_sample=True), ValueError,
                            "loss of gradient row 0 is nan"),
    "nan grad": (dict(loss_fn=nan_grad_loss), ValueError,
                 r"gradient row 0 is not finite in parameter 'fc2.bias'"),
    "nan grad per-sample": (dict(loss_fn=nan_grad_loss, per_sample=True), ValueError,
                            r"gradient row 0 is not finite in parameter 'fc2.bias'"),
    "ngrads zero": (dict(ngrads=0), ValueError, "ngrads must be >= 1, got 0"),
    "ngrads negative": (dict(ngrads=-3), ValueError, "ngrads must be >= 1, got -3"),
    "ngrads float": (dict(ngrads=2.5), TypeError, "ngrads must be an int"),
    "ngrads bool": (dict(ngrads=True), TypeError, "ngrads must be an int"),
    "unknown params": (dict(params=["fc1.weight", "fc9.bias"]), ValueError,
                       r"unknown parameter names \['fc9.bias'\]"),
    "non-scalar loss": (dict(loss_fn=lambda m, b: m(b[0])), ValueError,
                        r"scalar loss, got shape \(3, 3\)"),
    "loss not tensor": (dict(loss_fn=lambda m, b: 1.0), TypeError, "got float"),
    "data not iterable": (dict(data=3), TypeError, r"iterable of batches .*got int"),
    "masked no masks": (dict(masked=True), ValueError, "ParamSpace with masks"),
    "foreign space": (dict(params=ParamSpace.from_module(nn.Linear(2, 2))), ValueError,
                      "not parameters of the model"),
}


@pytest.mark.parametrize("case", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_error_table(case):
    overrides, exc, pattern = case
    kwargs = dict(loss_fn=ce_loss, data=make_data(3), ngrads=2) | overrides
    with pytest.raises(exc, match=pattern):
        collect_grads(make_model(), **kwargs)


def test_frozen_param_named_is_an_error_and_skipped_by_default():
    model = make_model()
    model.fc1.bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"\['fc1.bias'\] have requires_grad=False"):
        collect_grads(model, ce_loss, make_data(2), 2, params=["fc1.bias"])
    assert collect_grads(model, ce_loss, make_data(2), 2).shape == (2, 43 - 5)


# ------------------------------------------------------------------------------- restoration
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("fail", [False, True])
def test_grads_and_modes_restored(per_sample, fail):
    model = make_model()
    model.eval()
    model.fc2.train()  # mixed modes must come back exactly
    old = torch.ones_like(model.fc1.weight)
    model.fc1.weight.grad = old
    model.fc2.bias.grad = None
    seen_modes = []

    def loss_fn(m, batch):
        seen_modes.append(m.training)
        if fail:
            raise KeyError("boom")
        return ce_loss(m, batch)

    if fail:
        with pytest.raises(KeyError, match="boom"):
            collect_grads(model, loss_fn, make_data(2), 2, per_sample=per_sample, train=True)
    else:
        collect_grads(model, loss_fn, make_data(2), 2, per_sample=per_sample, train=True)
    assert seen_modes and all(seen_modes)  # train=True applied while collecting
    assert model.fc1.weight.grad is old and torch.equal(old, torch.ones_like(old))
    assert model.fc2.bias.grad is None and model.fc1.bias.grad is None
    assert not model.training and not model.fc1.training and model.fc2.training


class BNNet(nn.Module):
    """Conv -> BatchNorm2d -> ReLU -> pool -> Linear, plus a BatchNorm1d with cumulative averaging."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.bn1d = nn.BatchNorm1d(4, momentum=None)  # running averages driven by num_batches_tracked
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc(self.bn1d(h))


def bn_data(nbatches: int, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(5, 2, 4, 4, generator=gen, dtype=DT), torch.randint(0, 3, (5,), generator=gen))
        for _ in range(nbatches)
    ]


def _buffers(model):
    return {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("fail", [False, True])
def test_batchnorm_running_statistics_restored_and_grads_are_train_mode(fail):
    torch.manual_seed(0)
    model = BNNet().to(DT).train()
    data = bn_data(3)
    ce_loss(model, data[0])  # move the statistics away from their initial values first
    before = _buffers(model)
    identities = {n: b for n, b in model.named_buffers()}
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        if fail and len(calls) == 3:
            raise KeyError("boom")
        return ce_loss(m, batch)

    if fail:
        with pytest.raises(KeyError, match="boom"):
            collect_grads(model, loss_fn, data, 3)
    else:
        G = collect_grads(model, loss_fn, data, 3)
    after = dict(model.named_buffers())
    assert set(after) == set(before) and len(before) == 6
    for name, value in before.items():
        assert after[name] is identities[name], name  # copied back in place
        assert torch.equal(after[name], value), name
    if not fail:
        # restored, not frozen: the rows are the gradients of train-mode (batch-statistics) passes
        reference = grads_by_hand(model, data)
        torch.testing.assert_close(G, reference, rtol=1e-12, atol=1e-12)
        moved = _buffers(model)
        assert int(moved["bn.num_batches_tracked"]) == int(before["bn.num_batches_tracked"]) + 3
        eval_rows = collect_grads(model.eval(), ce_loss, data, 3)
        assert not torch.allclose(eval_rows, reference)  # eval mode would have given other rows


def test_mode_kept_by_default():
    model = make_model().train()
    seen = []
    collect_grads(model, lambda m, b: (seen.append(m.training), ce_loss(m, b))[1], make_data(1), 1)
    assert seen == [True] and model.training


def test_runs_under_no_grad():
    model = make_model()
    data = make_data(2)
    with torch.no_grad():
        G = collect_grads(model, ce_loss, data, 2)
        Gs = collect_grads(model, ce_loss, data, 6, per_sample=True)
    torch.testing.assert_close(G, grads_by_hand(model, data), rtol=0, atol=1e-14)
    torch.testing.assert_close(Gs, per_sample_by_hand(model, data, 6), rtol=0, atol=1e-13)


# ------------------------------------------------------------------------------- logging, progress
def test_logs_memory_up_front(caplog):
    with caplog.at_level(logging.INFO, logger="mfac.collect"):
        collect_grads(make_model(), ce_loss, make_data(2), 2)
    assert "2 mini-batch gradients x 43 coordinates" in caplog.text
    assert "688 B" in caplog.text  # 2 * 43 * 8 bytes


def test_progress_bar(capsys, monkeypatch):
    import tqdm.auto

    closed = []

    class Recording(tqdm.auto.tqdm):  # what the bar counted when it closed (redraws are rate-limited)
        def close(self):
            closed.append((self.n, self.total, self.disable))
            super().close()

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    G = collect_grads(make_model(), ce_loss, make_data(2), 2, progress=True)
    assert G.shape == (2, 43)
    shown = capsys.readouterr()
    assert shown.out == ""  # tqdm writes to stderr, nothing is printed
    assert "gradients" in shown.err  # the bar was drawn
    assert closed[0] == (2, 2, False)  # and completed
    collect_grads(make_model(), ce_loss, make_data(2), 2, progress=False)
    assert capsys.readouterr().err == ""  # and not drawn when not asked for


# ------------------------------------------------------------------------------- evaluate_loss
def test_evaluate_loss():
    model = make_model().train()
    data = make_data(4)
    with torch.no_grad():
        model.eval()
        losses = [float(ce_loss(model, b)) for b in data]
        model.train()
    assert evaluate_loss(model, ce_loss, data) == pytest.approx(sum(losses) / 4, rel=1e-14)
    assert evaluate_loss(model, ce_loss, data, 2) == pytest.approx(sum(losses[:2]) / 2, rel=1e-14)
    assert model.training  # restored
    with pytest.raises(ValueError, match="no batches"):
        evaluate_loss(model, ce_loss, [])
    with pytest.raises(ValueError, match="max_batches must be >= 1, got 0"):
        evaluate_loss(model, ce_loss, data, 0)
