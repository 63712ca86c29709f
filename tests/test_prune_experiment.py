"""The one-shot pruning experiment script runs end to end in its --quick mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "pruning_oneshot.py"


def test_help():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True)
    assert "--quick" in out.stdout and "--out" in out.stdout


def test_quick_run(tmp_path):
    pytest.importorskip("sklearn")
    subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=300,
    )
    results = json.loads((tmp_path / "results.json").read_text())
    methods = {r["method"] for r in results["runs"]}
    assert "magnitude" in methods
    assert any(m.startswith("M-FAC full") and m.endswith("+recompute") for m in methods)
    assert results["timing"] and results["timing"][0]["total_s"] >= 0
    table = (tmp_path / "results.md").read_text()
    assert "| magnitude |" in table
    assert (tmp_path / "accuracy_vs_sparsity.png").stat().st_size > 1000
