"""Numerical policy of mfac: warning and error types, input checks, precise Gram products, safe Cholesky.

Nothing here changes global state (no TF32 switches, no default dtypes): every routine takes the tensors
it works on and returns new ones.

Precision policy
----------------
* The ``m x d`` gradient buffer stays in the dtype and on the device of the gradients (the *compute dtype*).
* All ``m x m`` work (Gram matrix, Cholesky factor, small solves) is done in float64 (``SMALL_DTYPE``)
  whatever the compute dtype: it costs O(m^2)..O(m^3), nothing next to the O(md) passes.
* Products ``G @ x`` that feed the ``m x m`` system are accumulated in float64 chunk by chunk (float32
  partial sums over ``chunk`` columns, summed in float64), in the same single pass over ``G``.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "SMALL_DTYPE",
    "MFACWarning",
    "NonFiniteGradientError",
    "NotPositiveDefiniteError",
    "NumericalWarning",
    "accumulated_matmul",
    "accumulated_matvec",
    "accumulated_sqnorm",
    "SlabbedMatvec",
    "check_damp",
    "check_finite",
    "check_positive_int",
    "check_same_placement",
    "format_bytes",
    "read_checks",
    "safe_cholesky",
]

#: dtype of all m x m work (Gram matrices, Cholesky factors, coefficient vectors).
SMALL_DTYPE = torch.float64

#: columns per partial product when accumulating ``G @ x`` in float64 (float32/bf16 inputs).
DEFAULT_CHUNK = 1 << 13


class MFACWarning(UserWarning):
    """Base class of every warning mfac emits (filter them all with ``warnings.filterwarnings``)."""


class NumericalWarning(MFACWarning):
    """A numerical breakdown was detected and recovered from (e.g. a Cholesky needed jitter)."""


class NonFiniteGradientError(ValueError):
    """A gradient given to a window holds NaN or inf (or its squared norm overflows); nothing changed."""


class NotPositiveDefiniteError(RuntimeError):
    """A matrix that must be symmetric positive definite was not, and could not be recovered."""


def check_damp(damp: float) -> float:
    """Return ``damp`` as a float after checking that it is finite and > 0."""
    if isinstance(damp, torch.Tensor):
        if damp.numel() != 1:
            raise ValueError(f"damp must be a scalar, got a tensor of shape {tuple(damp.shape)}")
        damp = damp.item()
    try:
        value = float(damp)
    except (TypeError, ValueError):
        raise TypeError(f"damp must be a real number, got {damp!r}") from None
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"damp must be finite and > 0, got {damp}")
    return value


def check_positive_int(value: int, name: str) -> int:
    """Return ``value`` after checking that it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` if ``tensor`` holds NaN or inf."""
    if not bool(torch.isfinite(tensor).all()):
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        raise ValueError(f"{name} must be finite, got {nan} NaN and {inf} inf entries")


def check_same_placement(
    tensor: torch.Tensor, name: str, dtype: torch.dtype, device: torch.device
) -> None:
    """Raise ``TypeError``/``ValueError`` if ``tensor`` is not of ``dtype`` on ``device``."""
    if tensor.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (the operator's), got {tensor.dtype}")
    if tensor.device != device:
        raise ValueError(f"{name} must be on device {device} (the operator's), got {tensor.device}")


def format_bytes(n: float) -> str:
    """Human-readable byte count, e.g. ``format_bytes(3 * 2**30) == '3.00 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def allocate(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None,
             what: str) -> torch.Tensor:
    """``torch.zeros(shape)`` that, when it cannot fit, says how much memory was asked for."""
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    try:
        return torch.zeros(shape, dtype=dtype, device=device)
    except (RuntimeError, MemoryError) as err:  # torch.OutOfMemoryError is a RuntimeError
        raise MemoryError(
            f"cannot allocate the {what} of shape {tuple(shape)} ({dtype}): "
            f"{format_bytes(nbytes)} asked for on {device or 'cpu'}"
        ) from err


def accumulated_matmul(a: torch.Tensor, b: torch.Tensor, *, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Return ``a @ b`` (contracting the last dim of ``a``) accumulated in float64, in one pass.

    Args:
        a: shape ``(..., m, d)``.
        b: shape ``(..., d, k)``, same dtype and device as ``a``.
        chunk: columns of ``a`` per partial product (float32/bf16 only).

    Returns:
        ``a @ b`` in float64, shape ``(..., m, k)``.

    For float64 inputs this is one matmul. For lower precision, partial products over ``chunk``
    columns are formed in the input dtype (BLAS speed) and summed in float64, so the rounding error
    grows with ``chunk`` instead of with ``d``. Cost: the same single pass over ``a``.
    """
    d = a.shape[-1]
    if a.dtype == SMALL_DTYPE or d <= chunk:
        return (a @ b).to(SMALL_DTYPE)
    out = None
    for start in range(0, d, chunk):
        part = (a[..., start : start + chunk] @ b[..., start : start + chunk, :]).to(SMALL_DTYPE)
        out = part if out is None else out.add_(part)
    return out


def accumulated_matvec(a: torch.Tensor, x: torch.Tensor, *, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Return ``a @ x`` for ``a`` of shape ``(m, d)`` and ``x`` of shape ``(d,)``, accumulated in float64.

    The window's hot pass ``G g``: one matrix-vector product per ``chunk`` columns, each written into
    one row of a ``(ceil(d / chunk), m)`` buffer of partial sums, which is summed in float64 at the end
    (two dispatches per chunk instead of four). The rounding error of an entry is that of a ``chunk``-long
    float32 dot product, whatever ``d`` (measured on 16 x 4e6 correlated rows, relative to
    ``sum |a_ij x_j|``: 9e-5 for one float32 gemv, 9e-9 / 7e-8 / 2e-7 for chunks of 8192 / 32768 / 65536).
    Half-precision inputs give half-precision partial sums (rounded at 2^-9 relative for bfloat16).

    Returns:
        shape ``(m,)``, float64.
    """
    m, d = a.shape
    if a.dtype == SMALL_DTYPE or d <= chunk:
        return torch.mv(a, x).to(SMALL_DTYPE)
    nchunks = -(-d // chunk)
    parts = torch.empty(nchunks, m, dtype=a.dtype, device=a.device)
    for i, start in enumerate(range(0, d, chunk)):
        torch.mv(a[:, start : start + chunk], x[start : start + chunk], out=parts[i])
    return parts.sum(0, dtype=SMALL_DTYPE)


class SlabbedMatvec:
    """:func:`accumulated_matvec` for a fixed matrix, with its column slabs and the buffer prepared once.

    ``SlabbedMatvec(a, chunk)(x) == accumulated_matvec(a, x, chunk=chunk)``; per call, one ``split`` of
    ``x`` and one matrix-vector product per slab (the hot loop of a sliding window's step, where the
    slicing of the matrix would otherwise be redone every step). ``a`` is referenced, not copied: later
    writes into it are seen.
    """

    def __init__(self, a: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> None:
        self.shape = tuple(a.shape)
        self.chunk = chunk
        m, d = a.shape
        self._whole = a.dtype == SMALL_DTYPE or d <= chunk
        self._a = a
        if not self._whole:
            self._slabs = a.split(chunk, dim=1)
            self._parts = torch.empty(len(self._slabs), m, dtype=a.dtype, device=a.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``a @ x`` in float64, shape ``(m,)``, for ``x`` of shape ``(d,)``."""
        if self._whole:
            return torch.mv(self._a, x).to(SMALL_DTYPE)
        parts = self._parts
        for i, (slab, piece) in enumerate(zip(self._slabs, x.split(self.chunk), strict=True)):
            torch.mv(slab, piece, out=parts[i])
        return parts.sum(0, dtype=SMALL_DTYPE)


def accumulated_sqnorm(x: torch.Tensor, *, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Return ``|x|^2`` of a ``(d,)`` vector as a float64 0-d tensor, without a host synchronisation.

    Float32 (or better) norms of ``chunk``-long pieces, squared and summed in float64: one pass over ``x``.
    """
    d = x.shape[0]
    acc = torch.float64 if x.dtype == SMALL_DTYPE else torch.float32
    whole = d // chunk * chunk
    total = torch.zeros((), dtype=SMALL_DTYPE, device=x.device)
    if whole:
        norms = torch.linalg.vector_norm(x[:whole].view(-1, chunk), dim=1, dtype=acc)
        total = total + norms.to(SMALL_DTYPE).square().sum()
    if whole < d:
        tail = torch.linalg.vector_norm(x[whole:], dtype=acc).to(SMALL_DTYPE)
        total = total + tail.square()
    return total


def read_checks(values: torch.Tensor) -> list[float]:
    """Read a small tensor of device-computed check values on the host: the one synchronisation of a step.

    Every check of an optimizer step (finite gradient, stable rank-two update, no cancellation) is
    computed on the device as a number whose sign (or finiteness) is the verdict, and all are read here
    together, so a step waits for the device at most once; the comparisons are then host arithmetic.
    """
    return values.tolist()


class DeferredChecks:
    """Check values read one step late, without a synchronisation: copied to host memory asynchronously.

    :meth:`stash` starts a non-blocking device-to-host copy (pinned memory and an event on CUDA);
    :meth:`take` returns the values stashed last (waiting, on CUDA, only for that earlier copy, which the
    device finished long ago in a pipelined loop), or None if nothing was stashed.
    """

    def __init__(self) -> None:
        self._host: torch.Tensor | None = None  # reused (pinned on CUDA)
        self._event: Any = None
        self._pending = False

    def stash(self, values: torch.Tensor) -> None:
        """Start copying ``values`` (a small device tensor) to the host; replaces an unread stash."""
        if self._host is None or self._host.shape != values.shape or self._host.dtype != values.dtype:
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=values.is_cuda)
        self._host.copy_(values, non_blocking=values.is_cuda)
        if values.is_cuda:
            self._event = torch.cuda.Event()
            self._event.record()
        self._pending = True

    def take(self) -> list[float] | None:
        """Return the values stashed last (once), or None."""
        if not self._pending:
            return None
        self._pending = False
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        assert self._host is not None
        return self._host.numpy().tolist()  # a host buffer: no device read


def safe_cholesky(
    matrix: torch.Tensor, *, what: str = "matrix", entry_dtype: torch.dtype = SMALL_DTYPE
) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of a (batch of) symmetric positive definite float64 matrices.

    If the factorization fails (rounding made the matrix indefinite: typically a Gram matrix of nearly
    collinear float32 gradients with a tiny ``damp``), a diagonal jitter is added, starting at
    ``1e3 * eps(entry_dtype) * max|diag|`` and growing 10x per try (at most 8 tries), and a
    :class:`NumericalWarning` says how much was added. If that does not help,
    :class:`NotPositiveDefiniteError` is raised: never garbage.

    Why ``1e3 * eps``: a failed Cholesky means the rounding error ``E`` of the entries (accumulated
    float32 products: about ``1e-6 * max|diag|``) exceeds the smallest eigenvalue. Solutions then carry
    a relative error of about ``|E| / jitter`` in the directions that matter, so the jitter must exceed
    ``|E|`` by orders of magnitude, not just make the factorization succeed. The jitter acts as extra
    damping ``jitter / m`` restricted to the span of the gradients.

    Args:
        matrix: shape ``(..., n, n)``, symmetric.
        what: name of the matrix in messages.
        entry_dtype: dtype whose rounding produced the entries (the gradients' dtype).

    Returns:
        ``(L, jitter)`` with ``L @ L.mT == matrix + jitter * I`` (``jitter == 0.0`` when none was needed).
    """
    factor, info = torch.linalg.cholesky_ex(matrix)
    n = matrix.shape[-1]
    if n == 0 or not bool((info != 0).any()):
        return factor, 0.0
    scale = max(matrix.diagonal(dim1=-2, dim2=-1).abs().amax().item(), 1e-300)
    eye = torch.eye(n, dtype=matrix.dtype, device=matrix.device)
    jitter = scale * 1e3 * torch.finfo(entry_dtype).eps
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(matrix + jitter * eye)
        if not bool((info != 0).any()):
            warnings.warn(
                f"{what} was not numerically positive definite (Cholesky failed); added "
                f"{jitter:.3e} to its diagonal ({jitter / scale:.1e} of its largest entry). The "
                "gradients are nearly collinear for this damp at this precision: consider a larger "
                "damp or float64 gradients.",
                NumericalWarning,
                stacklevel=3,
            )
            logger.debug("safe_cholesky: jitter %.3e on %s of size %d", jitter, what, n)
            return factor, jitter
        jitter *= 10.0
    raise NotPositiveDefiniteError(
        f"{what} of size {n} is not positive definite even with a diagonal jitter of {jitter / 10:.3e}"
        f" ({jitter / 10 / scale:.1e} of its largest entry); are the gradients finite and damp > 0?"
    )
