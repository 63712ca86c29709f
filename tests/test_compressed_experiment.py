"""experiments/compressed_window.py runs end to end (quick mode) and reports what it claims."""

from __future__ import annotations

import json

import pytest

from experiments import bench_compressed, compressed_window


def test_quick_run_reports_every_optimizer_and_smaller_compressed_state(tmp_path, one_thread):
    results = compressed_window.main(["--quick", "--out", str(tmp_path), "--threads", "1"])
    table = (tmp_path / "results.md").read_text()
    for name in ("M-FAC dense", "M-FAC density 0.1", "M-FAC density 0.01", "M-FAC density 0.001",
                 "M-FAC density 0.01 (bfloat16, int16)", "Adam", "SGD", "Adam (foreach)"):
        assert f"| {name} |" in table, name
    assert "validation accuracy" in table and "**" in table  # the sweep's table, the picks in bold
    runs = {r["optimizer"]: r for r in results["runs"] if r["model"] == "MLP"}
    dense = runs["M-FAC dense"]
    # the window state shrinks with the density (rows + accumulator + m x m), momentum is the same
    sizes = [runs[f"M-FAC density {d:g}"]["window_bytes"] for d in (0.1, 0.01, 0.001)]
    assert dense["window_bytes"] > sizes[0] > sizes[1] >= sizes[2] > 0
    assert runs["M-FAC density 0.01 (bfloat16, int16)"]["window_bytes"] < sizes[1]
    # rows + accumulator: the d-sized part; the m x m matrices (the same in every window) are left out
    m = compressed_window.Config.quick().mfac_ngrads
    assert dense["rows_bytes"] == m * dense["params"] * 4 == dense["window_bytes"] - 2 * m * m * 8
    sparse = runs["M-FAC density 0.01"]
    assert sparse["rows_bytes"] == sparse["window_bytes"] - 2 * m * m * 8
    assert runs["Adam"]["rows_bytes"] == 0
    # every optimizer ran at its validated pick; the compact storage at its density's
    assert runs["M-FAC density 0.01 (bfloat16, int16)"]["hp"] == runs["M-FAC density 0.01"]["hp"]
    assert all(r["steps"] == dense["steps"] > 0 for r in runs.values())
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["runs"]) == len(results["runs"]) and saved["resnet"]
    # the run record replaces the former top-level "seconds" / "torch" keys
    assert "seconds" not in saved and "torch" not in saved
    assert saved["meta"]["quick"] is True and saved["meta"]["seconds"] > 0 and saved["meta"]["commit"]


# the step and storage sections stream one base gradient plus noise: nearly collinear rows, as intended
@pytest.mark.filterwarnings("ignore::mfac.numerics.NumericalWarning")
def test_bench_compressed_tiny_run_writes_tables_and_record(tmp_path, one_thread, capsys):
    bench_compressed.main(["--threads", "1", "--m", "8", "--d", "4000", "--repeats", "2",
                           "--largest-m", "8", "--largest-d", "20000", "--out", str(tmp_path)])
    text = (tmp_path / "bench_compressed.md").read_text()
    assert text == capsys.readouterr().out
    for heading in ("### Sparse products", "### update_mul at ResNet-20 size", "### Storage of a compressed",
                    "### Largest window here"):
        assert heading in text, heading
    # the float32-valued storages take the same step as the reference storage: no change at all
    assert "| float32 values, int16 offsets | " in text
    row = next(line for line in text.splitlines() if line.startswith("| float32 values, int16 offsets |"))
    assert row.rstrip(" |").endswith("0.0e+00")
    saved = json.loads((tmp_path / "bench_compressed.json").read_text())
    assert saved["markdown"] == text.rstrip("\n")
    assert saved["meta"]["m"] == 8 and saved["meta"]["threads"] == 1 and saved["meta"]["load_avg_after"]


def test_quick_diagnose_writes_its_rows_with_the_run_record(tmp_path, one_thread):
    results = compressed_window.main(["--quick", "--diagnose", "--out", str(tmp_path), "--threads", "1"])
    saved = json.loads((tmp_path / "diagnose.json").read_text())
    assert saved["diagnose"] and len(saved["diagnose"]) == len(results["diagnose"])
    assert saved["meta"]["commit"] and saved["meta"]["diagnose"] is True and saved["meta"]["quick"] is True
    assert (tmp_path / "diagnose.md").read_text().strip()
