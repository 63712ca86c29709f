"""experiments/bench_step.py runs end to end (quick mode): the side-by-side table and its run record."""

from __future__ import annotations

import json

import pytest

from experiments import bench_step

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_run_reports_ratios_errors_and_the_run_record(tmp_path):
    res = bench_step.main(["--quick", "--out", str(tmp_path), "--threads", "1"])
    rows = res["side_by_side"]
    assert [r["m"] for r in rows] == [8, 32] and all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert r["mfac_ratio"] > 0 and r["floor_s"] > 0
        assert r["mfac_err"] < 1e-5  # float32 step against the float64 truth, max-norm
        assert 40 <= r["mfac_ops"] <= 100  # one steady-state step's dispatched operations
    meta = json.loads((tmp_path / "bench_step.json").read_text())["meta"]
    assert meta["damp"] == 1e-5 and meta["repeats"] == 3 and meta["quick"] is True
    assert meta["commit"] and len(meta["load_avg_before"]) == 3
    table = (tmp_path / "bench_step.md").read_text()
    assert f"mfac at {meta['commit']}" in table and "load average (1 min)" in table
    assert f"{rows[0]['mfac_ops']} at m = 8" in table
