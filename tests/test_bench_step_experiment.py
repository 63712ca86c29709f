"""experiments/bench_step.py runs end to end (quick mode): the side-by-side table and its run record."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from experiments import bench_step
from experiments._measure import OpCount, two_pass_floor
from experiments.bench_core import _load_steady_state
from mfac import SlidingInverseFisher
from mfac.numerics import accumulated_matmul

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_run_reports_ratios_errors_and_the_run_record(tmp_path):
    res = bench_step.main(["--quick", "--out", str(tmp_path), "--threads", "1"])
    rows = res["side_by_side"]
    assert [r["m"] for r in rows] == [8, 32] and all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert r["mfac_ratio"] > 0 and r["floor_s"] > 0
        assert r["mfac_err"] < 1e-5  # float32 step against the float64 truth, max-norm
        assert 40 <= r["mfac_ops"] <= 100  # one steady-state step's dispatched operations
        assert r["bound_ratio_cpu"] > 0 and r["mfac_over_bound_cpu"] > 0 and "op_us" in r
    meta = json.loads((tmp_path / "bench_step.json").read_text())["meta"]
    assert meta["damp"] == 1e-5 and meta["repeats"] == 3 and meta["quick"] is True
    assert meta["commit"] and len(meta["load_avg_before"]) == 3
    table = (tmp_path / "bench_step.md").read_text()
    assert f"mfac at {meta['commit']}" in table and "load average (1 min)" in table
    assert f"{rows[0]['mfac_ops']} at m = 8" in table and f"{rows[0]['op_us']:.1f} us at m = 8" in table



def test_the_bound_is_the_two_passes_around_one_steady_state_step_of_the_same_m():
    """floor + stage pays one whole steady-state step's dispatched operations, nothing skipped."""
    m, d = 16, 3000
    args = argparse.Namespace(seed=0, damp=1e-5)
    window, g, c = torch.randn(m, d), torch.randn(d), torch.randn(m)
    bound, twin_floor = bench_step._floor_with_stage(window, g, c, m, 4, args)
    with OpCount() as passes:
        two_pass_floor(window, g, c)()
    twin = SlidingInverseFisher(bench_step._twin_dim(m), m, 1e-5)
    rows = twin.state_dict()["grads"]
    rows.copy_(torch.randn(rows.shape))
    _load_steady_state(twin, accumulated_matmul(rows, rows.T))
    bound()
    twin.update_mul(torch.randn(twin.dim))  # both past their first steady-state step (buffers made)
    with OpCount() as bounded:
        bound()
    with OpCount() as step:
        twin.update_mul(torch.randn(twin.dim))
    assert passes.count >= 2 and bounded.count == step.count + passes.count
    with OpCount() as twin_passes:
        twin_floor()
    assert twin_passes.count == passes.count  # the twin's two passes, subtracted from the bound


def test_the_op_probe_is_the_two_passes_around_its_small_operations():
    window, g, c = torch.randn(8, 300), torch.randn(300), torch.randn(8)
    with OpCount() as passes:
        two_pass_floor(window, g, c)()
    probe_fn = bench_step._floor_with_ops(window, g, c)
    with OpCount() as probe:
        probe_fn()
    assert probe.count == passes.count + bench_step.PROBE_OPS
