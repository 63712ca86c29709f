"""The main job: what mfac does, in a few minutes on a laptop CPU, on data that ships with scikit-learn.

    python -m experiments.demo [--out results/demo] [--quick]

1. Exactness: every operator against the explicit float64 inverse, and float32 against float64.
2. Speed: a training step of the sliding window (fresh gradients) and the static build against their BLAS
   floors, interleaved in one run, with the paper's sliding step beside them.
3. Training: an MLP on scikit-learn's digits with mfac.MFAC and with Adam.
4. Pruning: one-shot OBS (M-FAC) against magnitude pruning at several sparsities.

Prints markdown tables, writes them with a JSON file and PNG plots under ``--out``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

import mfac
from experiments._measure import (
    count_log_records,
    static_build_floor,
    static_floor_seconds,
    time_interleaved,
    two_pass_floor,
)
from experiments._metrics import rel_err_max
from experiments._paper_reference import PaperSlidingWindow
from experiments._provenance import RunRecord

DEFAULT_OUT = Path("results/demo")


def exactness_table(seed: int = 0) -> list[dict]:
    """Relative max-norm errors of mul/diag/update_mul against the dense float64 inverse."""
    gen = torch.Generator().manual_seed(seed)
    m, d, damp = 32, 300, 1e-4
    grads = torch.randn(m, d, generator=gen, dtype=torch.float64)
    x = torch.randn(4, d, generator=gen, dtype=torch.float64)
    dense = mfac.DenseInverseFisher(grads, damp).matrix
    rows = []
    for name, op, ref in [
        ("StaticInverseFisher", mfac.StaticInverseFisher(grads, damp), dense),
        ("StaticInverseFisher(block_size=64)", mfac.StaticInverseFisher(grads, damp, block_size=64),
         torch.block_diag(*[mfac.DenseInverseFisher(grads[:, s:s + 64], damp).matrix
                            for s in range(0, d, 64)])),
    ]:
        rows.append({"operator": name, "dtype": "float64", "mul": rel_err_max(op.mul(x), x @ ref),
                     "diag": rel_err_max(op.diag(), ref.diagonal())})
    window = mfac.SlidingInverseFisher(d, m, damp, dtype=torch.float64)
    stream = torch.randn(3 * m, d, generator=gen, dtype=torch.float64)
    for g in torch.cat([stream, grads]):
        window.update(g)
    rows.append({"operator": "SlidingInverseFisher (after 3 wraps)", "dtype": "float64",
                 "mul": rel_err_max(window.mul(x), x @ dense),
                 "diag": rel_err_max(window.diag(), dense.diagonal())})
    # float32 hot path against float64 truth
    w32 = mfac.SlidingInverseFisher(d, m, damp, dtype=torch.float32)
    w64 = mfac.SlidingInverseFisher(d, m, damp, dtype=torch.float64)
    worst = 0.0
    for g in torch.cat([stream, grads]):
        y32, y64 = w32.update_mul(g.float()), w64.update_mul(g)
        worst = max(worst, rel_err_max(y32, y64))
    rows.append({"operator": "SlidingInverseFisher.update_mul", "dtype": "float32 vs float64",
                 "mul": worst, "diag": float("nan")})
    return rows


#: the debug record ``SlidingInverseFisher`` writes when ``update_mul`` redoes ``G^T c`` in float64
FALLBACK_LOGGER, FALLBACK_MESSAGE = "mfac.fisher.sliding", "redone in float64"


def sliding_steps(window: mfac.SlidingInverseFisher, stream: torch.Tensor) -> Callable[[], None]:
    """A training step of ``window`` per call: ``update_mul`` of the next fresh gradient of ``stream``.

    ``stream`` (shape ``(n, d)``) must have a row for every call the timing makes: timing ``update_mul``
    on one repeated gradient fills the window with copies of it, whose float32 combination cancels and
    takes the float64 redo (about three passes), a rare case and not what a training step costs.
    """
    rows = iter(stream)

    def step() -> None:
        window.update_mul(next(rows))

    return step


def speed_table(m: int, d: int, *, repeats: int = 9, warmup: int = 2) -> list[dict]:
    """Time per training step against the BLAS floors, interleaved in one run.

    Rows: ``SlidingInverseFisher.update_mul`` (a fresh gradient each step) and the paper's sliding step
    (``experiments/_paper_reference.py``: the m x m system refactored every step) against the floor
    ``G @ g + G.T @ c`` on the same buffer; ``StaticInverseFisher`` against ``G @ G.T`` plus the
    triangular solve. ``float64_redos`` counts the timed steps that took the float64 redo of ``G^T c``
    (0 on fresh gradients: the figure is a training step's cost).
    """
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(m, d, generator=gen)
    window = mfac.SlidingInverseFisher(d, m, 1e-5)
    for g in grads:
        window.update(g)
    paper = PaperSlidingWindow(window.window.clone(), 1e-5, next_row=window.next_row)
    calls = warmup + repeats
    stream = torch.randn(2 * calls, d, generator=gen)  # one fresh gradient per timed call of each step
    with count_log_records(FALLBACK_LOGGER, FALLBACK_MESSAGE) as redos:
        t = time_interleaved({
            "ours": sliding_steps(window, stream[:calls]),
            "paper": sliding_steps(paper, stream[calls:]),
            "floor": two_pass_floor(window.window, stream[0]),
        }, repeats, warmup)
    # the floor of the build: the Gram product + the faster layout of the triangular solve
    tb = time_interleaved({"ours": lambda: mfac.StaticInverseFisher(grads, 1e-5),
                           **static_build_floor(grads)}, 3, 1)
    floor = t["floor"]["median"]

    def row(what: str, time_s: float, floor_s: float, redo: int | float) -> dict:
        return {"what": what, "m": m, "d": d, "time_ms": 1e3 * time_s, "floor_ms": 1e3 * floor_s,
                "ratio": time_s / floor_s, "float64_redos": redo}

    return [
        row("sliding update_mul (fresh gradient per step)", t["ours"]["median"], floor, redos.count),
        row("paper's sliding step (refactor every step)", t["paper"]["median"], floor, float("nan")),
        row("static build", tb["ours"]["median"], static_floor_seconds(tb), float("nan")),
    ]


def markdown(rows: list[dict], fmt: dict[str, str] | None = None) -> str:
    """Rows of dicts -> a markdown table (floats formatted by ``fmt[key]`` or ``.3g``)."""
    fmt = fmt or {}
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = []
        for key in keys:
            value = row[key]
            cells.append(format(value, fmt.get(key, ".3g")) if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for the tests")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    record = RunRecord(argv)
    results: dict = {}
    report: list[str] = ["# mfac demo", ""]

    def section(title: str, rows: list[dict], fmt: dict[str, str] | None = None, note: str = "") -> None:
        table = markdown(rows, fmt) + (f"\n\n{note}" if note else "")
        print(f"\n## {title}\n\n{table}", flush=True)
        report.extend([f"## {title}", "", table, ""])

    rows = exactness_table()
    results["exactness"] = rows
    section("1. Exactness against the dense inverse (relative max-norm error)", rows,
            {"mul": ".1e", "diag": ".1e"})

    m, d = (32, 20_000) if args.quick else (256, 400_000)
    rows = speed_table(m, d)
    results["speed"] = rows
    section(f"2. Speed against the BLAS floor ({torch.get_num_threads()} threads, float32)", rows,
            {"time_ms": ".1f", "floor_ms": ".1f", "ratio": ".2f", "float64_redos": ".0f"})

    from experiments import _demo_train_prune

    results.update(_demo_train_prune.run(args.out, quick=args.quick, section=section))
    results["meta"] = record.finish(quick=args.quick)

    (args.out / "demo.json").write_text(json.dumps(results, indent=2, default=str))
    (args.out / "demo.md").write_text("\n".join(report))
    print(f"\nResults: {args.out.resolve()}/ (demo.md, demo.json, *.png)")
    return results


if __name__ == "__main__":
    main()
