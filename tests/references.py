"""Dense float64 references for the operator tests (explicit matrices; tiny sizes only)."""

from __future__ import annotations

import torch


def dense_fisher(grads: torch.Tensor, damp: float, scale: int | None = None) -> torch.Tensor:
    """``F = damp I + (1/s) G^T G`` in float64 (``s = m`` unless given)."""
    g = grads.to(torch.float64)
    m, d = g.shape
    fisher = damp * torch.eye(d, dtype=torch.float64)
    if m:
        fisher += g.T @ g / (scale or m)
    return fisher


def dense_inverse(grads: torch.Tensor, damp: float, scale: int | None = None) -> torch.Tensor:
    """``F^{-1}`` in float64 by Cholesky."""
    return torch.cholesky_inverse(torch.linalg.cholesky(dense_fisher(grads, damp, scale)))


def block_diagonal_inverse(grads: torch.Tensor, damp: float, block: int) -> torch.Tensor:
    """``F^{-1}`` of the block-diagonal Fisher: one ``F_b`` per block of ``block`` coordinates."""
    d = grads.shape[1]
    out = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, d, block):
        stop = min(start + block, d)
        out[start:stop, start:stop] = dense_inverse(grads[:, start:stop], damp)
    return out


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max-norm relative error ``|a - e|_inf / |e|_inf``."""
    actual = actual.to(torch.float64)
    expected = expected.to(torch.float64)
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def tiny_mlp(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """The 4-4-3 tanh MLP (seeded) that the pruning and fault tests share: 31 parameters."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).to(dtype)


def tiny_batches(n: int, dtype: torch.dtype = torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n // 2`` seeded mini-batches of two (x: (2, 4), y: (2,)) for :func:`tiny_mlp`."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=gen)
    return [(x[i : i + 2], y[i : i + 2]) for i in range(0, n, 2)]


def ce_loss(net: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of ``net`` on one ``(x, y)`` batch."""
    x, y = batch
    return torch.nn.functional.cross_entropy(net(x), y)
