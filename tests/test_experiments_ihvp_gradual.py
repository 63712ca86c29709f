"""Smoke tests of experiments/ihvp_exactness.py and experiments/gradual_pruning.py (``--quick``, in-process)."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from experiments import gradual_pruning, ihvp_exactness


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def ihvp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ihvp_exactness")
    res = ihvp_exactness.main(["--quick", "--no-progress", "--out", str(out)])
    return out, res


@pytest.fixture(scope="module")
def gradual(tmp_path_factory):
    out = tmp_path_factory.mktemp("gradual_pruning")
    res = gradual_pruning.main(["--quick", "--no-progress", "--out", str(out)])
    return out, res


def test_help(capsys):
    for module in (ihvp_exactness, gradual_pruning):
        with pytest.raises(SystemExit) as exc:
            module.main(["--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert "--quick" in text and "--out" in text


def test_ihvp_outputs(ihvp, capsys):
    out, _res = ihvp
    data = json.loads((out / "results.json").read_text())
    assert {"exactness", "cost", "slopes", "memory", "summary", "meta"} <= set(data)
    assert data["meta"]["quick"] is True
    for name in ("results.md", "exactness.png", "cost_scaling.png", "memory_scaling.png"):
        assert (out / name).stat().st_size > 500, name
    text = (out / "results.md").read_text()
    assert "## 1. Exactness" in text and "## 2. Time vs d and m" in text and "## 3. Memory" in text


def test_ihvp_exactness_rows(ihvp):
    _, res = ihvp
    rows = res["exactness"]
    assert {r["dtype"] for r in rows} == {"float64", "float32"}
    assert {r["source"] for r in rows} == {"synthetic", "digits-mlp"}
    for r in rows:
        for key, _ in ihvp_exactness.PRODUCTS:
            assert key in r
        # mfac's own products never fail, and are accurate in float64 where F is well conditioned
        for key in ("static_mul_rand", "static_mul_grad", "static_diag", "sliding_mul_rand",
                    "sliding_mul_grad", "update_mul"):
            assert _finite(r[key]), (key, r)
        if r["dtype"] == "float64" and r["cond"] < 1e4:
            assert r["update_mul"] < 1e-10 and r["static_mul_grad"] < 1e-10
        if r["dtype"] == "float32":
            assert r["update_mul"] < 1e-4  # the cancellation-free step, at every damp


def test_ihvp_cost_and_memory_rows(ihvp):
    _, res = ihvp
    for section, keys in (("build", ("ours_s", "gram_s", "trsm_s", "floor_s", "ratio")),
                          ("step", ("ours_s", "floor_s", "ratio", "paper_s", "paper_ratio"))):
        rows = res["cost"][section]
        assert {r["sweep"] for r in rows} == {"d", "m"}
        for r in rows:
            for key in keys:
                assert _finite(r[key]) and r[key] > 0, (section, key, r)
            assert len(r["times"]["ours"]) >= 5
    for r in res["memory"]:
        for key in ("static_peak_multiple", "recursion_peak_multiple", "sliding_peak_multiple"):
            assert _finite(r[key])


def test_gradual_outputs(gradual):
    out, _res = gradual
    data = json.loads((out / "results.json").read_text())
    assert {"models", "runs", "summary", "config", "meta"} <= set(data)
    assert (out / "results.md").stat().st_size > 200
    assert (out / "accuracy_vs_step.png").stat().st_size > 1000
    assert {r["method"] for r in data["runs"]} == {"magnitude", "mfac"}


def test_gradual_reaches_target_sparsity(gradual):
    _, res = gradual
    for r in res["runs"]:
        # the mask sparsity is the target (to one weight) and the weights really are zero there
        assert abs(r["sparsity"] - r["target"]) <= 1.0 / r["prunable"] + 1e-12
        assert r["weight_sparsity"] >= r["sparsity"] - 1e-12
        for key in ("final_acc", "acc_after_last_prune", "mean_prune_drop", "max_prune_drop", "seconds"):
            assert _finite(r[key]), key
        assert 0.0 <= r["final_acc"] <= 1.0
        assert [h["step"] for h in r["history"]] == sorted(h["step"] for h in r["history"])
    for row in res["summary"]:
        assert _finite(row["final_acc_mean"]) and _finite(row["final_acc_std"])


def test_gradual_on_a_torchvision_dataset(tmp_path, fake_torchvision):
    """``--dataset torchvision:NAME`` (3x32x32 images here, a local stand-in) reaches its target too."""
    from experiments import gradual_pruning

    res = gradual_pruning.main([
        "--quick", "--no-progress", "--out", str(tmp_path / "out"), "--data-root", str(tmp_path),
        "--dataset", "torchvision:FakeCIFAR", "--models", "mlp", "--methods", "mfac",
    ])
    runs = [r for r in res["runs"] if r["method"] == "mfac"]
    assert runs and all(abs(r["sparsity"] - r["target"]) < 0.01 for r in runs), runs
    assert res["models"]["mlp"]["params"] > 100_000  # 3 x 32 x 32 inputs: a wider first layer


def test_pruning_oneshot_offers_the_dataset_and_resnet20():
    import subprocess
    import sys

    from experiments import pruning_oneshot

    script = pruning_oneshot.__file__
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, check=True)
    assert "--dataset" in out.stdout and "resnet20" in out.stdout
    model = pruning_oneshot.build("resnet20", (3, 32, 32))
    assert sum(p.numel() for p in model.parameters()) > 200_000
