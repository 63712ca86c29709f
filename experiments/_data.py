"""Small data sets that ship with installed packages, as torch tensors (no downloads).

``load_digits_split`` wraps scikit-learn's ``load_digits``: 1797 grey 8x8 images of the digits 0-9.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch


class Split(NamedTuple):
    """A train/test split: images ``(n, 1, 8, 8)`` (float) and labels ``(n,)`` (int64)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(
    seed: int = 0, test_fraction: float = 0.2, *, dtype: torch.dtype = torch.float32
) -> Split:
    """scikit-learn's digits, split stratified into train and held-out test sets.

    Pixels (0..16) are standardised with the *training* set's mean and standard deviation (one
    scalar each), so no test statistics leak. The split depends only on ``seed``.

    Returns:
        ``Split(x_train, y_train, x_test, y_test)``; 1437 / 360 images for ``test_fraction=0.2``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.images, data.target, test_size=test_fraction, random_state=seed, stratify=data.target
    )
    x_train = torch.as_tensor(x_train, dtype=torch.float64).unsqueeze(1)
    x_test = torch.as_tensor(x_test, dtype=torch.float64).unsqueeze(1)
    mean, std = x_train.mean(), x_train.std()
    return Split(
        ((x_train - mean) / std).to(dtype),
        torch.as_tensor(y_train, dtype=torch.long),
        ((x_test - mean) / std).to(dtype),
        torch.as_tensor(y_test, dtype=torch.long),
    )


def minibatches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, *, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled mini-batches (the last one may be smaller)."""
    order = torch.randperm(len(x), generator=generator)
    for start in range(0, len(x), batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]
