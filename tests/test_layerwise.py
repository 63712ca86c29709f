"""prune_layerwise end to end: targets, the sequential pipeline, N:M along inputs, reports, bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mfac
from mfac.prune import apply_masks, prune_layerwise
from mfac.prune._layer_solvers import prepare_hessian, sparsegpt

pytestmark = pytest.mark.usefixtures("one_thread")
transformers = pytest.importorskip("transformers")


def _gpt(seed=0, n_embd=32, n_layer=2):
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=n_embd, n_layer=n_layer, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg)


def _ids(n=6, seq=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 40, (2, seq), generator=gen) for _ in range(n // 2)]


def fwd(model, batch):
    return model(input_ids=batch)


class ConvBlock(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        self.bn = nn.BatchNorm2d(ch)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([ConvBlock(8) for _ in range(2)])
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean(dim=(2, 3)))


class MLP(nn.Module):
    def __init__(self, width=16, inp=12):
        super().__init__()
        self.fc1 = nn.Linear(inp, width)
        self.fc2 = nn.Linear(width, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _reports(model, data, **kw):
    out = []
    masks = prune_layerwise(model, data, callback=out.append, **kw)
    return masks, {r.name: r for r in out}


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------- targets
def test_default_targets_are_the_block_layers_and_never_the_tied_head():
    model = _gpt()
    assert model.lm_head.weight is model.transformer.wte.weight
    before = _snapshot(model)
    masks = prune_layerwise(model, _ids(), 0.5, forward_fn=fwd)
    want = [f"transformer.h.{i}.{n}.weight" for i in range(2)
            for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert list(masks) == want
    after = model.state_dict()
    for key, value in before.items():
        if key not in masks:  # biases, layer norms, wte/wpe, the tied head, attention buffers
            assert torch.equal(after[key], value), key
        else:
            assert not torch.equal(after[key], value), key
    for name, mask in masks.items():
        p = model.get_parameter(name)
        assert mask.dtype == torch.bool and mask.shape == p.shape
        assert int((~mask).sum()) == round(0.5 * p.numel())  # exact sparsity
        assert (p[~mask] == 0).all()


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_runs_along_the_input_dimension_for_conv1d_linear_and_conv2d(pattern):
    n, m = (int(v) for v in pattern.split(":"))
    gpt = _gpt()
    masks = prune_layerwise(gpt, _ids(), pattern=pattern, forward_fn=fwd)
    for name, mask in masks.items():  # Conv1D stores (in, out): groups run down its columns
        assert (mask.T.reshape(-1, m).sum(1) == n).all(), name
    mlp = MLP(inp=16)
    masks = prune_layerwise(mlp, [torch.randn(10, 16)], pattern=pattern)
    assert set(masks) == {"fc1.weight", "fc2.weight"}
    for mask in masks.values():
        assert (mask.reshape(-1, m).sum(1) == n).all()
    net = ConvNet()
    masks = prune_layerwise(net, [torch.randn(4, 3, 6, 6)], pattern=pattern)
    assert set(masks) == {"blocks.0.conv.weight", "blocks.1.conv.weight"}  # stem and head: outside blocks
    for mask in masks.values():
        assert (mask.reshape(8, -1).reshape(-1, m).sum(1) == n).all()


def test_conv_model_buffers_and_training_flag_untouched():
    net = ConvNet().train()
    x = [torch.randn(4, 3, 6, 6) for _ in range(2)]
    net(x[0])  # non-trivial running statistics
    before = _snapshot(net)
    _, reports = _reports(net, x, sparsity=0.5)
    assert net.training and all(m.training for m in net.modules())
    after = net.state_dict()
    for key in before:
        if key.endswith("conv.weight") and key.startswith("blocks"):
            continue
        assert torch.equal(after[key], before[key]), key  # BN running_mean/var/num_batches_tracked too
    assert all(r.cols == 8 * 9 and r.block in (0, 1) for r in reports.values())


# ------------------------------------------------------------------------------------- quality
@pytest.mark.parametrize("setting", [{"sparsity": 0.5}, {"pattern": "2:4"}])
@pytest.mark.parametrize("sequential", [False, True])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(setting, sequential):
    data = _ids(8)
    dense = _gpt(n_embd=64, n_layer=2)
    errors = {}
    for method in ("sparsegpt", "wanda", "magnitude"):
        _, reports = _reports(copy.deepcopy(dense), data, forward_fn=fwd, method=method,
                              sequential=sequential, **setting)
        errors[method] = {k: r.error for k, r in reports.items()}
    for name, err in errors["sparsegpt"].items():
        assert 0 < err < errors["wanda"][name], name
        assert err < errors["magnitude"][name], name


def test_obc_beats_the_masks_without_update_on_correlated_inputs():
    # OBC prunes the same count in every row, so its fair comparison is Wanda's per-row rule; with
    # correlated inputs the exact updates must also beat layer-wide magnitude
    dense = MLP(width=8)
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(12, 12, generator=gen)
    data = [torch.randn(20, 12, generator=gen) @ mix for _ in range(2)]
    reports = {m: _reports(copy.deepcopy(dense), data, sparsity=0.5, method=m, sequential=False)[1]
               for m in ("obc", "wanda", "magnitude", "sparsegpt")}
    for name, r in reports["obc"].items():
        assert r.sparsity == 0.5
        assert r.error < reports["wanda"][name].error and r.error < reports["magnitude"][name].error


# ------------------------------------------------------------------------------------- pipeline
def test_sequential_uses_the_pruned_blocks_outputs():
    dense = _gpt(n_layer=2)
    data = _ids()
    seq = copy.deepcopy(dense)
    prune_layerwise(seq, data, 0.6, forward_fn=fwd, true_sequential=False)
    # oracle: block 0 as pruned, block 1 dense, then one-pass pruning of block 1 on that model's inputs
    oracle = copy.deepcopy(dense)
    oracle.transformer.h[0].load_state_dict(seq.transformer.h[0].state_dict())
    names = [f"transformer.h.1.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    prune_layerwise(oracle, data, 0.6, forward_fn=fwd, targets=names, sequential=False)
    for n in names:
        torch.testing.assert_close(seq.get_parameter(f"{n}.weight"), oracle.get_parameter(f"{n}.weight"),
                                   rtol=1e-5, atol=1e-6)
    # and it differs from pruning block 1 on the dense model's inputs
    one_pass = copy.deepcopy(dense)
    prune_layerwise(one_pass, data, 0.6, forward_fn=fwd, sequential=False)
    assert not torch.allclose(seq.transformer.h[1].mlp.c_fc.weight, one_pass.transformer.h[1].mlp.c_fc.weight)


def test_block_device_and_activation_store_options_give_the_same_result():
    a, b = _gpt(), _gpt()
    data = _ids()
    ma = prune_layerwise(a, data, 0.5, forward_fn=fwd)
    mb = prune_layerwise(b, data, 0.5, forward_fn=fwd, device="cpu", store="cpu", blocks="transformer.h")
    for k in ma:
        assert torch.equal(ma[k], mb[k])
        assert torch.equal(a.get_parameter(k), b.get_parameter(k))


def test_true_sequential_prunes_in_call_order_each_group_after_the_previous():
    model = _gpt(n_layer=1)
    data = _ids()
    order = []
    prune_layerwise(model, data, 0.5, forward_fn=fwd, callback=lambda r: order.append(r.name))
    assert order == [f"transformer.h.0.{n}.weight" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                             "mlp.c_proj")]
    # the MLP's c_fc saw the inputs of the block with its attention already pruned: redo that by hand
    dense = _gpt(n_layer=1)
    for n in ("attn.c_attn", "attn.c_proj"):
        dense.get_parameter(f"transformer.h.0.{n}.weight").data.copy_(model.get_parameter(f"transformer.h.0.{n}.weight"))
    seen = []
    hook = dense.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, 32)))
    with torch.no_grad():
        for b in data:
            dense(input_ids=b)
    hook.remove()
    x = torch.cat(seen)
    h, dead = prepare_hessian(2 * x.T @ x / (len(data) * 2), 0.01)
    w = dense.transformer.h[0].mlp.c_fc.weight.detach().T
    want, _ = sparsegpt(w, h, sparsity=0.5, dead=dead)
    torch.testing.assert_close(model.transformer.h[0].mlp.c_fc.weight.T, want, rtol=1e-5, atol=1e-6)


def test_masks_work_with_apply_masks_and_float64_hessians_agree():
    a, b = _gpt(), _gpt()
    data = _ids()
    masks = prune_layerwise(a, data, 0.5, forward_fn=fwd)
    masks64 = prune_layerwise(b, data, 0.5, forward_fn=fwd, hessian_dtype=torch.float64)
    agree = sum(int((masks[k] == masks64[k]).sum()) for k in masks) / sum(m.numel() for m in masks.values())
    assert agree > 0.99
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    handle = apply_masks(a, masks, optimizers=opt)
    loss = a(input_ids=data[0], labels=data[0]).loss
    loss.backward()
    opt.step()
    handle.remove()
    for name, mask in masks.items():
        assert (a.get_parameter(name)[~mask] == 0).all()


def test_per_layer_sparsity_dict_and_top_level_export():
    assert mfac.prune_layerwise is prune_layerwise
    model = MLP()
    masks = prune_layerwise(model, [torch.randn(8, 12)], {"fc1": 0.25, "fc2.weight": 0.75})
    assert int((~masks["fc1.weight"]).sum()) == round(0.25 * 16 * 12)
    assert int((~masks["fc2.weight"]).sum()) == round(0.75 * 8 * 16)


# ------------------------------------------------------------------------------------- bad inputs
BAD = [
    ({"sparsity": 1.0}, ValueError, r"sparsity must lie in \[0, 1\), got 1.0"),
    ({"sparsity": -0.1}, ValueError, r"sparsity must lie in \[0, 1\)"),
    ({"sparsity": "0.5"}, TypeError, "sparsity must be a float"),
    ({"sparsity": None}, ValueError, "sparsity .* or pattern .* is required"),
    ({"sparsity": 0.5, "pattern": "2:4"}, ValueError, "either sparsity or pattern"),
    ({"pattern": "4:8"}, ValueError, r"divisible by 8; 'fc1.weight' has 12 inputs"),
    ({"sparsity": 0.5, "targets": ["fc3"]}, ValueError, "'fc3' is not a module or weight of MLP"),
    ({"sparsity": 0.5, "method": "obs"}, ValueError, "method must be one of"),
    ({"sparsity": 0.5, "damp": 0.0}, ValueError, "damp must be finite and > 0"),
    ({"sparsity": {"fc1": 0.5}}, ValueError, r"missing \['fc2.weight'\]"),
    ({"sparsity": 0.5, "data": []}, ValueError, "data is empty"),
    ({"sparsity": 0.5, "data": [torch.full((4, 12), float("nan"))]}, ValueError, "not finite"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD)
def test_bad_inputs_raise_before_anything_changes(kwargs, error, match):
    model = MLP()
    before = _snapshot(model)
    kwargs = dict(kwargs)
    data = kwargs.pop("data", [torch.randn(4, 12)])
    with pytest.raises(error, match=match):
        prune_layerwise(model, data, **kwargs)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"targets": ["lm_head"]}, "tied to an embedding"),
    ({"targets": ["transformer.wte"]}, "is a Embedding"),
    ({"data": []}, "data is empty"),
    ({"data": [torch.zeros(2, 16, dtype=torch.long)], "forward_fn": lambda m, b: m.transformer.wte(b)},
     "without calling its first block"),
])
def test_bad_inputs_gpt(kwargs, match):
    model = _gpt()
    before = _snapshot(model)
    kwargs = {"forward_fn": fwd, "data": _ids(), **kwargs}
    with pytest.raises(ValueError, match=match):
        prune_layerwise(model, kwargs.pop("data"), 0.5, **kwargs)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_nonfinite_block_inputs_are_refused_before_pruning():
    model = _gpt()
    before = _snapshot(model)
    model.transformer.wpe.weight.data[0, 0] = float("inf")
    before["transformer.wpe.weight"] = model.transformer.wpe.weight.detach().clone()
    with pytest.raises(ValueError, match="hidden states of calibration batch 0 at the first block are not finite"):
        prune_layerwise(model, _ids(), 0.5, forward_fn=fwd)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
