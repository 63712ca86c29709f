r"""IHVP exactness and cost of mfac's operators.

    python -m experiments.ihvp_exactness [--quick] [--out results/ihvp_exactness] [--sections ...]

Three sections, each with its own table and plot:

1. ``exactness``: relative error ``|y - y*|_2 / |y*|_2`` of inverse-Fisher-vector products
   ``y = F^{-1} x`` with ``F = damp I + (1/m) G^T G`` against the dense inverse, for ``damp`` from
   1e-8 to 1e2 (every decade) and the dtypes float64 and float32, on two gradient sets:
   ``synthetic`` (``bench_core.GradientGenerator``: correlated, per-coordinate log-normal scales)
   and ``digits-mlp`` (per-sample gradients of a small MLP trained on scikit-learn's digits: real,
   very unequal norms). Products measured on the same ``m`` gradients:

   * ``StaticInverseFisher.mul`` on a random vector (``rand``) and on a gradient of the set
     (``grad``: the hard, cancelling case ``x/damp - Q^T Q x/damp^2``), and ``diag()``;
   * ``SlidingInverseFisher`` after a stream that wrapped the ring: ``mul`` (``rand``, ``grad``)
     and ``update_mul`` (the newest gradient: the optimizer's product);
   * the paper's formulations (``experiments/_paper_reference.py``): the sequential static
     recursion then ``recursion_mul`` (``grad``), and the paper's sliding step (``grad``);
   * the explicit dense inverse cast to the dtype (what a dense float32 inverse gives).

   The reference is ``DenseInverseFisher`` in float64 on the same (float32-representable) gradients,
   with one step of iterative refinement (``y += F^{-1}(x - F y)``, ``F y`` applied in float64 as
   ``damp y + G^T (G y) / m``), so that the reference is accurate to about float64 round-off even
   where ``cond(F) = 1 + lambda_max / damp`` reaches 1e8 and more; the refinement correction itself
   is reported as the error of the unrefined dense inverse (column ``dense f64``).

2. ``cost``: time against ``d`` (fixed ``m``) and against ``m`` (fixed ``d``), float32, median of
   ``--repeats`` (>= 5) interleaved calls after a warm-up:

   * static build ``StaticInverseFisher(G, damp)`` against its floor (DESIGN.md section 5):
     ``G @ G.T`` + one triangular solve ``L^{-1} G`` (the faster of the left and the transposed
     right layout), and against the paper's sequential recursion;
   * sliding step ``SlidingInverseFisher.update_mul`` in steady state (window full, wrapped)
     against its floor ``G @ g`` + ``G.T @ c``, and the paper's sliding step (``K`` refactored
     every step) on a copy of the same window (``4 x --repeats`` timed steps: a step costs
     milliseconds; the O(m^3) refactor every ``m`` steps is included where it falls).

   One torch thread by default (``--threads``): on a shared, loaded machine multi-threaded
   BLAS/LAPACK calls stall on OpenMP barriers.

   Log-log plots carry reference slopes: O(dm) and O(dm^2) (linear in ``d`` for both; slope 1 and
   2 in ``m``), anchored at the largest measured size.

3. ``memory``: peak resident memory added by the static build (ours and the paper's recursion) and
   by a sliding operator that took ``m + 1`` gradients, over the ``m x d`` input, measured in one
   fresh child process (``VmHWM`` reset through ``/proc/self/clear_refs``; malloc's mmap threshold
   pinned so freed buffers go back to the system).

Outputs in ``--out``: ``results.json``, ``results.md``, ``exactness.png``, ``cost_scaling.png``,
``memory_scaling.png``. ``--quick`` runs tiny sizes in seconds (the smoke test uses it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
from tqdm.auto import tqdm

if __package__ in (None, ""):  # run as a file: make `experiments` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments._data import load_digits_split, minibatches
from experiments._measure import (
    current_rss,
    peak_rss,
    reset_peak,
    static_build_floor,
    static_floor_seconds,
    stopwatch,
    time_interleaved,
    two_pass_floor,
)
from experiments._metrics import rel_err
from experiments._models import mlp
from experiments._paper_reference import (
    PaperSlidingWindow,
    recursion_mul,
    static_recursion,
)
from experiments._provenance import RunRecord
from experiments._report import fmt_d, fmt_e, fmt_x, jsonable, md_head, md_row
from experiments.bench_core import GradientGenerator
from mfac import DenseInverseFisher, SlidingInverseFisher, StaticInverseFisher
from mfac.collect import collect_grads
from mfac.numerics import MFACWarning

SECTIONS = ("exactness", "cost", "memory")
F64 = torch.float64
F32 = torch.float32
TIMING_DAMP = 1e-4
DTYPES = {"float64": F64, "float32": F32}
#: the products of the exactness table, in column order: (key, label)
PRODUCTS = (
    ("static_mul_rand", "static mul (rand)"),
    ("static_mul_grad", "static mul (grad)"),
    ("static_diag", "static diag"),
    ("sliding_mul_rand", "sliding mul (rand)"),
    ("sliding_mul_grad", "sliding mul (grad)"),
    ("update_mul", "sliding update_mul"),
    ("paper_recursion_grad", "paper recursion (grad)"),
    ("paper_step", "paper sliding step"),
    ("dense_cast", "dense inverse in dtype (grad)"),
)

DEFAULTS: dict[str, Any] = {
    "acc_m": 64,
    "acc_d": 2000,
    "mlp_hidden": 32,  # 64-32-10 MLP: d = 2410
    "mlp_epochs": 15,
    "damps": [10.0**k for k in range(-8, 3)],
    "m_fixed": 64,
    "d_sweep": [10_000, 30_000, 100_000, 300_000, 1_000_000],
    "d_fixed": 100_000,
    "m_sweep": [8, 16, 32, 64, 128, 256],
    "repeats": 5,
    "warmup": 1,
    "recursion_max": 1e10,  # skip the paper's recursion where m^2 d exceeds this
    "mem_sizes": [(64, 100_000), (64, 1_000_000), (16, 300_000), (256, 300_000)],
}
QUICK: dict[str, Any] = {
    "acc_m": 12,
    "acc_d": 200,
    "mlp_hidden": 4,  # d = 310
    "mlp_epochs": 2,
    "damps": [1e-8, 1e-4, 1.0, 1e2],
    "m_fixed": 8,
    "d_sweep": [2_000, 8_000],
    "d_fixed": 8_000,
    "m_sweep": [4, 16],
    "repeats": 5,
    "warmup": 1,
    "recursion_max": 1e10,
    "mem_sizes": [(4, 200_000)],
}


# ====================================================================== small helpers
def _fmt_t(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of ``log y`` on ``log x`` (None with fewer than two points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if y and y > 0]
    if len(pts) < 2:
        return None
    lx, ly = np.array(pts).T
    return float(np.polyfit(lx, ly, 1)[0])


# ====================================================================== 1. exactness
def digits_mlp_gradients(n: int, hidden: int, seed: int, epochs: int) -> torch.Tensor:
    """``n`` per-sample gradients (float32, ``(n, d)``) of a 64-``hidden``-10 MLP trained on digits."""
    split = load_digits_split(seed=0)
    torch.manual_seed(seed)
    model = mlp(hidden=(hidden,))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for x, y in minibatches(split.x_train, split.y_train, 64, generator=gen):
            opt.zero_grad()
            nnf.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    order = torch.randperm(len(split.x_train), generator=gen)[:n]
    data = [(split.x_train[order], split.y_train[order])]

    def loss_fn(model, batch):
        x, y = batch
        return nnf.cross_entropy(model(x), y)

    return collect_grads(model, loss_fn, data, n, per_sample=True, progress=False).to(F32)


def gradient_sets(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """``{source: (m + m//2, d)}`` float32 rows: the first ``m // 2`` are the older stream, the last
    ``m`` the set every operator is built on."""
    m = cfg["acc_m"]
    n = m + m // 2
    synthetic = GradientGenerator(cfg["acc_d"], seed=seed).rows(n, seed=seed + 1, dtype=F32)
    real = digits_mlp_gradients(n, cfg["mlp_hidden"], seed, cfg["mlp_epochs"])
    return {"synthetic": synthetic, "digits-mlp": real}


def dense_reference(grads64: torch.Tensor, damp: float, rhs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float64 dense ``F^{-1}`` applied to the columns of ``rhs`` ``(d, k)``, refined once.

    Returns ``{"truth": (d, k), "unrefined": (d, k), "diag": (d,), "matrix": (d, d)}``.
    """
    m = grads64.shape[0]
    dense = DenseInverseFisher(grads64, damp)
    inv = dense.matrix  # (d, d) float64

    def apply_fisher(y: torch.Tensor) -> torch.Tensor:  # F y, float64, without forming F again
        return damp * y + grads64.T @ (grads64 @ y) / m

    y0 = inv @ rhs
    y1 = y0 + inv @ (rhs - apply_fisher(y0))
    return {"truth": y1, "unrefined": y0, "diag": dense.diag(), "matrix": inv}


def exactness_case(rows32: torch.Tensor, m: int, damp: float, dtype: torch.dtype,
                   ref: dict[str, torch.Tensor], x_rand32: torch.Tensor) -> dict[str, Any]:
    """All products of one (gradient set, damp, dtype) against the float64 reference."""
    rows = rows32.to(dtype)
    old, grads = rows[:-m], rows[-m:]  # (m//2, d) older stream, (m, d) the set
    d = grads.shape[1]
    x_rand = x_rand32.to(dtype)
    g_last = grads[-1]
    truth_rand, truth_grad = ref["truth"][:, 0], ref["truth"][:, 1]
    out: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MFACWarning)
        static = StaticInverseFisher(grads, damp)
        out["static_mul_rand"] = rel_err(static.mul(x_rand), truth_rand)
        out["static_mul_grad"] = rel_err(static.mul(g_last), truth_grad)
        out["static_diag"] = rel_err(static.diag(), ref["diag"])
        del static
        sliding = SlidingInverseFisher(d, m, damp, dtype=dtype)
        for g in torch.cat([old, grads[:-1]]):
            sliding.update(g)
        out["update_mul"] = rel_err(sliding.update_mul(g_last), truth_grad)
        out["sliding_mul_rand"] = rel_err(sliding.mul(x_rand), truth_rand)
        out["sliding_mul_grad"] = rel_err(sliding.mul(g_last), truth_grad)
        out["sliding_refactors_jitter"] = sliding.jitter
        del sliding
    out["warnings"] = sorted({str(w.message).split(";")[0][:120] for w in caught})
    with torch.no_grad():
        vecs, den = static_recursion(grads, damp)
        out["paper_recursion_grad"] = rel_err(recursion_mul(vecs, den, damp, g_last), truth_grad)
        del vecs, den
        buffer = grads.clone()
        buffer[-1] = old[-1]  # the window just before g_last replaces the oldest row
        paper = PaperSlidingWindow(buffer, damp, next_row=m - 1)
        out["paper_step"] = rel_err(paper.update_mul(g_last), truth_grad)
        out["paper_failed_steps"] = paper.failed_steps
        out["dense_cast"] = rel_err(ref["matrix"].to(dtype) @ g_last, truth_grad)
    return out


def run_exactness(cfg: dict, seed: int, progress: bool) -> list[dict]:
    m = cfg["acc_m"]
    sets = gradient_sets(cfg, seed)
    results = []
    jobs = [(src, damp) for src in sets for damp in cfg["damps"]]
    for src, damp in tqdm(jobs, desc="exactness", disable=not progress):
        rows32 = sets[src]
        grads64 = rows32[-m:].to(F64)
        d = grads64.shape[1]
        gen = torch.Generator().manual_seed(seed + 7)
        x_rand32 = torch.randn(d, generator=gen, dtype=F32)
        rhs = torch.stack([x_rand32.to(F64), grads64[-1]], dim=1)  # (d, 2)
        ref = dense_reference(grads64, damp, rhs)
        lam = torch.linalg.eigvalsh(grads64 @ grads64.T / m)
        mean_diag = float(grads64.square().sum(0).mean() / m)
        common = {
            "source": src, "m": m, "d": d, "damp": damp,
            "damp_over_mean_diag": damp / mean_diag,
            "cond": 1.0 + float(lam[-1]) / damp,
            "lambda_max": float(lam[-1]),
        }
        dense_err = rel_err(ref["unrefined"][:, 1], ref["truth"][:, 1])
        for name, dtype in DTYPES.items():
            row = {**common, "dtype": name}
            row.update(exactness_case(rows32, m, damp, dtype, ref, x_rand32))
            row["dense_f64_unrefined"] = dense_err
            results.append(row)
    return results


# ====================================================================== 2. cost
def _time_build(m: int, d: int, gen: GradientGenerator, args, cfg: dict) -> dict:
    grads = gen.rows(m, seed=args.seed + 11)  # (m, d) float32
    small = grads[: min(m, 8), : min(d, 4096)].contiguous()
    with_rec = m * m * d <= cfg["recursion_max"]
    fns = {"ours": lambda: StaticInverseFisher(grads, TIMING_DAMP), **static_build_floor(grads)}
    if with_rec:
        fns["recursion"] = lambda: static_recursion(grads, TIMING_DAMP)
    warm = dict(fns)
    if with_rec:
        warm["recursion"] = lambda: static_recursion(small, TIMING_DAMP)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MFACWarning)
        t = time_interleaved(fns, cfg["repeats"], cfg["warmup"], warmup_fns=warm)
    row = {"m": m, "d": d, **{f"{k}_s": v["median"] for k, v in t.items()}}
    row["trsm_s"] = min(row["trsm_left_s"], row["trsm_right_s"])
    row["floor_s"] = static_floor_seconds(t)
    row["ratio"] = row["ours_s"] / row["floor_s"]
    row["recursion_s"] = row.get("recursion_s")
    row["recursion_over_ours"] = row["recursion_s"] / row["ours_s"] if with_rec else None
    row["recursion_status"] = "ok" if with_rec else f"skipped: m^2 d > {cfg['recursion_max']:g}"
    row["times"] = {k: v["times"] for k, v in t.items()}
    return row


def _time_step(m: int, d: int, gen: GradientGenerator, args, cfg: dict) -> dict:
    repeats = 4 * cfg["repeats"]  # a step costs milliseconds: more repeats, steadier medians
    nsteps = cfg["warmup"] + repeats
    window = gen.rows(m, seed=args.seed + 13)
    stream = gen.rows(nsteps + 2, seed=args.seed + 17)
    op = SlidingInverseFisher(d, m, TIMING_DAMP, dtype=F32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MFACWarning)
        for g in window:  # fill ...
            op.update(g)
        op.update(stream[-1])  # ... and wrap: steady state from here on
        paper = PaperSlidingWindow(op.window.clone(), TIMING_DAMP, next_row=op.next_row)
        counter = {"ours": 0, "paper": 0}

        def ours() -> None:
            op.update_mul(stream[counter["ours"] % nsteps])
            counter["ours"] += 1

        def paper_step() -> None:
            paper.update_mul(stream[counter["paper"] % nsteps])
            counter["paper"] += 1

        floor = two_pass_floor(op.window, stream[0])  # the ring buffer itself (a view, not a copy)
        t = time_interleaved({"ours": ours, "floor": floor, "paper": paper_step}, repeats, cfg["warmup"])
    row = {"m": m, "d": d, **{f"{k}_s": v["median"] for k, v in t.items()}}
    row["ratio"] = row["ours_s"] / row["floor_s"]
    row["paper_ratio"] = row["paper_s"] / row["floor_s"]
    row["paper_failed_steps"] = paper.failed_steps
    row["times"] = {k: v["times"] for k, v in t.items()}
    return row


def run_cost(cfg: dict, args, progress: bool) -> dict[str, list[dict]]:
    grid = [("d", cfg["m_fixed"], d) for d in cfg["d_sweep"]]
    grid += [("m", m, cfg["d_fixed"]) for m in cfg["m_sweep"]]
    build, step = [], []
    gens: dict[int, GradientGenerator] = {}
    done: dict[tuple[int, int], tuple[dict, dict]] = {}
    for sweep, m, d in tqdm(grid, desc="cost", disable=not progress):
        if (m, d) not in done:  # the (m_fixed, d_fixed) point is shared by both sweeps
            if d not in gens:
                gens = {d: GradientGenerator(d, seed=args.seed)}  # keep one (memory)
            done[(m, d)] = (_time_build(m, d, gens[d], args, cfg), _time_step(m, d, gens[d], args, cfg))
        b, s = done[(m, d)]
        build.append({**b, "sweep": sweep})
        step.append({**s, "sweep": sweep})
    return {"build": build, "step": step}


def cost_slopes(cost: dict[str, list[dict]]) -> dict[str, float | None]:
    """Fitted log-log slopes over the upper half of each sweep (small sizes are overhead-bound)."""
    out: dict[str, float | None] = {}
    for section, keys in (("build", ("ours_s", "floor_s", "recursion_s")),
                          ("step", ("ours_s", "floor_s", "paper_s"))):
        for sweep in ("d", "m"):
            rows = [r for r in cost[section] if r["sweep"] == sweep]
            rows = rows[len(rows) // 2 - (len(rows) % 2 == 0):] if len(rows) > 2 else rows
            for key in keys:
                pts = [(r[sweep], r[key]) for r in rows if r.get(key)]
                out[f"{section}.{key[:-2]}.vs_{sweep}"] = (
                    loglog_slope(*zip(*pts, strict=True)) if len(pts) >= 2 else None
                )
    return out


# ====================================================================== 3. memory


def measure_memory(sizes: Sequence[tuple[int, int]], seed: int) -> list[dict]:
    """Peak RSS added by each build (over the RSS with the input held), in units of ``m d * 4``."""
    StaticInverseFisher(torch.randn(4, 300), 1e-2)  # load code paths once
    static_recursion(torch.randn(4, 300), 1e-2)
    out = []
    for m, d in sizes:
        unit = m * d * 4
        grads = GradientGenerator(d, seed=seed).rows(m, seed=seed + 1)
        row: dict[str, Any] = {"m": m, "d": d, "input_bytes": unit}
        for name in ("static", "recursion", "sliding"):
            base = current_rss()
            ok = reset_peak()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MFACWarning)
                if name == "static":
                    held = StaticInverseFisher(grads, TIMING_DAMP)
                elif name == "recursion":
                    held = static_recursion(grads, TIMING_DAMP)
                else:
                    held = SlidingInverseFisher(d, m, TIMING_DAMP, dtype=F32)
                    for g in grads:
                        held.update(g)
                    held.update_mul(grads[0])
            peak = peak_rss(ok)
            retained = current_rss()
            del held
            row[f"{name}_peak_bytes"] = peak - base
            row[f"{name}_peak_multiple"] = (peak - base) / unit
            row[f"{name}_retained_multiple"] = (retained - base) / unit
            row["method"] = "VmHWM after clear_refs" if ok else "ru_maxrss (upper bound)"
        del grads
        out.append(row)
    return out


def run_memory(cfg: dict, args, quick: bool) -> list[dict]:
    if quick:  # in-process (a child costs a torch import): exercises the code only
        return measure_memory(cfg["mem_sizes"], args.seed)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072",
               OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "experiments.ihvp_exactness", "--memory-child",
           json.dumps([list(s) for s in cfg["mem_sizes"]]), "--seed", str(args.seed)]
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, cwd=root)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ====================================================================== report
def exactness_tables(rows: list[dict]) -> list[str]:
    lines = []
    for src in dict.fromkeys(r["source"] for r in rows):
        for dtype in DTYPES:
            sel = [r for r in rows if r["source"] == src and r["dtype"] == dtype]
            if not sel:
                continue
            r0 = sel[0]
            lines += [f"### {src}, {dtype} (m = {r0['m']}, d = {r0['d']}, "
                      f"lambda_max(G G^T / m) = {r0['lambda_max']:.2e})", ""]
            head = ["damp", "damp / mean diag", "cond(F)"] + [label for _, label in PRODUCTS]
            if dtype == "float64":
                head.append("dense f64 (unrefined)")
            lines.append(md_head(head))
            for r in sel:
                cells = [f"{r['damp']:.0e}", f"{r['damp_over_mean_diag']:.1e}", f"{r['cond']:.1e}"]
                cells += [fmt_e(r[k]) for k, _ in PRODUCTS]
                if dtype == "float64":
                    cells.append(fmt_e(r["dense_f64_unrefined"]))
                lines.append(md_row(cells))
            warned = sorted({w for r in sel for w in r["warnings"]})
            if warned:
                lines += ["", f"mfac warnings: {'; '.join(warned)}"]
            lines.append("")
    lines += ["Relative 2-norm error against the refined float64 dense inverse on the same gradients. "
              "`rand`: a Gaussian vector; `grad`: the newest gradient of the set (in the span of G: "
              "the cancelling case). 'fail' = non-finite output (the paper's float32 Cholesky of K "
              "failed, or the recursion broke down).", ""]
    return lines


def cost_tables(cost: dict[str, list[dict]], slopes: dict[str, float | None]) -> list[str]:
    lines = ["### Static build (float32)", "",
             md_head(["sweep", "m", "d", "ours", "G G^T", "trsm", "floor", "ours/floor",
                    "paper recursion", "recursion/ours"])]
    for r in cost["build"]:
        lines.append(md_row([r["sweep"], r["m"], fmt_d(r["d"]), _fmt_t(r["ours_s"]), _fmt_t(r["gram_s"]),
                           _fmt_t(r["trsm_s"]), _fmt_t(r["floor_s"]), fmt_x(r["ratio"]),
                           _fmt_t(r["recursion_s"]) if r["recursion_s"] else r["recursion_status"],
                           fmt_x(r["recursion_over_ours"], 1)]))
    lines += ["", "### Sliding step `update_mul`, steady state (float32)", "",
              md_head(["sweep", "m", "d", "ours", "floor G g + G^T c", "ours/floor", "paper step",
                     "paper/floor"])]
    for r in cost["step"]:
        lines.append(md_row([r["sweep"], r["m"], fmt_d(r["d"]), _fmt_t(r["ours_s"]), _fmt_t(r["floor_s"]),
                           fmt_x(r["ratio"]), _fmt_t(r["paper_s"]), fmt_x(r["paper_ratio"])]))
    lines += ["", "### Fitted log-log slopes (upper half of each sweep)", "",
              md_head(["quantity", "vs d (expected 1)", "vs m (expected: build 2, step 1)"])]
    for section, keys in (("build", ("ours", "floor", "recursion")), ("step", ("ours", "floor", "paper"))):
        for key in keys:
            vd, vm = slopes.get(f"{section}.{key}.vs_d"), slopes.get(f"{section}.{key}.vs_m")
            lines.append(md_row([f"{section} {key}", "-" if vd is None else f"{vd:.2f}",
                               "-" if vm is None else f"{vm:.2f}"]))
    lines += ["", f"Median of the timed calls (interleaved round-robin with their floors), damp = "
              f"{TIMING_DAMP:g}.", ""]
    return lines


def memory_table(rows: list[dict]) -> list[str]:
    lines = [md_head(["m", "d", "input m·d·4", "static build peak", "paper recursion peak",
                    "sliding (m+1 updates) peak", "static retained", "method"])]
    for r in rows:
        lines.append(md_row([r["m"], fmt_d(r["d"]), f"{r['input_bytes'] / 2**20:.0f} MiB",
                           fmt_x(r["static_peak_multiple"]), fmt_x(r["recursion_peak_multiple"]),
                           fmt_x(r["sliding_peak_multiple"]), fmt_x(r["static_retained_multiple"]),
                           r["method"]]))
    lines += ["", "Peak RSS added by the call, over the RSS with the input held, in units of the "
              "m x d float32 input. A dense d x d float32 inverse would be d / m of these units "
              "(e.g. 15600x at m = 64, d = 1e6).", ""]
    return lines


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_exactness(rows: list[dict], path: Path) -> None:
    plt = _plt()
    sources = list(dict.fromkeys(r["source"] for r in rows))
    fig, axes = plt.subplots(len(sources), 2, figsize=(13, 4.6 * len(sources)), squeeze=False)
    styles = {"static_mul_grad": "o-", "static_mul_rand": "o:", "static_diag": "x--",
              "sliding_mul_grad": "s-", "update_mul": "D-", "paper_recursion_grad": "v-",
              "paper_step": "^-", "dense_cast": "*--", "sliding_mul_rand": "s:"}
    labels = dict(PRODUCTS)
    for i, src in enumerate(sources):
        for j, dtype in enumerate(DTYPES):
            ax = axes[i][j]
            sel = [r for r in rows if r["source"] == src and r["dtype"] == dtype]
            damps = [r["damp"] for r in sel]
            for key, style in styles.items():
                ys = [r[key] if math.isfinite(r[key]) else np.nan for r in sel]
                ys = [max(y, 1e-17) if not math.isnan(y) else y for y in ys]
                ax.loglog(damps, ys, style, label=labels[key], markersize=4)
            eps = torch.finfo(DTYPES[dtype]).eps
            ax.axhline(eps, color="grey", lw=0.8, ls="--")
            ax.text(damps[0], eps * 1.5, f"eps({dtype})", color="grey", fontsize=7)
            ax.set_ylim(1e-17, 1e3)
            ax.set_title(f"{src}, {dtype}")
            ax.set_xlabel("damp")
            ax.set_ylabel("relative error vs dense (refined)")
            ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.suptitle("F^{-1} x: relative error against the dense inverse (failed products not drawn)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ref_line(ax, xs: list[float], anchor: float, power: int, label: str, style: str) -> None:
    x_top = xs[-1]
    ax.loglog(xs, [anchor * (x / x_top) ** power for x in xs], style, color="grey", lw=1, label=label)


def plot_cost(cost: dict[str, list[dict]], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    spec = {
        "build": (("ours_s", "static build (ours)", "o-"), ("floor_s", "floor: G G^T + trsm", "k--"),
                  ("recursion_s", "paper recursion", "v-")),
        "step": (("ours_s", "update_mul (ours)", "o-"), ("floor_s", "floor: G g + G^T c", "k--"),
                 ("paper_s", "paper sliding step", "^-")),
    }
    for i, sweep in enumerate(("d", "m")):
        for j, section in enumerate(("build", "step")):
            ax = axes[i][j]
            rows = [r for r in cost[section] if r["sweep"] == sweep]
            if not rows:
                continue
            xs = [r[sweep] for r in rows]
            for key, label, style in spec[section]:
                pts = [(r[sweep], r[key]) for r in rows if r.get(key)]
                if pts:
                    ax.loglog(*zip(*pts, strict=True), style, label=label, markersize=4)
            top = rows[-1]["ours_s"]
            if sweep == "d":
                _ref_line(ax, xs, top, 1, "O(dm), O(dm^2): slope 1 in d", ":")
            else:
                _ref_line(ax, xs, top, 1, "O(dm): slope 1 in m", ":")
                _ref_line(ax, xs, top, 2, "O(dm^2): slope 2 in m", "-.")
            fixed = f"m = {rows[0]['m']}" if sweep == "d" else f"d = {fmt_d(rows[0]['d'])}"
            ax.set_title(f"{section}: time vs {sweep} ({fixed}, float32)")
            ax.set_xlabel(sweep)
            ax.set_ylabel("seconds (median)")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(rows: list[dict], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    units = [r["input_bytes"] for r in rows]
    order = np.argsort(units)
    xs = [units[k] / 2**20 for k in order]
    for key, label, style in (("static", "static build (ours)", "o-"), ("recursion", "paper recursion", "v-"),
                              ("sliding", "sliding (m+1 updates)", "s-")):
        ax.loglog(xs, [rows[k][f"{key}_peak_bytes"] / 2**20 for k in order], style, label=label)
    ax.loglog(xs, xs, "k:", label="O(dm): 1x input")
    ax.loglog(xs, [2 * x for x in xs], "k--", lw=0.8, label="2x input")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("input m·d·4 (MiB)")
    ax.set_ylabel("peak RSS added (MiB)")
    ax.set_title("memory vs m·d")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(res: dict) -> dict[str, Any]:
    """A few headline numbers (also the basis of experiments/README.md)."""
    out: dict[str, Any] = {}
    if "exactness" in res:
        for dtype in DTYPES:
            sel = [r for r in res["exactness"] if r["dtype"] == dtype]
            for key, _ in PRODUCTS:
                vals = [r[key] for r in sel]
                out[f"worst.{dtype}.{key}"] = max(vals) if vals else None
            for damp in (1e-4, 1e-6):
                at = [r for r in sel if math.isclose(r["damp"], damp)]
                if at:
                    out[f"worst.{dtype}.update_mul.damp={damp:g}"] = max(r["update_mul"] for r in at)
                    worst = max(r["static_mul_grad"] for r in at)
                    out[f"worst.{dtype}.static_mul_grad.damp={damp:g}"] = worst
    if "cost" in res:
        out["build_ratio_max"] = max(r["ratio"] for r in res["cost"]["build"])
        out["step_ratio_max"] = max(r["ratio"] for r in res["cost"]["step"])
        rec = [r["recursion_over_ours"] for r in res["cost"]["build"] if r["recursion_over_ours"]]
        out["recursion_over_ours_max"] = max(rec) if rec else None
    return out


# ====================================================================== CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.ihvp_exactness",
        description="Exactness (relative error vs the dense inverse across damp and dtype) and cost "
                    "(time and memory vs d and m, against the floors and the paper's formulations) "
                    "of mfac's inverse-Fisher-vector products. Writes results.json, results.md and "
                    "PNG plots to --out.",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for the smoke test")
    p.add_argument("--out", type=Path, default=Path("results/ihvp_exactness"),
                   help="output folder (default: results/ihvp_exactness/)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="what to run (default: all)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed calls per measurement, median reported (default {DEFAULTS['repeats']}; >= 5)")
    p.add_argument("--d-sweep", type=int, nargs="+", default=None,
                   help=f"d values at fixed m (default {DEFAULTS['d_sweep']})")
    p.add_argument("--m-sweep", type=int, nargs="+", default=None,
                   help=f"m values at fixed d (default {DEFAULTS['m_sweep']})")
    p.add_argument("--m-fixed", type=int, default=None,
                   help=f"m of the d sweep (default {DEFAULTS['m_fixed']})")
    p.add_argument("--d-fixed", type=int, default=None,
                   help=f"d of the m sweep (default {DEFAULTS['d_fixed']})")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared, loaded machine multi-threaded BLAS/LAPACK "
                        "calls stall on OpenMP barriers, e.g. a 4x4 Cholesky takes 16 ms instead of 3 µs; "
                        "ratios to the floors are measured with the same threads)")
    p.add_argument("--seed", type=int, default=0, help="seed of gradients and vectors")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the experiment; returns the results (also written to ``--out``)."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        sizes = [tuple(s) for s in json.loads(args.memory_child)]
        print(json.dumps(measure_memory(sizes, args.seed)))
        return {}
    cfg = dict(QUICK if args.quick else DEFAULTS)
    for key in ("repeats", "d_sweep", "m_sweep", "m_fixed", "d_fixed"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if cfg["repeats"] < 5:
        raise SystemExit(f"--repeats must be >= 5 (medians of at least 5), got {cfg['repeats']}")
    progress = not args.no_progress
    record = RunRecord(argv)
    res: dict[str, Any] = {}
    timings: dict[str, float] = {}
    if "exactness" in args.sections:
        with stopwatch() as watch:
            res["exactness"] = run_exactness(cfg, args.seed, progress)
        timings["exactness"] = watch.seconds
    if "cost" in args.sections:
        with stopwatch() as watch:
            res["cost"] = run_cost(cfg, args, progress)
            res["slopes"] = cost_slopes(res["cost"])
        timings["cost"] = watch.seconds
    if "memory" in args.sections:
        with stopwatch() as watch:
            res["memory"] = run_memory(cfg, args, args.quick)
        timings["memory"] = watch.seconds
    res["summary"] = summarize(res)
    res["meta"] = record.finish(quick=args.quick, config=dict(cfg), seed=args.seed,
                                section_seconds=timings)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = res["meta"]
    text = ["# IHVP exactness and cost", "",
            f"torch {meta['torch']}, {meta['threads']} threads, {meta['cpu_count']} CPUs; load average "
            f"{meta['load_avg_before'][0]:.1f} before, {meta['load_avg_after'][0]:.1f} after (shared "
            f"machine); run took {meta['seconds']:.0f} s.", ""]
    if "exactness" in res:
        text += ["## 1. Exactness", "", *exactness_tables(res["exactness"])]
        plot_exactness(res["exactness"], args.out / "exactness.png")
    if "cost" in res:
        text += ["## 2. Time vs d and m", "", *cost_tables(res["cost"], res["slopes"])]
        plot_cost(res["cost"], args.out / "cost_scaling.png")
    if "memory" in res:
        text += ["## 3. Memory", "", *memory_table(res["memory"])]
        plot_memory(res["memory"], args.out / "memory_scaling.png")
    (args.out / "results.json").write_text(json.dumps(jsonable(res), indent=1))
    (args.out / "results.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    print(f"[ihvp_exactness] results in {args.out}/ (results.json, results.md, *.png)")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
