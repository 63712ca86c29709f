"""The README's main job, ``python -m experiments.demo``, at --quick sizes: runs, writes its files, and
its numbers say what the README says they say."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from experiments import demo


def test_demo_quick(tmp_path):
    results = demo.main(["--quick", "--out", str(tmp_path)])
    for name in ("demo.md", "demo.json", "train.png", "prune.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "demo.json").read_text()).keys() == results.keys()

    exact = {row["operator"]: row for row in results["exactness"]}
    for name, row in exact.items():
        limit = 1e-4 if row["dtype"] != "float64" else 1e-9
        assert row["mul"] <= limit, (name, row)
        assert math.isnan(row["diag"]) or row["diag"] <= limit, (name, row)

    for row in results["speed"]:
        assert row["time_ms"] > 0 and row["floor_ms"] > 0 and row["ratio"] > 0

    assert [r["optimizer"].split()[0] for r in results["training"]] == ["MFAC", "Adam"]
    for row in results["training"]:
        assert math.isfinite(row["train_loss"]) and 0.0 <= row["test_acc"] <= 1.0
    pruning = results["pruning"]
    assert [r["sparsity"] for r in pruning] == [0.5, 0.9]
    hardest = pruning[-1]
    assert hardest["mfac_obs_acc"] > hardest["magnitude_acc"], hardest  # OBS beats magnitude at 90 %
