"""Smoke test of experiments/optimizer_comparison.py: --quick runs in-process and writes its outputs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("sklearn")


def test_quick_run_writes_tables_json_and_plots(tmp_path, capsys):

    from experiments import optimizer_comparison

    threads = torch.get_num_threads()
    results = optimizer_comparison.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # no lasting global side effect

    for name in ("results.json", "results.md", "training.png", "step_time.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {r["optimizer"] for r in saved["sweep"]} == {"MFAC", "SGD", "Adam"}
    assert {r["model"] for r in saved["sweep"]} == {"MLP", "CNN"}
    assert [r["ngrads"] for r in saved["step_time"]] == [None, 4, 8]
    assert all(r["ms_per_step"] > 0 for r in results["step_time"])
    table = (tmp_path / "results.md").read_text()
    assert "| MLP | MFAC |" in table and "| Adam (foreach) |" in table
    assert table in capsys.readouterr().out


def test_help():
    from experiments import optimizer_comparison

    with pytest.raises(SystemExit) as exit_info:
        optimizer_comparison.main(["--help"])
    assert exit_info.value.code == 0


# 40 fake images recycled: nearly repeated gradients, for which update_mul rightly warns
@pytest.mark.filterwarnings("ignore:update_mul:mfac.NumericalWarning")
def test_torchvision_path_and_resnet20(tmp_path, fake_torchvision):
    """The user path with internet: a torchvision dataset by name and ResNet-20, here on a local fake."""
    from experiments import optimizer_comparison
    from experiments._data import load_split

    split = load_split("torchvision:FakeCIFAR", root=str(tmp_path))
    assert split.x_train.shape == (40, 3, 32, 32) and split.x_test.shape == (12, 3, 32, 32)
    assert abs(split.x_train.mean().item()) < 1e-5 and abs(split.x_train.std().item() - 1) < 1e-5
    with pytest.raises(ValueError, match=r"torchvision\.datasets has no 'Nope'"):
        load_split("torchvision:Nope")
    with pytest.raises(ValueError, match="dataset must be 'digits' or 'torchvision:NAME'"):
        load_split("cifar")

    results = optimizer_comparison.main([
        "--quick", "--no-progress", "--out", str(tmp_path / "out"), "--dataset", "torchvision:FakeCIFAR",
        "--data-root", str(tmp_path), "--models", "ResNet20", "MLP",
    ])
    assert {r["model"] for r in results["sweep"]} == {"ResNet20", "MLP"}
    assert results["train_size"] == 40 and results["test_size"] == 12
    assert all(math.isfinite(r["final_train_loss"]) for r in results["runs"])
