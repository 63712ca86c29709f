r"""Sparsity schedules for gradual pruning, called from the user's own training loop.

A schedule maps a training step to a target sparsity and says at which steps to prune; it holds no model and
runs nothing. Two kinds:

* :class:`CubicSchedule`: Zhu and Gupta (2017), "To prune, or not to prune":

      s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (n dt))^3     for t = t_0, t_0 + dt, ..., t_0 + n dt

  fast pruning early (redundant weights), slow near the end.
* :class:`StepSchedule`: an explicit list of ``(step, sparsity)`` pairs.

Within one pruning event, :func:`recompute_steps` splits the way from the current sparsity to the target into
``k`` steps with geometrically decreasing density (each step removes the same fraction of the weights still
there), as the paper's code does; gradients are recollected and ``F^{-1}`` rebuilt between them.

Example (the pruner is :class:`~mfac.prune.GradualPruner`; or call ``prune_oneshot`` yourself)::

    schedule = CubicSchedule(final_sparsity=0.9, begin_step=1000, end_step=9000, frequency=1000)
    for step, batch in enumerate(loader):
        ...  # forward, backward, optimizer.step()
        if schedule.is_pruning_step(step):
            masks = prune_oneshot(model, loss_fn, calib, schedule.sparsity(step), ngrads=256,
            damp=1e-4,
                                  masks=masks)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence

from mfac.numerics import check_fraction, check_nonnegative_int

__all__ = ["CubicSchedule", "PruningSchedule", "StepSchedule", "recompute_steps"]


class PruningSchedule:
    """Interface: ``sparsity(step)`` (the target at ``step``) and ``is_pruning_step(step)``."""

    def sparsity(self, step: int) -> float:  # pragma: no cover - interface
        """Return the target sparsity at training step ``step``."""
        raise NotImplementedError

    def is_pruning_step(self, step: int) -> bool:  # pragma: no cover - interface
        """Whether to prune at ``step`` (to ``sparsity(step)``)."""
        raise NotImplementedError

    @property
    def pruning_steps(self) -> list[int]:  # pragma: no cover - interface
        """All steps at which the schedule prunes, increasing."""
        raise NotImplementedError

    @property
    def final_sparsity(self) -> float:
        """The sparsity after the last pruning step."""
        return self.sparsity(self.pruning_steps[-1])

    def __call__(self, step: int) -> float:
        """Return ``sparsity(step)``."""
        return self.sparsity(step)


class CubicSchedule(PruningSchedule):
    r"""Zhu and Gupta's cubic schedule: ``s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_1 - t_0))^3``.

    Args:
        final_sparsity: ``s_f`` in ``[0, 1)``.
        begin_step: ``t_0``, the first pruning step (target ``s_i``).
        end_step: ``t_1 >= t_0``, the last pruning step (target ``s_f``); ``t_1 - t_0`` must be a multiple of
            ``frequency``.
        initial_sparsity: ``s_i`` (default 0).
        frequency: ``dt``, steps between pruning events.

    ``sparsity(t)`` is ``s_i`` before ``t_0``, ``s_f`` after ``t_1``, and between pruning steps the value of
    the last pruning step (the target in force).
    """

    def __init__(
        self,
        final_sparsity: float,
        begin_step: int,
        end_step: int,
        *,
        initial_sparsity: float = 0.0,
        frequency: int = 1,
    ) -> None:
        self.final = check_fraction(final_sparsity, "final_sparsity", upper_open=True)
        self.initial = check_fraction(initial_sparsity, "initial_sparsity", upper_open=True)
        if self.initial > self.final:
            raise ValueError(
                f"initial_sparsity {initial_sparsity} must be <= final_sparsity {final_sparsity}"
            )
        self.begin = check_nonnegative_int(begin_step, "begin_step")
        self.end = check_nonnegative_int(end_step, "end_step")
        if self.end < self.begin:
            raise ValueError(f"end_step must be >= begin_step, got {end_step} < {begin_step}")
        self.frequency = check_nonnegative_int(frequency, "frequency")
        if self.frequency < 1:
            raise ValueError(f"frequency must be >= 1, got {frequency}")
        if (self.end - self.begin) % self.frequency:
            raise ValueError(
                f"end_step - begin_step ({self.end - self.begin}) must be a multiple of frequency "
                f"({self.frequency}) so that the last pruning step reaches final_sparsity"
            )

    def _raw(self, step: int) -> float:
        if self.end == self.begin:
            return self.final
        frac = min(max((step - self.begin) / (self.end - self.begin), 0.0), 1.0)
        return self.final + (self.initial - self.final) * (1.0 - frac) ** 3

    def sparsity(self, step: int) -> float:
        """Return the target in force at ``step`` (that of the last pruning step ``<= step``)."""
        if step < self.begin:
            return self.initial
        last = min(step, self.end)
        last -= (last - self.begin) % self.frequency
        return self._raw(last)

    def is_pruning_step(self, step: int) -> bool:
        """``t_0 <= step <= t_1`` and ``(step - t_0)`` a multiple of ``frequency``."""
        return self.begin <= step <= self.end and (step - self.begin) % self.frequency == 0

    @property
    def pruning_steps(self) -> list[int]:
        """``[t_0, t_0 + dt, ..., t_1]``."""
        return list(range(self.begin, self.end + 1, self.frequency))

    def __repr__(self) -> str:
        return (
            f"CubicSchedule(final_sparsity={self.final}, begin_step={self.begin}, end_step={self.end}, "
            f"initial_sparsity={self.initial}, frequency={self.frequency})"
        )


class StepSchedule(PruningSchedule):
    """An explicit schedule: prune to ``sparsity`` at each listed ``step``.

    Args:
        steps: ``(step, sparsity)`` pairs with increasing steps and non-decreasing sparsities in ``[0, 1)``.
    """

    def __init__(self, steps: Iterable[tuple[int, float]]) -> None:
        if isinstance(steps, (str, bytes, Mapping)) or not isinstance(steps, Iterable):
            raise TypeError(
                f"steps must be an iterable of (step, sparsity) pairs, got {type(steps).__name__} {steps!r}"
            )
        pairs = []
        for i, pair in enumerate(steps):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"steps[{i}] must be a (step, sparsity) pair, got {pair!r}")
            t, s = pair
            step = check_nonnegative_int(t, f"steps[{i}] step")
            pairs.append((step, check_fraction(s, f"steps[{i}] sparsity", upper_open=True)))
        if not pairs:
            raise ValueError("StepSchedule needs at least one (step, sparsity) pair")
        for (t0, s0), (t1, s1) in itertools.pairwise(pairs):
            if t1 <= t0:
                raise ValueError(f"steps must increase, got {t0} then {t1}")
            if s1 < s0:
                raise ValueError(f"sparsities must not decrease, got {s0} at step {t0} then {s1} at {t1}")
        self.steps = pairs
        self._targets = dict(pairs)

    def sparsity(self, step: int) -> float:
        """Return the target of the last listed step ``<= step`` (0 before the first)."""
        current = 0.0
        for t, s in self.steps:
            if t > step:
                break
            current = s
        return current

    def is_pruning_step(self, step: int) -> bool:
        """Whether ``step`` is listed."""
        return step in self._targets

    @property
    def pruning_steps(self) -> list[int]:
        """The listed steps."""
        return [t for t, _ in self.steps]

    def __repr__(self) -> str:
        return f"StepSchedule({self.steps})"


def recompute_steps(start: float, target: float, k: int) -> list[float]:
    """Sparsities of ``k`` recomputation steps from ``start`` to ``target`` (geometric in density).

    Step ``j`` (1..k) prunes to ``1 - (1 - start) * ((1 - target) / (1 - start)) ** (j / k)``: each step
    removes the same fraction of the weights still present (the paper's code). The last entry is ``target``
    exactly.

    Args:
        start: the current sparsity, in ``[0, 1)``.
        target: the target sparsity, ``start <= target <= 1``.
        k: number of steps, >= 1.
    """
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(
            f"the number of recomputation steps must be an int >= 1, got {type(k).__name__} {k!r}"
        )
    if k < 1:
        raise ValueError(f"the number of recomputation steps must be an int >= 1, got {k!r}")
    if not 0.0 <= start < 1.0 or not start <= target <= 1.0:
        raise ValueError(f"need 0 <= start < 1 and start <= target <= 1, got start={start}, target={target}")
    if target == 1.0:
        return [start + (target - start) * j / k for j in range(1, k + 1)]
    ratio = (1.0 - target) / (1.0 - start)
    out = [1.0 - (1.0 - start) * ratio ** (j / k) for j in range(1, k)]
    return [*out, target]


def _as_steps(recompute: int | Sequence[float], start: float, target: float) -> list[float]:
    """``recompute`` as an int (geometric steps) or an explicit increasing list ending at ``target``."""
    if isinstance(recompute, int) and not isinstance(recompute, bool):
        return recompute_steps(start, target, recompute)
    steps = [float(s) for s in recompute]
    if not steps:
        raise ValueError("recompute must be an int >= 1 or a non-empty list of sparsities")
    if any(b < a for a, b in itertools.pairwise(steps)):
        raise ValueError(f"recompute sparsities must not decrease, got {steps}")
    if not math.isclose(steps[-1], target, abs_tol=1e-12):
        raise ValueError(f"the last recompute sparsity must be the target {target}, got {steps[-1]}")
    return steps
