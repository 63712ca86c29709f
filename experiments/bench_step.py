r"""The optimizer's step side by side with the paper's own code, and at scale.

Run ``python -m experiments.bench_step`` (``--help``; ``--quick`` for a smoke run). Two tables:

* ``side-by-side``: one steady-state sliding-window step of mfac (``SlidingInverseFisher.update_mul``),
  of IST-DASLab/M-FAC's ``HInvFastUpMulti.update_mul`` (the paper's code) and of ista-daslab-optimizers'
  ``DenseCoreMFAC.integrate_gradient_and_precondition`` (both loaded by file path and run on CPU
  through :mod:`experiments._peer_code`), each as a multiple of the floor ``G g + G^T c`` on the same
  buffer, all four interleaved round-robin in one loop (float32, ``--damp``). Then one more step of each
  on the same (shared) window and its max-norm relative error against the float64 truth
  ``m G^T M^{-1} e_r``, ``M = m damp I + G G^T`` (skipped above ``--max-gflop`` of float64 work).
* ``scale``: ``MFAC.step`` (steady state: a full window installed through the checkpoint API) against
  ``torch.optim.Adam(foreach=True).step`` and one forward + backward of the model, at ResNet-20 size
  (CIFAR-10 shapes, batch 128) and at ``d = 1e7`` (one 3163 x 3163 linear layer, batch 128), for the
  ``--scale-m`` window sizes whose float32 window fits ``--mem-gb``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experiments import _peer_code as peers
from experiments._measure import OpCount, time_interleaved, two_pass_floor
from experiments._metrics import rel_err_max
from experiments._models import count_parameters, resnet20_like
from experiments._provenance import RunRecord, commit_label, load_label
from experiments._report import fmt_d, fmt_e, fmt_x, jsonable, md_head, md_row
from experiments.bench_core import (
    GradientGenerator,
    _float64_combine,
    _float64_gram,
    _load_steady_state,
)
from mfac import MFAC, SlidingInverseFisher
from mfac.numerics import accumulated_matmul

GIB = 2**30
#: the timed callables that are not steppers: the floor and the fixed-cost bound (``_floor_with_stage``)
AUXILIARY = ("floor", "bound", "twin_floor", "op_probe")
#: small in-place operations run between the floor's passes to price one dispatched operation in place
PROBE_OPS = 40


def side_by_side(m: int, d: int, args: argparse.Namespace, paper: Any, ista: Any) -> dict:
    row: dict[str, Any] = {"m": m, "d": d}
    if m * d * 4 > args.mem_gb * GIB:
        row["status"] = f"skipped: window {m * d * 4 / GIB:.1f} GiB > --mem-gb {args.mem_gb:g}"
        return row
    gen = GradientGenerator(d, seed=args.seed)
    op = SlidingInverseFisher(d, m, args.damp)
    window = op.state_dict()["grads"]  # the operator's buffer, shared with the peers
    gen.fill(window, seed=args.seed + 1)
    _load_steady_state(op, accumulated_matmul(window, window.T))
    gram32 = window @ window.T  # the peers keep G G^T in the window's dtype
    nsteps = args.warmup + args.repeats + 1
    stream = gen.rows(nsteps + 1, seed=args.seed + 2)
    coeff = torch.randn(m)
    fns: dict[str, Any] = {}
    counters = {}

    def stepper(name: str, call: Any) -> Any:
        counters[name] = 0

        def run() -> Any:
            g = stream[counters[name]]
            counters[name] += 1
            return call(g)

        return run

    fns["mfac"] = stepper("mfac", op.update_mul)
    contenders = {}
    if paper is not None:
        contenders["paper"] = peers.new_paper(paper, window, gram32, args.damp, op.next_row)
        fns["paper"] = stepper("paper", contenders["paper"].update_mul)
    if ista is not None:
        contenders["ista"] = peers.new_ista(ista, window, gram32, args.damp, op.next_row)
        fns["ista"] = stepper(
            "ista", lambda g: contenders["ista"].integrate_gradient_and_precondition(g, g))
    fns["floor"] = two_pass_floor(window, stream[0], coeff)
    fns["bound"], fns["twin_floor"] = _floor_with_stage(window, stream[0], coeff, m, nsteps, args)
    fns["op_probe"] = _floor_with_ops(window, stream[0], coeff)
    with peers.lu_nopivot_shim():
        t = time_interleaved(fns, args.repeats, args.warmup)
        floor = t["floor"]["median"]
        for name in fns:
            if name not in AUXILIARY:
                row[f"{name}_s"] = t[name]["median"]
                row[f"{name}_ratio"] = t[name]["median"] / floor
                row[f"{name}_ratio_min"] = t[name]["min"] / t["floor"]["min"]
                row[f"{name}_ratio_cpu"] = t[name]["cpu_median"] / t["floor"]["cpu_median"]
        row["floor_s"] = floor
        bound = t["bound"]["cpu_median"] - t["twin_floor"]["cpu_median"]  # less the twin's own passes
        row["bound_ratio_cpu"] = bound / t["floor"]["cpu_median"]
        row["op_us"] = 1e6 * (t["op_probe"]["cpu_median"] - t["floor"]["cpu_median"]) / PROBE_OPS
        row["mfac_over_bound_cpu"] = t["mfac"]["cpu_median"] / bound
        # one aligned step of each on the same window, then the float64 truth for that window
        r = op.next_row
        assert all(counters[k] == counters["mfac"] for k in counters)
        outs = {name: fns[name]() for name in fns if name not in AUXILIARY}
    if 2.0 * m * m * d <= args.max_gflop * 1e9:
        gram = _float64_gram(window)
        system = gram.clone()
        system.diagonal().add_(m * args.damp)
        rhs = torch.zeros(m, 1, dtype=torch.float64)
        rhs[r, 0] = m
        truth = _float64_combine(window, torch.cholesky_solve(rhs, torch.linalg.cholesky(system)))[:, 0]
        for name, out in outs.items():
            row[f"{name}_err"] = rel_err_max(out, truth)
    with OpCount() as ops:  # one more steady-state step, on the spare row of the stream
        op.update_mul(stream[counters["mfac"]])
    row["mfac_ops"] = ops.count
    row["status"] = "ok"
    return row


def _twin_dim(m: int) -> int:
    """``d`` of the twin window in :func:`_floor_with_stage`: ``>= 2 m`` (full-rank random rows)."""
    return max(2 * m, 256)


def _floor_with_stage(window: torch.Tensor, g: torch.Tensor, c: torch.Tensor, m: int, nsteps: int,
                      args: argparse.Namespace) -> tuple[Any, Any]:
    """The floor's two passes with one steady-state step of a small twin window (same ``m``) between them.

    Returns ``(bound, twin_floor)``: ``bound`` runs ``G g``, the twin's ``update_mul`` and ``G^T c``, so the
    step's fixed cost (the ``m x m`` algebra, its checks, dispatch and Python) is paid where a step pays
    it, between two passes that stream the window through the caches; ``twin_floor`` is the twin's own
    two passes (``16 m^2`` bytes, not fixed cost: subtract its time). ``(bound - twin_floor) / floor`` is
    then the best any step with this ``m x m`` stage can do on this machine, and ``mfac / (bound -
    twin_floor)`` the cost of mfac's own ``d``-sized work (the row write and undo copy, the
    float64-accumulated slabs) beyond the two bare passes.
    """
    dim = _twin_dim(m)
    gen = GradientGenerator(dim, seed=args.seed + 7)
    twin = SlidingInverseFisher(dim, m, args.damp)
    twin_window = twin.state_dict()["grads"]
    gen.fill(twin_window, seed=args.seed + 8)
    _load_steady_state(twin, accumulated_matmul(twin_window, twin_window.T))
    rows = gen.rows(nsteps + 2, seed=args.seed + 9)
    calls = [0]

    def twin_step() -> None:
        twin.update_mul(rows[calls[0] % rows.shape[0]])
        calls[0] += 1

    return two_pass_floor(window, g, c, between=twin_step), two_pass_floor(twin_window, rows[0], c)


def _floor_with_ops(window: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> Any:
    """The floor's two passes with ``PROBE_OPS`` in-place adds on an ``m``-vector between them.

    ``(probe - floor) / PROBE_OPS`` is what one small dispatched operation costs where the step's ``m x m``
    stage runs (after a pass: the dispatcher's code and data out of the caches), whatever it computes.
    """
    small = torch.zeros(window.shape[0], dtype=window.dtype)

    def adds() -> None:
        for _ in range(PROBE_OPS):
            small.add_(1.0)

    return two_pass_floor(window, g, c, between=adds)


def _gram32(window: torch.Tensor, chunk: int = 1 << 15) -> torch.Tensor:
    """``G G^T`` from float32 products of ``chunk``-column slabs (any window dtype), summed in float64."""
    gram = torch.zeros(window.shape[0], window.shape[0], dtype=torch.float64)
    for start in range(0, window.shape[1], chunk):
        part = window[:, start:start + chunk].float()
        gram += (part @ part.T).double()
    return gram


def _steady_mfac(params: list[nn.Parameter], m: int, damp: float,
                 window_dtype: torch.dtype | None = None) -> MFAC:
    """An ``MFAC`` whose window is full (random rows, installed through the operator's state dict)."""
    opt = MFAC(params, lr=1e-4, ngrads=m, damp=damp, window_dtype=window_dtype)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    fisher = opt.inverse_fisher
    window = fisher.state_dict()["grads"]
    GradientGenerator(fisher.dim, seed=1).fill(window, seed=2)
    gram = accumulated_matmul(window, window.T) if window.dtype == torch.float32 else _gram32(window)
    _load_steady_state(fisher, gram)
    return opt


def scale(args: argparse.Namespace) -> list[dict]:
    rows = []
    side = math.ceil(math.sqrt(1e7))
    models = {
        "ResNet-20 (CIFAR-10, batch 128)": (resnet20_like(), (128, 3, 32, 32), 10),
        "d = 1e7 (one linear layer, batch 128)": (nn.Linear(side, side, bias=False), (128, side), side),
    }
    for label, (model, shape, classes) in models.items():
        params = list(model.parameters())
        d = count_parameters(model)
        x = torch.randn(shape)
        y = torch.randint(0, classes, (shape[0],))

        def fwd_bwd(model=model, x=x, y=y) -> None:
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()

        fwd_bwd()
        adam = torch.optim.Adam(params, lr=1e-4, foreach=True)
        base = {"fwd_bwd": fwd_bwd, "adam": adam.step}
        for m in args.scale_m:
            row: dict[str, Any] = {"model": label, "d": d, "m": m, "window": "float32"}
            need, window_dtype = m * d * 4, None
            if need > args.mem_gb * GIB and args.scale_bf16:  # the bfloat16 window: half the bytes
                need, window_dtype, row["window"] = m * d * 2, torch.bfloat16, "bfloat16"
            if need > args.mem_gb * GIB:
                row["status"] = (f"does not fit: window {need / GIB:.1f} GiB ({row['window']}) > "
                                 f"--mem-gb {args.mem_gb:g}")
                rows.append(row)
                continue
            opt = _steady_mfac(params, m, args.damp, window_dtype)
            fwd_bwd()
            # a fresh gradient per timed step: the same one repeated fills the window with copies, whose
            # float32 combination cancels and takes the float64 redo (about three passes more)
            pool = [[torch.randn_like(p) * 1e-3 for p in params]
                    for _ in range(args.repeats + args.warmup)]
            calls = [0]

            def mfac_step(opt=opt, pool=pool, calls=calls, params=params) -> None:
                for p, g in zip(params, pool[calls[0] % len(pool)], strict=True):
                    p.grad = g
                calls[0] += 1
                opt.step()

            t = time_interleaved({**base, "mfac": mfac_step}, args.repeats, args.warmup)
            row.update({f"{k}_s": v["median"] for k, v in t.items()})
            row.update({f"{k}_cpu_s": v["cpu_median"] for k, v in t.items()})
            row["vs_adam"] = row["mfac_s"] / row["adam_s"]
            row["vs_fwd_bwd"] = row["mfac_s"] / row["fwd_bwd_s"]
            row["status"] = "ok"
            rows.append(row)
            print("  " + json.dumps(jsonable(row)), flush=True)
            del opt
    return rows


def render(res: dict) -> str:
    meta = res["meta"]
    lines = [
        "# The optimizer's step: mfac, the paper's code, ista-daslab-optimizers",
        "",
        f"{meta['date']}, mfac at {commit_label(meta)}; torch {meta['torch']}, {meta['threads']} threads; "
        f"float32, damp {meta['damp']:g}; median of {meta['repeats']} after {meta['warmup']} warm-up, "
        f"interleaved; load average (1 min) {load_label(meta, 'before')} before, {load_label(meta, 'after')} "
        f"after; paper's code: {meta['paper_code']}; ista: {meta['ista']}.",
        "",
        "## Side by side: step / floor (floor = `G g + G^T c` on the same buffer) and float32 error",
        "",
        md_head(["m", "d", "mfac", "paper", "ista", "mfac (cpu)", "paper (cpu)", "ista (cpu)",
                 "mfac (min/min)", "floor + stage (cpu)", "mfac / (floor + stage) (cpu)", "mfac err",
                 "paper err", "ista err", "floor"]),
    ]
    for r in res["side_by_side"]:
        if r["status"] != "ok":
            lines.append(f"| {r['m']} | {fmt_d(r['d'])} | {r['status']} |" + " |" * 12)
            continue
        lines.append(md_row([
            r["m"], fmt_d(r["d"]), fmt_x(r.get("mfac_ratio")), fmt_x(r.get("paper_ratio")),
            fmt_x(r.get("ista_ratio")), fmt_x(r.get("mfac_ratio_cpu")), fmt_x(r.get("paper_ratio_cpu")),
            fmt_x(r.get("ista_ratio_cpu")), fmt_x(r.get("mfac_ratio_min")),
            fmt_x(r.get("bound_ratio_cpu")), fmt_x(r.get("mfac_over_bound_cpu")), fmt_e(r.get("mfac_err")),
            fmt_e(r.get("paper_err")), fmt_e(r.get("ista_err")), f"{r['floor_s'] * 1e3:.1f} ms",
        ]))
    lines += ["", "err: max-norm relative error of the step against the float64 truth on the same "
              "float32 window ('-': above --max-gflop). mfac / paper / ista: median wall time over the "
              "floor's. (cpu): the same with this process's CPU time (`time.process_time`), which leaves "
              "out the time spent waiting for a core when other processes load the machine (memory "
              "contention stays in). min/min: fastest step over fastest floor. floor + stage: the floor's "
              "two passes with one steady-state step of a twin window between them (the same m, d = "
              "max(2 m, 256); less the time of the twin's own two passes, timed in the same loop): the "
              "step's fixed cost where the step pays it, after a pass has streamed the window through the "
              "caches; over the floor it is the best any step with this m x m stage does on this machine, "
              "and mfac / (floor + stage) is the cost of mfac's d-sized work beyond the two passes.", ""]
    counted = [r for r in res["side_by_side"] if r["status"] == "ok" and "mfac_ops" in r]
    if counted:
        lines += ["mfac aten operations per steady-state step (a dispatch-mode count of one more step; "
                  "each costs a few us whatever m and d, the step's fixed cost): "
                  + ", ".join(f"{r['mfac_ops']} at m = {r['m']}, d = {fmt_d(r['d'])}" for r in counted)
                  + ".", "",
                  f"One small operation in place ({PROBE_OPS} in-place adds on an m-vector between the "
                  "floor's passes, CPU time over the floor's, per add): "
                  + ", ".join(f"{r['op_us']:.1f} us at m = {r['m']}, d = {fmt_d(r['d'])}" for r in counted)
                  + ".", ""]
    if res.get("scale"):
        lines += ["## Scale: `MFAC.step` against Adam (foreach) and one forward + backward", "",
                  md_head(["model", "d", "m", "window", "MFAC.step", "Adam.step", "fwd+bwd", "MFAC/Adam",
                           "MFAC/(fwd+bwd)", "MFAC/(fwd+bwd) (cpu)"])]
        for r in res["scale"]:
            window = r.get("window", "float32")
            if r["status"] != "ok":
                lines.append(f"| {r['model']} | {fmt_d(r['d'])} | {r['m']} | {window} | {r['status']} |"
                             + " |" * 5)
                continue
            cpu = r["mfac_cpu_s"] / r["fwd_bwd_cpu_s"] if "mfac_cpu_s" in r else None
            lines.append(md_row([r["model"], fmt_d(r["d"]), r["m"], window, f"{r['mfac_s'] * 1e3:.1f} ms",
                                 f"{r['adam_s'] * 1e3:.1f} ms", f"{r['fwd_bwd_s'] * 1e3:.1f} ms",
                                 fmt_x(r["vs_adam"], 1), fmt_x(r["vs_fwd_bwd"], 2), fmt_x(cpu, 2)]))
        lines.append("")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_step", description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--d", type=float, nargs="+", default=[1e5, 1e6, 4e6])
    p.add_argument("--damp", type=float, default=1e-5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mem-gb", type=float, default=8.0, help="largest float32 window to allocate")
    p.add_argument("--max-gflop", type=float, default=150.0, help="cap on the float64 truth's work")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--paper-code", type=Path, default=peers.DEFAULT_PAPER_CODE,
                   help="IST-DASLab/M-FAC's optim.py (see experiments/_peer_code.py)")
    p.add_argument("--scale-m", type=int, nargs="*", default=[64, 256, 1024],
                   help="window sizes of the scale table (none: skip it)")
    p.add_argument("--no-scale-bf16", dest="scale_bf16", action="store_false",
                   help="scale table: skip sizes whose float32 window does not fit (default: run them "
                        "with the bfloat16 window when that fits)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    p.add_argument("--out", type=Path, default=Path("results/bench_step"))
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.m, args.d, args.repeats, args.warmup, args.scale_m = [8, 32], [3e4], 3, 1, []
    torch.set_num_threads(args.threads)
    record = RunRecord(argv)
    paper, ista = peers.load_paper(args.paper_code), peers.load_ista()
    rows = []
    for d in args.d:
        for m in args.m:
            print(f"[bench_step] m={m} d={fmt_d(int(d))}", flush=True)
            rows.append(side_by_side(m, int(d), args, paper, ista))
            print("  " + json.dumps(jsonable({k: v for k, v in rows[-1].items()})), flush=True)
    scaled = scale(args) if args.scale_m else []
    res = {
        "meta": record.finish(
            damp=args.damp, repeats=args.repeats, warmup=args.warmup, quick=args.quick,
            paper_code=str(args.paper_code) if paper is not None else "not found (skipped)",
            ista="installed" if ista is not None else "not installed (skipped)",
        ),
        "side_by_side": rows,
        "scale": scaled,
    }
    text = render(res)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_step.md").write_text(text)
    (args.out / "bench_step.json").write_text(json.dumps(jsonable(res), indent=1))
    return res


if __name__ == "__main__":
    main()
