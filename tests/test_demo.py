"""The README's main job, ``python -m experiments.demo``, at --quick sizes: runs, writes its files, and
its numbers say what the README says they say."""

from __future__ import annotations

import json
import math
import warnings

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
    assert results["speed"][0]["float64_redos"] == 0  # the timed steps are training steps

    assert [r["optimizer"].split()[0] for r in results["training"]] == ["MFAC", "Adam"]
    for row in results["training"]:
        assert math.isfinite(row["train_loss"]) and 0.0 <= row["test_acc"] <= 1.0
    pruning = results["pruning"]
    assert [r["sparsity"] for r in pruning] == [0.5, 0.9]
    hardest = pruning[-1]
    assert hardest["mfac_obs_acc"] > hardest["magnitude_acc"], hardest  # OBS beats magnitude at 90 %


def test_demo_speed_rows_time_training_steps_not_the_float64_redo():
    """The speed table's sliding step is a training step: fresh gradients, so no float64 redo of G^T c.

    Its detector must see the redo when it happens: the same gradient stepped over and over (what the
    table once timed) fills the window with copies whose float32 combination cancels.
    """
    import torch

    import mfac
    from experiments._measure import count_log_records

    rows = {row["what"].split(" (")[0]: row for row in demo.speed_table(16, 4096, repeats=3, warmup=1)}
    assert rows["sliding update_mul"]["float64_redos"] == 0
    assert set(rows) == {"sliding update_mul", "paper's sliding step", "static build"}
    for row in rows.values():
        assert row["time_ms"] > 0 and row["floor_ms"] > 0

    gen = torch.Generator().manual_seed(0)
    window = mfac.SlidingInverseFisher(4096, 16, 1e-5)
    same = torch.randn(4096, generator=gen)
    with count_log_records(demo.FALLBACK_LOGGER, demo.FALLBACK_MESSAGE) as redos, warnings.catch_warnings():
        warnings.simplefilter("ignore", mfac.NumericalWarning)  # copies of one row: a singular Gram
        step = demo.sliding_steps(window, same.expand(40, -1))
        for _ in range(40):
            step()
    assert redos.count > 0
