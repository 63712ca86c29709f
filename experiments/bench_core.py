r"""Benchmark of mfac's core operators against their floors and the paper's formulations.

Run ``python -m experiments.bench_core`` (``--help`` for the options, ``--quick`` for a seconds-long smoke
run). It prints markdown tables and writes ``bench_core.json`` and ``bench_core.md`` to ``--out``.

What is measured (float32, all cores, ``damp = 1e-4`` for timings; every time is the median of
``--repeats`` timed calls after ``--warmup`` untimed ones; the measured calls of one table row are
interleaved round-robin, so that load from other processes hits the operator and its floor alike):

* ``sliding``: ``SlidingInverseFisher.update_mul`` in steady state (window full and wrapped) against the
  floor ``G @ g`` + ``G.T @ c`` on the same buffer; the paper's step (b) against its own floor, the same
  way. The full window is installed through the public checkpoint API (``state_dict`` /
  ``load_state_dict``): the Gram matrix computed with the operator's own precision policy
  (``accumulated_matmul``) and ``P = M^{-1}`` with the Cholesky inverse a refactor uses; then
  ``--warmup`` real (wrap) steps precede the timed ones. The refactor every ``m`` steps is timed apart.
* ``static``: ``StaticInverseFisher(G, damp)`` against ``G @ G.T`` + one ``m x m`` triangular solve of
  ``G`` (the faster of the left-solve and the transposed right-solve layouts); and the paper's sequential
  recursion (a) on the same ``G``.
* ``block``: ``StaticInverseFisher(G, damp, block_size=B)`` against recursion (a) run block after block
  (timed on the first ``--block-sample`` blocks and extrapolated linearly when there are more; labelled).
* ``apply``: ``mul`` (one vector) and ``diag`` of a built static operator against two passes
  (``G x`` + ``G^T c``), resp. one pass (the faster of ``G^T c`` and ``G.sum(0)``), over an ``m x d``
  matrix; the paper's row-loop diagonal (c) against the same one pass.
* ``memory``: peak RSS of the static build in a fresh child process (``VmHWM`` after resetting it through
  ``/proc/self/clear_refs``; ``ru_maxrss`` where that is not possible), minus the RSS before the
  gradients were allocated, as a multiple of the ``m x d`` input; ``overwrite=False`` and ``True``.
* ``accuracy``: float32 max-norm relative error of ``update_mul`` (and of the paper's step (b) in float32)
  against the float64 truth on the same float32 window, for several ``damp``; the worst of ``--acc-steps``
  steady-state steps. Truth: ``F^{-1} g_r = m G^T M^{-1} e_r`` with ``M = m damp I + G G^T`` all in
  float64 (products chunked over columns, exact float32 -> float64 promotion); the generic float64 form
  ``(g - G^T M^{-1} G g) / damp`` is reported next to it as a check of the truth.

Gradients (``GradientGenerator``): ``g = s * (a mu + U c + b n) / Z`` with a per-coordinate log-normal
scale ``s`` (layers of different gradient scale), a shared mean direction ``mu`` (every gradient shares it:
pairwise cosine about 0.3), a rank-8 component ``U c`` with decaying weights, and i.i.d. noise ``n``;
``a^2 = 0.3``, ``|c|^2`` weights summing to 0.4, ``b^2 = 0.3`` per coordinate, and ``Z`` so that
``E|g|^2 = 1``. The "repeated" accuracy row uses ``m + steps`` copies of one such gradient.

Configurations whose memory exceeds ``--mem-gb`` are skipped (and say so), as are those whose
``O(m^2 d)`` work exceeds ``--max-gflop`` (static and block build, memory, accuracy) or
``--recursion-max-gflop`` (the paper's recursion), so that a default run stays well under 30 minutes
on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from experiments._measure import (
    current_rss,
    peak_rss,
    reset_peak,
    static_build_floor,
    static_floor_seconds,
    time_interleaved,
    two_pass_floor,
)
from experiments._metrics import rel_err_max
from experiments._paper_reference import (
    PaperSlidingWindow,
    diag_rowloop,
    static_recursion,
)
from experiments._provenance import RunRecord, commit_label
from experiments._report import fmt_d, fmt_e, fmt_x, jsonable, md_head, md_row
from mfac import SlidingInverseFisher, StaticInverseFisher
from mfac.numerics import MFACWarning, accumulated_matmul

DTYPE = torch.float32
BYTES = 4
TIMING_DAMP = 1e-4
ACCURACY_DAMPS = (1e-2, 1e-4, 1e-5, 1e-6, 1e-8)
REPEATED_DAMP = 1e-5
GIB = 2**30
SECTIONS = ("sliding", "static", "recursion", "block", "apply", "memory", "accuracy")
TRUTH_CHUNK = 1 << 15

DEFAULTS = {
    "m": [64, 256, 1024],
    "d": [100_000, 1_000_000, 4_000_000],
    "repeats": 5,
    "warmup": 2,
    "mem_gb": 8.0,
    "max_gflop": 400.0,
    "recursion_max_gflop": 220.0,
    "block_size": 128,
    "block_sample": 32,
    "acc_steps": 3,
}
QUICK = {
    "m": [8, 32],
    "d": [30_000],
    "block_size": 128,
    "block_sample": 4,
}


# ====================================================================== gradients
class GradientGenerator:
    """Correlated synthetic gradients of dimension ``d`` (see the module docstring).

    The structure (scales, mean direction, low-rank basis) is fixed by ``seed``; :meth:`fill` draws rows.
    """

    rank = 8
    mean_var = 0.3
    lowrank_var = 0.4
    noise_var = 0.3

    def __init__(self, d: int, seed: int = 0, chunk: int = 1 << 16) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.d = d
        self.chunk = chunk
        scale = torch.exp(0.5 * torch.randn(d, generator=gen))  # log-normal per-coordinate scale
        self.scale = scale / scale.square().sum().sqrt()  # E|g|^2 = 1
        self.mean = torch.randn(d, generator=gen)  # shape: (d,)
        self.basis = torch.randn(d, self.rank, generator=gen)  # shape: (d, r)
        w = torch.tensor([1.0 / (k + 1) ** 2 for k in range(self.rank)])
        self.weights = (self.lowrank_var * w / w.sum()).sqrt()  # shape: (r,)

    def fill(self, out: torch.Tensor, seed: int) -> torch.Tensor:
        """Write ``out.shape[0]`` gradients into ``out`` (shape ``(n, d)``), column chunk by chunk."""
        n = out.shape[0]
        gen = torch.Generator().manual_seed(seed)
        coeffs = torch.randn(n, self.rank, generator=gen) * self.weights  # shape: (n, r)
        for start in range(0, self.d, self.chunk):
            sl = slice(start, min(start + self.chunk, self.d))
            block = torch.randn(n, sl.stop - start, generator=gen).mul_(math.sqrt(self.noise_var))
            block.addmm_(coeffs, self.basis[sl].T)
            block.add_(self.mean[sl], alpha=math.sqrt(self.mean_var)).mul_(self.scale[sl])
            out[:, sl] = block.to(out.dtype)
        return out

    def rows(self, n: int, seed: int, dtype: torch.dtype = DTYPE) -> torch.Tensor:
        """``n`` fresh gradients, shape ``(n, d)``."""
        return self.fill(torch.empty(n, self.d, dtype=dtype), seed)


# ====================================================================== helpers


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def _fmt_t(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _cholesky_inverse64(gram64: torch.Tensor, shift: float) -> torch.Tensor:
    system = gram64.clone()
    system.diagonal().add_(shift)
    return torch.cholesky_inverse(torch.linalg.cholesky(system))


def _load_steady_state(op: SlidingInverseFisher, gram64: torch.Tensor) -> None:
    """Install a full, wrapped window (its rows already in ``op``'s buffer) through ``load_state_dict``.

    ``gram64`` must be ``accumulated_matmul(G, G.T)`` (the operator's own precision policy); ``P`` is
    ``M^{-1}`` from a float64 Cholesky, as the operator's refactor computes it.
    """
    m = op.ngrads
    state = op.state_dict()
    state["gram"] = gram64
    state["inv"] = _cholesky_inverse64(gram64, m * op.damp)
    state["num_seen"] = 2 * m  # wrapped: the next gradient overwrites row 0
    state["since_refactor"] = 0
    op.load_state_dict(state)


def _float64_gram(window: torch.Tensor, chunk: int = TRUTH_CHUNK) -> torch.Tensor:
    """``G G^T`` in float64 (exact promotion, float64 products), chunked over columns."""
    m, d = window.shape
    gram = torch.zeros(m, m, dtype=torch.float64)
    for start in range(0, d, chunk):
        part = window[:, start:start + chunk].to(torch.float64)
        gram.addmm_(part, part.T)
    return gram


def _float64_rowproducts(window: torch.Tensor, g: torch.Tensor,
                         chunk: int = TRUTH_CHUNK) -> torch.Tensor:
    """``G g`` in float64, shape ``(m,)``."""
    out = torch.zeros(window.shape[0], dtype=torch.float64)
    for start in range(0, window.shape[1], chunk):
        out.addmv_(window[:, start:start + chunk].to(torch.float64),
                   g[start:start + chunk].to(torch.float64))
    return out


def _float64_combine(window: torch.Tensor, coeffs: torch.Tensor,
                     chunk: int = TRUTH_CHUNK) -> torch.Tensor:
    """``G^T C`` in float64 for ``C`` of shape ``(m, k)``; returns shape ``(d, k)``."""
    d = window.shape[1]
    out = torch.empty(d, coeffs.shape[1], dtype=torch.float64)
    for start in range(0, d, chunk):
        out[start:start + chunk] = window[:, start:start + chunk].to(torch.float64).T @ coeffs
    return out


# ====================================================================== sections
class Context:
    """Shared state of one run: options, the gradient generator per ``d`` and the results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.budget = args.mem_gb * GIB
        self._gens: dict[int, GradientGenerator] = {}
        self.results: dict[str, Any] = {name: [] for name in SECTIONS}

    def generator(self, d: int) -> GradientGenerator:
        if d not in self._gens:
            self._gens = {d: GradientGenerator(d, seed=self.args.seed)}  # keep one (memory)
        return self._gens[d]

    def fits(self, m: int, d: int, copies: float) -> str | None:
        """``None`` if ``copies`` m x d float32 buffers fit the budget, else the reason to skip."""
        need = copies * m * d * BYTES
        if need > self.budget:
            return f"skipped: needs {_gib(need)} > {_gib(self.budget)} budget"
        return None

    def within(self, m: int, d: int, flops: float, cap_gflop: float, flag: str) -> str | None:
        if flops > cap_gflop * 1e9:
            return f"skipped: {flops / 1e9:.0f} GFLOP > {flag} {cap_gflop:g}"
        return None


def run_sliding(ctx: Context, m: int, d: int, grads_out: list) -> dict:
    """Steady-state ``update_mul`` vs ``G g + G^T c``; then the paper's (b) on the same window."""
    args = ctx.args
    row: dict[str, Any] = {"m": m, "d": d}
    gen = ctx.generator(d)
    op = SlidingInverseFisher(d, m, TIMING_DAMP, dtype=DTYPE)
    window = op.state_dict()["grads"]  # the operator's own buffer (a reference, not a copy)
    gen.fill(window, seed=args.seed + 1)
    gram64 = accumulated_matmul(window, window.T)
    _load_steady_state(op, gram64)
    nsteps = args.warmup + args.repeats
    stream = gen.rows(2 * nsteps + 4, seed=args.seed + 2)
    it = iter(range(10**9))

    def ours() -> None:
        op.update_mul(stream[next(it) % stream.shape[0]])

    floor = two_pass_floor(window, stream[0])
    t = time_interleaved({"ours": ours, "floor": floor}, args.repeats, args.warmup)
    row["ours_s"] = t["ours"]["median"]
    row["floor_s"] = t["floor"]["median"]
    row["ratio"] = row["ours_s"] / row["floor_s"]
    row["times"] = t
    # the refactor every m steps (Cholesky + inverse of M, O(m^3)), forced through the state dict
    def force_refactor() -> None:
        state = op.state_dict()
        state["since_refactor"] = m
        op.load_state_dict(state)

    t = time_interleaved({"refactor": ours}, min(3, args.repeats), 0, setup={"refactor": force_refactor})
    row["refactor_step_s"] = t["refactor"]["median"]
    row["refactor_amortized_ratio"] = (
        row["ours_s"] + (row["refactor_step_s"] - row["ours_s"]) / m
    ) / row["floor_s"]
    next_row = op.next_row
    current_gram = op.state_dict()["gram"].to(DTYPE)  # the Gram of the window as it is now
    # ``op`` is done with; its buffer (``window``) is shared by the paper's step from here on

    paper = PaperSlidingWindow(window, TIMING_DAMP, gram=current_gram, next_row=next_row)

    def paper_step() -> None:
        paper.update_mul(stream[next(it) % stream.shape[0]])

    t = time_interleaved({"paper": paper_step, "floor": floor}, args.repeats, args.warmup)
    row["paper_s"] = t["paper"]["median"]
    row["paper_floor_s"] = t["floor"]["median"]
    row["paper_ratio"] = row["paper_s"] / row["paper_floor_s"]
    row["paper_failed_steps"] = paper.failed_steps
    row["paper_times"] = t
    grads_out.append(window)  # reused by the next sections (a valid set of m gradients)
    return row


def run_static(ctx: Context, m: int, d: int, grads: torch.Tensor) -> tuple[dict, Any]:
    """Static build vs ``G G^T`` + triangular solve. Returns the row and the last built operator."""
    args = ctx.args
    row: dict[str, Any] = {"m": m, "d": d}
    built: list = [None]
    calls = [0]

    def ours() -> None:
        # one build's memory at a time (G + Q: 2x); the last build is kept for the `apply` section
        op = StaticInverseFisher(grads, TIMING_DAMP)
        calls[0] += 1
        if calls[0] == args.warmup + args.repeats:
            built[0] = op

    t = time_interleaved({"ours": ours, **static_build_floor(grads)}, args.repeats, args.warmup)
    row["ours_s"] = t["ours"]["median"]
    row["gram_s"] = t["gram"]["median"]
    row["trsm_left_s"] = t["trsm_left"]["median"]
    row["trsm_right_s"] = t["trsm_right"]["median"]
    row["trsm_s"] = min(row["trsm_left_s"], row["trsm_right_s"])
    row["floor_s"] = static_floor_seconds(t)
    row["ratio"] = row["ours_s"] / row["floor_s"]
    row["times"] = t
    return row, built[0]


def run_recursion(ctx: Context, m: int, d: int, grads: torch.Tensor, ours_s: float | None) -> dict:
    """The paper's sequential recursion (a) on the same gradients (warm-up on a slice of them)."""
    args = ctx.args
    row: dict[str, Any] = {"m": m, "d": d}
    small = grads[: min(m, 16), : min(d, 4096)].contiguous()
    t = time_interleaved({"recursion": lambda: static_recursion(grads, TIMING_DAMP)},
                         args.repeats, args.warmup,
                         warmup_fns={"recursion": lambda: static_recursion(small, TIMING_DAMP)})
    row["recursion_s"] = t["recursion"]["median"]
    row["times"] = t
    row["ours_s"] = ours_s
    row["speedup"] = row["recursion_s"] / ours_s if ours_s else None
    return row


def run_block(ctx: Context, m: int, d: int, grads: torch.Tensor) -> dict:
    """Block-diagonal build vs recursion (a) block after block (sampled and extrapolated)."""
    args = ctx.args
    block = min(args.block_size, d)
    nblocks = math.ceil(d / block)
    sample = min(nblocks, args.block_sample)
    row: dict[str, Any] = {"m": m, "d": d, "block_size": block, "num_blocks": nblocks,
                           "sampled_blocks": sample, "extrapolated": sample < nblocks}
    slabs = [grads[:, b * block:min((b + 1) * block, d)].contiguous() for b in range(sample)]

    def recursion_blocks() -> None:
        for slab in slabs:  # one after another, as the paper does
            static_recursion(slab, TIMING_DAMP)

    route: list = [None]

    def ours() -> None:
        route[0] = StaticInverseFisher(grads, TIMING_DAMP, block_size=block).route

    t = time_interleaved({"ours": ours, "recursion": recursion_blocks}, args.repeats, args.warmup)
    row["route"] = route[0]
    row["ours_s"] = t["ours"]["median"]
    row["recursion_sample_s"] = t["recursion"]["median"]
    row["recursion_s"] = row["recursion_sample_s"] * nblocks / sample
    row["speedup"] = row["recursion_s"] / row["ours_s"]
    row["times"] = t
    return row


def run_apply(ctx: Context, m: int, d: int, grads: torch.Tensor, op: StaticInverseFisher) -> dict:
    """``mul`` and ``diag`` of a built operator vs two passes / one pass over an m x d matrix."""
    args = ctx.args
    row: dict[str, Any] = {"m": m, "d": d}
    x = ctx.generator(d).rows(1, seed=args.seed + 3)[0]
    coeff = torch.randn(m, dtype=DTYPE)
    den = torch.full((m,), 2.0 * m, dtype=DTYPE)  # timing only: the values do not matter
    fns = {
        "mul": lambda: op.mul(x),
        "two_pass": two_pass_floor(grads, x, coeff),
        "diag": op.diag,
        "one_pass_gemv": lambda: torch.mv(grads.T, coeff),
        "one_pass_sum": lambda: grads.sum(dim=0),
        "paper_diag": lambda: diag_rowloop(grads, den, TIMING_DAMP),
    }
    t = time_interleaved(fns, args.repeats, args.warmup)
    row.update({f"{k}_s": v["median"] for k, v in t.items()})
    row["one_pass_s"] = min(row["one_pass_gemv_s"], row["one_pass_sum_s"])
    row["mul_ratio"] = row["mul_s"] / row["two_pass_s"]
    row["diag_ratio"] = row["diag_s"] / row["one_pass_s"]
    row["paper_diag_ratio"] = row["paper_diag_s"] / row["one_pass_s"]
    row["times"] = t
    return row


# ---------------------------------------------------------------------- memory (child processes)


def _memory_child(m: int, d: int, modes: Sequence[bool], seed: int, threads: int) -> list[dict]:
    """In a fresh process: peak RSS increase of static builds, relative to the m x d input.

    ``modes`` lists the ``overwrite`` flags to measure, one build each on freshly generated gradients.
    When the peak cannot be reset (no ``/proc/self/clear_refs``) only the first is measured (the caller
    starts another process for the rest).
    """
    torch.set_num_threads(threads)
    for overwrite in (False, True):  # load the code paths (and the BLAS/LAPACK buffers) once
        StaticInverseFisher(torch.randn(4, 256), TIMING_DAMP, overwrite=overwrite)
    gen = GradientGenerator(d, seed=seed)
    nbytes = m * d * BYTES
    out = []
    for overwrite in modes:
        base = current_rss()
        grads = torch.empty(m, d, dtype=DTYPE)
        gen.fill(grads, seed=seed + 1)
        after_input = current_rss()
        reset_ok = reset_peak()
        op = StaticInverseFisher(grads, TIMING_DAMP, overwrite=overwrite)
        peak = peak_rss(reset_ok)
        retained = current_rss()
        del op, grads
        out.append({
            "overwrite": overwrite,
            "input_bytes": nbytes,
            "input_measured": (after_input - base) / nbytes,
            "peak_multiple": (peak - base) / nbytes,
            "retained_multiple": (retained - base) / nbytes,
            "method": "VmHWM (clear_refs reset)" if reset_ok else "ru_maxrss",
        })
        if not reset_ok:
            break
    return out


def run_memory(ctx: Context, m: int, d: int) -> dict:
    """Peak RSS of the static build with ``overwrite=False`` and ``True``, in spawned processes."""
    row: dict[str, Any] = {"m": m, "d": d, "input_bytes": m * d * BYTES}
    mpctx = mp.get_context("spawn")
    todo = [False, True]
    while todo:
        with mpctx.Pool(1) as pool:
            got = pool.apply(_memory_child, (m, d, todo, ctx.args.seed, torch.get_num_threads()))
        for res in got:
            row["overwrite" if res["overwrite"] else "copy"] = res
            todo.remove(res["overwrite"])
    row["peak_multiple"] = row["copy"]["peak_multiple"]
    row["peak_multiple_overwrite"] = row["overwrite"]["peak_multiple"]
    return row


# ---------------------------------------------------------------------- accuracy
def run_accuracy(ctx: Context, m: int, d: int, base: torch.Tensor, repeated: bool) -> list[dict]:
    """float32 ``update_mul`` (ours and paper's (b)) vs the float64 truth, per damp.

    ``base`` is the float32 window (m x d); ``acc_steps`` new gradients replace rows 0, 1, ...
    """
    args = ctx.args
    gen = ctx.generator(d)
    steps = args.acc_steps
    if repeated:
        stream = base[:1].expand(steps, d).contiguous()
    else:
        stream = gen.rows(steps, seed=args.seed + 4)
    gram_ours = accumulated_matmul(base, base.T)  # what the operator would hold
    gram_paper = base @ base.T  # float32 BLAS, as the paper
    gram_truth = _float64_gram(base)
    damps = (REPEATED_DAMP,) if repeated else ACCURACY_DAMPS
    rows = []
    for damp in damps:
        op = SlidingInverseFisher(d, m, damp, dtype=DTYPE)
        op.state_dict()["grads"].copy_(base)
        _load_steady_state(op, gram_ours)
        paper = PaperSlidingWindow(op.window, damp, gram=gram_paper, next_row=op.next_row,
                                   write_rows=False)
        truth_gram = gram_truth.clone()
        errs, perrs, checks = [], [], []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MFACWarning)
            for k in range(steps):
                g = stream[k]
                r = op.next_row
                ours = op.update_mul(g)
                theirs = paper.update_mul(g)
                window = op.window
                # float64 truth on the same (float32) window
                col = _float64_rowproducts(window, g)
                truth_gram[r, :] = col
                truth_gram[:, r] = col
                system = truth_gram.clone()
                system.diagonal().add_(m * damp)
                chol = torch.linalg.cholesky(system)
                rhs = torch.zeros(m, 2, dtype=torch.float64)
                rhs[r, 0] = m
                rhs[:, 1] = col
                sol = torch.cholesky_solve(rhs, chol)
                comb = _float64_combine(window, sol)  # (d, 2)
                truth = comb[:, 0]
                generic = (g.to(torch.float64) - comb[:, 1]) / damp
                errs.append(rel_err_max(ours, truth))
                perrs.append(rel_err_max(theirs, truth))
                checks.append(rel_err_max(generic, truth))
        rows.append({
            "m": m, "d": d, "damp": damp, "gradients": "repeated" if repeated else "structured",
            "ours": max(errs), "paper": max(perrs), "truth_check": max(checks),
            "ours_steps": errs, "paper_steps": perrs,
            "paper_failed_steps": paper.failed_steps,
            "warnings": sorted({str(w.message).split(";")[0] for w in caught}),
        })
        del op, paper
    return rows


# ====================================================================== driver
def _grid(args: argparse.Namespace) -> list[tuple[int, int]]:
    return [(m, d) for d in args.d for m in args.m]


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    ctx = Context(args)
    sections = set(args.sections)
    record = RunRecord(args.argv)
    log = print if not args.silent else (lambda *a, **k: None)

    for m, d in _grid(args):
        log(f"[bench_core] m={m} d={fmt_d(d)}  ({record.seconds:.0f} s)", flush=True)
        grads_box: list = []
        skip_1 = ctx.fits(m, d, 1)
        skip_2 = ctx.fits(m, d, 2)
        build_flops = 3.0 * m * m * d  # Gram (2 m^2 d) + triangular solve (m^2 d)
        skip_cost = ctx.within(m, d, build_flops, args.max_gflop, "--max-gflop")
        skip_rec = ctx.within(m, d, 2.0 * m * m * d, args.recursion_max_gflop,
                              "--recursion-max-gflop")
        need_grads = sections & {"sliding", "static", "recursion", "block", "apply", "accuracy"}
        if skip_1 is not None:
            for name in sorted(sections - {"memory"}):  # memory has its own loop below
                ctx.results[name].append({"m": m, "d": d, "status": skip_1})
            continue
        if "sliding" in sections:
            row = run_sliding(ctx, m, d, grads_box)
            row["status"] = "ok"
            ctx.results["sliding"].append(row)
        if need_grads and not grads_box:
            grads_box.append(ctx.generator(d).fill(torch.empty(m, d, dtype=DTYPE), args.seed + 1))
        grads = grads_box[0] if grads_box else None

        static_row = None
        op = None
        if "static" in sections or "apply" in sections:
            reason = skip_2 or skip_cost
            if reason is None:
                static_row, op = run_static(ctx, m, d, grads)
                static_row["status"] = "ok"
            if "static" in sections:
                ctx.results["static"].append(static_row or {"m": m, "d": d, "status": reason})
            if "apply" in sections:
                if op is not None:
                    row = run_apply(ctx, m, d, grads, op)
                    row["status"] = "ok"
                else:
                    row = {"m": m, "d": d, "status": reason}
                ctx.results["apply"].append(row)
            del op
        if "recursion" in sections:
            reason = skip_2 or skip_rec
            if reason is None:
                row = run_recursion(ctx, m, d, grads,
                                    static_row["ours_s"] if static_row else None)
                row["status"] = "ok"
            else:
                row = {"m": m, "d": d, "status": reason}
            ctx.results["recursion"].append(row)
        if "block" in sections:
            block = min(args.block_size, d)
            flops = 4.0 * m * block * d if block <= m else build_flops  # direct: float64 (2x)
            reason = skip_2 or ctx.within(m, d, flops, args.max_gflop, "--max-gflop")
            if reason is None:
                row = run_block(ctx, m, d, grads)
                row["status"] = ("ok" if not row["extrapolated"] else
                                 f"recursion extrapolated from {row['sampled_blocks']} of "
                                 f"{row['num_blocks']} blocks")
            else:
                row = {"m": m, "d": d, "status": reason}
            ctx.results["block"].append(row)
        if "accuracy" in sections:
            reason = skip_2 or skip_cost
            if reason is None:
                rows = run_accuracy(ctx, m, d, grads, repeated=False)
                grads[1:] = grads[0]  # last use of these gradients: m copies of one of them
                rows += run_accuracy(ctx, m, d, grads, repeated=True)
                for r in rows:
                    r["status"] = "ok"
                ctx.results["accuracy"].extend(rows)
            else:
                ctx.results["accuracy"].append({"m": m, "d": d, "status": reason})
        del grads, grads_box

    if "memory" in sections:  # after the loop: the parent holds no gradients meanwhile
        # --quick: the largest size only (one child process start costs seconds)
        for m, d in (_grid(args)[-1:] if args.quick else _grid(args)):
            log(f"[bench_core] memory m={m} d={fmt_d(d)}", flush=True)
            reason = ctx.fits(m, d, 2) or ctx.within(m, d, 3.0 * m * m * d, args.max_gflop,
                                                     "--max-gflop")
            if reason is None:
                row = run_memory(ctx, m, d)
                row["status"] = "ok"
            else:
                row = {"m": m, "d": d, "status": reason}
            ctx.results["memory"].append(row)

    results = {
        "meta": _meta(args, record),
        **{name: ctx.results[name] for name in SECTIONS if name in sections},
    }
    results["targets"] = _targets(results)
    return results


def _meta(args: argparse.Namespace, record: RunRecord) -> dict:
    """The run record (:mod:`experiments._provenance`) with this benchmark's settings."""
    return record.finish(
        dtype=str(DTYPE),
        timing_damp=TIMING_DAMP,
        repeats=args.repeats,
        warmup=args.warmup,
        grid_m=list(args.m),
        grid_d=list(args.d),
        mem_budget_gib=args.mem_gb,
        max_gflop=args.max_gflop,
        recursion_max_gflop=args.recursion_max_gflop,
        block_size=args.block_size,
        block_sample=args.block_sample,
        acc_steps=args.acc_steps,
        quick=args.quick,
        generator=(
            "g = s*(sqrt(0.3) mu + U c + sqrt(0.3) n)/Z: log-normal per-coordinate scale s, shared mean "
            "direction mu, rank-8 U with weights ~1/k^2 (total variance 0.4), i.i.d. noise n, E|g|^2=1"
        ),
    )


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status", "ok") == "ok" or "extrapolated" in r.get("status", "")]


def _targets(res: dict) -> list[dict]:
    """The targets, each with the measured worst case and whether it is met."""
    out = []

    def add(name: str, target: str, values: list[float], ok: Callable[[float], bool],
            where: str) -> None:
        if not values:
            return
        worst = max(values) if "<=" in target else min(values)
        out.append({"name": name, "target": target, "worst": worst, "met": bool(ok(worst)),
                    "over": where})

    if "sliding" in res:
        rows = _ok(res["sliding"])
        add("sliding update_mul / floor", "<= 1.1x", [r["ratio"] for r in rows],
            lambda v: v <= 1.1, f"{len(rows)} sizes")
    if "static" in res:
        rows = _ok(res["static"])
        add("static build / floor", "<= 1.2x", [r["ratio"] for r in rows], lambda v: v <= 1.2,
            f"{len(rows)} sizes")
    if "recursion" in res:
        rows = [r for r in _ok(res["recursion"]) if r["m"] == 1024 and r.get("speedup")]
        add("recursion (a) / static build at m=1024", ">= 8x", [r["speedup"] for r in rows],
            lambda v: v >= 8, f"{len(rows)} sizes")
    if "block" in res:
        rows = [r for r in _ok(res["block"]) if r["m"] == 1024]
        add("block recursion / block build at m=1024", ">= 30x", [r["speedup"] for r in rows],
            lambda v: v >= 30, f"{len(rows)} sizes")
    if "apply" in res:
        rows = _ok(res["apply"])
        add("mul / two passes", "<= 1.1x", [r["mul_ratio"] for r in rows], lambda v: v <= 1.1,
            f"{len(rows)} sizes")
        add("diag / one pass", "<= 1.1x", [r["diag_ratio"] for r in rows], lambda v: v <= 1.1,
            f"{len(rows)} sizes")
    if "memory" in res:
        rows = _ok(res["memory"])
        add("static build peak / input", "<= 2x", [r["peak_multiple"] for r in rows],
            lambda v: v <= 2.0, f"{len(rows)} sizes")
        add("static build peak / input, overwrite=True", "<= 1.1x",
            [r["peak_multiple_overwrite"] for r in rows], lambda v: v <= 1.1, f"{len(rows)} sizes")
    if "accuracy" in res:
        rows = [r for r in _ok(res["accuracy"])
                if r["damp"] == REPEATED_DAMP and r["gradients"] == "structured"]
        add("float32 update_mul rel. error at damp=1e-5", "<= 1e-5", [r["ours"] for r in rows],
            lambda v: v <= 1e-5, f"{len(rows)} sizes (structured gradients)")
    return out


# ====================================================================== tables
def _status_row(r: dict, ncols: int) -> str:
    return f"| {r['m']} | {fmt_d(r['d'])} | {r['status']} |" + " |" * (ncols - 3)


def render_markdown(res: dict) -> str:
    meta = res["meta"]
    lines = [
        "# mfac core benchmark",
        "",
        f"{meta['date']}, mfac at {commit_label(meta)}; torch {meta['torch']}, {meta['threads']} threads, "
        f"{meta['cpu_count']} CPUs ({meta['cpu']}); {meta['dtype']}; median of "
        f"{meta['repeats']} after {meta['warmup']} warm-up call(s), interleaved; timing damp = "
        f"{meta['timing_damp']:g}; memory budget {meta['mem_budget_gib']:g} GiB; run took "
        f"{meta['seconds']:.0f} s; load average (1 min) {meta['load_avg_before'][0]:.1f} before, "
        f"{meta['load_avg_after'][0]:.1f} after (other processes share the cores).",
        "",
    ]
    if "sliding" in res:
        head = ["m", "d", "ours", "floor G g + G^T c", "ours/floor", "refactor step (1 in m)",
                "ours/floor incl. amortized refactor", "paper (b)", "its floor", "paper/floor"]
        lines += ["## Sliding window: `update_mul`, steady state", "", md_head(head)]
        for r in res["sliding"]:
            if r["status"] != "ok":
                lines.append(_status_row(r, len(head)))
                continue
            lines.append(md_row([r["m"], fmt_d(r["d"]), _fmt_t(r["ours_s"]), _fmt_t(r["floor_s"]),
                                 fmt_x(r["ratio"]), _fmt_t(r["refactor_step_s"]),
                                 fmt_x(r["refactor_amortized_ratio"]), _fmt_t(r["paper_s"]),
                                 _fmt_t(r["paper_floor_s"]), fmt_x(r["paper_ratio"])]))
        lines += ["", "Target: ours/floor <= 1.1x at every size. The paper reports 1.02-1.17x at d >= 1e6 "
                  "and 1.6-2.5x at d = 1e5 for its step.", ""]
    if "static" in res:
        head = ["m", "d", "ours", "G G^T", "trsm (left / right)", "floor", "ours/floor",
                "recursion (a)", "(a)/ours", "(a)/floor"]
        rec = {(r["m"], r["d"]): r for r in res.get("recursion", [])}
        lines += ["## Static build", "", md_head(head)]
        for r in res["static"]:
            if r["status"] != "ok":
                lines.append(_status_row(r, len(head)))
                continue
            rr = rec.get((r["m"], r["d"]), {})
            rec_s = rr.get("recursion_s")
            lines.append(md_row([
                r["m"], fmt_d(r["d"]), _fmt_t(r["ours_s"]), _fmt_t(r["gram_s"]),
                f"{_fmt_t(r['trsm_left_s'])} / {_fmt_t(r['trsm_right_s'])}", _fmt_t(r["floor_s"]),
                fmt_x(r["ratio"]), _fmt_t(rec_s) if rec_s else rr.get("status", "-"),
                fmt_x(rec_s / r["ours_s"], 1) if rec_s else "-",
                fmt_x(rec_s / r["floor_s"], 1) if rec_s else "-",
            ]))
        lines += ["", "floor = G G^T + the faster of the two triangular-solve layouts (left: "
                  "`solve_triangular(L, G)`; right: `solve_triangular(L^T, G^T, left=False)`). "
                  "Targets: ours/floor <= 1.2x; (a)/ours >= 8x at m = 1024. (a)/floor is the "
                  "most any BLAS-3 build can reach on this machine.", ""]
    if "block" in res:
        head = ["m", "d", "blocks", "route", "ours", "recursion (a) per block", "speedup", "note"]
        lines += [f"## Block-diagonal build (B = {res['meta']['block_size']})", "", md_head(head)]
        for r in res["block"]:
            if "num_blocks" not in r:
                lines.append(_status_row(r, len(head)))
                continue
            note = r["status"] if r["status"] != "ok" else "all blocks timed"
            lines.append(md_row([r["m"], fmt_d(r["d"]), r["num_blocks"], r["route"],
                                 _fmt_t(r["ours_s"]), _fmt_t(r["recursion_s"]),
                                 fmt_x(r["speedup"], 1), note]))
        lines += ["", "Target: speedup >= 30x at m = 1024.", ""]
    if "apply" in res:
        head = ["m", "d", "mul", "two passes", "mul/floor", "diag", "one pass", "diag/floor",
                "paper diag (c)", "(c)/floor"]
        lines += ["## `mul` and `diag` of a built static operator", "", md_head(head)]
        for r in res["apply"]:
            if r["status"] != "ok":
                lines.append(_status_row(r, len(head)))
                continue
            lines.append(md_row([r["m"], fmt_d(r["d"]), _fmt_t(r["mul_s"]), _fmt_t(r["two_pass_s"]),
                                 fmt_x(r["mul_ratio"]), _fmt_t(r["diag_s"]),
                                 _fmt_t(r["one_pass_s"]), fmt_x(r["diag_ratio"]),
                                 _fmt_t(r["paper_diag_s"]), fmt_x(r["paper_diag_ratio"])]))
        lines += ["", "Target: <= 1.1x for both.", ""]
    if "memory" in res:
        head = ["m", "d", "input", "peak/input", "peak/input (overwrite=True)",
                "retained/input (copy / overwrite)", "method"]
        lines += ["## Peak memory of the static build (RSS, child process)", "", md_head(head)]
        for r in res["memory"]:
            if r["status"] != "ok":
                lines.append(_status_row(r, len(head)))
                continue
            lines.append(md_row([
                r["m"], fmt_d(r["d"]), _gib(r["input_bytes"]), fmt_x(r["peak_multiple"]),
                fmt_x(r["peak_multiple_overwrite"]),
                f"{fmt_x(r['copy']['retained_multiple'])} / "
                f"{fmt_x(r['overwrite']['retained_multiple'])}",
                r["copy"]["method"],
            ]))
        lines += ["", "Peak RSS during the build minus RSS before the input was allocated, over the "
                  "input size (so the input itself counts 1x). Target: <= 2x (overwrite=True: ~1x).",
                  ""]
    if "accuracy" in res:
        lines += _accuracy_table(res["accuracy"])
    if res.get("targets"):
        lines += ["## Targets", "", md_head(["target", "wanted", "worst measured", "met", "over"])]
        for t in res["targets"]:
            worst = fmt_e(t["worst"]) if "error" in t["name"] else fmt_x(t["worst"])
            lines.append(md_row([t["name"], t["target"], worst, "yes" if t["met"] else "NO",
                                 t["over"]]))
        lines.append("")
    return "\n".join(lines)


def _accuracy_table(rows: list[dict]) -> list[str]:
    sizes = []
    for r in rows:
        if (r["m"], r["d"]) not in sizes:
            sizes.append((r["m"], r["d"]))
    keys = [(damp, "structured") for damp in ACCURACY_DAMPS] + [(REPEATED_DAMP, "repeated")]
    head = ["damp", "gradients"] + [f"m={m}, d={fmt_d(d)}" for m, d in sizes]
    lines = ["## float32 accuracy of `update_mul`: ours / paper (b)", "", md_head(head)]
    cell = {(r["m"], r["d"], r["damp"], r["gradients"]): r for r in rows if r["status"] == "ok"}
    skipped = {(r["m"], r["d"]): r["status"] for r in rows if r["status"] != "ok"}
    for damp, kind in keys:
        cells = [f"{damp:g}", kind]
        for m, d in sizes:
            r = cell.get((m, d, damp, kind))
            if r is None:
                cells.append(skipped.get((m, d), "-"))
            else:
                cells.append(f"{fmt_e(r['ours'])} / {fmt_e(r['paper'])}")
        lines.append(md_row(cells))
    checks = [r["truth_check"] for r in cell.values()]
    warned = sorted({w for r in cell.values() for w in r["warnings"]})
    lines += ["", "Max-norm relative error against the float64 truth on the same float32 window, "
              "worst of the steady-state steps; 'fail' = the paper's float32 Cholesky of K failed. "
              "Target (ours): <= 1e-5 at damp = 1e-5.",
              f"Truth check (generic float64 form vs cancellation-free float64 form): worst "
              f"{fmt_e(max(checks)) if checks else '-'}.",
              f"mfac warnings during these steps: {warned or 'none'}.", ""]
    return lines


# ====================================================================== CLI
def _size(text: str) -> int:
    value = float(text)
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"sizes must be positive integers, got {text!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.bench_core",
        description="Benchmark mfac's core operators against their floors and the paper's "
                    "formulations (sliding update_mul, static build, block build, mul/diag, peak "
                    "memory, float32 accuracy). Prints markdown tables; writes JSON and markdown.",
    )
    p.add_argument("--quick", action="store_true",
                   help=f"tiny sizes (seconds): m in {QUICK['m']}, d in {QUICK['d']}")
    p.add_argument("--out", type=Path, default=Path("results/bench_core"),
                   help="output folder (default: results/bench_core/)")
    p.add_argument("--m", type=int, nargs="+", default=None,
                   help=f"window sizes / numbers of gradients (default: {DEFAULTS['m']})")
    p.add_argument("--d", type=_size, nargs="+", default=None,
                   help="dimensions, e.g. 1e5 1e6 (default: 1e5 1e6 4e6)")
    p.add_argument("--repeats", type=int, default=DEFAULTS["repeats"],
                   help="timed calls per measurement, median reported (default: 5, minimum 5 "
                        "except in --quick)")
    p.add_argument("--warmup", type=int, default=DEFAULTS["warmup"],
                   help="untimed calls before timing (sliding: wrap steps) (default: 2)")
    p.add_argument("--mem-gb", type=float, default=DEFAULTS["mem_gb"],
                   help="skip configurations needing more GiB than this (default: 8)")
    p.add_argument("--max-gflop", type=float, default=DEFAULTS["max_gflop"],
                   help="skip static build / block build / memory / accuracy where their work "
                        "(3 m^2 d; direct blocks: 4 m B d) exceeds this many GFLOP (default: 400; "
                        "e.g. 1e5 for the full grid)")
    p.add_argument("--recursion-max-gflop", type=float, default=DEFAULTS["recursion_max_gflop"],
                   help="skip the paper's recursion (a) where 2 m^2 d exceeds this many GFLOP "
                        "(default: 220, i.e. only d = 1e5 for m = 1024)")
    p.add_argument("--block-size", type=int, default=DEFAULTS["block_size"],
                   help="B of the block-diagonal build (default: 128)")
    p.add_argument("--block-sample", type=int, default=DEFAULTS["block_sample"],
                   help="blocks the per-block recursion is timed on; extrapolated linearly to all "
                        "blocks (default: 32)")
    p.add_argument("--acc-steps", type=int, default=DEFAULTS["acc_steps"],
                   help="steady-state steps per accuracy measurement (worst reported; default: 3)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="sections to run (default: all)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help=f"torch threads (default: all, {torch.get_num_threads()})")
    p.add_argument("--seed", type=int, default=0, help="seed of the gradient generator")
    p.add_argument("--silent", action="store_true", help="print nothing (tests)")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; returns the results dict (also written to ``--out``)."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.m = args.m or QUICK["m"]
        args.d = args.d or QUICK["d"]
        args.block_sample = min(args.block_sample, QUICK["block_sample"])
    else:
        args.m = args.m or DEFAULTS["m"]
        args.d = args.d or DEFAULTS["d"]
        if args.repeats < 5:
            raise SystemExit(f"--repeats must be >= 5 (medians of at least 5), got {args.repeats}")
    if args.repeats < 1 or args.warmup < 0 or args.acc_steps < 1 or args.block_sample < 1:
        raise SystemExit("--repeats, --acc-steps, --block-sample must be >= 1 and --warmup >= 0")
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    text = render_markdown(results)
    (args.out / "bench_core.json").write_text(json.dumps(jsonable(results), indent=1))
    (args.out / "bench_core.md").write_text(text + "\n")
    if not args.silent:
        print(text)
        print(f"[bench_core] wrote {args.out / 'bench_core.json'} and {args.out / 'bench_core.md'}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
