"""Mask selection (global, per layer, N:M), schedules, and the torch.nn.utils.prune scorer
bridge."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from mfac.prune import (
    CubicSchedule,
    StepSchedule,
    check_nm,
    mask_sparsity,
    parse_pattern,
    recompute_steps,
    select_global,
    select_nm,
    select_per_layer,
    torch_importance_scores,
    torch_prune_parameters,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _scores(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "a": torch.rand(6, 8, generator=gen),
        "b": torch.rand(4, 2, 2, 4, generator=gen),  # conv-like: rows of 16
        "c": torch.rand(3, 8, generator=gen),
    }


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.73, 0.95, 1.0])
def test_global_exact_count_and_lowest_scores(sparsity):
    scores = _scores()
    masks = select_global(scores, sparsity)
    total = sum(s.numel() for s in scores.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned == round(sparsity * total)
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    kept = torch.cat([m.reshape(-1) for m in masks.values()])
    if 0 < pruned < total:
        assert flat[~kept].max() < flat[kept].min()


def test_global_respects_earlier_masks():
    scores = _scores()
    keep = {"a": torch.rand(6, 8, generator=torch.Generator().manual_seed(1)) > 0.3}
    masks = select_global(scores, 0.6, keep=keep)
    assert not bool((masks["a"] & ~keep["a"]).any())  # nothing un-pruned
    total = sum(s.numel() for s in scores.values())
    assert mask_sparsity(masks) == pytest.approx(round(0.6 * total) / total)
    # a target below the current sparsity keeps the earlier masks
    masks = select_global(scores, 0.0, keep=keep)
    assert torch.equal(masks["a"], keep["a"])


def test_per_layer_counts():
    scores = _scores()
    masks = select_per_layer(scores, 0.5)
    for n, s in scores.items():
        assert int((~masks[n]).sum()) == round(0.5 * s.numel())
    masks = select_per_layer(scores, {"a": 0.25, "b": 0.5, "c": 0.75})
    assert [int((~masks[n]).sum()) for n in "abc"] == [12, 32, 18]
    with pytest.raises(ValueError, match="cover exactly"):
        select_per_layer(scores, {"a": 0.5})


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_valid_on_every_group(pattern):
    n, m = parse_pattern(pattern)
    scores = _scores()
    masks = select_nm(scores, n, m)
    for name, mask in masks.items():
        groups = mask.reshape(-1, m)
        assert bool((groups.sum(dim=1) == n).all()), name
        assert check_nm(mask, n, m)
        # the kept ones are the highest scores of each group
        sg = scores[name].reshape(-1, m)
        assert bool(
            (
                sg.masked_fill(~groups, float("inf")).min(1).values
                >= sg.masked_fill(groups, float("-inf")).max(1).values
            ).all()
        )
    assert mask_sparsity(masks) == pytest.approx(1 - n / m)


def test_nm_groups_never_straddle_rows_and_errors():
    with pytest.raises(ValueError, match="divisible by 4"):
        select_nm({"w": torch.rand(3, 6)}, 2, 4)
    for bad in ["2-4", "4:2", "0:4", "a:b", (2,)]:
        with pytest.raises((ValueError, TypeError)):
            parse_pattern(bad)


def test_nm_with_earlier_masks_keeps_them_pruned():
    s = {"w": torch.rand(4, 8, generator=torch.Generator().manual_seed(2))}
    keep = {"w": select_nm(s, 3, 4)["w"]}
    masks = select_nm(s, 2, 4, keep=keep)
    assert not bool((masks["w"] & ~keep["w"]).any())
    assert check_nm(masks["w"], 2, 4)


def test_global_unstructured_with_our_scores_selects_the_same_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Conv1d(3, 4, 3), nn.Linear(12, 5))
    names = ["0.weight", "2.weight", "3.weight"]
    gen = torch.Generator().manual_seed(5)
    params = dict(model.named_parameters())
    scores = {n: torch.rand(params[n].shape, generator=gen) for n in names}
    ours = select_global(scores, 0.7)
    torch_prune.global_unstructured(
        torch_prune_parameters(model, scores),
        pruning_method=torch_prune.L1Unstructured,
        importance_scores=torch_importance_scores(model, scores),
        amount=0.7,
    )
    for n in names:
        module = model.get_submodule(n.rpartition(".")[0])
        assert torch.equal(module.weight_mask.bool(), ours[n]), n


def test_cubic_schedule():
    sched = CubicSchedule(0.9, begin_step=100, end_step=1100, frequency=100, initial_sparsity=0.1)
    assert sched.sparsity(0) == 0.1 and sched.sparsity(100) == pytest.approx(0.1)
    assert sched.sparsity(1100) == pytest.approx(0.9) and sched.sparsity(5000) == pytest.approx(0.9)
    assert sched.pruning_steps == list(range(100, 1101, 100))
    values = [sched.sparsity(t) for t in sched.pruning_steps]
    assert values == sorted(values)
    diffs = [b - a for a, b in itertools.pairwise(values)]
    assert diffs == sorted(diffs, reverse=True)  # fast early, slow late
    # Zhu & Gupta formula at the middle
    assert sched.sparsity(600) == pytest.approx(0.9 + (0.1 - 0.9) * 0.5**3)
    assert sched.sparsity(650) == sched.sparsity(600)  # target in force between events
    assert sched.is_pruning_step(300) and not sched.is_pruning_step(350)
    assert sched(1100) == sched.final_sparsity
    with pytest.raises(ValueError, match="multiple of frequency"):
        CubicSchedule(0.9, 0, 150, frequency=100)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        CubicSchedule(1.5, 0, 100)


def test_step_schedule():
    sched = StepSchedule([(10, 0.5), (20, 0.7), (40, 0.9)])
    assert [sched.sparsity(t) for t in (0, 10, 15, 20, 39, 40, 99)] == [
        0,
        0.5,
        0.5,
        0.7,
        0.7,
        0.9,
        0.9,
    ]
    assert sched.is_pruning_step(20) and not sched.is_pruning_step(21)
    assert sched.pruning_steps == [10, 20, 40]
    with pytest.raises(ValueError, match="increase"):
        StepSchedule([(10, 0.5), (5, 0.7)])
    with pytest.raises(ValueError, match="not decrease"):
        StepSchedule([(10, 0.5), (20, 0.3)])


def test_recompute_steps_geometric_density():
    steps = recompute_steps(0.0, 0.9, 4)
    assert steps[-1] == 0.9 and len(steps) == 4
    densities = [1.0] + [1 - s for s in steps]
    ratios = [b / a for a, b in itertools.pairwise(densities)]
    assert ratios == pytest.approx([0.1**0.25] * 4)
    assert recompute_steps(0.5, 0.5, 2) == [0.5, 0.5]
    with pytest.raises(ValueError):
        recompute_steps(0.0, 0.9, 0)


# ---------------------------------------------------------------------------------------- N:M group axes
def _nm_reference(score: torch.Tensor, n: int, m: int, axis: int) -> torch.Tensor:
    """Brute force: loop over every line along ``axis`` and every group of ``m`` in it."""
    mask = torch.zeros(score.shape, dtype=torch.bool)
    other = [range(s) for d, s in enumerate(score.shape) if d != axis]
    for idx in itertools.product(*other):
        for start in range(0, score.shape[axis], m):
            full = [(*idx[:axis], start + j, *idx[axis:]) for j in range(m)]
            values = [float(score[i]) for i in full]
            best = sorted(range(m), key=lambda j: (-values[j], j))[:n]
            for j in best:
                mask[full[j]] = True
    return mask


@pytest.mark.parametrize("axis", [0, 1, 2, 3, -1])
def test_nm_along_an_axis_matches_a_loop_over_groups(axis):
    score = torch.rand(4, 8, 4, 4, generator=torch.Generator().manual_seed(3))
    got = select_nm({"w": score}, 2, 4, axis=axis)["w"]
    assert torch.equal(got, _nm_reference(score, 2, 4, axis % 4))
    assert check_nm(got, 2, 4, axis=axis)


def test_nm_axes_input_dimension_of_each_layer_and_asp_layout_for_convs():
    from mfac.prune import nm_axes

    model = nn.Sequential(nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(16, 8))
    names = ["0.weight", "2.weight"]
    assert nm_axes(model, names) == {"0.weight": None, "2.weight": None}  # SparseGPT's flattened layout
    assert nm_axes(model, names, "channels") == {"0.weight": 1, "2.weight": None}
    assert nm_axes(model, names, "rows") == {"0.weight": None, "2.weight": None}
    assert nm_axes(model, names, {"0.weight": 3}) == {"0.weight": 3, "2.weight": None}
    score = torch.rand(4, 8, 3, 3, generator=torch.Generator().manual_seed(4))
    mask = select_nm({"0.weight": score}, 2, 4, axis=nm_axes(model, ["0.weight"], "channels"))["0.weight"]
    # ASP's own view of a conv weight: permute(2, 3, 0, 1) -> rows (kh, kw, out), groups of 4 input channels
    asp = mask.permute(2, 3, 0, 1).reshape(-1, 8).reshape(-1, 4)
    assert bool((asp.sum(1) == 2).all())
    flat = select_nm({"0.weight": score}, 2, 4)["0.weight"]  # default: groups of in*kh*kw entries
    assert bool((flat.reshape(-1, 4).sum(1) == 2).all())
    assert not torch.equal(flat, mask)


@pytest.mark.parametrize(
    ("layout", "error", "match"),
    [
        ("columns", ValueError, "nm_axis must be one of"),
        (True, TypeError, "nm_axis must be one of"),
        ({"nope.weight": 0}, ValueError, "not pruned here"),
        (4, ValueError, "out of range"),
    ],
)
def test_nm_axes_bad_layouts(layout, error, match):
    from mfac.prune import nm_axes

    model = nn.Sequential(nn.Conv2d(8, 4, 3))
    with pytest.raises(error, match=match):
        nm_axes(model, ["0.weight"], layout)


def test_nm_axis_not_divisible_names_the_axis():
    with pytest.raises(ValueError, match="dimension 1 of length 6"):
        select_nm({"w": torch.rand(8, 6)}, 2, 4, axis=1)


def test_prune_oneshot_nm_axis_needs_a_pattern_and_is_checked_before_any_change():
    from mfac.prune import prune_oneshot

    model = nn.Sequential(nn.Linear(8, 4))
    before = model[0].weight.detach().clone()
    data = [(torch.randn(2, 8), torch.randint(0, 4, (2,)))]

    def loss(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1])

    with pytest.raises(ValueError, match="applies to N:M pruning only"):
        prune_oneshot(model, loss, data, 0.5, curvature="identity", nm_axis="channels")
    with pytest.raises(ValueError, match="nm_axis must be one of"):
        prune_oneshot(model, loss, data, pattern="2:4", curvature="identity", nm_axis="cols")
    assert torch.equal(model[0].weight, before)
