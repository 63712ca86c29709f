"""MFAC against SGD with momentum and Adam on data that ships with scikit-learn; step time.

    python -m experiments.optimizer_comparison [--quick] [--out results/optimizer_comparison]

1. Training: an MLP and a small CNN on scikit-learn's digits (1797 8x8 images, stratified held-out
   test split of 20%), each optimizer with a small learning-rate sweep, 3 seeds, the same number of
   epochs and the same mini-batches. Reports the final train loss (full training set, after the
   last epoch), the test accuracy (mean +- sample std over seeds) and the wall time per step (whole
   step: forward, backward and optimizer; and the optimizer's ``step()`` alone).
2. Step time at ResNet-20's size (272k parameters): ``MFAC.step()`` at ngrads in {64, 256, 1024}
   against ``Adam(foreach=True).step()``, with the memory floor of the sliding-window step (one
   ``G @ g`` plus one ``c @ G`` pass over the same window). Gradients are random there (the cost of
   a step does not depend on their values); the time while the window fills (where the m x m system
   is refactored every step) is reported separately from the steady state.

Writes ``results.json``, ``results.md`` (the tables), ``training.png`` and ``step_time.png``
under ``--out``. ``--quick`` runs a few-second version of everything (used by the tests).
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
from tqdm import tqdm

if __package__ in (None, ""):  # run as a file: make `experiments` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments._data import load_split, minibatches
from experiments._measure import median_seconds, stopwatch, time_interleaved, two_pass_floor
from experiments._metrics import evaluate, mean_std
from experiments._models import build_model, count_parameters, resnet20_like
from experiments._provenance import RunRecord
from mfac.optim import MFAC

DEFAULT_OUT = Path("results/optimizer_comparison")
MODELS = ("MLP", "CNN", "ResNet20", "CharMLP")  # build_model names; the default run trains the first two
#: learning rates swept per optimizer (the default run); ``--lr-grid wide`` adds decades on both sides
WIDE_LRS = {
    "MFAC": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    "SGD": (0.01, 0.03, 0.1, 0.3),
    "Adam": (3e-4, 1e-3, 3e-3, 1e-2),
}


@dataclass
class Config:
    """Everything the run depends on (saved with the results)."""

    epochs: int = 20
    batch_size: int = 32
    seeds: tuple[int, ...] = (0, 1, 2)
    train_subset: int | None = None  # first n training images only (quick runs)
    lrs: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {
            "MFAC": (1e-3, 3e-3, 1e-2),
            "SGD": (0.01, 0.03, 0.1),
            "Adam": (1e-3, 3e-3, 1e-2),
        }
    )
    sgd_momentum: float = 0.9
    mfac_ngrads: int = 256
    mfac_damp: float = 1e-3
    mfac_momentum: float = 0.9
    timing_ngrads: tuple[int, ...] = (64, 256, 1024)
    timing_width: int = 16  # ResNet-20 width (16: the real one, 272k parameters)
    timing_batch: int = 32
    timing_steps: int = 20  # steady-state steps timed per optimizer
    dataset: str = "digits"  # or "torchvision:CIFAR10", "torchvision:MNIST", ... (experiments/_data.py)
    models: tuple[str, ...] = ("MLP", "CNN")
    device: str = "cpu"

    @classmethod
    def quick(cls) -> Config:
        """A few seconds in total: tiny data, one lr and seed, a narrow ResNet."""
        return replace(
            cls(),
            epochs=2,
            seeds=(0,),
            train_subset=256,
            lrs={"MFAC": (3e-3,), "SGD": (0.03,), "Adam": (3e-3,)},
            mfac_ngrads=8,
            timing_ngrads=(4, 8),
            timing_width=4,
            timing_batch=4,
            timing_steps=3,
        )


def make_optimizer(name: str, params, lr: float, cfg: Config) -> torch.optim.Optimizer:
    """The optimizers compared (no weight decay anywhere)."""
    if name == "MFAC":
        return MFAC(
            params, lr=lr, ngrads=cfg.mfac_ngrads, damp=cfg.mfac_damp, momentum=cfg.mfac_momentum
        )
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.sgd_momentum)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


# ------------------------------------------------------------------------------ training
def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings mean something off the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_run(model_name: str, opt_name: str, lr: float, seed: int, data, cfg: Config) -> dict:
    """One training run; the seed fixes the initialisation and the mini-batch order."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = build_model(model_name, tuple(x_train.shape[1:])).to(x_train.device)
    opt = make_optimizer(opt_name, model.parameters(), lr, cfg)
    gen = torch.Generator().manual_seed(seed)
    curve, steps, step_time, opt_time = [], 0, 0.0, 0.0
    grad_sq = None  # |g|^2 of the first mini-batch gradient: the scale M-FAC's step depends on
    diverged = False
    for epoch in range(cfg.epochs):
        losses = []
        for xb, yb in minibatches(x_train, y_train, cfg.batch_size, generator=gen):
            _sync(xb.device)
            watch = stopwatch()  # marks: forward + backward done (mid), step done (end)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            _sync(xb.device)
            mid = watch.seconds
            if grad_sq is None:
                grad_sq = sum(float(p.grad.square().sum()) for p in model.parameters() if p.grad is not None)
                mid = watch.seconds
            try:
                opt.step()
            except ValueError:  # MFAC refuses a non-finite gradient: the run diverged
                diverged = True
            _sync(xb.device)
            end = watch.seconds
            step_time += end
            opt_time += end - mid
            steps += 1
            losses.append(loss.item())
            if diverged or not math.isfinite(losses[-1]):
                diverged = True
                break
        if diverged:
            break
        _, test_acc = evaluate(model, x_test, y_test)
        curve.append(
            {"epoch": epoch + 1, "train_loss": statistics.fmean(losses), "test_acc": test_acc}
        )
    train_loss, _ = evaluate(model, x_train, y_train) if not diverged else (math.nan, None)
    _, test_acc = evaluate(model, x_test, y_test) if not diverged else (None, math.nan)
    return {
        "model": model_name,
        "optimizer": opt_name,
        "lr": lr,
        "seed": seed,
        "diverged": diverged,
        "final_train_loss": train_loss,
        "test_acc": test_acc,
        "steps": steps,
        "grad_sq": grad_sq,
        "ms_per_step": 1e3 * step_time / max(steps, 1),
        "ms_per_optimizer_step": 1e3 * opt_time / max(steps, 1),
        "curve": curve,
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std over the seeds whose run did not diverge (NaN, NaN when none)."""
    values = [v for v in values if math.isfinite(v)]
    return mean_std(values) if values else (math.nan, math.nan)


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (model, optimizer, lr): means and sample standard deviations over seeds."""
    rows = []
    keys = sorted({(r["model"], r["optimizer"], r["lr"]) for r in runs}, key=_order)
    for model, opt, lr in keys:
        group = [r for r in runs if (r["model"], r["optimizer"], r["lr"]) == (model, opt, lr)]
        loss, loss_std = _mean_std([r["final_train_loss"] for r in group])
        acc, acc_std = _mean_std([100 * r["test_acc"] for r in group])
        rows.append(
            {
                "model": model,
                "optimizer": opt,
                "lr": lr,
                "seeds": len(group),
                "diverged": sum(r["diverged"] for r in group),
                "train_loss": loss,
                "train_loss_std": loss_std,
                "test_acc": acc,
                "test_acc_std": acc_std,
                "ms_per_step": statistics.fmean(r["ms_per_step"] for r in group),
                "grad_sq": statistics.fmean(r["grad_sq"] for r in group) if group[0].get("grad_sq") else None,
                "ms_per_optimizer_step": statistics.fmean(
                    r["ms_per_optimizer_step"] for r in group
                ),
            }
        )
    return rows


def _order(key: tuple[str, str, float]) -> tuple[int, int, float]:
    model, opt, lr = key
    return (MODELS.index(model), ["MFAC", "SGD", "Adam"].index(opt), lr)


def best_rows(rows: list[dict]) -> list[dict]:
    """Per (model, optimizer): the lr with the lowest mean final train loss (no test data used)."""
    best = {}
    for row in rows:
        key = (row["model"], row["optimizer"])
        loss = row["train_loss"] if row["diverged"] == 0 else math.inf
        if key not in best or loss < best[key][0]:
            best[key] = (loss, row)
    return [row for _, row in best.values()]


# ------------------------------------------------------------------------------ step time at scale


def step_time_table(cfg: Config, progress: bool = True) -> tuple[list[dict], dict]:
    """``MFAC.step()`` at several ngrads against ``Adam(foreach=True).step()`` on a ResNet-20."""
    torch.manual_seed(0)
    model = resnet20_like(width=cfg.timing_width)
    d = count_parameters(model)
    x = torch.randn(cfg.timing_batch, 3, 32, 32)
    y = torch.randint(0, 10, (cfg.timing_batch,))

    def forward_backward():
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()

    fwd_bwd = median_seconds(forward_backward, 3)
    params = [p for p in model.parameters() if p.grad is not None]
    adam = torch.optim.Adam(params, lr=1e-3, foreach=True)
    adam_ms = 1e3 * median_seconds(adam.step, cfg.timing_steps)
    rows = [
        {
            "optimizer": "Adam (foreach)",
            "ngrads": None,
            "fill_ms_per_step": None,
            "ms_per_step": adam_ms,
            "x_adam": 1.0,
            "floor_ms": None,
            "x_floor": None,
            "window_mib": 0.0,
        }
    ]
    gen = torch.Generator().manual_seed(0)
    for m in cfg.timing_ngrads:
        opt = MFAC(params, lr=0.0, ngrads=m, damp=cfg.mfac_damp)  # lr 0: the model stays put

        def fresh_gradient() -> None:  # untimed: a new gradient for every step
            for p in params:
                p.grad.normal_(generator=gen)

        bar = tqdm(total=m, desc=f"fill m={m}", leave=False, disable=not progress)

        def fill_step(opt=opt, bar=bar) -> None:
            opt.step()
            bar.update()

        fill = time_interleaved({"fill": fill_step}, m, 0, setup={"fill": fresh_gradient})["fill"]["times"]
        bar.close()
        window = opt.inverse_fisher.window  # shape: (m, d), the window itself (read only)
        # steady-state steps interleaved with their floor, the two passes over the same window
        t = time_interleaved({"step": opt.step, "floor": two_pass_floor(window)}, cfg.timing_steps, 1,
                             setup={"step": fresh_gradient})
        steady, floor = t["step"]["median"], t["floor"]["median"]
        rows.append(
            {
                "optimizer": "MFAC",
                "ngrads": m,
                "fill_ms_per_step": 1e3 * statistics.fmean(fill),
                "ms_per_step": 1e3 * steady,
                "x_adam": 1e3 * steady / adam_ms,
                "floor_ms": 1e3 * floor,
                "x_floor": steady / floor,
                "window_mib": window.numel() * window.element_size() / 2**20,
            }
        )
        del opt, window
    context = {"parameters": d, "batch": cfg.timing_batch, "forward_backward_ms": 1e3 * fwd_bwd}
    return rows, context


# ------------------------------------------------------------------------------ output
def _jsonable(value):
    """Strict JSON: non-finite floats become null, tuples lists, anything else its str."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    return format(value, spec)


def markdown_tables(
    sweep: list[dict], best: list[dict], timing: list[dict], context: dict, cfg: Config
) -> str:
    """The three result tables as markdown (the step-time table only when it was measured)."""
    title = {"digits": "Digits", "mnist": "MNIST", "shakespeare": "Shakespeare (next character)"}.get(
        cfg.dataset, cfg.dataset
    )
    out = [
        f"### {title}: learning-rate sweep ({len(cfg.seeds)} seeds, {cfg.epochs} epochs, "
        f"batch {cfg.batch_size})",
        "",
        "| model | optimizer | lr | final train loss | test acc (%) | ms/step "
        "| optimizer ms/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sweep:
        note = f" ({r['diverged']}/{r['seeds']} diverged)" if r["diverged"] else ""
        if r["optimizer"] == "MFAC" and r.get("grad_sq") is not None:
            note += f" (first-step ‖g‖² {r['grad_sq']:.3g})"  # no pipes: it sits in a table cell
        out.append(
            f"| {r['model']} | {r['optimizer']} | {r['lr']:g} | "
            f"{_fmt(r['train_loss'], '.4f')} +- {_fmt(r['train_loss_std'], '.4f')}{note} | "
            f"{_fmt(r['test_acc'], '.2f')} +- {_fmt(r['test_acc_std'], '.2f')} | "
            f"{r['ms_per_step']:.2f} | {r['ms_per_optimizer_step']:.2f} |"
        )
    out += [
        "",
        f"### {title}: best learning rate per optimizer (lowest mean final train loss)",
        "",
        "| model | optimizer | lr | final train loss | test acc (%) | ms/step |",
        "|---|---|---|---|---|---|",
    ]
    for r in best:
        out.append(
            f"| {r['model']} | {r['optimizer']} | {r['lr']:g} | "
            f"{_fmt(r['train_loss'], '.4f')} +- {_fmt(r['train_loss_std'], '.4f')} | "
            f"{_fmt(r['test_acc'], '.2f')} +- {_fmt(r['test_acc_std'], '.2f')} | "
            f"{r['ms_per_step']:.2f} |"
        )
    if not timing:
        return "\n".join(out) + "\n"
    out += [
        "",
        f"### Optimizer step time, ResNet-20 (width {cfg.timing_width}: "
        f"{context['parameters']:,} parameters; forward + backward of a batch of "
        f"{context['batch']} 32x32 images: {context['forward_backward_ms']:.1f} ms; "
        f"{torch.get_num_threads()} thread(s))",
        "",
        "| optimizer | ngrads | window (MiB) | ms/step while filling | ms/step (full window) | "
        "x Adam | floor G@g + c@G (ms) | x floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in timing:
        out.append(
            f"| {r['optimizer']} | {_fmt(r['ngrads'], 'd')} | {r['window_mib']:.0f} | "
            f"{_fmt(r['fill_ms_per_step'], '.2f')} | {r['ms_per_step']:.2f} | "
            f"{r['x_adam']:.1f} | {_fmt(r['floor_ms'], '.2f')} | {_fmt(r['x_floor'], '.2f')} |"
        )
    return "\n".join(out) + "\n"


def plot(runs: list[dict], best: list[dict], timing: list[dict], out: Path) -> None:
    """training.png (best lr per optimizer: mean and range over seeds) and step_time.png."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = [m for m in MODELS if any(r["model"] == m for r in runs)]
    fig = Figure(figsize=(10, 3.6 * len(models)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(models), 2, squeeze=False)
    for row, model in enumerate(models):
        for choice in (b for b in best if b["model"] == model):
            group = [
                r
                for r in runs
                if (r["model"], r["optimizer"], r["lr"])
                == (model, choice["optimizer"], choice["lr"])
                and not r["diverged"]
            ]
            if not group:
                continue
            epochs = [p["epoch"] for p in group[0]["curve"]]
            for col, key in enumerate(("train_loss", "test_acc")):
                values = torch.tensor([[p[key] for p in r["curve"]] for r in group])
                label = f"{choice['optimizer']} (lr {choice['lr']:g})"
                axes[row][col].plot(epochs, values.mean(0), label=label)
                low, high = values.min(0).values, values.max(0).values
                axes[row][col].fill_between(epochs, low, high, alpha=0.2)  # range over seeds
        axes[row][0].set_yscale("log")
        axes[row][0].set_title(f"{model}: train loss (mean over the epoch's batches)")
        axes[row][1].set_title(f"{model}: test accuracy")
        for ax in axes[row]:
            ax.set_xlabel("epoch")
            ax.legend()
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=110)

    if not timing:  # --no-timing
        return
    fig = Figure(figsize=(6, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    labels = [r["optimizer"] if r["ngrads"] is None else f"MFAC m={r['ngrads']}" for r in timing]
    ax.bar(labels, [r["ms_per_step"] for r in timing], label="optimizer step")
    floors = [(i, r["floor_ms"]) for i, r in enumerate(timing) if r["floor_ms"] is not None]
    ax.scatter(
        [i for i, _ in floors],
        [f for _, f in floors],
        color="k",
        marker="_",
        s=400,
        label="floor: G@g + c@G",
        zorder=3,
    )
    ax.set_yscale("log")
    ax.set_ylabel("ms per step")
    ax.set_title("Optimizer step at ResNet-20's size (CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=110)


# ------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    """Run everything, write the results under ``--out`` and return them."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few-second version of everything (tiny data, narrow ResNet)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="override the number of epochs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--dataset",
        default="digits",
        help="'digits' (scikit-learn, default) or 'torchvision:NAME' (e.g. torchvision:CIFAR10; "
        "downloads to --data-root, needs torchvision and internet)",
    )
    parser.add_argument("--data-root", default="data", help="torchvision download folder")
    parser.add_argument(
        "--models", nargs="+", default=None, choices=list(MODELS),
        help="models to train (default MLP CNN; CharMLP with --dataset shakespeare; ResNet20: for "
        "CIFAR-10 on a GPU)",
    )
    parser.add_argument("--no-timing", action="store_true", help="skip the ResNet-20 step-time table")
    parser.add_argument(
        "--lr-grid", choices=["default", "wide"], default="default",
        help="wide: learning rates over more decades (M-FAC's step is not SGD's, see the README)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    parser.add_argument("--train-subset", type=int, default=None, help="first N training examples only")
    parser.add_argument("--device", default="cpu", help="torch device for training, e.g. cuda")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: stable timings on a shared machine; "
        "0: torch's default)",
    )
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) keep their setting


def _run(args: argparse.Namespace) -> dict:
    record = RunRecord(args.argv)
    cfg = Config.quick() if args.quick else Config()
    if args.epochs is not None:
        cfg = replace(cfg, epochs=args.epochs)
    progress = not args.no_progress
    args.out.mkdir(parents=True, exist_ok=True)

    models = args.models or (["CharMLP"] if args.dataset == "shakespeare" else ["MLP", "CNN"])
    cfg = replace(cfg, dataset=args.dataset, models=tuple(models), device=args.device)
    if args.lr_grid == "wide":
        cfg = replace(cfg, lrs=dict(WIDE_LRS))
    if args.seeds is not None:
        cfg = replace(cfg, seeds=tuple(range(args.seeds)))
    if args.train_subset is not None:
        cfg = replace(cfg, train_subset=args.train_subset)
    split = load_split(cfg.dataset, root=args.data_root, seed=0, limit=cfg.train_subset)
    data = [t.to(cfg.device) for t in split]
    if cfg.train_subset is not None:
        data[0], data[1] = data[0][: cfg.train_subset], data[1][: cfg.train_subset]
    jobs = [
        (model, opt, lr, seed)
        for model in cfg.models
        for opt, lrs in cfg.lrs.items()
        for lr in lrs
        for seed in cfg.seeds
    ]
    runs = [
        train_run(*job, data, cfg) for job in tqdm(jobs, desc="training runs", disable=not progress)
    ]
    sweep = summarize(runs)
    best = best_rows(sweep)
    timing, context = ([], {}) if args.no_timing else step_time_table(cfg, progress)

    table = markdown_tables(sweep, best, timing, context, cfg)
    results = {
        "config": asdict(cfg),
        "meta": record.finish(),
        "train_size": len(data[0]),
        "test_size": len(data[2]),
        "runs": runs,
        "sweep": sweep,
        "best": best,
        "step_time": timing,
        "step_time_context": context,
    }
    (args.out / "results.json").write_text(json.dumps(_jsonable(results), indent=1))
    (args.out / "results.md").write_text(table)
    plot(runs, best, timing, args.out)
    print(table)
    return results


if __name__ == "__main__":
    main()
