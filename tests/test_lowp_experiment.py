"""experiments/bench_lowp.py runs end to end (quick mode) and reports what it claims."""

from __future__ import annotations

import json

from experiments import bench_lowp


def test_quick_run_reports_accuracy_training_and_time(tmp_path, one_thread):
    res = bench_lowp.main(["--quick", "--out", str(tmp_path), "--threads", "1"])
    table = (tmp_path / "bench_lowp.md").read_text()
    for heading in ("## Accuracy of one step", "## Training", "## Step time and memory"):
        assert heading in table
    (acc,) = res["accuracy"]
    # the bfloat16 window is float32-exact for its rounded rows, and ~bf16 rounding away from exact
    assert acc["bf16_vs_rounded"] < 1e-5 < 1e-4 < acc["bf16_vs_exact"]
    assert acc["f32_vs_exact"] < 1e-5
    windows = {r["window"]: r for r in res["training"]}
    assert windows["bfloat16"]["window_bytes"] * 2 == windows["float32"]["window_bytes"]
    (row,) = res["time"]
    assert row["status"] == "ok" and row["bf16_bytes"] * 2 == row["f32_bytes"]
    saved = json.loads((tmp_path / "bench_lowp.json").read_text())
    assert len(saved["training"]) == len(res["training"]) == 2
