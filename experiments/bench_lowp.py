r"""The bfloat16 window against the float32 window: accuracy of the step, training, step time, memory.

Run ``python -m experiments.bench_lowp`` (``--help``; ``--quick`` for a smoke run). Three tables:

* ``accuracy``: one steady-state step of a float32 window and of a bfloat16 window
  (:class:`mfac.LowPrecisionSlidingInverseFisher`) holding the same synthetic correlated gradients
  (``experiments.bench_core.GradientGenerator``), for several ``damp``. Max-norm relative errors
  against the float64 step ``s G^T (s damp I + G G^T)^{-1} e_r`` of the *unrounded* rows (what each
  window costs against exact arithmetic) and, for the bfloat16 window, against the float64 step of the
  bfloat16-*rounded* rows (the implementation's own error: it should be float32's).
* ``training``: ``MFAC`` with a float32 and a bfloat16 window (otherwise identical: the learning rate,
  damping, window and momentum of ``experiments/compressed_window.py``) on scikit-learn's digits,
  the MLP and the CNN, 3 seeds: final train loss and test accuracy (mean +- std) and the window's bytes.
* ``time``: ``update_mul`` of the float32 window, of the bfloat16 window and the float32 floor
  ``G g + G^T c``, interleaved; wall-time and CPU-time medians (the CPU time leaves out waiting for a
  core on a loaded machine), and torch's own bfloat16 ``mv`` pair on the bfloat16 window (inexact: it
  rounds every output to bfloat16) as the speed a fused bfloat16-in, float32-accumulate kernel could
  reach. Memory: the window's bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experiments._data import load_split, minibatches
from experiments._measure import stopwatch, time_interleaved, two_pass_floor
from experiments._metrics import evaluate, mean_std, rel_err_max
from experiments._models import build_model, count_parameters
from experiments._provenance import RunRecord, commit_label, load_label
from experiments._report import fmt_d, fmt_e, fmt_x, jsonable, md_head, md_row
from experiments.bench_core import (
    GradientGenerator,
    _float64_combine,
    _float64_gram,
    _load_steady_state,
)
from mfac import MFAC, LowPrecisionSlidingInverseFisher, SlidingInverseFisher

GIB = 2**30
BF16 = torch.bfloat16


def _pair(m: int, d: int, damp: float, seed: int
          ) -> tuple[SlidingInverseFisher, LowPrecisionSlidingInverseFisher]:
    """A float32 and a bfloat16 window, full and wrapped, over the same rows (rounded for bfloat16)."""
    gen = GradientGenerator(d, seed=seed)
    full = SlidingInverseFisher(d, m, damp)
    window = full.state_dict()["grads"]
    gen.fill(window, seed=seed + 1)
    _load_steady_state(full, _float64_gram(window))
    low = LowPrecisionSlidingInverseFisher(d, m, damp)
    low.state_dict()["grads"].copy_(window)  # rounds to bfloat16
    _load_steady_state(low, _float64_gram(low.state_dict()["grads"]))
    return full, low


def _truth(window: torch.Tensor, row: int, damp: float) -> torch.Tensor:
    """The float64 step ``m G^T (m damp I + G G^T)^{-1} e_row`` for the rows ``window`` holds."""
    m = window.shape[0]
    system = _float64_gram(window)
    system.diagonal().add_(m * damp)
    rhs = torch.zeros(m, 1, dtype=torch.float64)
    rhs[row, 0] = m
    return _float64_combine(window, torch.cholesky_solve(rhs, torch.linalg.cholesky(system)))[:, 0]


def accuracy(args: argparse.Namespace) -> list[dict]:
    rows = []
    for m, d in args.accuracy_sizes:
        for damp in args.damps:
            full, low = _pair(m, d, damp, args.seed)
            g = GradientGenerator(d, seed=args.seed).rows(1, seed=args.seed + 7)[0]
            row = full.next_row
            u32, u16 = full.update_mul(g), low.update_mul(g)
            exact = _truth(full.window, row, damp)
            rounded = _truth(low.window, row, damp)
            rows.append({
                "m": m, "d": d, "damp": damp,
                "f32_vs_exact": rel_err_max(u32, exact), "bf16_vs_exact": rel_err_max(u16, exact),
                "bf16_vs_rounded": rel_err_max(u16, rounded),
                "bf16_vs_f32": rel_err_max(u16, u32.double()),
                "rounded_vs_exact": rel_err_max(rounded, exact),
            })
            print("  " + json.dumps(jsonable(rows[-1])), flush=True)
    return rows


def training(args: argparse.Namespace) -> list[dict]:
    data = load_split("digits", seed=0)
    x_train, y_train, x_test, y_test = data
    if args.train_subset:
        x_train, y_train = x_train[: args.train_subset], y_train[: args.train_subset]
    runs = []
    for model_name in args.models:
        for window_dtype in (None, BF16):
            for seed in args.seeds:
                torch.manual_seed(seed)
                model = build_model(model_name, tuple(x_train.shape[1:]))
                opt = MFAC(model.parameters(), lr=args.lr[model_name], ngrads=args.ngrads, damp=args.damp,
                           momentum=0.9, window_dtype=window_dtype)
                gen = torch.Generator().manual_seed(seed)
                steps, spent = 0, 0.0
                for _ in range(args.epochs):
                    for xb, yb in minibatches(x_train, y_train, 32, generator=gen):
                        opt.zero_grad()
                        nn.functional.cross_entropy(model(xb), yb).backward()
                        with stopwatch() as watch:
                            opt.step()
                        spent += watch.seconds
                        steps += 1
                window = opt.inverse_fisher.state_dict()["grads"]
                runs.append({
                    "model": model_name, "window": "bfloat16" if window_dtype else "float32", "seed": seed,
                    "params": count_parameters(model), "steps": steps,
                    "train_loss": evaluate(model, x_train, y_train)[0],
                    "test_acc": evaluate(model, x_test, y_test)[1],
                    "window_bytes": window.numel() * window.element_size(),
                    "ms_per_step": 1e3 * spent / steps,
                })
                print("  " + json.dumps(jsonable(runs[-1])), flush=True)
    return runs


def _time_one(m: int, d: int, args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"m": m, "d": d}
    full, low = _pair(m, d, args.time_damp, args.seed)
    stream = GradientGenerator(d, seed=args.seed).rows(args.repeats + args.warmup + 1, seed=99)
    count = {"f32": 0, "bf16": 0}

    def stepper(name: str, op: Any) -> Any:
        def run() -> Any:
            count[name] += 1
            return op.update_mul(stream[count[name]])
        return run

    w32, w16 = full.state_dict()["grads"], low.state_dict()["grads"]
    c = torch.randn(m)
    g16, c16 = stream[0].to(BF16), c.to(BF16)
    t = time_interleaved({
        "f32": stepper("f32", full), "bf16": stepper("bf16", low),
        "floor": two_pass_floor(w32, stream[0], c),
        "bf16_native": lambda: (torch.mv(w16, g16), torch.mv(w16.T, c16)),
    }, args.repeats, args.warmup)
    floor, floor_cpu = t["floor"]["median"], t["floor"]["cpu_median"]
    for name in ("f32", "bf16", "bf16_native"):
        row[f"{name}_s"] = t[name]["median"]
        row[f"{name}_ratio"] = t[name]["median"] / floor
        row[f"{name}_ratio_cpu"] = t[name]["cpu_median"] / floor_cpu
    row.update(floor_s=floor, f32_bytes=w32.numel() * 4, bf16_bytes=w16.numel() * 2,
               tile_cols=low.tile_cols, status="ok")
    return row


def timing(args: argparse.Namespace) -> list[dict]:
    rows = []
    for m, d in args.time_sizes:
        need = m * d * 6  # both windows
        if need > args.mem_gb * GIB:
            rows.append({"m": m, "d": d, "status": f"skipped: both windows {need / GIB:.1f} GiB > "
                                                   f"--mem-gb {args.mem_gb:g}"})
        else:
            rows.append(_time_one(m, d, args))
        print("  " + json.dumps(jsonable(rows[-1])), flush=True)
    return rows


def _mean_std(values: list[float]) -> str:
    """``mean ± std`` over seeds (sample std), the mean alone for one seed."""
    mean, std = mean_std(values)
    return f"{mean:.4f}" if len(values) < 2 else f"{mean:.4f} ± {std:.4f}"


def render(res: dict) -> str:
    meta = res["meta"]
    lines = [
        "# The bfloat16 window against the float32 window", "",
        f"{meta['date']}, mfac at {commit_label(meta)}; torch {meta['torch']}, {meta['threads']} threads; "
        f"load average (1 min) {load_label(meta, 'before')} before, {load_label(meta, 'after')} after.", "",
    ]
    if res["accuracy"]:
        lines += ["## Accuracy of one step (max-norm relative error)", "",
                  md_head(["m", "d", "damp", "f32 vs exact", "bf16 vs exact", "bf16 vs its rounded rows",
                           "bf16 vs f32"])]
        for r in res["accuracy"]:
            lines.append(md_row([r["m"], fmt_d(r["d"]), f"{r['damp']:g}", fmt_e(r["f32_vs_exact"]),
                                 fmt_e(r["bf16_vs_exact"]), fmt_e(r["bf16_vs_rounded"]),
                                 fmt_e(r["bf16_vs_f32"])]))
        lines += ["", "exact: the float64 step of the unrounded rows; its rounded rows: the float64 step of "
                  "the bfloat16-rounded rows (the operator the bfloat16 window represents).", ""]
    if res["training"]:
        lines += ["## Training: MFAC on digits, float32 vs bfloat16 window (mean ± std over seeds)", "",
                  md_head(["model", "window", "params", "steps", "train loss", "test accuracy", "window",
                           "ms / optimizer step"])]
        groups: dict[tuple[str, str], list[dict]] = {}
        for r in res["training"]:
            groups.setdefault((r["model"], r["window"]), []).append(r)
        for (model, window), runs in groups.items():
            lines.append(md_row([model, window, runs[0]["params"], runs[0]["steps"],
                                 _mean_std([r["train_loss"] for r in runs]),
                                 _mean_std([r["test_acc"] for r in runs]),
                                 f"{runs[0]['window_bytes'] / 2**20:.1f} MiB",
                                 f"{statistics.median(r['ms_per_step'] for r in runs):.2f}"]))
        lines.append("")
    if res["time"]:
        lines += ["## Step time and memory (steady state; / the float32 floor `G g + G^T c`)", "",
                  md_head(["m", "d", "f32 step", "bf16 step", "bf16 native mv pair (inexact)",
                           "f32 (cpu)", "bf16 (cpu)", "f32 floor", "f32 window", "bf16 window", "tile"])]
        for r in res["time"]:
            if r["status"] != "ok":
                lines.append(f"| {r['m']} | {fmt_d(r['d'])} | {r['status']} |" + " |" * 8)
                continue
            lines.append(md_row([r["m"], fmt_d(r["d"]), fmt_x(r["f32_ratio"]), fmt_x(r["bf16_ratio"]),
                                 fmt_x(r["bf16_native_ratio"]), fmt_x(r["f32_ratio_cpu"]),
                                 fmt_x(r["bf16_ratio_cpu"]), f"{r['floor_s'] * 1e3:.1f} ms",
                                 f"{r['f32_bytes'] / GIB:.2f} GiB", f"{r['bf16_bytes'] / GIB:.2f} GiB",
                                 r["tile_cols"]]))
        lines += ["", "cpu: the same ratios from CPU time (`time.process_time`), which leaves out waiting "
                  "for a core. bf16 native: torch's bfloat16 `mv` for `G g` and `G^T c` on the bfloat16 "
                  "window; it rounds each result to bfloat16 (relative error ~4e-3 per Gram entry), so "
                  "the window does not use it; it shows what a fused kernel could reach.", ""]
    return "\n".join(lines)


def _sizes(text: list[str]) -> list[tuple[int, int]]:
    out = []
    for item in text:
        m, d = item.lower().split("x")
        out.append((int(m), int(float(d))))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_lowp", description=__doc__.split("\n")[0])
    p.add_argument("--accuracy-sizes", nargs="*", default=["64x1e5", "256x1e5"], help="m x d")
    p.add_argument("--damps", type=float, nargs="+", default=[1e-1, 1e-3, 1e-5])
    p.add_argument("--time-sizes", nargs="*", default=["1024x1e5", "256x1e6", "64x4e6", "64x1e7"])
    p.add_argument("--time-damp", type=float, default=1e-5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--mem-gb", type=float, default=8.0, help="largest pair of windows to allocate")
    p.add_argument("--models", nargs="*", default=["MLP", "CNN"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--ngrads", type=int, default=256)
    p.add_argument("--damp", type=float, default=1e-3, help="training damp")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    p.add_argument("--out", type=Path, default=Path("results/bench_lowp"))
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    args.lr = {"MLP": 3e-3, "CNN": 1e-2}
    if args.quick:
        args.accuracy_sizes, args.damps, args.time_sizes = ["8x3e4"], [1e-3], ["8x3e4"]
        args.models, args.seeds, args.epochs, args.ngrads = ["MLP"], [0], 1, 4
        args.train_subset, args.repeats = 64, 2
    args.accuracy_sizes, args.time_sizes = _sizes(args.accuracy_sizes), _sizes(args.time_sizes)
    torch.set_num_threads(args.threads)
    record = RunRecord(argv)
    print("[bench_lowp] accuracy", flush=True)
    acc = accuracy(args)
    print("[bench_lowp] training", flush=True)
    train = training(args) if args.models else []
    print("[bench_lowp] time", flush=True)
    times = timing(args)
    res = {
        "meta": record.finish(quick=args.quick, repeats=args.repeats, warmup=args.warmup,
                              time_damp=args.time_damp, seed=args.seed),
        "accuracy": acc, "training": train, "time": times,
    }
    text = render(res)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_lowp.md").write_text(text)
    (args.out / "bench_lowp.json").write_text(json.dumps(jsonable(res), indent=1))
    if any(not math.isfinite(r["train_loss"]) for r in train):
        print("[bench_lowp] note: a training run diverged", flush=True)
    return res


if __name__ == "__main__":
    main()
