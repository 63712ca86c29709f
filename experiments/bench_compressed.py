"""Compressed (error feedback + top-k) window: kernel choices, step time and memory against the dense window.

Sections:

* ``kernels``: the two sparse products of a step at ``m`` x ``d`` and one density, every candidate
  interleaved with the dense window's floor (``G @ g`` + ``G^T c``, the same ``m`` and ``d``):
  Gram row ``G' g'`` by a segmented CSR mat-vec (kept), ``index_select`` + multiply + float64 sum, a
  batched gather (``bmm``); ``G'^T c`` by ``index_add_`` (kept), ``scatter_add_``, ``bincount`` with
  weights (float64), and the CSR transpose product.
* ``step``: ``update_mul`` of the dense window and of compressed windows (densities 0.1, 0.01, 0.001)
  at ResNet-20's size (d = 272,474), interleaved; state bytes (counted from the tensors) and the RSS
  growth measured when each window is allocated and filled.
* ``storage``: one density (0.01) stored four ways (float32 or bfloat16 values, int32 indices or int16
  offsets inside the blocks) at ResNet-20's size, interleaved: ``update_mul`` time, state bytes
  against the dense float32 window (stated: ``m d 4 + 2 m^2 8``), and what bfloat16 values change in
  the step (relative difference to the float32-valued window on the same gradients).
* ``largest``: the largest windows that fit here: the dense window's bytes stated, a compressed
  window at m = 1024, d = 1e7, density 0.01 allocated and stepped (its RSS measured).

Run: ``python -m experiments.bench_compressed [--sections kernels step largest] [--threads 1]
[--out results/bench_compressed]`` (with ``--out``: ``bench_compressed.md`` and ``bench_compressed.json``,
the tables and the run record).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import warnings
from pathlib import Path

import torch

from experiments._measure import current_rss, time_interleaved, two_pass_floor
from experiments._metrics import rel_err
from experiments._provenance import RunRecord, commit_label
from experiments._report import jsonable, md_head, md_row
from mfac.fisher.compressed import CompressedSlidingInverseFisher
from mfac.fisher.sliding import SlidingInverseFisher
from mfac.numerics import format_bytes

RESNET20_D = 272_474
#: damping of the timed windows: large enough that random gradients never need a Cholesky repair.
TIMING_DAMP = 1.0


def _rows(m: int, d: int, density: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Values ``(m, k)`` and sorted int32 indices, ``k`` per row, as a compressed window holds them."""
    probe = CompressedSlidingInverseFisher(d, 1, 1.0, density=density)
    k = probe.row_size
    gen = torch.Generator().manual_seed(seed)
    values, indices = torch.randn(m, k, generator=gen), torch.empty(m, k, dtype=torch.int32)
    for i in range(m):
        g = torch.randn(d, generator=gen)
        _, idx, _ = probe.compress(g)
        probe.reset()
        indices[i] = idx
    return values, indices, k


def kernels(m: int, d: int, density: float, repeats: int) -> list[str]:
    values, indices, k = _rows(m, d, density)
    flat_idx = indices.view(-1)
    g, c = torch.randn(d), torch.randn(m, dtype=torch.float64)
    dense = torch.randn(m, d)
    dense_floor = two_pass_floor(dense, g, c.float())
    crow = torch.arange(0, m * k + 1, k, dtype=torch.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        csr = torch.sparse_csr_tensor(crow, flat_idx, values.view(-1), size=(m, d), check_invariants=False)

    def scatter_index_add():
        out = torch.zeros(d)
        return out.index_add_(0, flat_idx, (c.float()[:, None] * values).view(-1))

    def scatter_add():  # needs int64 indices: the conversion of the int32 storage is part of it
        out = torch.zeros(d)
        return out.scatter_add_(0, flat_idx.long(), (c.float()[:, None] * values).view(-1))

    def scatter_bincount():
        return torch.bincount(flat_idx.long(), (c[:, None] * values).view(-1), minlength=d)

    fns = {
        "floor: G @ g + G^T c (dense window)": dense_floor,
        "gram row: CSR mat-vec (kept)": lambda: csr @ g,
        "gram row: index_select + mul + sum(float64)": lambda: (
            torch.index_select(g, 0, flat_idx).view(m, k) * values).sum(1, dtype=torch.float64),
        "gram row: gather + bmm": lambda: torch.bmm(g[indices.long()].unsqueeze(1), values.unsqueeze(-1)),
        "G^T c: index_add_ (kept)": scatter_index_add,
        "G^T c: scatter_add_": scatter_add,
        "G^T c: bincount (float64 weights)": scatter_bincount,
        "G^T c: CSR transpose @ c": lambda: csr.t() @ c.float().unsqueeze(1),
    }
    res = time_interleaved(fns, repeats=repeats, warmup=1)
    floor = res["floor: G @ g + G^T c (dense window)"]["median"]
    lines = [f"\n### Sparse products: m = {m}, d = {d:,}, density {density} (k = {k:,} per row)\n",
             md_head(["product", "median ms", "vs dense floor"])]
    for name, r in res.items():
        lines.append(md_row([name, f"{r['median'] * 1e3:.2f}", f"{r['median'] / floor:.3f}x"]))
    return lines


def _grads(d: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=gen)
    return [base + torch.randn(d, generator=gen) for _ in range(steps)]


def _state_bytes(op: SlidingInverseFisher) -> int:
    return sum(t.numel() * t.element_size() for t in op.state_dict().values() if isinstance(t, torch.Tensor))


def _build(kind: float | None, m: int, d: int, grads: list[torch.Tensor]) -> tuple[SlidingInverseFisher, int]:
    """Allocate and fill a window; return it and the RSS growth that took (bytes)."""
    gc.collect()
    before = current_rss()
    if kind is None:
        op = SlidingInverseFisher(d, m, TIMING_DAMP)
    else:
        op = CompressedSlidingInverseFisher(d, m, TIMING_DAMP, density=kind)
    for i in range(m):
        op.update(grads[i % len(grads)])
    return op, current_rss() - before


def _cycling_steps(grads: list[torch.Tensor]):
    """``stepper(op)``: a callable taking one ``op.update_mul`` step per call on the next of ``grads``.

    One counter is shared by every operator's stepper, so interleaved operators see different gradients
    in turn (a repeated gradient would send a window down its float64 fallback).
    """
    counter = {"i": 0}

    def stepper(op):
        def run():
            counter["i"] += 1
            return op.update_mul(grads[counter["i"] % len(grads)])
        return run

    return stepper


def step(m: int, d: int, repeats: int) -> list[str]:
    grads = _grads(d, 16)
    kinds: list[float | None] = [None, 0.1, 0.01, 0.001]
    ops, rss = {}, {}
    for kind in kinds:
        ops[kind], rss[kind] = _build(kind, m, d, grads)
    stepper = _cycling_steps(grads)

    names = {kind: "dense" if kind is None else f"density {kind}" for kind in kinds}
    res = time_interleaved({names[k]: stepper(ops[k]) for k in kinds}, repeats=repeats, warmup=1)
    dense_t, dense_b = res["dense"]["median"], _state_bytes(ops[None])
    lines = [f"\n### update_mul at ResNet-20 size: m = {m}, d = {d:,} (float32)\n",
             md_head(["window", "k per row", "ms / step", "vs dense", "state bytes", "vs dense",
                      "RSS growth (allocate + fill)"])]
    for kind in kinds:
        op, t = ops[kind], res[names[kind]]["median"]
        k = d if kind is None else op.row_size
        b = _state_bytes(op)
        lines.append(md_row([names[kind], f"{k:,}", f"{t * 1e3:.1f}", f"{t / dense_t:.3f}x",
                             format_bytes(b), f"1/{dense_b / b:.1f}", format_bytes(rss[kind])]))
    return lines


STORAGES = {
    "float32 values, int32 indices": {},
    "float32 values, int16 offsets": {"index_dtype": torch.int16},
    "bfloat16 values, int32 indices": {"values_dtype": torch.bfloat16},
    "bfloat16 values, int16 offsets": {"values_dtype": torch.bfloat16, "index_dtype": torch.int16},
}


def storage(m: int, d: int, density: float, repeats: int) -> list[str]:
    """The same compressed window stored four ways: step time, bytes, and the bfloat16 step's change."""
    grads = _grads(d, 16)
    ops, rss = {}, {}
    for name, kw in STORAGES.items():
        gc.collect()
        before = current_rss()
        op = CompressedSlidingInverseFisher(d, m, TIMING_DAMP, density=density, **kw)
        for i in range(m):
            op.update(grads[i % len(grads)])
        ops[name], rss[name] = op, current_rss() - before
    # the step's change from bfloat16 values: every window takes the same next gradient once
    probe = torch.randn(d, generator=torch.Generator().manual_seed(1))
    reference = None
    change = {}
    for name, op in ops.items():
        twin = CompressedSlidingInverseFisher(d, m, TIMING_DAMP, density=density, **STORAGES[name])
        twin.load_state_dict(op.state_dict())
        u = twin.update_mul(probe).double()
        reference = u if reference is None else reference
        change[name] = rel_err(u, reference)
        del twin
    stepper = _cycling_steps(grads)

    res = time_interleaved({name: stepper(op) for name, op in ops.items()}, repeats=repeats, warmup=1)
    base = res[next(iter(ops))]["median"]
    dense_b = m * d * 4 + 2 * m * m * 8
    lines = [f"\n### Storage of a compressed window: m = {m}, d = {d:,}, density {density} "
             f"(k = {ops[next(iter(ops))].row_size:,} per row)\n",
             md_head(["storage", "ms / step", "vs float32 + int32", "state bytes", "vs dense float32 window",
                      "RSS growth (allocate + fill)", "step change vs float32 values"])]
    for name, op in ops.items():
        t = res[name]["median"]
        lines.append(md_row([name, f"{t * 1e3:.1f}", f"{t / base:.3f}x", format_bytes(op.nbytes),
                             f"1/{dense_b / op.nbytes:.1f}", format_bytes(rss[name]),
                             f"{change[name]:.1e}"]))
    return lines


def largest(m: int, d: int, density: float, steps: int = 3) -> list[str]:
    """Allocate the window (``reset`` writes every page, so RSS counts all of it) and take a few steps.

    The steps are the first ones of the window (n <= ``steps`` rows): their time is the O(d) part of a
    step (accumulator, top-k, the dense g' and the scatter's zero vector); the O(m k) part at a full
    window is what the ``kernels`` section measures at smaller sizes.
    """
    dense_bytes = m * d * 4
    gc.collect()
    before = current_rss()
    op = CompressedSlidingInverseFisher(d, m, TIMING_DAMP, density=density)
    op.reset()  # touch every page of the values, indices and accumulator
    allocated = current_rss() - before
    gen = torch.Generator().manual_seed(0)
    grad = [torch.empty(d)]

    def fresh() -> None:  # untimed: a new gradient for every step
        grad[0] = torch.randn(d, generator=gen)

    t = time_interleaved({"step": lambda: op.update_mul(grad[0])}, repeats=steps, warmup=0,
                         setup={"step": fresh})
    per_step = statistics.fmean(t["step"]["times"])  # the mean: the first steps differ (n = 1, 2, ...)
    stepped = current_rss() - before
    return [f"\n### Largest window here: m = {m}, d = {d:,}, density {density} (k = {op.row_size:,})\n",
            md_head(["window", "state bytes", "RSS growth: allocated", "after steps",
                     "ms / step (first steps)"]),
            md_row(["dense (float32), stated", format_bytes(dense_bytes), "does not fit (24 GB RAM)", "-",
                    "-"]),
            md_row([f"compressed, density {density}", format_bytes(op.nbytes), format_bytes(allocated),
                    format_bytes(stepped), f"{per_step * 1e3:.0f}"])]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=["kernels", "step", "storage", "largest"],
                   choices=["kernels", "step", "storage", "largest"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--m", type=int, default=256)
    p.add_argument("--d", type=int, default=RESNET20_D)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--largest-m", type=int, default=1024)
    p.add_argument("--largest-d", type=int, default=10_000_000)
    p.add_argument("--out", type=Path, default=None, help="also write the tables and the run record here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    record = RunRecord(argv)
    lines = []
    if "kernels" in args.sections:
        for density in (0.01, 0.001):
            lines += kernels(args.m, args.d, density, args.repeats)
    if "step" in args.sections:
        lines += step(args.m, args.d, args.repeats)
    if "storage" in args.sections:
        lines += storage(args.m, args.d, 0.01, args.repeats)
    if "largest" in args.sections:
        lines += largest(args.largest_m, args.largest_d, 0.01)
    meta = record.finish(sections=args.sections, m=args.m, d=args.d, repeats=args.repeats,
                         largest_m=args.largest_m, largest_d=args.largest_d)
    load = meta["load_avg_before"], meta["load_avg_after"]
    lines.insert(0, f"{meta['date']}, mfac at {commit_label(meta)}; torch {meta['torch']}, "
                    f"threads: {meta['threads']}; load average (1 min) "
                    + " before, ".join("-" if x is None else f"{x[0]:.1f}" for x in load) + " after")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_compressed.md").write_text(text + "\n")
        (args.out / "bench_compressed.json").write_text(
            json.dumps(jsonable({"meta": meta, "markdown": text}), indent=1))


if __name__ == "__main__":
    main()
