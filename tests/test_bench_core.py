"""The core benchmark: a smoke run of ``--quick`` and the correctness of the paper baselines."""

from __future__ import annotations

import json
import math

import pytest
import torch

from experiments import bench_core
from experiments._paper_reference import (
    PaperSlidingWindow,
    diag_rowloop,
    recursion_mul,
    static_recursion,
)
from mfac import DenseInverseFisher, StaticInverseFisher

F64 = torch.float64


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_core")
    results = bench_core.main(["--quick", "--silent", "--out", str(out)])
    return out, results


def test_quick_writes_json_and_markdown(quick_results):
    out, results = quick_results
    data = json.loads((out / "bench_core.json").read_text())
    text = (out / "bench_core.md").read_text()
    assert set(data) == {"meta", "targets", *bench_core.SECTIONS}
    assert data["meta"]["quick"] is True
    assert data["meta"]["threads"] == torch.get_num_threads()
    for title in ("Sliding window", "Static build", "Block-diagonal build", "`mul` and `diag`",
                  "Peak memory", "float32 accuracy", "Targets"):
        assert title in text
    assert results["meta"]["repeats"] >= 5


@pytest.mark.parametrize(
    ("section", "keys"),
    [
        ("sliding", ["ours_s", "floor_s", "ratio", "paper_s", "paper_floor_s", "paper_ratio",
                     "refactor_step_s", "refactor_amortized_ratio"]),
        ("static", ["ours_s", "gram_s", "trsm_left_s", "trsm_right_s", "floor_s", "ratio"]),
        ("recursion", ["recursion_s", "ours_s", "speedup"]),
        ("block", ["ours_s", "recursion_s", "speedup"]),
        ("apply", ["mul_s", "two_pass_s", "mul_ratio", "diag_s", "one_pass_s", "diag_ratio",
                   "paper_diag_s", "paper_diag_ratio"]),
        ("memory", ["peak_multiple", "peak_multiple_overwrite", "input_bytes"]),
    ],
)
def test_quick_rows_have_finite_numbers(quick_results, section, keys):
    out, _ = quick_results
    rows = json.loads((out / "bench_core.json").read_text())[section]
    measured = [r for r in rows if keys[0] in r]
    assert measured, f"no measured row in {section}: {rows}"
    for row in measured:
        for key in keys:
            assert _finite(row[key]), (section, key, row[key])
            assert row[key] > 0, (section, key, row[key])


def test_quick_accuracy_rows(quick_results):
    out, _ = quick_results
    rows = json.loads((out / "bench_core.json").read_text())["accuracy"]
    measured = [r for r in rows if r["status"] == "ok"]
    damps = {(r["damp"], r["gradients"]) for r in measured}
    assert {(d, "structured") for d in bench_core.ACCURACY_DAMPS} <= damps
    assert (bench_core.REPEATED_DAMP, "repeated") in damps
    for r in measured:
        assert _finite(r["ours"]) and _finite(r["truth_check"])
        assert r["ours"] < 1.0  # a real (float32) answer, not garbage
        # the paper's step may fail (NaN -> "inf" in JSON) for the repeated gradients: that is data
        assert _finite(r["paper"]) or r["paper"] == "inf"
    structured = [r for r in measured if r["gradients"] == "structured"]
    assert max(r["truth_check"] for r in structured) < 1e-6


def test_quick_targets_are_listed(quick_results):
    _, results = quick_results
    names = {t["name"] for t in results["targets"]}
    assert "sliding update_mul / floor" in names
    assert "static build / floor" in names
    for t in results["targets"]:
        assert _finite(t["worst"]) and isinstance(t["met"], bool)


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as err:
        bench_core.main(["--help"])
    assert err.value.code == 0
    assert "--quick" in capsys.readouterr().out


# ---------------------------------------------------------------------- the baselines are correct
def _grads(m: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=gen, dtype=F64)


@pytest.mark.parametrize(("m", "d", "damp"), [(1, 5, 0.1), (6, 11, 1e-2), (9, 7, 1e-3), (12, 30, 1.0)])
def test_static_recursion_matches_dense(m, d, damp):
    grads = _grads(m, d, seed=m + d)
    ref = DenseInverseFisher(grads, damp)
    vecs, den = static_recursion(grads, damp)
    x = _grads(3, d, seed=1)
    for row in x:
        torch.testing.assert_close(recursion_mul(vecs, den, damp, row), ref.mul(row),
                                   rtol=1e-10, atol=1e-10 / damp)
    # (c): the paper's row-loop diagonal
    torch.testing.assert_close(diag_rowloop(vecs, den, damp), ref.diag(), rtol=1e-10,
                               atol=1e-10 / damp)
    # the denominators are m + g_i^T F_{i-1}^{-1} g_i, i.e. >= m
    assert bool((den >= m).all())


def test_recursion_terms_are_the_cholesky_rows():
    # v_i v_i^T / den_i == q_i q_i^T / damp: the recursion is the static operator's Cholesky in disguise
    grads = _grads(5, 9, seed=3)
    damp = 0.05
    vecs, den = static_recursion(grads, damp)
    q = StaticInverseFisher(grads, damp, block_size=9)._q.reshape(5, 9)
    torch.testing.assert_close(vecs * vecs / den[:, None], q * q / damp, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("m", "d", "damp"), [(1, 6, 0.1), (4, 10, 1e-2), (7, 5, 0.3)])
def test_paper_sliding_window_matches_dense(m, d, damp):
    # from an empty (zero) window, through the wrap: the paper divides by m from the start
    buffer = torch.zeros(m, d, dtype=F64)
    paper = PaperSlidingWindow(buffer, damp)
    stream = _grads(2 * m + 3, d, seed=m * d)
    for k, g in enumerate(stream):
        out = paper.update_mul(g)
        expected = DenseInverseFisher(buffer.clone(), damp).mul(g)
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9 / damp)
        assert paper.next_row == (k + 1) % m
    assert paper.failed_steps == 0


def test_paper_sliding_window_shared_buffer_and_given_gram():
    m, d, damp = 5, 8, 0.02
    window = _grads(m, d, seed=7)
    paper = PaperSlidingWindow(window, damp, gram=window @ window.T, next_row=2, write_rows=False)
    g = _grads(1, d, seed=8)[0]
    window[2] = g  # the caller writes the row (shared buffer)
    torch.testing.assert_close(paper.update_mul(g), DenseInverseFisher(window, damp).mul(g),
                               rtol=1e-9, atol=1e-9 / damp)


def test_paper_sliding_window_reports_cholesky_failure():
    m, d, damp = 4, 3, 1e-8
    window = torch.ones(m, d, dtype=torch.float32)
    paper = PaperSlidingWindow(window, damp, gram=-torch.eye(m) * 1e3)  # not SPD: K fails
    out = paper.update_mul(torch.ones(d))
    # row 0 refreshed, the rest of K = m I - 1e3 I / damp stays indefinite
    assert paper.failed_steps == 1
    assert bool(torch.isnan(out).all())


def test_gradient_generator_is_correlated_and_normalised():
    gen = bench_core.GradientGenerator(4000, seed=0)
    grads = gen.rows(64, seed=1).to(F64)
    norms = grads.norm(dim=1)
    assert 0.8 < norms.mean().item() < 1.2
    unit = grads / norms[:, None]
    cos = unit @ unit.T
    off = cos[~torch.eye(64, dtype=torch.bool)]
    assert 0.15 < off.mean().item() < 0.6  # shared mean direction
    torch.testing.assert_close(gen.rows(3, seed=5), gen.rows(3, seed=5))  # reproducible
