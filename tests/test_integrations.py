"""mfac with the libraries people train with: transformers, Lightning, torch.compile, torch.nn.utils.prune,
scipy, torch.distributed.

Each ``# [recipe: NAME]`` ... ``# [end recipe]`` block is shown verbatim on the documentation's Integrations
page (``docs/integrations.md`` includes it), so what users read is what this module runs. Tiny random-init
models (no downloads); transformers and lightning tests are skipped, with the reason, when the package is
absent (``pip install 'mfac[integrations]'``).
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mfac
from mfac.prune import (
    CubicSchedule,
    GradualPruner,
    check_nm,
    obs_scores,
    prune_oneshot,
    select_global,
    torch_importance_scores,
    torch_prune_parameters,
)

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None
HAS_LIGHTNING = importlib.util.find_spec("lightning") is not None
needs_transformers = pytest.mark.skipif(
    not HAS_TRANSFORMERS, reason="transformers is not installed (pip install 'mfac[integrations]')"
)
needs_trainer = pytest.mark.skipif(
    not (HAS_TRANSFORMERS and HAS_ACCELERATE),
    reason="the HF Trainer needs transformers and accelerate (pip install 'mfac[integrations]')",
)
needs_lightning = pytest.mark.skipif(
    not HAS_LIGHTNING, reason="lightning is not installed (pip install 'mfac[integrations]')"
)


def _tokens(vocab: int, n: int, length: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (4, length), generator=gen) for _ in range(n)]


def _embedding_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if any(p is m.weight for m in model.modules() if isinstance(m, nn.Embedding))
    }


# ------------------------------------------------------------------------------------- transformers models
def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def _tiny_bert_mlm():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                        vocab_size=64, max_position_embeddings=16)
    return BertForMaskedLM(config)


def _lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


@needs_transformers
def test_gpt2_defaults_are_the_blocks_conv1d_projections():
    from transformers.pytorch_utils import Conv1D

    model = _tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight  # the tie the defaults must not follow
    names = mfac.default_prunable(model)
    expected = [
        f"transformer.h.{i}.{leaf}.weight"
        for i in range(2)
        for leaf in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert names == expected
    assert all(isinstance(model.get_submodule(n.rsplit(".", 1)[0]), Conv1D) for n in names)


@needs_transformers
def test_bert_mlm_defaults_skip_the_embeddings_and_the_tied_decoder():
    model = _tiny_bert_mlm()
    decoder = model.cls.predictions.decoder.weight
    assert decoder is model.bert.embeddings.word_embeddings.weight
    names = mfac.default_prunable(model)
    assert not any("embeddings" in n for n in names)
    assert all(writable is not decoder for writable in (model.get_parameter(n) for n in names))
    per_layer = ["attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense", "intermediate.dense", "output.dense"]
    blocks = [f"bert.encoder.layer.{i}.{leaf}.weight" for i in range(2) for leaf in per_layer]
    assert names == [*blocks, "cls.predictions.transform.dense.weight"]


@needs_transformers
@pytest.mark.parametrize("make", [_tiny_gpt2, _tiny_bert_mlm], ids=["gpt2", "bert-mlm"])
def test_prune_with_defaults_touches_no_embedding_and_prunes_the_blocks(make):
    model = make()
    data = _tokens(64, 4, 12, seed=1)
    embeddings = _embedding_weights(model)
    assert embeddings
    masks = prune_oneshot(model, _lm_loss, data, 0.5, ngrads=4, damp=1.0, relative_damp=True,
                          block_size=64, collect={"cycle": True, "train": False})
    assert set(masks) == set(mfac.default_prunable(model))
    for name, before in embeddings.items():
        assert torch.equal(model.get_parameter(name), before), name
    pruned = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert pruned == round(0.5 * total)
    for name, mask in masks.items():
        weight = model.get_parameter(name)
        assert bool((weight[~mask] == 0).all()), name
        assert 0.05 < float((~mask).float().mean()) < 0.95, name  # every block projection is pruned
    assert torch.isfinite(_lm_loss(model, data[0]))


@needs_transformers
def test_gpt2_two_four_groups_run_along_the_input_dimension_of_conv1d():
    model = _tiny_gpt2()
    data = _tokens(64, 4, 12, seed=2)
    masks = prune_oneshot(model, _lm_loss, data, pattern="2:4", ngrads=4, damp=1.0, relative_damp=True,
                          block_size=64, collect={"cycle": True, "train": False})
    for name, mask in masks.items():
        # Conv1D stores (in, out) and computes x @ W: the input dimension is dim 0
        by_input = mask.T.reshape(-1, 4)  # rows = outputs, groups of 4 consecutive inputs
        assert bool((by_input.sum(dim=1) == 2).all()), name
        assert check_nm(mask, 2, 4, axis=0)
        assert not check_nm(mask, 2, 4)  # the stored rows (outputs) are not 2:4
    rows = prune_oneshot(_tiny_gpt2(), _lm_loss, data, pattern="2:4", nm_axis="rows", ngrads=4, damp=1.0,
                         relative_damp=True, block_size=64, collect={"cycle": True, "train": False})
    assert all(check_nm(m, 2, 4) for m in rows.values())  # the old layout stays available


# ------------------------------------------------------------------------------------- BatchNorm models
class _Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    """A ResNet-like model: stem conv + BN, two residual blocks, pooled linear head."""

    def __init__(self, channels: int = 8, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.blocks = nn.Sequential(_Block(channels), _Block(channels))
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        h = self.blocks(torch.relu(self.bn(self.stem(x))))
        return self.head(h.mean(dim=(2, 3)))


def _image_batches(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, 6, 6, generator=gen), torch.randint(0, 4, (6,), generator=gen))
            for _ in range(n)]


def _ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _stats(model):
    return {n: b.clone() for n, b in model.named_buffers() if not n.endswith("_mask")}


def test_resnet_with_batchnorm_scoring_and_pruning_leave_the_statistics_as_found():
    torch.manual_seed(0)
    model = TinyResNet().train()
    data = _image_batches(4)
    _ce(model, data[0])  # statistics away from their initial values
    before = _stats(model)
    assert len(before) == 15  # 5 BatchNorms x (mean, var, count)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    obs_scores(model, _ce, data, ngrads=4, damp=1.0, relative_damp=True)
    assert all(torch.equal(b, before[n]) for n, b in _stats(model).items())
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # scoring writes nothing

    prune_oneshot(model, _ce, data, 0.5, ngrads=4, damp=1.0, relative_damp=True, recompute=2)
    assert all(torch.equal(b, before[n]) for n, b in _stats(model).items())

    pruner = GradualPruner(model, _ce, data, CubicSchedule(0.8, 0, 2, frequency=1), ngrads=4, damp=1.0,
                           relative_damp=True)
    for step in range(3):
        pruner.step(step)
    assert pruner.sparsity == pytest.approx(0.8, abs=1e-3)
    assert all(torch.equal(b, before[n]) for n, b in _stats(model).items())
    assert model.training


def test_resnet_two_four_in_nvidia_asp_layout():
    torch.manual_seed(0)
    model = TinyResNet().train()
    names = [n for n in mfac.default_prunable(model) if n != "stem.weight"]  # 3 input channels
    masks = prune_oneshot(model, _ce, _image_batches(4), pattern="2:4", nm_axis="channels", params=names,
                          ngrads=4, damp=1.0, relative_damp=True)
    for name, mask in masks.items():
        if mask.dim() == 4:  # ASP's view: (kh, kw, out) rows of input channels
            asp = mask.permute(2, 3, 0, 1).reshape(-1, mask.shape[1]).reshape(-1, 4)
            assert bool((asp.sum(1) == 2).all()), name
        else:
            assert check_nm(mask, 2, 4), name


# ------------------------------------------------------------------------------------- HF Trainer
class _TrainerModel(nn.Module):
    """What the HF Trainer expects of a model: ``forward(**batch)`` returning a dict with ``loss``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x, labels=None, **kwargs):  # **kwargs: the Trainer passes num_items_in_batch
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def _trainer_data(n: int = 48):
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def _run_trainer(out_dir, *, max_steps=6, resume=None, accumulation=1, workaround=True, save="steps",
                 **extra):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = _TrainerModel()
    # [recipe: hf-trainer]
    opt = mfac.MFAC(model.parameters(), lr=1e-2, ngrads=8, damp=1e-3, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=8,
        gradient_accumulation_steps=accumulation, save_strategy=save, save_steps=3,
        report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no", seed=0, **extra,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_trainer_data(), optimizers=(opt, sched))
    if workaround:
        trainer.model_accepts_loss_kwargs = False  # average micro-batches (see the accumulation note)
    trainer.train(resume_from_checkpoint=resume)  # the window is in checkpoint-*/optimizer.pt
    # [end recipe]
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@needs_trainer
def test_hf_trainer_resume_equals_an_uninterrupted_run(tmp_path):
    full = _run_trainer(tmp_path / "full")
    _run_trainer(tmp_path / "first", max_steps=3)
    resumed = _run_trainer(tmp_path / "resumed", resume=str(tmp_path / "first" / "checkpoint-3"))
    half = _run_trainer(tmp_path / "half", max_steps=3)
    assert any(not torch.equal(full[n], half[n]) for n in full)  # the last 3 steps do move the weights
    for name in full:
        assert torch.equal(resumed[name], full[name]), name


def _plain_accumulated(steps: int, accumulation: int, batch: int = 8):
    data = _trainer_data()
    torch.manual_seed(0)
    model = _TrainerModel()
    opt = mfac.MFAC(model.parameters(), lr=1e-2, ngrads=8, damp=1e-3, momentum=0.9)
    i = 0
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(accumulation):
            chunk = data[i : i + batch]
            i += batch
            x = torch.stack([d["x"] for d in chunk])
            y = torch.stack([d["labels"] for d in chunk])
            (model(x, y)["loss"] / accumulation).backward()  # the mean over micro-batches
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@needs_trainer
def test_hf_trainer_gradient_accumulation_needs_the_loss_kwargs_workaround(tmp_path):
    reference = _plain_accumulated(steps=3, accumulation=2)
    common = {"max_steps": 3, "accumulation": 2, "train_sampling_strategy": "sequential", "save": "no"}
    fixed = _run_trainer(tmp_path / "fixed", workaround=True, **common)
    for name in reference:
        torch.testing.assert_close(fixed[name], reference[name], rtol=1e-5, atol=1e-6)
    # without it the optimizer sees the *sum* of the micro-batch means (a gradient twice as long): M-FAC's
    # step is not scale-invariant, so the run differs
    summed = _run_trainer(tmp_path / "summed", workaround=False, **common)
    assert any(not torch.allclose(summed[n], reference[n], rtol=1e-3, atol=1e-4) for n in reference)


# ------------------------------------------------------------------------------------- Lightning
def _lightning_data():
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(40, 6, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    return torch.utils.data.TensorDataset(x, y)


def _lightning_module(manual: bool):
    import lightning as L

    # [recipe: lightning]
    class LitClassifier(L.LightningModule):
        def __init__(self, manual_optimization: bool = False):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
            self.automatic_optimization = not manual_optimization

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            if not self.automatic_optimization:  # manual optimization
                opt = self.optimizers()
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()
            return loss

        def configure_optimizers(self):
            # automatic optimization calls opt.step(closure): MFAC evaluates the closure once
            return mfac.MFAC(self.parameters(), lr=1e-2, ngrads=8, damp=1e-3, momentum=0.9)
    # [end recipe]

    torch.manual_seed(0)
    return LitClassifier(manual)


@needs_lightning
@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_lightning_equals_a_plain_loop(manual):
    import lightning as L

    module = _lightning_module(manual)
    plain = copy.deepcopy(module.net)
    loader = torch.utils.data.DataLoader(_lightning_data(), batch_size=8, shuffle=False)
    trainer = L.Trainer(max_steps=5, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)

    opt = mfac.MFAC(plain.parameters(), lr=1e-2, ngrads=8, damp=1e-3, momentum=0.9)
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt.step()
    for (name, a), b in zip(module.net.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------- torch.compile
def test_torch_compile_model_with_mfac_matches_eager():
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    model = copy.deepcopy(eager)
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(4)]
    # [recipe: torch-compile]
    compiled = torch.compile(model, backend="aot_eager")  # or the default inductor backend
    opt = mfac.MFAC(model.parameters(), lr=1e-2, ngrads=8, damp=1e-3)  # the original module's parameters
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        opt.step()  # the step itself runs eagerly (two BLAS passes over the window)
    # [end recipe]
    ref = mfac.MFAC(eager.parameters(), lr=1e-2, ngrads=8, damp=1e-3)
    for x, y in batches:
        ref.zero_grad()
        F.cross_entropy(eager(x), y).backward()
        ref.step()
    for a, b in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- torch.nn.utils.prune
def test_torch_prune_global_unstructured_with_obs_scores():
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(6)
    data = [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(8)]
    # [recipe: torch-prune]
    scores = obs_scores(model, _ce, data, ngrads=8, damp=1.0, relative_damp=True)  # {name: saliency}
    prune.global_unstructured(
        torch_prune_parameters(model, scores), pruning_method=prune.L1Unstructured,
        importance_scores=torch_importance_scores(model, scores), amount=0.5,
    )  # model[0].weight_mask / model[2].weight_mask now hold the OBS selection
    # [end recipe]
    expected = select_global(scores, 0.5)
    assert torch.equal(model[0].weight_mask.bool(), expected["0.weight"])
    assert torch.equal(model[2].weight_mask.bool(), expected["2.weight"])


# ------------------------------------------------------------------------------------- scipy
def test_scipy_linear_operator_eigsh_and_cg_are_exact():
    import numpy as np
    from scipy.sparse.linalg import cg, eigsh

    gen = torch.Generator().manual_seed(7)
    grads = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    damp = 0.1
    # [recipe: scipy]
    op = mfac.StaticInverseFisher(grads, damp)  # F^{-1}, F = damp I + G^T G / m
    A = op.to_scipy()  # a symmetric scipy LinearOperator, float64 numpy in and out
    top = eigsh(A, k=3, which="LA", return_eigenvectors=False)  # largest eigenvalues of F^{-1}
    b = np.ones(40)
    x, info = cg(A, b, rtol=1e-12, atol=0.0)  # solves F^{-1} x = b, i.e. x = F b
    # [end recipe]
    fisher = damp * torch.eye(40, dtype=torch.float64) + grads.T @ grads / 6
    exact = torch.linalg.eigvalsh(torch.linalg.inv(fisher)).numpy()[-3:]
    np.testing.assert_allclose(np.sort(top), exact, rtol=1e-10)
    assert info == 0
    np.testing.assert_allclose(x, (fisher @ torch.ones(40, dtype=torch.float64)).numpy(), rtol=1e-8)


# ------------------------------------------------------------------------------------- torch.distributed
@pytest.mark.distributed
@pytest.mark.slow  # torchrun + real DDP (torch._dynamo import): 20-45 s; the DDP placement itself is tested
# in the default run by tests/test_distributed.py
def test_ddp_recipe_equals_one_process_on_the_concatenated_batches(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "docs" / "recipes" / "ddp_mfac.py"
    out = tmp_path / "check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(script.parents[2]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "--check", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2
    d = 12 * 32 + 32 + 32 * 4 + 4
    assert result["window"] == [6, d // 2]  # each rank holds its half of the 6 gradients seen
    assert result["max_abs_diff"] < 1e-5, result
