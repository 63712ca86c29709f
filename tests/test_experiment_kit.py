"""The experiments' benchmark kit: timing order and arithmetic (fake clock), floors, relative errors,
accuracy helpers (mode restored), mean/std and the run record."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn

from experiments._measure import (
    measured,
    static_build_floor,
    static_floor_seconds,
    stopwatch,
    time_interleaved,
    two_pass_floor,
)
from experiments._metrics import accuracy, eval_mode, evaluate, mean_std, rel_err, rel_err_max
from experiments._provenance import RunRecord, commit_label, git_state

F64 = torch.float64


# ------------------------------------------------------------------------------------------ timing
class FakeClock:
    """A clock that only the timed functions (and setups) advance, by known amounts."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_time_interleaved_rotates_the_order_and_times_only_the_function():
    clock, calls = FakeClock(), []
    cost = {"a": 1.0, "b": 10.0, "c": 100.0}

    def fn(name):
        def run():
            calls.append(name)
            clock.now += cost[name]
        return run

    def setup(name):
        def run():
            calls.append(f"setup {name}")
            clock.now += 1000.0  # untimed: must not show in the times
        return run

    t = time_interleaved({k: fn(k) for k in cost}, repeats=4, warmup=1, clock=clock,
                         setup={"b": setup("b")})
    warm = ["a", "setup b", "b", "c"]
    rounds = [["a", "setup b", "b", "c"], ["setup b", "b", "c", "a"], ["c", "a", "setup b", "b"],
              ["a", "setup b", "b", "c"]]
    assert calls == warm + [c for r in rounds for c in r]
    for name, seconds in cost.items():
        assert t[name]["times"] == [seconds] * 4
        assert t[name]["median"] == t[name]["min"] == seconds


def test_time_interleaved_warmup_fns_replace_the_functions_only_while_warming_up():
    calls = []
    t = time_interleaved({"x": lambda: calls.append("real")}, 2, 2,
                         warmup_fns={"x": lambda: calls.append("small")})
    assert calls == ["small", "small", "real", "real"]
    assert len(t["x"]["times"]) == 2


def test_time_interleaved_median_and_min_of_uneven_times():
    clock = FakeClock()
    costs = iter([3.0, 1.0, 2.0, 5.0, 4.0])

    def run():
        clock.now += next(costs)

    t = time_interleaved({"x": run}, 5, 0, clock=clock)
    assert {k: t["x"][k] for k in ("median", "min", "times")} == {
        "median": 3.0, "min": 1.0, "times": [3.0, 1.0, 2.0, 5.0, 4.0]
    }
    # the CPU time is the process's own (not the fake clock's): one non-negative entry per call
    assert len(t["x"]["cpu_times"]) == 5 and min(t["x"]["cpu_times"]) >= 0.0
    assert t["x"]["cpu_median"] == sorted(t["x"]["cpu_times"])[2]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"repeats": 0, "warmup": 0}, "repeats must be >= 1"),
    ({"repeats": 1, "warmup": -1}, "warmup >= 0"),
    ({"repeats": 1, "warmup": 0, "setup": {"y": lambda: None}}, r"\['y'\]"),
])
def test_time_interleaved_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        time_interleaved({"x": lambda: None}, **kwargs)


def test_stopwatch_stops_at_the_end_of_the_block_and_runs_otherwise():
    clock = FakeClock()
    with stopwatch(clock) as watch:
        clock.now += 2.5
    clock.now += 7.0
    assert watch.seconds == 2.5
    running = stopwatch(clock)
    clock.now += 1.0
    assert running.seconds == 1.0
    clock.now += 1.0
    assert running.stop() == 2.0 and running.seconds == 2.0


def test_measured_returns_the_result_and_a_nonnegative_peak():
    out, seconds, peak = measured(lambda: torch.ones(1000, 1000).sum())
    assert float(out) == 1e6 and seconds >= 0.0 and peak >= 0


# ------------------------------------------------------------------------------------------ floors
def test_two_pass_floor_reads_the_window_itself(monkeypatch):
    window = torch.randn(6, 50)
    seen = []
    real_mv = torch.mv
    monkeypatch.setattr(torch, "mv", lambda a, b: seen.append((a, b)) or real_mv(a, b))
    state = torch.random.get_rng_state()
    floor = two_pass_floor(window)
    assert torch.equal(torch.random.get_rng_state(), state)  # private generator: global RNG untouched
    floor()
    (a1, g), (a2, c) = seen
    assert a1.data_ptr() == window.data_ptr() and a1.shape == (6, 50) and g.shape == (50,)
    assert a2.data_ptr() == window.data_ptr() and a2.shape == (50, 6) and c.shape == (6,)
    given = torch.randn(50)
    seen.clear()
    two_pass_floor(window, given)()
    assert seen[0][1] is given
    seen.clear()
    two_pass_floor(window, given, between=lambda: seen.append("between"))()
    assert [x if x == "between" else x[0].shape for x in seen] == [(6, 50), "between", (50, 6)]


def test_static_build_floor_parts_are_the_gram_and_one_triangular_solve_in_two_layouts():
    grads = torch.randn(5, 40, dtype=F64)
    parts = static_build_floor(grads)
    assert set(parts) == {"gram", "trsm_left", "trsm_right"}
    torch.testing.assert_close(parts["gram"](), grads @ grads.T)
    left, right = parts["trsm_left"](), parts["trsm_right"]()  # L^{-1} G and G^T L^{-T}
    torch.testing.assert_close(right, left.T)
    factor = torch.linalg.cholesky(grads @ grads.T + 5 * torch.eye(5, dtype=F64))
    torch.testing.assert_close(factor @ left, grads)
    times = {"gram": {"median": 1.0}, "trsm_left": {"median": 0.5}, "trsm_right": {"median": 0.25}}
    assert static_floor_seconds(times) == 1.25


# ------------------------------------------------------------------------------------------ errors
def test_relative_errors_on_a_known_case():
    expected = torch.tensor([3.0, 4.0], dtype=F64)  # |e|_2 = 5, |e|_inf = 4
    actual = torch.tensor([3.0, 5.0], dtype=torch.float32)  # a - e = (0, 1)
    assert rel_err(actual, expected) == pytest.approx(1 / 5, rel=1e-15)
    assert rel_err_max(actual, expected) == pytest.approx(1 / 4, rel=1e-15)
    vec = torch.tensor([1.0, -2.0, 2.0], dtype=F64)  # the 2-norm over all entries, not the largest
    assert rel_err(2 * vec, vec) == pytest.approx(1.0)
    assert rel_err(vec + torch.tensor([0.0, 0.0, 3.0], dtype=F64), vec) == pytest.approx(1.0)
    assert rel_err_max(vec + torch.tensor([0.0, 0.0, 3.0], dtype=F64), vec) == pytest.approx(1.5)


def test_relative_errors_compare_in_float64():
    expected = torch.tensor([1.0, 1.0], dtype=F64)
    actual = torch.tensor([1.0 + 2**-40, 1.0], dtype=F64)  # a float32 comparison would say 0
    assert rel_err(actual, expected) == pytest.approx(2**-40 / math.sqrt(2), rel=1e-9)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_relative_errors_of_a_failed_product_are_infinite(bad):
    actual = torch.tensor([1.0, bad])
    assert rel_err(actual, torch.ones(2)) == math.inf == rel_err_max(actual, torch.ones(2))


def test_relative_errors_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match=r"shapes differ: actual \(3,\), expected \(1, 3\)"):
        rel_err(torch.ones(3), torch.ones(1, 3))


# ------------------------------------------------------------------------------------------ accuracy
class ModeProbe(nn.Module):
    """Identity on logits that records the training flag it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x):
        self.seen.append(self.training)
        return x


def _logits_and_labels():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0], [5.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0, 0])  # 3 of 5 right
    return logits, labels


@pytest.mark.parametrize("batch_size", [None, 2])
def test_accuracy_evaluates_in_eval_mode_and_restores_every_modules_mode(batch_size):
    probe, frozen = ModeProbe(), nn.Dropout(0.5)
    model = nn.Sequential(probe, frozen).train()
    frozen.eval()  # a submodule kept in eval mode during training (e.g. a frozen BatchNorm)
    logits, labels = _logits_and_labels()
    assert accuracy(model, logits, labels, batch_size=batch_size) == 3 / 5
    assert probe.seen and not any(probe.seen)
    assert model.training and probe.training and not frozen.training
    model.eval()
    accuracy(model, logits, labels)
    assert not model.training


def test_eval_mode_restores_the_modes_when_the_block_raises():
    model = nn.Sequential(nn.Linear(2, 2)).train()
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not model.training
        raise RuntimeError("boom")
    assert model.training and model[0].training


def test_evaluate_gives_the_mean_loss_and_accuracy_batched_or_not():
    probe = ModeProbe()
    model = nn.Sequential(probe).train()
    logits, labels = _logits_and_labels()
    whole = evaluate(model, logits, labels)
    batched = evaluate(model, logits, labels, batch_size=2)
    assert whole == (float(nn.functional.cross_entropy(logits, labels)), 3 / 5)
    assert batched[0] == pytest.approx(whole[0], rel=1e-6) and batched[1] == whole[1]
    assert model.training and not any(probe.seen)


def test_accuracy_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="got 3 and 2"):
        accuracy(nn.Identity(), torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))


# ------------------------------------------------------------------------------------------ mean/std
def test_mean_std_matches_the_sample_and_population_definitions():
    values = [1.0, 2.0, 4.0, 7.0]
    mean, std = mean_std(values)
    assert mean == 3.5 and std == pytest.approx(statistics.stdev(values), rel=1e-15)
    mean0, std0 = mean_std(values, ddof=0)
    assert mean0 == 3.5 and std0 == pytest.approx(statistics.pstdev(values), rel=1e-15)
    assert mean_std([2.5]) == (2.5, 0.0)  # one seed: no spread
    with pytest.raises(ValueError, match="at least one value"):
        mean_std([])
    with pytest.raises(ValueError, match="ddof must be >= 0, got -1"):
        mean_std(values, ddof=-1)


# ------------------------------------------------------------------------------------------ run record
def test_run_record_has_the_environment_the_code_version_and_the_settings():
    record = RunRecord(["--quick", "--out", "x"])
    meta = record.finish(quick=True, repeats=5)
    for key in ("date", "argv", "commit", "dirty", "python", "torch", "threads", "cpu", "cpu_count",
                "machine", "platform", "load_avg_before", "load_avg_after", "seconds"):
        assert key in meta, key
    assert meta["argv"] == ["--quick", "--out", "x"]
    assert meta["torch"] == torch.__version__ and meta["threads"] == torch.get_num_threads()
    assert meta["quick"] is True and meta["repeats"] == 5 and meta["seconds"] >= 0.0
    assert meta["date"].endswith("+00:00")
    with pytest.raises(ValueError, match=r"\['threads'\]"):
        record.finish(threads=1)


def test_commit_label_says_when_the_checkout_was_dirty():
    assert commit_label({"commit": "abc1234", "dirty": []}) == "abc1234"
    assert commit_label({"commit": "abc1234", "dirty": ["experiments", "mfac"]}) == (
        "abc1234 +dirty (experiments, mfac)"
    )
    commit, dirty = git_state()
    assert commit == "unknown" or all(c in "0123456789abcdef" for c in commit)
    assert dirty == sorted(dirty)
