r"""Quality measurements for the experiments: relative errors, classification accuracy, mean and std.

Relative error, one definition for every script: ``|y - y*|_2 / |y*|_2`` (:func:`rel_err`). Where a
script's claim is about the largest entry (a table that says "max-norm"), it uses
:func:`rel_err_max`, ``|y - y*|_inf / |y*|_inf``, and says so in its output. Both compare in float64
and give ``inf`` for a non-finite result (a failed product), so a failure is never a small number.

:func:`accuracy` and :func:`evaluate` run the model in eval mode without gradients and put every module
back in the mode it was in (a model evaluated in the middle of training keeps training afterwards).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn


# ====================================================================== relative errors
def _difference(actual: torch.Tensor, expected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    actual, expected = actual.to(torch.float64), expected.to(torch.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: actual {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    if not bool(torch.isfinite(actual).all()):
        return None
    return actual - expected, expected


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative 2-norm error ``|a - e|_2 / |e|_2`` (over all entries), in float64; ``inf`` if ``a`` is
    not finite."""
    pair = _difference(actual, expected)
    if pair is None:
        return math.inf
    diff, expected = pair
    return float(torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(expected))


def rel_err_max(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative max-norm error ``|a - e|_inf / |e|_inf`` (largest entry), in float64; ``inf`` if ``a`` is
    not finite. For claims about the worst entry; everything else uses :func:`rel_err`."""
    pair = _difference(actual, expected)
    if pair is None:
        return math.inf
    diff, expected = pair
    return float(diff.abs().max() / expected.abs().max())


# ====================================================================== accuracy
@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; each module's own ``training`` flag restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _batches(x: torch.Tensor, batch_size: int | None) -> Iterator[slice]:
    n = len(x)
    step = n if batch_size is None else batch_size
    for start in range(0, n, max(step, 1)):
        yield slice(start, start + step)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
    batch_size: int | None = None,
) -> tuple[float, float]:
    """``(mean loss, accuracy)`` of ``model`` on ``(x, y)``, in eval mode (restored after).

    ``loss_fn(logits, y)`` must return the batch mean; ``batch_size`` bounds the memory (``None``: one
    batch). Accuracy is the fraction of ``argmax(logits) == y``, exact in float64.
    """
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(f"need as many labels as inputs (and at least one), got {len(x)} and {len(y)}")
    losses, correct = [], 0
    with eval_mode(model):
        for sl in _batches(x, batch_size):
            logits = model(x[sl])
            losses.append((float(loss_fn(logits, y[sl])), len(y[sl])))
            correct += int((logits.argmax(1) == y[sl]).sum())
    loss = losses[0][0] if len(losses) == 1 else math.fsum(v * k for v, k in losses) / len(y)
    return loss, correct / len(y)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int | None = None) -> float:
    """Fraction of ``argmax(model(x)) == y``, in eval mode (each module's mode restored after)."""
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(f"need as many labels as inputs (and at least one), got {len(x)} and {len(y)}")
    correct = 0
    with eval_mode(model):
        for sl in _batches(x, batch_size):
            correct += int((model(x[sl]).argmax(1) == y[sl]).sum())
    return correct / len(y)


# ====================================================================== over seeds
def mean_std(values: Sequence[float], *, ddof: int = 1) -> tuple[float, float]:
    """Mean and standard deviation of ``values``: ``sqrt(sum (v - mean)^2 / (n - ddof))``.

    ``ddof=1`` (default): the sample standard deviation over seeds; ``ddof=0``: the population one. With
    ``n <= ddof`` values the std is ``0.0`` (one seed has no spread to report).
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std needs at least one value")
    if ddof < 0:
        raise ValueError(f"ddof must be >= 0, got {ddof}")
    n = len(vals)
    mean = math.fsum(vals) / n
    if n <= ddof:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - ddof))
