"""Sharded operators on torch.distributed (gloo, CPU): 2 and 3 real processes against one process.

Each world size is one launch of R worker processes (this file run as a script, ``--worker``) that run
every scenario below in order and write one JSON line per scenario; the test fails listing the
scenarios that failed, with their tracebacks. Robustness: the rendezvous is a ``file://`` store in
``tmp_path`` (no ports to pick), every collective has a timeout, a failing scenario stops all ranks
together, and the parent kills the workers after a deadline.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import mfac
from mfac.distributed import (
    CommStats,
    DistributedWindow,
    ShardedSlidingInverseFisher,
    ShardedStaticInverseFisher,
    ShardSpec,
    consolidate_state_dicts,
    gather_full,
    load_sharded,
    local_flat,
    local_tensor,
    save_sharded,
    shard_range,
    shard_state_dict,
    state_nbytes,
)
from mfac.fisher.sliding import WINDOW_CHUNK

F64 = torch.float64
DEADLINE_S = 150  # per launch; a healthy launch of 3 workers takes about 15 s on 2 cores
COLLECTIVE_TIMEOUT_S = 45


# ============================================================================ in-process tests
def test_shard_range_is_a_contiguous_even_partition():
    for d in (1, 2, 7, 10, 64, 101):
        for world in (1, 2, 3, 4):
            if d < world:
                with pytest.raises(ValueError, match="non-empty shards"):
                    shard_range(d, 0, world)
                continue
            ranges = [shard_range(d, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == d
            assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert [shard_range(10, r, 2, align=4) for r in range(2)] == [(0, 8), (8, 10)]
    assert [shard_range(12, r, 3, align=4) for r in range(3)] == [(0, 4), (4, 8), (8, 12)]


@pytest.mark.parametrize(
    ("bounds", "rank", "match"),
    [
        ((0,), 0, "at least 2"),
        ((1, 4), 0, "start at 0"),
        ((0, 3, 3), 0, "strictly increasing"),
        ((0, 3, 5), 2, "rank must be in"),
    ],
)
def test_shard_spec_rejects_bad_layouts(bounds, rank, match):
    with pytest.raises(ValueError, match=match):
        ShardSpec(bounds, rank)


def test_shard_spec_views():
    spec = ShardSpec.even(10, 1, 3)
    assert spec.bounds == (0, 4, 7, 10) and (spec.start, spec.stop, spec.size) == (4, 7, 3)
    assert spec.sizes == (4, 3, 3) and spec.dim == 10 and spec.world_size == 3
    full = torch.arange(20.0).reshape(2, 10)
    assert torch.equal(spec.take(full), full[:, 4:7])
    with pytest.raises(ValueError, match="d=10"):
        spec.take(torch.zeros(9))
    assert ShardSpec.from_sizes([2, 5], 0).bounds == (0, 2, 7)


def test_world_of_one_equals_the_single_process_operator():
    # without torch.distributed initialised the sharded classes are the plain ones, bit for bit
    gen = torch.Generator().manual_seed(0)
    d, m = 17, 4
    stream = torch.randn(9, d, generator=gen, dtype=F64)
    op = ShardedSlidingInverseFisher(d, m, 1e-2, dtype=F64)
    ref = mfac.SlidingInverseFisher(d, m, 1e-2, dtype=F64)
    for g in stream:
        assert torch.equal(op.update_mul(g), ref.update_mul(g))
    x = torch.randn(2, d, generator=gen, dtype=F64)
    assert torch.equal(op.mul(x), ref.mul(x))
    torch.testing.assert_close(op.to_dense(), ref.to_dense(), rtol=1e-12, atol=1e-12)
    assert op.comm.allreduce_calls == 0 and op.global_dim == d and op.shard.world_size == 1
    grads = torch.randn(6, d, generator=gen, dtype=F64)
    static = ShardedStaticInverseFisher(grads, 1e-2)
    torch.testing.assert_close(
        static.mul(x), mfac.StaticInverseFisher(grads, 1e-2).mul(x), rtol=1e-12, atol=0
    )
    with pytest.raises(NotImplementedError, match="scipy"):
        op.to_scipy()
    # the single-process methods over placement hooks: the checkpoint carries the layout, and a state
    # without one (a single-process window's) is refused before anything changes
    assert op.state_dict()["shard"] == {"bounds": [0, d], "rank": 0}
    with pytest.raises(ValueError, match="no 'shard' entry"):
        op.load_state_dict(ref.state_dict())
    assert op.num_seen == ref.num_seen and torch.equal(op.mul(x), ref.mul(x))
    with pytest.raises(IndexError, match=r"idx \(global coordinates\) must lie in \[0, 17\)"):
        op.submatrix(torch.tensor([d]))


def test_consolidate_and_reshard_offline():
    gen = torch.Generator().manual_seed(3)
    d, m = 13, 3
    ref = mfac.SlidingInverseFisher(d, m, 1e-3, dtype=F64)
    for g in torch.randn(5, d, generator=gen, dtype=F64):
        ref.update(g)
    full = ref.state_dict()
    states = [shard_state_dict(full, ShardSpec.even(d, r, 3)) for r in (2, 0, 1)]
    assert [s["grads"].shape[1] for s in states] == [4, 5, 4]
    back = consolidate_state_dicts(states)
    assert torch.equal(back["grads"], full["grads"]) and back["dim"] == d and "shard" not in back
    bad = [dict(states[0]), states[1]]
    with pytest.raises(ValueError, match="one layout"):
        consolidate_state_dicts(bad)
    other = dict(states[2], num_seen=99)
    with pytest.raises(ValueError, match="num_seen"):
        consolidate_state_dicts([states[0], states[1], other])


def test_local_flat_and_gather_full_on_one_process():
    a, b = torch.ones(2, 3), torch.full((4,), 2.0)
    flat = local_flat([a, None, b], sizes=[6, 2, 4], dtype=F64)
    assert flat.dtype == F64 and flat.tolist() == [1.0] * 6 + [0.0, 0.0] + [2.0] * 4
    assert local_tensor(a) is a
    spec = ShardSpec.even(5, 0, 1)
    assert torch.equal(gather_full(torch.arange(5.0), spec), torch.arange(5.0))
    stats = CommStats()
    stats.record("allreduce", 80, 10)
    stats.record("other", 8)
    assert (stats.allreduce_calls, stats.allreduce_bytes, stats.other_bytes) == (1, 80, 8)
    stats.reset()
    assert stats.allreduce_bytes == 0


# ============================================================================ multi-process tests
def _launch(world: int, tmp_path: Path) -> dict[str, dict[int, str]]:
    """Run every scenario on ``world`` gloo workers; return ``{scenario: {rank: "ok" | traceback}}``."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
    )
    if "GLOO_SOCKET_IFNAME" not in env and Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    procs = []
    for rank in range(world):
        log = open(tmp_path / f"rank{rank}.log", "w")  # closed below
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            str(rank),
            str(world),
            str(tmp_path),
        ]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + DEADLINE_S
    timed_out = False
    for proc, _ in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    for proc, log in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    results: dict[str, dict[int, str]] = {}
    for rank in range(world):
        path = tmp_path / f"results{rank}.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                results.setdefault(entry["scenario"], {})[rank] = entry["outcome"]
    missing = [s for s in SCENARIOS if len(results.get(s, {})) != world]
    if timed_out or missing or any(p.returncode for p, _ in procs):
        logs = "\n".join(
            f"--- rank {r} (exit {p.returncode}) ---\n"
            + (tmp_path / f"rank{r}.log").read_text()[-4000:]
            for r, (p, _) in enumerate(procs)
        )
        failed = {s: o for s, o in results.items() if any(v != "ok" for v in o.values())}
        pytest.fail(
            f"world={world}: timed_out={timed_out}, scenarios without a result on every rank: "
            f"{missing}, failed: {list(failed)}\n{_format_failures(failed)}\n{logs}"
        )
    return results


def _format_failures(failed: dict[str, dict[int, str]]) -> str:
    return "\n".join(
        f"=== {name}, rank {rank} ===\n{outcome}"
        for name, outcomes in failed.items()
        for rank, outcome in sorted(outcomes.items())
        if outcome != "ok"
    )


@pytest.mark.distributed
@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_equals_single_process(world, tmp_path):
    results = _launch(world, tmp_path)
    failed = {s: o for s, o in results.items() if any(v != "ok" for v in o.values())}
    assert not failed, _format_failures(failed)


# ============================================================================ worker side
class Ctx:
    def __init__(self, rank: int, world: int, tmp: Path) -> None:
        self.rank, self.world, self.tmp = rank, world, tmp


SCENARIOS: dict = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


def _slice_err(local: torch.Tensor, full: torch.Tensor, spec: ShardSpec) -> float:
    """Max-norm error of this rank's slice against the full reference, relative to the full one."""
    return float((local - spec.take(full)).abs().max() / full.abs().max())


def _rss() -> int | None:
    statm = Path("/proc/self/statm")
    if not statm.exists():
        return None
    return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@scenario
def memory_is_one_rth(ctx: Ctx) -> None:
    """Per-rank window memory ~ 1/R of one process's: RSS growth and the operator's own storages."""
    m, d = 8, 3_000_000  # float32: 96 MB for one process
    full_bytes = m * d * 4
    before = _rss()
    op = ShardedSlidingInverseFisher(d, m, 1e-3, dtype=torch.float32)
    grown = None if before is None else _rss() - before
    held = state_nbytes(op)
    share = full_bytes * op.dim / d  # exactly this rank's columns
    assert op.dim in (d // ctx.world, d // ctx.world + 1)
    # the window, one (d_r,) row kept for a failed step's restore, Gram + P + the spare P buffer
    assert held == (m + 1) * op.dim * 4 + 3 * m * m * 8
    single = mfac.SlidingInverseFisher(d, m, 1e-3, dtype=torch.float32)
    ratio = held / state_nbytes(single)
    del single
    assert ratio <= 1.02 / ctx.world, ratio
    if grown is not None:
        # RSS is process-wide (gloo's threads and the allocator move it too), so only a loose bound is
        # asserted: well below one process's whole window. The exact check is ``held`` above.
        assert grown <= share + full_bytes / 4, (grown, share, full_bytes)


@scenario
def sliding_matches_single(ctx: Ctx) -> None:
    R, rank = ctx.world, ctx.rank
    d, m, damp = 11 * R + 2, 5, 1e-3
    even = ShardSpec.even(d, rank, R)
    skewed = ShardSpec.from_sizes([1] * (R - 1) + [d - R + 1], rank)  # uneven: 1, ..., 1, rest
    for spec, average_over in ((even, "seen"), (even, "ngrads"), (skewed, "seen")):
        if True:
            gen = torch.Generator().manual_seed(1)
            stream = torch.randn(13, d, generator=gen, dtype=F64)
            stream[5] = stream[2]  # a repeated gradient: singular Gram, fine with damp
            xs = torch.randn(3, d, generator=gen, dtype=F64)
            op = ShardedSlidingInverseFisher(spec, m, damp, dtype=F64, average_over=average_over)
            ref = mfac.SlidingInverseFisher(d, m, damp, dtype=F64, average_over=average_over)
            for t, g in enumerate(stream):
                err = _slice_err(op.update_mul(spec.take(g)), ref.update_mul(g), spec)
                assert err < 1e-11, (t, err, average_over, spec)  # cond(M) ~ 1e4 at the repeat
                if t % 4 == 0:
                    assert _slice_err(op.mul(spec.take(xs)), ref.mul(xs), spec) < 1e-12
                    assert _slice_err(op.mul(spec.take(xs[0])), ref.mul(xs[0]), spec) < 1e-12
            assert _slice_err(op.diag(), ref.diag(), spec) < 1e-12
            idx = torch.tensor([0, d - 1, spec.bounds[1], 3, 0, d // 2])  # crosses shards, repeats
            torch.testing.assert_close(op.submatrix(idx), ref.submatrix(idx), rtol=1e-11, atol=1e-9)
            torch.testing.assert_close(op.to_dense(), ref.to_dense(), rtol=1e-11, atol=1e-9)
            op.check_consistency()
            # one all-reduce of n <= m float64 per update, n * k per mul of k vectors
            assert op.comm.allreduce_calls == 13 + 2 * 4
            assert op.comm.allreduce_max_numel == m * 3
            assert op.num_seen == 13 and op.global_dim == d


@scenario
def static_matches_single(ctx: Ctx) -> None:
    R, rank = ctx.world, ctx.rank
    damp = 1e-3
    # (m, d, block_size, align): full operator with d > m, full with d <= m (one process inverts
    # d x d directly, the sharded one goes through Woodbury), whole blocks direct (B <= m) and
    # Woodbury (B > m) on block-aligned shards, and a block larger than d (= full)
    cases = [
        (5, 11 * R + 2, None, 1),
        (2 * R + 4, 2 * R + 1, None, 1),
        (5, 6 * R + 1, 3, 3),
        (2, 8 * R + 3, 4, 4),
        (3, 4 * R, 10 * R, 1),
    ]
    for m, d, block, align in cases:
        gen = torch.Generator().manual_seed(2)
        grads = torch.randn(m, d, generator=gen, dtype=F64)
        xs = torch.randn(2, d, generator=gen, dtype=F64)
        spec = ShardSpec.even(d, rank, R, align=align)
        op = ShardedStaticInverseFisher(spec.take(grads), damp, block_size=block, shard=spec)
        ref = mfac.StaticInverseFisher(grads, damp, block_size=block)
        assert _slice_err(op.mul(spec.take(xs)), ref.mul(xs), spec) < 1e-12, (m, d, block)
        assert _slice_err(op.diag(), ref.diag(), spec) < 1e-12, (m, d, block)
        idx = torch.tensor([0, d - 1, spec.bounds[1], spec.bounds[1] - 1, 1])
        torch.testing.assert_close(op.submatrix(idx), ref.submatrix(idx), rtol=1e-11, atol=1e-9)
        torch.testing.assert_close(op.to_dense(), ref.to_dense(), rtol=1e-11, atol=1e-9)
        op.check_consistency()
        if block is None or block >= d:
            assert op.full and op.route == "woodbury"
        else:
            assert not op.full and op.comm.allreduce_calls == 0  # blocks are local: no traffic
    # the layout defaults to the ranks' columns in rank order
    gen = torch.Generator().manual_seed(4)
    grads = torch.randn(4, 5 * R, generator=gen, dtype=F64)
    spec = ShardSpec.from_sizes(
        [3 + 2 * (r % 2) for r in range(R - 1)]
        + [5 * R - sum(3 + 2 * (r % 2) for r in range(R - 1))],
        rank,
    )
    op = ShardedStaticInverseFisher(spec.take(grads), damp)
    assert op.shard == spec
    x = torch.randn(5 * R, generator=gen, dtype=F64)
    assert (
        _slice_err(op.mul(spec.take(x)), mfac.StaticInverseFisher(grads, damp).mul(x), spec) < 1e-12
    )
    # blocks straddling shards are refused on every rank
    d = 6 * R + 1
    spec = ShardSpec.even(d, rank, R)
    with pytest.raises(ValueError, match="multiple of it"):
        ShardedStaticInverseFisher(spec.take(torch.randn(5, d, dtype=F64)), damp, block_size=3)


@scenario
def ranks_that_disagree_raise_everywhere(ctx: Ctx) -> None:
    rank, R = ctx.rank, ctx.world
    odd = rank == R - 1
    with pytest.raises(ValueError, match=r"ranks disagree on ngrads \(rank 0: 4, .*rank \d: 5\)"):
        ShardedSlidingInverseFisher(20, 5 if odd else 4, 1e-3)
    with pytest.raises(ValueError, match="ranks disagree on damp"):
        ShardedSlidingInverseFisher(20, 4, 1e-2 if odd else 1e-3)
    with pytest.raises(ValueError, match=r"ranks disagree on dtype .*torch.float64"):
        ShardedSlidingInverseFisher(20, 4, 1e-3, dtype=F64 if odd else torch.float32)
    with pytest.raises(ValueError, match="ranks disagree on average_over"):
        ShardedSlidingInverseFisher(20, 4, 1e-3, average_over="ngrads" if odd else "seen")
    with pytest.raises(ValueError, match="ranks disagree on the shard layout"):
        ShardedSlidingInverseFisher(21 if odd else 20, 4, 1e-3)
    # a local error on one rank: that rank raises it, the others say which rank failed
    if odd:
        with pytest.raises(ValueError, match="ngrads must be >= 1"):
            ShardedSlidingInverseFisher(20, 0, 1e-3)
    else:
        with pytest.raises(RuntimeError, match=rf"rank\(s\) \[{R - 1}\] failed"):
            ShardedSlidingInverseFisher(20, 4, 1e-3)
    grads = torch.randn(6 if odd else 5, 4, dtype=F64)
    with pytest.raises(ValueError, match="ranks disagree on ngrads"):
        ShardedStaticInverseFisher(grads, 1e-3)
    bad = torch.randn(5, 4, dtype=F64)
    if odd:
        bad[0, 0] = float("nan")
    # full operator: found on the all-reduced Gram diagonal (no isfinite pass), so every rank raises
    with pytest.raises(ValueError, match="1 NaN" if odd else "another rank's grads hold NaN"):
        ShardedStaticInverseFisher(bad, 1e-3)
    # whole blocks on each rank: the rank whose blocks hold the NaN raises, the others are told
    if odd:
        with pytest.raises(ValueError, match="1 NaN"):
            ShardedStaticInverseFisher(bad, 1e-3, block_size=2)
    else:
        with pytest.raises(RuntimeError, match="failed their local checks"):
            ShardedStaticInverseFisher(bad, 1e-3, block_size=2)
    with pytest.raises(ValueError, match="ranks disagree on block_size"):
        ShardedStaticInverseFisher(torch.randn(5, 4, dtype=F64), 1e-3, block_size=2 if odd else 4)
    # and the group is still in step afterwards
    ShardedSlidingInverseFisher(20, 4, 1e-3).check_consistency()


@scenario
def nonfinite_gradient_on_one_rank(ctx: Ctx) -> None:
    R, rank = ctx.world, ctx.rank
    d, m = 5 * R + 1, 3
    spec = ShardSpec.even(d, rank, R)
    gen = torch.Generator().manual_seed(5)
    stream = torch.randn(8, d, generator=gen, dtype=F64)
    op = ShardedSlidingInverseFisher(spec, m, 1e-3, dtype=F64)
    ref = mfac.SlidingInverseFisher(d, m, 1e-3, dtype=F64)
    for g in stream[:4]:
        op.update(spec.take(g))
        ref.update(g)
    before = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in op.state_dict().items()}
    for bad_value in (float("nan"), float("inf")):
        bad = spec.take(stream[4]).clone()
        if rank == R - 1:
            bad[-1] = bad_value
        with pytest.raises(ValueError, match="finite on every rank"):
            op.update_mul(bad)
        after = op.state_dict()
        assert all(
            torch.equal(v, after[k]) if torch.is_tensor(v) else v == after[k]
            for k, v in before.items()
        )
    for g in stream[4:]:
        assert _slice_err(op.update_mul(spec.take(g)), ref.update_mul(g), spec) < 1e-12
    op.check_consistency()


@scenario
def checkpoint_round_trip(ctx: Ctx) -> None:
    R, rank = ctx.world, ctx.rank
    d, m = 7 * R + 2, 4
    spec = ShardSpec.even(d, rank, R)
    gen = torch.Generator().manual_seed(6)
    stream = torch.randn(14, d, generator=gen)
    a = ShardedSlidingInverseFisher(spec, m, 1e-4)
    ref = mfac.SlidingInverseFisher(d, m, 1e-4)
    for g in stream[:7]:
        a.update(spec.take(g))
        ref.update(g)
    ckpt = ctx.tmp / "ckpt"
    path = save_sharded(a.state_dict(), ckpt)
    assert path.name == f"shard-{rank:05d}-of-{R:05d}.pt"
    b = ShardedSlidingInverseFisher(spec, m, 1e-4)
    b.load_state_dict(load_sharded(ckpt))
    for g in stream[7:10]:  # save -> load -> step equals the uninterrupted run, bit for bit
        assert torch.equal(a.update_mul(spec.take(g)), b.update_mul(spec.take(g)))
    # ranks loading different steps: refused everywhere, nothing changed
    stale = torch.load(ckpt / path.name, weights_only=True)
    c = ShardedSlidingInverseFisher(spec, m, 1e-4)
    with pytest.raises(ValueError, match="ranks disagree on num_seen"):
        c.load_state_dict(stale if rank == 0 else b.state_dict())
    assert c.num_seen == 0
    # a state saved under another layout: refused (each rank raises its own error or names it)
    other = ShardSpec.from_sizes([1] * (R - 1) + [d - R + 1], rank)
    e = ShardedSlidingInverseFisher(other, m, 1e-4)
    with pytest.raises((ValueError, RuntimeError), match=r"layout|failed"):
        e.load_state_dict(b.state_dict())
    # ... but resharding through a consolidated state works
    if rank == 0:
        states = [torch.load(p, weights_only=True) for p in sorted(ckpt.glob("shard-*.pt"))]
        full = consolidate_state_dicts(states)
        torch.save(full, ctx.tmp / "full.pt")
        single = mfac.SlidingInverseFisher(d, m, 1e-4)
        single.load_state_dict(full)
        x = torch.randn(d, generator=gen)
        assert float((single.mul(x) - ref.mul(x)).norm() / ref.mul(x).norm()) < 1e-5
    torch.distributed.barrier()
    full = torch.load(ctx.tmp / "full.pt", weights_only=True)
    e.load_state_dict(shard_state_dict(full, other))
    a2 = ShardedSlidingInverseFisher(spec, m, 1e-4)
    a2.load_state_dict(shard_state_dict(full, spec))
    for g in stream[7:]:  # the resharded window continues like the original one
        out_e, out_a = e.update_mul(other.take(g)), a2.update_mul(spec.take(g))
        full_e = torch.zeros(d).index_put_((torch.arange(other.start, other.stop),), out_e)
        full_a = torch.zeros(d).index_put_((torch.arange(spec.start, spec.stop),), out_a)
        torch.distributed.all_reduce(full_e)
        torch.distributed.all_reduce(full_a)
        assert float((full_e - full_a).norm() / full_a.norm()) < 1e-5
    # a checkpoint written by another number of ranks
    wrong = ctx.tmp / "wrong"
    if rank == 0:
        wrong.mkdir()
        torch.save({}, wrong / f"shard-00000-of-{R + 2:05d}.pt")
    torch.distributed.barrier()
    with pytest.raises(ValueError, match=rf"written by \[{R + 2}\] rank"):
        load_sharded(wrong)


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))


def _data(steps: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [
        (torch.randn(batch, 6, generator=gen), torch.randn(batch, 3, generator=gen))
        for _ in range(steps)
    ]


def _single_trajectory(data, lr, m, damp) -> list[torch.Tensor]:
    model = _mlp(0)
    params = list(model.parameters())
    window = mfac.SlidingInverseFisher(sum(p.numel() for p in params), m, damp)
    out = []
    for x, y in data:
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        step = window.update_mul(torch.cat([p.grad.reshape(-1) for p in params]))
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(
                torch.nn.utils.parameters_to_vector(params) - lr * step, params
            )
        out.append(torch.nn.utils.parameters_to_vector(params).detach().clone())
    return out


def _placement_trajectory(model, placement, data, rank, R, lr, m, damp, ddp, expected):
    """SGD along the M-FAC direction, the way ``mfac.optim`` drives a :class:`DistributedWindow`."""
    params = list(model.parameters())
    window = None
    worst = 0.0
    for t, (x, y) in enumerate(data):
        part = slice(rank * x.shape[0] // R, (rank + 1) * x.shape[0] // R)
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x[part]), y[part]).backward()
        if ddp:
            # DDP's contract (gradients all-reduced and averaged in backward), one all_reduce per
            # parameter: constructing DistributedDataParallel would import torch._dynamo (about 8
            # CPU-seconds per process), which this 2-core CI cannot afford.
            for p in params:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(R)
        flat = torch.cat([placement.local(p.grad).reshape(-1) for p in params])
        if window is None:
            window = placement.new_fisher(
                flat.numel(), m, damp, params=params, dtype=flat.dtype, device=flat.device
            )
        step = placement.update_mul(window, flat)  # with the finiteness vote (all_finite)
        offset = 0
        with torch.no_grad():
            for p in params:
                mine = placement.local(p)  # shares storage with the (D)Tensor parameter
                mine.add_(step[offset : offset + mine.numel()].view_as(mine), alpha=-lr)
                offset += mine.numel()
        assert offset == step.numel()
        if ddp:
            now = torch.nn.utils.parameters_to_vector(params).detach()
        else:
            now = torch.cat([p.full_tensor().reshape(-1) for p in params]).detach()  # test only
        worst = max(worst, float((now - expected[t]).norm() / expected[t].norm()))
    return window, worst


@scenario
def ddp_trajectory(ctx: Ctx) -> None:
    """DDP: every rank has the averaged gradient, keeps its slice, all-gathers the step (ZeRO-1)."""
    from mfac.distributed import DistributedWindow

    R = ctx.world
    lr, m, damp, steps = 0.1, 4, 1e-1, 20
    data = _data(steps, 6 * R)
    expected = _single_trajectory(data, lr, m, damp)
    placement = DistributedWindow()
    window, worst = _placement_trajectory(
        _mlp(0), placement, data, ctx.rank, R, lr, m, damp, True, expected
    )
    assert worst < 1e-6, worst
    assert placement.mode == "replicated" and window.global_dim == expected[0].numel()
    assert window.comm.allreduce_calls == steps and window.comm.allreduce_max_numel == m


@scenario
def fsdp_trajectory(ctx: Ctx) -> None:
    """FSDP2 (fully_shard): each rank keeps its local parameter shards; nothing d-sized moves."""
    from torch.distributed.fsdp import fully_shard

    from mfac.distributed import DistributedWindow

    R = ctx.world
    lr, m, damp, steps = 0.1, 4, 1e-1, 20
    data = _data(steps, 6 * R)
    expected = _single_trajectory(data, lr, m, damp)
    model = _mlp(0)
    fully_shard(model)  # 10 and 3 rows over R ranks: uneven shards, some of size 1
    placement = DistributedWindow()
    window, worst = _placement_trajectory(
        model, placement, data, ctx.rank, R, lr, m, damp, False, expected
    )
    assert worst < 1e-6, worst
    assert placement.mode == "sharded" and window.global_dim == expected[0].numel()
    assert window.comm.allreduce_calls == steps and window.comm.allreduce_max_numel == m
    assert placement.comm.other_bytes == 4 * steps  # the finiteness votes: one float32 per step


def _mfac_run(model, data, rank, R, *, ddp, opt_kwargs, steps_range, opt=None, precondition=False):
    """Train ``model`` with ``mfac.MFAC`` (or the preconditioner + SGD) on this rank's batch slices."""
    params = list(model.parameters())
    if opt is None:
        if precondition:
            opt = (mfac.MFACPreconditioner(params, ngrads=4, damp=1e-1, **opt_kwargs),
                   torch.optim.SGD(params, lr=0.05, momentum=0.9))
        else:
            opt = mfac.MFAC(params, lr=0.05, ngrads=4, damp=1e-1, momentum=0.9,
                            weight_decay=1e-3, **opt_kwargs)
    trajectory = []
    for t in steps_range:
        x, y = data[t]
        part = slice(rank * x.shape[0] // R, (rank + 1) * x.shape[0] // R)
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x[part]), y[part]).backward()
        if ddp:  # DDP's contract (see _placement_trajectory)
            for p in params:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(R)
        for o in opt if isinstance(opt, tuple) else (opt,):
            o.step()
        vec = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in params]
        trajectory.append(torch.cat([v.detach().reshape(-1) for v in vec]).clone())
    return opt, trajectory


def _worst(got, expected) -> float:
    return max(float((a - b).norm() / b.norm()) for a, b in zip(got, expected, strict=True))


@scenario
def optimizer_trajectories(ctx: Ctx) -> None:
    """mfac.MFAC (and MFACPreconditioner + SGD) with distributed=DistributedWindow(): DDP, FSDP2."""
    import copy

    from torch.distributed.fsdp import fully_shard

    from mfac.distributed import DistributedWindow

    R, rank, steps = ctx.world, ctx.rank, 20
    data = _data(steps, 6 * R)
    for precondition in (False, True):
        _, expected = _mfac_run(_mlp(0), data, 0, 1, ddp=False, opt_kwargs={},
                                steps_range=range(steps), precondition=precondition)
        # DDP (replicated parameters): the window is cut evenly, the step all-gathered
        model = _mlp(0)
        opt, got = _mfac_run(model, data, rank, R, ddp=True, steps_range=range(steps),
                             opt_kwargs={"distributed": DistributedWindow()},
                             precondition=precondition)
        assert _worst(got, expected) < 1e-6, ("ddp", precondition, _worst(got, expected))
        window = (opt[0] if precondition else opt).inverse_fisher
        assert window.global_dim == expected[0].numel() and window.dim < window.global_dim
        # FSDP2: DTensor parameters, each rank steps its local shards
        model = _mlp(0)
        fully_shard(model)
        opt, got = _mfac_run(model, data, rank, R, ddp=False, steps_range=range(steps),
                             opt_kwargs={"distributed": DistributedWindow()},
                             precondition=precondition)
        assert _worst(got, expected) < 1e-6, ("fsdp", precondition, _worst(got, expected))
    # checkpoint (DDP): save -> load -> continue equals the uninterrupted run, bit for bit
    model = _mlp(0)
    opt, _ = _mfac_run(model, data, rank, R, ddp=True, steps_range=range(10),
                       opt_kwargs={"distributed": DistributedWindow()})
    save_sharded(opt.state_dict(), ctx.tmp / "optim")
    twin = copy.deepcopy(model)
    twin_opt = mfac.MFAC(list(twin.parameters()), lr=0.05, ngrads=4, damp=1e-1, momentum=0.9,
                         weight_decay=1e-3, distributed=DistributedWindow())
    twin_opt.load_state_dict(load_sharded(ctx.tmp / "optim"))
    _, a = _mfac_run(model, data, rank, R, ddp=True, steps_range=range(10, steps), opt=opt,
                     opt_kwargs={})
    _, b = _mfac_run(twin, data, rank, R, ddp=True, steps_range=range(10, steps), opt=twin_opt,
                     opt_kwargs={})
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    # ranks that disagree on ngrads: refused on every rank at the first step (window creation)
    model = _mlp(0)
    bad = mfac.MFAC(model.parameters(), ngrads=4 + (rank == R - 1), damp=1e-2,
                    distributed=DistributedWindow())
    model(data[0][0]).sum().backward()
    with pytest.raises(ValueError, match="ranks disagree on ngrads"):
        bad.step()
    # a NaN gradient on one rank only (FSDP: each rank sees its shard): every rank skips together
    model = _mlp(0)
    fully_shard(model)
    opt = mfac.MFAC(model.parameters(), lr=0.05, ngrads=4, damp=1e-1,
                    distributed=DistributedWindow(), skip_nonfinite=True)
    for t in range(3):
        model.zero_grad()
        model(data[t][0]).sum().backward()
        if t == 1 and rank == R - 1:
            next(iter(model.parameters())).grad.to_local().view(-1)[0] = float("nan")
        opt.step()
    assert (opt.num_steps, opt.num_skipped) == (2, 1)
    opt.inverse_fisher.check_consistency()


def _worker(rank: int, world: int, tmp: Path) -> int:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{tmp / 'rendezvous'}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    ctx = Ctx(rank, world, tmp)
    status = 0
    with open(tmp / f"results{rank}.jsonl", "w") as out:
        for name, fn in SCENARIOS.items():
            began = time.perf_counter()
            try:
                fn(ctx)
                outcome = "ok"
            except BaseException:  # reported to the parent
                outcome = traceback.format_exc()
            seconds = round(time.perf_counter() - began, 2)
            out.write(json.dumps({"scenario": name, "outcome": outcome, "seconds": seconds}) + "\n")
            out.flush()
            # stop together: a scenario that failed on one rank may have left the others mid-way
            flag = torch.tensor([0.0 if outcome == "ok" else 1.0])
            torch.distributed.all_reduce(flag)
            if flag.item():
                status = 1
                break
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return status


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    code = _worker(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
    sys.stdout.flush()
    sys.stderr.flush()
    # skip the interpreter's teardown: C++ destructors of gloo/FSDP threads at exit sometimes abort
    # ("terminate called without an active exception") after everything was written and checked
    os._exit(code)


def test_sharded_windows_default_to_the_local_windows_slabs():
    """The sharded step runs the local step's code: its ``G g`` slabs default to the same width (a
    narrower default made every rank's pass 4x as many gemvs as the one-process window's)."""
    local = inspect.signature(mfac.SlidingInverseFisher).parameters["chunk"].default
    assert local == WINDOW_CHUNK
    assert inspect.signature(ShardedSlidingInverseFisher).parameters["chunk"].default == local
    assert inspect.signature(DistributedWindow.new_fisher).parameters["chunk"].default == local
