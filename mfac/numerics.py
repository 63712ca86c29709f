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
* Half precision (float16 / bfloat16) gradients are computed on in float32 by the static operator
  (its vectors stay in the gradients' dtype); ``damp`` must be such that ``1 / damp`` is finite in the
  vectors' dtype (``F^{-1} x`` is about ``x / damp`` off the gradients' span).

Error rules (every public entry point of mfac follows them)
------------------------------------------------------------
* ``TypeError``: an argument of the wrong *type*: not a tensor where one is needed (gradients, a loss, a
  mask), a bool where a number is needed (``damp=True``, ``sparsity=True``), a float where an int is
  needed, a tensor of the wrong *dtype* (an integer gradient matrix, a float mask: masks are
  ``torch.bool``, a window ``dtype`` that is not supported), an unknown keyword argument.
* ``ValueError``: a value of the right type that breaks a rule: out of range (``damp <= 0``, a
  sparsity above 1), not finite, a wrong shape, a name that is not a parameter, a state dict that is
  malformed, corrupt or from another configuration (missing keys and entries of the wrong type included:
  the state dict is the value; only a state dict that is not a dict is a ``TypeError``), tensors on the wrong
  *device* (a device mismatch is a placement value, like a shape: always ``ValueError``), meta tensors
  (they hold no numbers).
* ``IndexError``: an index out of range (``submatrix``). ``MemoryError``: an allocation that does not
  fit, with the size asked for (:func:`allocate`). :class:`NotPositiveDefiniteError`: a breakdown that
  a jitter could not repair.
* Errors are raised before anything is changed: an operator, an optimizer, a model or a mask handle
  that raised is left as it was.
* Lost accuracy that can be detected is a :class:`NumericalWarning` (filterable), never silent.

The shared checks live here (``check_damp``, ``check_positive_int``, ``check_nonnegative_int``,
``check_real``, ``check_nonnegative``, ``check_fraction``, ``check_finite``, ``check_same_placement``,
``check_not_meta``, ``check_bool_mask``) so that every entry point words and types its errors the same
way; the mask contract built on ``check_bool_mask`` (one mask against its parameter, a name-keyed dict
of them) is :func:`mfac.params.check_mask` / :func:`mfac.params.check_masks`.
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
    "SlabbedMatvec",
    "accumulated_matmul",
    "accumulated_matvec",
    "accumulated_sqnorm",
    "allocate",
    "available_memory",
    "batched_spd_solve",
    "check_bool_mask",
    "check_damp",
    "check_finite",
    "check_fraction",
    "check_memory",
    "check_nonnegative",
    "check_nonnegative_int",
    "check_not_meta",
    "check_positive_int",
    "check_real",
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


def check_damp(damp: float, dtype: torch.dtype | None = None, *, name: str = "damp") -> float:
    """Return ``damp`` as a float after checking that it is a finite real number > 0.

    With ``dtype``, ``1 / damp`` must also be finite in ``dtype``: ``F^{-1} x`` is ``x / damp`` off
    the gradients' span, so a smaller damp (``1e-39`` in float32) would return inf silently.
    Bools are refused (``damp=True`` is a bug, not 1.0): ``TypeError``.
    """
    if isinstance(damp, torch.Tensor):
        if damp.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(damp.shape)}")
        if damp.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a torch.bool tensor")
        check_not_meta(damp, name)
        damp = damp.item()
    if isinstance(damp, bool):
        raise TypeError(f"{name} must be a real number, got the bool {damp!r}")
    try:
        value = float(damp)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(damp).__name__} {damp!r}") from None
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be finite and > 0, got {damp}")
    if dtype is not None and dtype.is_floating_point:
        big = torch.finfo(dtype).max
        if 1.0 / value > big:
            raise ValueError(
                f"{name}={value:g} is too small for {dtype}: 1/{name} = {1.0 / value:.3g} overflows its "
                f"largest value {big:.3g} (F^-1 x would be inf); use {name} >= {1.0 / big:.3g} or a "
                "wider dtype"
            )
    return value


def check_fraction(value: float, name: str, *, upper_open: bool = False) -> float:
    """Return ``value`` as a float after checking that it is a real number in ``[0, 1]`` (``[0, 1)``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "the bool" if isinstance(value, bool) else type(value).__name__
        raise TypeError(f"{name} must be a float in [0, 1{')' if upper_open else ']'}, got {kind} {value!r}")
    out = float(value)
    if not (0.0 <= out < 1.0 if upper_open else 0.0 <= out <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1{')' if upper_open else ']'}, got {value}")
    return out


def check_not_meta(tensor: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``tensor`` is on the meta device (it has a shape but no values)."""
    if tensor.device.type == "meta":
        raise ValueError(
            f"{name} is on the meta device: it has a shape but no values to compute with; "
            "materialize it first (e.g. model.to_empty(device=...) and load weights)"
        )


def check_bool_mask(
    mask: object, name: str, shape: torch.Size | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Check a mask: a ``torch.bool`` tensor (``TypeError`` otherwise) of ``shape`` (``ValueError``)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.bool tensor (True = kept), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{name} must have dtype torch.bool (True = kept), got {mask.dtype}; convert with .bool() "
            "(the bool masks of a model pruned with torch.nn.utils.prune: mfac.params.prune_masks(model))"
        )
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have the parameter's shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask


def check_positive_int(value: int, name: str) -> int:
    """Return ``value`` after checking that it is an integer >= 1."""
    return _check_int(value, name, 1)


def check_nonnegative_int(value: int, name: str) -> int:
    """Return ``value`` after checking that it is an integer >= 0 (a step count, a step number)."""
    return _check_int(value, name, 0)


def _check_int(value: int, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def check_real(value: float, name: str) -> float:
    """Return ``value`` as a float after checking that it is a finite real number (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out}")
    return out


def check_nonnegative(value: float, name: str) -> float:
    """Return ``value`` as a float after checking that it is a finite real number >= 0 (``lr``)."""
    out = check_real(value, name)
    if out < 0.0:
        raise ValueError(f"{name} must be >= 0, got {out}")
    return out


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` if ``tensor`` holds NaN or inf."""
    if not bool(torch.isfinite(tensor).all()):
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        raise ValueError(f"{name} must be finite, got {nan} NaN and {inf} inf entries")


def check_same_placement(
    tensor: torch.Tensor, name: str, dtype: torch.dtype, device: torch.device
) -> None:
    """Raise ``TypeError`` if ``tensor`` is not of ``dtype``, ``ValueError`` if it is not on ``device``."""
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
            self._part_rows = self._parts.unbind(0)  # the out= views, made once (not one select per slab)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``a @ x`` in float64, shape ``(m,)``, for ``x`` of shape ``(d,)``."""
        if self._whole:
            return torch.mv(self._a, x).to(SMALL_DTYPE)
        for slab, piece, part in zip(self._slabs, x.split(self.chunk), self._part_rows, strict=True):
            torch.mv(slab, piece, out=part)
        return self._parts.sum(0, dtype=SMALL_DTYPE)


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


def batched_spd_solve(matrix: torch.Tensor, rhs: torch.Tensor, *, what: str = "matrix") -> torch.Tensor:
    """Solve ``matrix @ x = rhs`` for a batch of symmetric positive definite float64 matrices.

    Args:
        matrix: shape ``(n, s, s)``, symmetric (symmetrised here against rounding).
        rhs: shape ``(n, s, k)``.
        what: name of the matrices in the warning.

    Cholesky per matrix; the matrices that rounding left indefinite (a tiny damp in float32) are solved
    by pivoted LU instead, with a :class:`NumericalWarning` saying how many.
    """
    matrix = 0.5 * (matrix + matrix.mT)
    factor, info = torch.linalg.cholesky_ex(matrix)
    out = torch.cholesky_solve(rhs, factor)
    bad = (info != 0).nonzero().squeeze(1)
    if bad.numel():
        warnings.warn(
            f"{bad.numel()} of {matrix.shape[0]} matrices {what} ({matrix.shape[-1]} x {matrix.shape[-1]}) "
            "are not numerically positive definite; solved by LU instead. Consider a larger damp.",
            NumericalWarning,
            stacklevel=3,
        )
        out[bad] = torch.linalg.solve(matrix[bad], rhs[bad])
    return out


def available_memory(device: torch.device | str | None = None) -> int | None:
    """Bytes that can still be allocated on ``device`` (None where it cannot be told).

    ``MemAvailable`` of ``/proc/meminfo`` for the CPU (Linux), ``torch.cuda.mem_get_info`` for CUDA.
    """
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(nbytes: int, device: torch.device | str | None, what: str, advice: str) -> None:
    """Raise ``MemoryError`` up front when ``nbytes`` exceed :func:`available_memory` of ``device``.

    Meant for allocations that would otherwise succeed lazily and be killed later (Linux overcommit)
    or fail halfway through a computation. Silent when the free memory cannot be told.
    """
    free = available_memory(device)
    if free is not None and nbytes > free:
        raise MemoryError(
            f"{what} needs {format_bytes(nbytes)}, but only {format_bytes(free)} is available on "
            f"{device or 'cpu'}; {advice}"
        )
