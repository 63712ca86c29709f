r"""Benchmark of the sharded sliding window: time and bytes per step for R = 1, 2, 4 ranks.

Run ``python -m experiments.bench_distributed`` (``--help`` for the options, ``--quick`` for a
seconds-long smoke run). It starts R gloo processes on this machine (``file://`` rendezvous, loopback),
prints a markdown table and writes ``bench_distributed.json`` and ``bench_distributed.md`` to ``--out``.

Per R, every rank holds ``d_r ~ d / R`` columns of an ``m x d`` float32 window
(:class:`mfac.distributed.ShardedSlidingInverseFisher`), fills it with ``m`` random gradients, then times
``--steps`` calls of ``update_mul`` (the optimizer's step: one all-reduce of the ``m``-vector ``G g``) after
``--warmup`` untimed ones. Columns:

* ``step ms``: median wall time of one ``update_mul`` (slowest rank);
* ``floor ms``: the same rank's two local passes ``G_r g_r`` and ``G_r^T c`` (what R cannot avoid);
* ``step/floor``: median step time over median floor time, from a second round where steps and floor
  passes alternate (so that load from other processes hits both alike);
* ``allreduce ms``: one all-reduce of ``m`` float64 alone (the latency the step adds);
* ``expected B/step``: the payload, ``m`` float64 per step, and what a ring all-reduce sends per rank,
  ``2 (R-1)/R`` times that;
* ``counted B/step``: what the operator handed to ``all_reduce`` (:class:`mfac.distributed.CommStats`);
* ``sent B/step``: bytes this rank's process wrote to its sockets, measured by the kernel
  (``wchar`` of ``/proc/self/io`` over the timed steps: gloo's TCP transport uses ``writev``; its message
  headers are included). Linux only (``n/a`` elsewhere);
* ``window MiB/rank``: the operator's storages (:func:`mfac.distributed.state_nbytes`);
* ``DDP gather``: under DDP the optimizer must all-gather the ``(d,)`` step for the replicated
  parameters (ZeRO-1 style): its time and bytes sent, listed apart because the operator never needs it
  (under FSDP it does not happen at all).

Threads: each rank gets ``max(1, cores // R)`` intra-op threads, so R = 4 on a 2-core machine is
oversubscribed (and says so). Times on a shared CPU box are noisy; the byte counts are exact.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from experiments._measure import stopwatch, time_interleaved, two_pass_floor
from experiments._provenance import RunRecord

DEFAULTS = {"d": 1_000_000, "m": 256, "worlds": [1, 2, 4], "steps": 20, "warmup": 3}
QUICK = {"d": 200_000, "m": 32, "worlds": [1, 2, 4], "steps": 6, "warmup": 2}
DAMP = 1e-4
GIB = 2**30


# =============================================================================== worker side
def _sent_bytes() -> int | None:
    path = Path("/proc/self/io")
    if not path.exists():
        return None
    fields = dict(line.split(": ") for line in path.read_text().splitlines())
    return int(fields["wchar"])


def _median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def _worker(rank: int, world: int, args: argparse.Namespace, tmp: Path) -> None:
    import torch.distributed as dist

    from mfac.distributed import ShardedSlidingInverseFisher, ShardSpec, gather_full, state_nbytes

    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp / 'rendezvous'}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=300),
    )
    d, m = args.d, args.m
    spec = ShardSpec.even(d, rank, world)
    op = ShardedSlidingInverseFisher(spec, m, DAMP, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1000 + rank)

    def grad() -> torch.Tensor:  # a fresh random gradient: this rank's slice only
        return torch.randn(spec.size, generator=gen)

    for _ in range(m):  # fill the window
        op.update(grad())
    for _ in range(args.warmup):  # steady state
        op.update_mul(grad())
    fresh = [grad() for _ in range(args.steps)]  # drawn before the clock starts

    def steps_over(grads: list[torch.Tensor]):
        it = iter(grads)
        return lambda: op.update_mul(next(it))

    op.comm.reset()
    dist.barrier()
    sent0 = _sent_bytes()
    step_s = time_interleaved({"step": steps_over(fresh)}, args.steps, 0)["step"]["times"]
    sent1 = _sent_bytes()
    counted = op.comm.allreduce_bytes / args.steps
    calls = op.comm.allreduce_calls / args.steps
    # the floor: the two local passes over this rank's window, interleaved with more steps so that
    # load from other processes hits both alike (their ratio is the number to read); every rank runs
    # the same order, so the steps' all-reduces stay matched
    pair = time_interleaved({"floor": two_pass_floor(op.window, fresh[0]), "step": steps_over(fresh)},
                            args.steps, 0)
    floor_s, step2_s = pair["floor"]["times"], pair["step"]["times"]
    del fresh
    # one all-reduce of m float64 alone
    vec = torch.zeros(m, dtype=torch.float64)
    dist.barrier()

    def all_reduce() -> None:
        if world > 1:
            dist.all_reduce(vec)

    ar_s = time_interleaved({"allreduce": all_reduce}, max(5, args.steps), 0)["allreduce"]["times"]
    # DDP: the all-gather of the (d,) step for replicated parameters
    local_step = op.update_mul(grad())
    dist.barrier()
    sent2 = _sent_bytes()
    gather_s = time_interleaved({"gather": lambda: gather_full(local_step, spec)},
                                max(3, args.steps // 4), 0)["gather"]["times"]
    sent3 = _sent_bytes()
    result = {
        "rank": rank,
        "d_r": spec.size,
        "step_ms": _median_ms(step_s),
        "step_interleaved_ms": _median_ms(step2_s),
        "floor_ms": _median_ms(floor_s),
        "allreduce_ms": _median_ms(ar_s),
        "allreduce_calls_per_step": calls,
        "counted_bytes_per_step": counted,
        "sent_bytes_per_step": None if sent0 is None else (sent1 - sent0) / args.steps,
        "window_bytes": state_nbytes(op),
        "gather_ms": _median_ms(gather_s),
        "gather_sent_bytes": None if sent2 is None else (sent3 - sent2) / len(gather_s),
        "threads": torch.get_num_threads(),
    }
    (tmp / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


# =============================================================================== driver side
def _launch(world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // world)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if "GLOO_SOCKET_IFNAME" not in env and Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cmd = [
            sys.executable,
            "-m",
            "experiments.bench_distributed",
            "--_worker",
            "RANK",
            str(world),
            tmp_name,
            "--d",
            str(args.d),
            "--m",
            str(args.m),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
        ]
        procs = [
            subprocess.Popen(
                [str(rank) if a == "RANK" else a for a in cmd], env=env, cwd=root
            )
            for rank in range(world)
        ]
        deadline = time.monotonic() + args.timeout
        try:
            for proc in procs:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for proc in procs:
                proc.kill()
            raise RuntimeError(f"R={world}: the workers did not finish in {args.timeout} s") from None
        if any(p.returncode for p in procs):
            raise RuntimeError(f"R={world}: worker exit codes {[p.returncode for p in procs]}")
        return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]


def _row(world: int, ranks: list[dict[str, Any]], m: int, cores: int) -> dict[str, Any]:
    payload = 8 * m
    ring = 2 * (world - 1) / world * payload
    sent = [r["sent_bytes_per_step"] for r in ranks]
    return {
        "R": world,
        "threads_per_rank": ranks[0]["threads"],
        "oversubscribed": world * ranks[0]["threads"] > cores,
        "d_r_max": max(r["d_r"] for r in ranks),
        "step_ms": max(r["step_ms"] for r in ranks),
        "floor_ms": max(r["floor_ms"] for r in ranks),
        "step_over_floor": max(r["step_interleaved_ms"] / r["floor_ms"] for r in ranks),
        "allreduce_ms": max(r["allreduce_ms"] for r in ranks),
        "allreduces_per_step": ranks[0]["allreduce_calls_per_step"],
        "expected_payload_bytes": payload if world > 1 else 0,
        "expected_ring_sent_bytes": ring,
        "counted_bytes_per_step": max(r["counted_bytes_per_step"] for r in ranks),
        "sent_bytes_per_step": None if None in sent else max(sent),
        "window_mib_per_rank": max(r["window_bytes"] for r in ranks) / 2**20,
        "gather_ms": max(r["gather_ms"] for r in ranks),
        "gather_sent_bytes": None
        if any(r["gather_sent_bytes"] is None for r in ranks)
        else max(r["gather_sent_bytes"] for r in ranks),
        "per_rank": ranks,
    }


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    if n >= 2**20:
        return f"{n / 2**20:.2f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.2f} KiB"
    return f"{n:.0f} B"


def _table(rows: list[dict[str, Any]], m: int, d: int) -> str:
    lines = [
        f"Sharded sliding window, m = {m}, d = {d:,} (float32 window, float64 all-reduce), gloo on "
        "loopback; per step = one `update_mul`; bytes are per rank per step.",
        "",
        "| R | threads/rank | d_r | window MiB/rank | step ms | floor ms | step/floor | allreduce ms "
        "| all-reduces/step "
        "| expected payload (m float64) | expected ring sent | counted | sent (measured) "
        "| DDP gather ms | DDP gather sent |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        threads = f"{r['threads_per_rank']}" + (" (oversubscribed)" if r["oversubscribed"] else "")
        lines.append(
            f"| {r['R']} | {threads} | {r['d_r_max']:,} | {r['window_mib_per_rank']:.1f} "
            f"| {r['step_ms']:.2f} | {r['floor_ms']:.2f} | {r['step_over_floor']:.2f} "
            f"| {r['allreduce_ms']:.3f} "
            f"| {r['allreduces_per_step']:.0f} | {_fmt_bytes(r['expected_payload_bytes'])} "
            f"| {_fmt_bytes(r['expected_ring_sent_bytes'])} | {_fmt_bytes(r['counted_bytes_per_step'])} "
            f"| {_fmt_bytes(r['sent_bytes_per_step'])} | {r['gather_ms']:.2f} "
            f"| {_fmt_bytes(r['gather_sent_bytes'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Per-step time and bytes communicated by the sharded M-FAC window for R ranks "
        "(gloo, this machine). Prints a markdown table; writes JSON and markdown to --out.",
    )
    parser.add_argument("--d", type=int, default=None, help=f"global d (default {DEFAULTS['d']:,})")
    parser.add_argument("--m", type=int, default=None, help=f"window size (default {DEFAULTS['m']})")
    parser.add_argument(
        "--worlds", type=int, nargs="+", default=None, help="numbers of ranks (default 1 2 4)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3)")
    parser.add_argument(
        "--threads", type=int, default=None, help="intra-op threads per rank (default cores // R)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a seconds-long smoke run")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per world size")
    parser.add_argument(
        "--out", type=Path, default=Path("results/bench_distributed"), help="output directory"
    )
    parser.add_argument("--_worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    for key in ("d", "m", "worlds", "steps", "warmup"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args._worker:
        rank, world, tmp = args._worker
        _worker(int(rank), int(world), args, Path(tmp))
        return 0
    cores = os.cpu_count() or 1
    record = RunRecord(argv)
    rows = []
    for world in args.worlds:
        with stopwatch() as watch:
            ranks = _launch(world, args)
        rows.append(_row(world, ranks, args.m, cores))
        print(f"R={world}: done in {watch.seconds:.1f} s", file=sys.stderr)
    table = _table(rows, args.m, args.d)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = record.finish(d=args.d, m=args.m, steps=args.steps, warmup=args.warmup, quick=args.quick,
                         damp=DAMP)
    (args.out / "bench_distributed.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2)
    )
    (args.out / "bench_distributed.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # gloo's threads sometimes abort in C++ teardown after all was written
