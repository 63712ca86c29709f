r"""Sliding-window inverse Fisher: the last ``m`` gradients of a training run (the optimizer's hot path).

State: a ring buffer ``G`` of the last ``m`` gradients (``m x d``, the gradients' dtype and device), the
float64 Gram matrix ``G G^T`` of the stored rows, and the float64 inverse ``P = M^{-1}`` of

    M = s * damp * I + G G^T          (n x n over the n <= m stored rows)

where ``s`` is the averaging count: ``F = damp I + (1/s) G^T G``. Then (Woodbury)

    F^{-1} x   = (x - G^T P G x) / damp                    general vector: two passes over G
    F^{-1} g_r = s * G^T P e_r                               a stored row: no cancellation (F G^T = G^T M / s)

Each ``update(g)`` overwrites the oldest row, refreshes one row and column of the Gram matrix with one pass
``G g`` (accumulated in float64) and updates ``P`` by two rank-one corrections (remove row r, add it back:
O(m^2)); ``update_mul(g)`` then returns ``F^{-1} g = s G^T P e_r`` with one more pass. Per step that is the
floor of two passes over ``G`` plus O(m^2) float64 work. ``P`` is refactored from the Gram matrix by a
Cholesky every ``m`` updates, whenever the rank-one update looks unstable (a pivot that is not clearly
positive, or a residual ``|M c - e_r|`` above tolerance), and while the window fills with
``average_over="seen"`` (there ``s`` changes every step, which shifts the whole diagonal).

One step, as executed (``update_mul``): write ``g`` into ring row ``r`` (keeping the row it replaces in a
``(d,)`` buffer), one pass ``G g`` in 32768-column float32 slabs summed in float64 (``|g|^2`` at ``r``),
the new ``P`` staged (a rank-two update, applied to ``P`` in place when the step is installed; a Cholesky
into a spare ``m x m`` buffer while filling and every ``m`` steps), the refined ``c`` and, all on the
device, the numbers whose signs are the step's checks: ``|g|^2`` finite, the rank-two update stable, and
no cancellation in the coming float32 ``G^T c`` (from ``|G^T c|^2 = c^T G G^T c``, before the pass). They
are read in one host synchronisation; only then is the step installed (or undone: a non-finite gradient
leaves the window as it was) and the second pass ``G^T c`` run. ``update_mul(g, check_finite=False)``
reads nothing: the numerical checks are copied to the host asynchronously and acted on at the next step.
``set_damp`` changes ``damp`` by refactoring ``P`` from the Gram matrix (O(m^3)); the window is kept.

Open choice, made explicit: while the window fills (``n < m`` gradients seen), ``average_over="seen"``
(default) uses ``s = n``: the Fisher is the average of the gradients it holds, so the first step is the
Sherman-Morrison step ``g / (damp + |g|^2)``. ``average_over="ngrads"`` uses ``s = m`` from the start, as
the paper's code does (its empty rows are zeros), so early steps are close to ``g / damp``.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mfac.fisher._sliding_state import SlidingCheckpoint
from mfac.fisher.base import InverseFisher
from mfac.numerics import (
    SMALL_DTYPE,
    DeferredChecks,
    NonFiniteGradientError,
    NumericalWarning,
    SlabbedMatvec,
    accumulated_matmul,
    allocate,
    check_damp,
    check_positive_int,
    check_same_placement,
    read_checks,
    safe_cholesky,
)

__all__ = ["SlidingInverseFisher", "check_average_over"]

logger = logging.getLogger(__name__)

#: ``sum_i |c_i| |g_i| / |G^T c|`` above which ``update_mul`` redoes ``G^T c`` in float64
#: (float32 error bound eps32 * 1e3 ~ 1e-4).
_CANCELLATION_LIMIT = 1e3

#: the choices of ``average_over`` (how ``s`` in ``(1/s) G^T G`` is chosen while the window fills).
AVERAGE_OVER = ("seen", "ngrads")
#: relative residual of ``M c = e_r`` above which the rank-one-updated inverse is refactored.
_RESIDUAL_TOL = 1e-10
#: the smallest positive normal float64: the floor of the pivots divided by in ``_replace_row``.
_TINY = torch.finfo(SMALL_DTYPE).tiny
#: ``eps * cancellation ratio`` above which ``update_mul`` warns that its accuracy is lost.
_ACCURACY_WARN = 1e-4
#: columns per float32 partial product of the window's passes (summed in float64). 32768 columns keep
#: the per-slab dispatch cost small next to the slab (m rows of 128 KB runs) and the partial sums short.
WINDOW_CHUNK = 1 << 15


@dataclass
class _Staged:
    """One step computed but not yet installed (see ``SlidingInverseFisher._stage``)."""

    row: int  # ring index the gradient goes to
    n: int  # rows stored after the step
    scale: int  # s after the step
    saved: torch.Tensor  # the Gram row r before the step, shape (n,)
    work: torch.Tensor | None  # the buffer holding the new P, shape (m, m) (refactored steps)
    coeff: torch.Tensor  # M^{-1} e_r for the new window, float64 (n,)
    checks: torch.Tensor  # [|g|^2, pivot margin, residual margin, cancellation margin], float64
    fast: bool  # P from the rank-two update (else refactored)
    jitter: float  # the jitter of the new P
    update: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (left, right, edge): see _replace_row


@dataclass
class _Scratch:
    """Buffers and views every steady-state step reuses (built on first use, never pickled: views).

    Written fresh by each rank-two step and read until its commit; made once so that a step does not
    pay an operation per buffer (a stack, a select, a diagonal view: a few microseconds each).
    """

    left: torch.Tensor  # (m, 2): [p, -w] of the rank-two update, a transposed view of (2, m) rows
    left_p: torch.Tensor  # its rows, (m,) each
    left_w: torch.Tensor
    right: torch.Tensor  # (2, m): [-p / p_rr, -w / sigma]
    right_p: torch.Tensor
    right_w: torch.Tensor  # = the new row and column r of P
    diag: torch.Tensor  # the Gram matrix's diagonal, a view of the full (m, m) matrix


def check_average_over(value: Any) -> str:
    """Return ``value`` if it is one of :data:`AVERAGE_OVER`; raise ``ValueError`` naming it otherwise."""
    if value not in AVERAGE_OVER:
        raise ValueError(f"average_over must be one of {AVERAGE_OVER}, got {value!r}")
    return value


def _verdicts(checks: list[float]) -> tuple[bool, bool, bool]:
    """``(finite, stable, plain)`` from the host values of ``_Staged.checks`` (NaN compares False).

    finite: ``|g|^2`` is finite (exactly when ``g`` is, unless its norm overflows). stable: the
    pivot margin is > 0 and the residual margin >= 0. plain: the cancellation margin is >= 0.
    """
    square, pivot, residual, cancellation = checks
    return math.isfinite(square), pivot > 0 and residual >= 0, cancellation >= 0


class SlidingInverseFisher(SlidingCheckpoint, InverseFisher):
    r"""``F^{-1}`` for ``F = damp I + (1/s) G^T G`` over the last ``ngrads`` gradients of a stream.

    Args:
        dim: ``d``, the number of coordinates.
        ngrads: ``m``, the window size (capacity of the ring buffer).
        damp: ``lambda > 0``.
        dtype: dtype of the buffer and of the vectors in and out (float32 by default).
        device: device of the buffer (``None``: the default device).
        average_over: ``"seen"`` (``s = min(num_seen, m)``, default) or ``"ngrads"`` (``s = m``
            always, the paper's choice); see the module docstring.
        chunk: columns per float32 partial product of ``G x`` (summed in float64); ``WINDOW_CHUNK``.

    Memory: ``m * d * bytes(dtype)`` for the window (e.g. ``m = 1024, d = 1e6`` in float32: 4 GiB),
    one ``(d,)`` row kept for undoing a failed step, plus ``3 * m^2 * 8`` bytes of float64 state (Gram
    matrix, ``P`` and the buffer the next ``P`` is built in). Allocation is eager and fails with the
    size asked for.

    Cost per ``update_mul``: two passes over the window (``G g`` and ``G^T c``, O(md)) plus O(m^2)
    float64 work (four passes over ``m x m`` data, ~65 small tensor operations); O(m^3) once
    every ``m`` steps (and every step while filling with ``"seen"``). One host synchronisation per step
    (none with ``check_finite=False``).
    """

    def __init__(
        self,
        dim: int,
        ngrads: int,
        damp: float,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        average_over: Literal["seen", "ngrads"] = "seen",
        chunk: int = WINDOW_CHUNK,
    ) -> None:
        check_positive_int(dim, "dim")
        check_positive_int(ngrads, "ngrads")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        damp = check_damp(damp, dtype)
        check_average_over(average_over)
        if device is not None and not isinstance(device, (str, torch.device)):
            raise TypeError(f"device must be a torch.device, a str or None, got {type(device).__name__}")
        device = torch.device(device) if device is not None else torch.empty(0).device
        if device.type == "meta":
            raise ValueError(
                "device='meta' holds no values: a sliding window must live where the gradients are "
                "computed (cpu, cuda, ...)"
            )
        self._chunk = check_positive_int(chunk, "chunk")
        super().__init__(dim, damp, dtype, device)
        self._m = ngrads
        self._average_over = average_over
        self._allocate_rows()
        self._gram = allocate((ngrads, ngrads), SMALL_DTYPE, device, "m x m Gram matrix")  # G G^T
        self._inv = allocate((ngrads, ngrads), SMALL_DTYPE, device, "m x m inverse")  # P = M^{-1}
        self._work = allocate((ngrads, ngrads), SMALL_DTYPE, device, "m x m work buffer")  # next P
        self._deferred = DeferredChecks()  # checks of an unchecked step, read at the next one
        self._slabbed: SlabbedMatvec | None = None  # the prepared G g pass
        self._scratch: _Scratch | None = None  # the step's reused buffers, see _scratch_buffers
        self._num_seen = 0
        self._since_refactor = 0
        self._jitter = 0.0

    def __getstate__(self) -> dict[str, Any]:
        # the prepared slab views and a pending device-to-host copy are rebuilt, not pickled
        return {**self.__dict__, "_slabbed": None, "_scratch": None, "_deferred": DeferredChecks()}

    # ------------------------------------------------------------------ properties
    @property
    def ngrads(self) -> int:
        """``m``: the window size."""
        return self._m

    @property
    def num_seen(self) -> int:
        """Number of gradients added since construction (or since :meth:`reset`)."""
        return self._num_seen

    @property
    def num_stored(self) -> int:
        """``n = min(num_seen, m)``: the number of gradients the Fisher currently holds."""
        return min(self._num_seen, self._m)

    @property
    def average_over(self) -> str:
        """``"seen"`` or ``"ngrads"``: how ``s`` in ``(1/s) G^T G`` is chosen while filling."""
        return self._average_over

    @property
    def scale(self) -> int:
        """``s``: the count the outer products are averaged over right now."""
        return self._m if self._average_over == "ngrads" else max(self.num_stored, 1)

    @property
    def jitter(self) -> float:
        """Diagonal jitter added to ``M`` at the last refactor (0.0 unless a breakdown was repaired)."""
        return self._jitter

    @property
    def _shift(self) -> float:
        """The diagonal of ``M`` beyond the Gram matrix: ``s * damp`` (+ jitter after a breakdown)."""
        return self.scale * self._damp + self._jitter

    @property
    def window(self) -> torch.Tensor:
        """The stored gradients, shape ``(n, d)`` (ring order, not chronological).

        A view of the live buffer, not a copy: do not write to it (the Gram matrix would no longer
        match), and ``clone()`` it to keep it past the next update.
        """
        return self._grads[: self.num_stored]

    @property
    def next_row(self) -> int:
        """Ring index the next gradient will overwrite."""
        return self._num_seen % self._m

    # ------------------------------------------------------------------ updates
    def reset(self) -> None:
        """Empty the window (``F^{-1}`` becomes ``I / damp``); keeps the allocations."""
        self._clear_rows()
        self._gram.zero_()
        self._inv.zero_()
        self._num_seen = 0
        self._since_refactor = 0
        self._jitter = 0.0
        self._deferred = DeferredChecks()

    def set_damp(self, damp: float) -> None:
        """Change ``damp`` and keep the window: ``P`` is refactored from the Gram matrix, O(m^3).

        Exactly the operator a fresh window with the new ``damp`` would build from the same gradients
        (the Gram matrix does not depend on ``damp``; only the diagonal shift ``s * damp`` of ``M``
        changes). Cost: one ``m x m`` Cholesky and inverse; nothing ``d``-sized.
        """
        damp = check_damp(damp)
        if damp == self._damp:
            return
        self._damp = damp
        if self.num_stored:
            self._refactor()

    def grow(self, dim: int, index: torch.Tensor) -> None:
        """Add coordinates to the window, in place: old coordinate ``j`` becomes coordinate ``index[j]``.

        The coordinates of ``[0, dim)`` not in ``index`` are new: zero in every stored row, which is
        exact for a coordinate whose gradient was zero in those steps (a parameter that had no
        gradient yet). A zero column adds nothing to ``G G^T``, so the Gram matrix, ``P``, the
        counters and the jitter are kept as they are: the operator equals a fresh window of ``dim``
        coordinates fed the same gradients with zeros at the new coordinates, and later steps
        continue from it (pending unchecked-step checks included).

        Args:
            dim: the new ``d``, ``>= dim`` of the window.
            index: shape ``(d_old,)``, integer, strictly increasing (the old coordinates keep their
                order), values in ``[0, dim)``.

        Raises ``TypeError`` / ``ValueError`` before anything changes; on a ``MemoryError`` the
        window is left as it was. Memory: the new storage is allocated before the old is freed
        (``m * (d_old + dim) * bytes`` at the peak for a dense window). Cost: one copy of the window;
        nothing ``m x m`` changes.
        """
        self._check_available("grow")
        check_positive_int(dim, "dim")
        if dim < self._dim:
            raise ValueError(f"dim must be >= the window's dim={self._dim} (a window only grows), got {dim}")
        if not isinstance(index, torch.Tensor) or index.is_floating_point() or index.is_complex() or (
            index.dtype == torch.bool
        ):
            raise TypeError(f"index must be an integer tensor, got {type(index).__name__} "
                            f"{getattr(index, 'dtype', '')}".rstrip())
        if index.shape != (self._dim,):
            raise ValueError(f"index must have shape ({self._dim},) (one entry per old coordinate), "
                             f"got {tuple(index.shape)}")
        index = index.to(device=self._device, dtype=torch.long)
        if self._dim and (int(index[0]) < 0 or int(index[-1]) >= dim or bool((index.diff() <= 0).any())):
            raise ValueError(f"index must be strictly increasing with values in [0, {dim}), got values "
                             f"in [{int(index.min())}, {int(index.max())}]")
        saved = dict(self.__dict__)  # references only: what a failed allocation restores
        rows = self._rows_state()
        try:
            self._dim = dim
            self._grow_rows(rows, index)
        except BaseException:
            self.__dict__.update(saved)
            raise
        self._slabbed = None  # views of the old rows

    def update(self, grad: torch.Tensor) -> None:
        """Add ``grad`` (shape ``(d,)``) as the newest gradient, dropping the oldest once full.

        Raises ``ValueError`` for a non-finite ``grad``; the window is then left untouched.
        Cost: one pass over the window plus O(m^2) (O(m^3) when refactoring).
        """
        self._check_vector(grad, "grad")
        self._update(grad)

    def update_mul(self, grad: torch.Tensor, *, check_finite: bool = True) -> torch.Tensor:
        """Add ``grad`` to the window and return ``F^{-1} grad`` for the updated window.

        Uses the cancellation-free form ``F^{-1} g_r = s G^T P e_r`` (``g_r`` is in the window), accurate
        to float32 round-off of the two passes even when ``damp`` is tiny. Shape ``(d,) -> (d,)``.

        Host synchronisations: one (the checks below, computed on the device and read together), or none
        with ``check_finite=False``. ``check_finite=True`` raises ``ValueError`` for a NaN/inf ``grad``
        (or one whose squared norm overflows) and leaves the window untouched. ``check_finite=False``
        is for callers that know the gradient is finite (e.g. after a ``GradScaler`` skipped the inf
        steps): a non-finite ``grad`` then poisons the window until it leaves it; the two numerical
        checks (stable rank-one update, cancelling float32 sum) are then read one step late, and act
        at the next step (refactor first; a debug message for a cancelled sum).
        """
        self._check_vector(grad, "grad")
        staged = self._stage(grad, checked=check_finite)
        if check_finite:
            finite, stable, plain = _verdicts(read_checks(staged.checks))
            if not finite:
                self._unstage(staged)
                self._raise_nonfinite(grad)
        else:
            self._deferred.stash(staged.checks)
            stable, plain = True, True
        coeff = self._commit(staged, stable) * staged.scale
        return self._combine_rows(coeff, plain if stable else None)

    def _update(self, grad: torch.Tensor) -> torch.Tensor:
        """Add ``grad`` with the finiteness check: returns ``c = M^{-1} e_r`` (float64, ``(n,)``)."""
        staged = self._stage(grad)
        finite, stable, _ = _verdicts(read_checks(staged.checks))
        if not finite:
            self._unstage(staged)
            self._raise_nonfinite(grad)
        return self._commit(staged, stable)

    def _warn_cancellation(self, ratio: float) -> None:
        """Warn that ``G^T c`` cancels by ``ratio``: the Gram products' rounding is amplified as much.

        The coefficients ``c`` come from Gram products rounded in the window's dtype (about
        ``eps * |g_i| |g_j|`` each), and a combination that cancels by ``ratio`` amplifies that error at
        least ``ratio`` times: the float64 redo removes the error of the combination, not this one.
        Measured (float32, m = 8, d = 2e3..2e4, damp 1e-2..1e-8): relative errors 1e-2 to 1 for
        identical or nearly identical gradients (ratio 2e3..1e12), against about 3e-7 for ordinary
        windows (ratio < 10), which never get here.
        """
        floor = torch.finfo(self._dtype).eps * ratio
        if floor <= _ACCURACY_WARN:
            return
        warnings.warn(
            f"update_mul: the window's gradients are (nearly) collinear for damp={self._damp:g}: "
            f"F^-1 g is a combination of window rows that cancels by {ratio:.1e}, which amplifies the "
            f"rounding of the {self._dtype} Gram products to a relative error of at least {floor:.0e} "
            "(measured up to O(1)). Use a float64 window or a larger damp.",
            NumericalWarning,
            stacklevel=3,
        )

    def _raise_nonfinite(self, grad: torch.Tensor) -> None:
        """Raise :class:`~mfac.numerics.NonFiniteGradientError` (a ``ValueError``) describing ``grad``."""
        nan, inf = int(torch.isnan(grad).sum()), int(torch.isinf(grad).sum())
        if nan or inf:
            raise NonFiniteGradientError(f"grad must be finite, got {nan} NaN and {inf} inf entries")
        raise NonFiniteGradientError(
            f"grad must be finite: its squared norm overflows {self._dtype}; rescale the loss or use float64"
        )

    def _combine_rows(self, coeff: torch.Tensor, plain: bool | None = True) -> torch.Tensor:
        """``G^T coeff`` in the window's dtype, recomputed in float64 when the float32 sum cancels.

        The float32 pass has an error of about ``eps * bound`` with ``bound = sum_i |c_i| |g_i|``
        (``>= |G^T c|``, from the Gram diagonal in O(n)). For ordinary windows ``bound / |G^T c|`` is
        below 10 (measured <= 6.3 on correlated gradients); for (nearly) identical gradients at small
        damp it reaches 1e6-1e7 and the float32 result is noise. Above ``_CANCELLATION_LIMIT`` the
        product is redone with the window upcast in ``chunk``-column slabs: about 3 passes instead of 1,
        only then. ``plain`` is the verdict computed before the pass from ``|G^T c|^2 = c^T (G G^T) c``
        (see :meth:`_checks`); ``None`` recomputes it here (one synchronisation, rare paths only).
        """
        n = self.num_stored
        if plain is None:
            plain = self._dtype == SMALL_DTYPE or n == 0 or bool(self._cancellation_margin(coeff) >= 0)
        if plain:
            return self._combination(coeff)
        logger.debug("update_mul: float32 combination cancels; redone in float64")
        out = self._combination_float64(coeff)
        bound = self._combination_bound(coeff)
        square = torch.linalg.vector_norm(out, dtype=SMALL_DTYPE).square().reshape(1)
        self._reduce(square)  # |G^T c|^2 over every shard's coordinates
        norm = square.sqrt()
        self._warn_cancellation(float(bound) / max(float(norm), 1e-300))  # a rare path: two host reads
        return out

    def _cancellation_margin(
        self, coeff: torch.Tensor, gram_coeff: torch.Tensor | None = None
    ) -> torch.Tensor:
        """0-d: ``|G^T c|^2 - (bound / _CANCELLATION_LIMIT)^2``, from the Gram matrix, O(n^2); >= 0: plain.

        ``|G^T c|^2 = c^T (G G^T) c`` exactly; in float64 from the float64-accumulated Gram matrix it is
        accurate (error ~1e-7 * bound^2) well past the limit's ``bound^2 / 1e6``. ``gram_coeff``
        (``G G^T c``, or that of a vector within round-off of ``c``) saves the O(n^2) product when the
        caller has it. NaN compares False.
        """
        bound = self._combination_bound(coeff)
        if gram_coeff is None:
            n = coeff.shape[0]
            gram_coeff = torch.mv(self._gram if n == self._m else self._gram[:n, :n], coeff)
        square = torch.dot(coeff, gram_coeff)
        return torch.addcmul(square, bound, bound, value=-1.0 / _CANCELLATION_LIMIT**2)

    def _combination_bound(self, coeff: torch.Tensor) -> torch.Tensor:
        """0-d: ``sum_i |c_i| |g_i|`` (``>= |G^T c|``, the scale of its rounding), from the Gram diagonal."""
        return torch.dot(coeff.abs(), self._gram_diagonal(coeff.shape[0]).clamp_min(0.0).sqrt_())

    def _gram_diagonal(self, n: int) -> torch.Tensor:
        """Return the first ``n`` entries of the Gram diagonal (a view; the reused one when ``n = m``)."""
        return self._scratch_buffers().diag if n == self._m else self._gram.diagonal()[:n]

    # ------------------------------------------------------------------ the staged step
    def _stage(self, grad: torch.Tensor, checked: bool = True) -> _Staged:
        """Compute everything a step needs, changing only what :meth:`_unstage` can undo; no host read.

        ``grad`` goes into row ``r`` (with ``checked``, the row it replaces is first kept in a ``(d,)``
        buffer: one copy, what :meth:`_unstage` restores), the Gram column ``G g`` is one pass over the
        new window (``|g|^2`` at ``r``, computed by the same kernel as the other entries: a window of
        identical gradients gets an exactly rank-one float Gram matrix), the Gram column is written (its
        old values saved) and the new ``P`` is staged (the rank-two update, applied at :meth:`_commit`;
        a refactor is built in the spare buffer). The checks are numbers on the
        device (see :func:`_verdicts`), stacked into one tensor for one read.
        """
        self._apply_deferred()
        m, seen = self._m, self._num_seen
        row = seen % m
        n = min(seen + 1, m)
        scale = m if self._average_over == "ngrads" else n
        new_row = self._new_row(grad)
        self._write_row(row, new_row, checked)  # checked: keep what a failed check restores
        col = self._row_products(new_row, n)  # G g accumulated in float64; col[row] = |g|^2
        self._reduce(col)
        square = col[row]
        gram = self._gram if n == m else self._gram[:n, :n]
        gram_row, gram_col = gram[row], gram.select(1, row)
        if checked:
            saved, entry = gram_row.clone(), square
        else:  # nothing is undone: keep a non-finite column out of the m x m state
            saved = col
            col = torch.nan_to_num(col, nan=0.0, posinf=0.0, neginf=0.0)
            entry = col[row]
        gram_row.copy_(col)
        gram_col.copy_(col)
        fast = seen >= m and scale == self.scale and self._since_refactor < m
        work, update = None, None
        if fast:
            coeff, margins, update, gram_coeff = self._replace_row(row, col, entry)
            jitter = self._jitter
        else:
            coeff, margins, work, gram_coeff = self._refactored(row, n, scale)
            jitter = 0.0
        if self._dtype == SMALL_DTYPE:
            plain = torch.ones_like(square)
        else:
            plain = self._cancellation_margin(coeff, gram_coeff)  # scale-free test
        checks = torch.stack([square, *margins, plain])  # one tensor: one host read
        return _Staged(row, n, scale, saved, work, coeff, checks, fast, jitter, update)

    def _gram_pass(self, n: int) -> SlabbedMatvec:
        """Return the prepared ``G[:n] @ x`` (float64-accumulated slabs), rebuilt when ``n`` changes."""
        gram_pass = self._slabbed
        if gram_pass is None or gram_pass.shape[0] != n:
            gram_pass = self._slabbed = SlabbedMatvec(self._grads[:n], self._chunk)
        return gram_pass

    def _scratch_buffers(self) -> _Scratch:
        """Return the step's reused buffers and views (:class:`_Scratch`), made on first use."""
        scratch = self._scratch
        if scratch is None:
            left = torch.zeros(2, self._m, dtype=SMALL_DTYPE, device=self._device)
            right = torch.zeros_like(left)
            scratch = self._scratch = _Scratch(
                left.T, *left.unbind(0), right, *right.unbind(0), self._gram.diagonal())
        return scratch

    def _unstage(self, staged: _Staged) -> None:
        """Undo what :meth:`_stage` wrote (the window row and the Gram row and column ``r``)."""
        row, n = staged.row, staged.n
        self._restore_row(row)
        self._gram[row, :n] = staged.saved
        self._gram[:n, row] = staged.saved

    def _commit(self, staged: _Staged, stable: bool) -> torch.Tensor:
        """Install the new ``P`` and count the step; refactor when the staged one was not stable."""
        self._num_seen += 1
        if staged.update is None:
            self._inv, self._work = staged.work, self._inv
        elif stable:  # the rank-two update, in place (an unstable one is refactored from the Gram matrix)
            left, right, edge = staged.update
            inv = self._inv
            inv.addmm_(left, right)
            inv[staged.row].copy_(edge)
            inv.select(1, staged.row).copy_(edge)
        self._jitter = staged.jitter
        if stable:
            self._since_refactor = self._since_refactor + 1 if staged.fast else 0
            return staged.coeff
        logger.debug("sliding window: rank-one update of P not stable at row %d; refactored", staged.row)
        self._refactor()
        return self._refined_column(staged.row, staged.n, self._shift)[0]

    def _apply_deferred(self) -> None:
        """Act on the checks of the previous unchecked step (``check_finite=False``), read one step late."""
        values = self._deferred.take()
        if values is None:
            return
        _, stable, plain = _verdicts(values)
        if not stable and self.num_stored:
            logger.debug("sliding window: last step's rank-one update was not stable; refactored")
            self._refactor()
        if not plain:
            logger.debug("update_mul: last step's float32 combination cancelled (unchecked step)")

    def _system(self, jitter: float = 0.0, n: int | None = None, scale: int | None = None) -> torch.Tensor:
        """``M = s damp I + G G^T (+ jitter I)`` over the stored rows, float64, shape ``(n, n)``."""
        n = self.num_stored if n is None else n
        scale = self.scale if scale is None else scale
        system = self._gram[:n, :n].clone()
        system.diagonal().add_(scale * self._damp + jitter)
        return system

    def _factor(self) -> torch.Tensor:
        """Cholesky factor of ``M`` (float64); records the jitter a breakdown needed."""
        factor, self._jitter = safe_cholesky(
            self._system(), what="m x m system s*damp*I + G G^T", entry_dtype=self._dtype
        )
        return factor

    def _refactor(self) -> None:
        n = self.num_stored
        factor = self._factor()
        self._inv.zero_()
        self._inv[:n, :n] = torch.cholesky_inverse(factor)
        self._since_refactor = 0

    def _refactored(
        self, row: int, n: int, scale: int
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]:
        """``P`` refactored into the spare buffer (no jitter); margins > 0 iff the Cholesky succeeded.

        A failed factorization (rounding made ``M`` indefinite) reports ``stable = False``; the commit
        then refactors with :func:`~mfac.numerics.safe_cholesky`, which adds jitter and warns.
        """
        factor, info = torch.linalg.cholesky_ex(self._system(0.0, n, scale))  # info: no host read
        work = self._work
        work.zero_()
        work[:n, :n] = torch.cholesky_inverse(factor)
        coeff, rel, gram_coeff = self._refined_column(row, n, scale * self._damp, work)
        ok = torch.where(info == 0, 1.0, -1.0).to(SMALL_DTYPE)
        return coeff, (ok, 0.0 * rel), work, gram_coeff

    def _refined_column(
        self, row: int, n: int, shift: float, inv: torch.Tensor | None = None,
        pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``c = M^{-1} e_r`` from ``P`` plus one step of iterative refinement, the relative residual.

        ``r = e_r - M c0`` costs one O(n^2) product; ``c = c0 + P r`` removes most of the error that
        ``P`` carries (the forward error of ``c0`` is up to cond(M) times ``P``'s backward error).
        The residual ``|r| / (|M| |c0|)`` is returned as a 0-d tensor (no host synchronisation here),
        and ``G G^T c0`` (for :meth:`_cancellation_margin`).

        ``pending = (left, right, edge)``: the new ``P`` is ``inv + left @ right`` with row and column
        ``r`` equal to ``edge`` (not yet applied, see :meth:`_replace_row`); then ``c0 = edge`` and
        ``P r = inv r + left (right r)`` (the exact row/column ``r`` changes ``P r`` only at second
        order: both ``P r`` terms are round-off sized).
        """
        inv = self._inv if inv is None else inv
        gram = self._gram
        if n < self._m:
            inv, gram = inv[:n, :n], gram[:n, :n]
        diag = self._gram_diagonal(n)
        c0 = inv[row] if pending is None else pending[2]  # P is symmetric: row r is column r
        gram_c0 = torch.mv(gram, c0)
        neg_resid = torch.add(gram_c0, c0, alpha=shift)  # -r = M c0 - e_r (the sign flips are exact)
        neg_resid[row].sub_(1.0)
        scale = (diag.amax() + shift) * torch.linalg.vector_norm(c0, math.inf)
        rel = torch.linalg.vector_norm(neg_resid, math.inf) / scale
        refined = torch.addmv(c0, inv, neg_resid, alpha=-1.0)  # c0 + P r
        if pending is not None:
            left, right, _ = pending
            refined.addmv_(left, torch.mv(right, neg_resid), alpha=-1.0)
        return refined, rel, gram_c0

    def _replace_row(
        self, row: int, col: torch.Tensor, entry: torch.Tensor
    ) -> tuple[
        torch.Tensor,
        tuple[torch.Tensor, torch.Tensor],
        tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        torch.Tensor,
    ]:
        """Stage the new ``P = M^{-1}`` for a new row/column ``row`` of ``M`` in O(m^2), as a rank-two update.

        Remove: ``P' = P - p p^T / p_rr`` (``p = P e_r``) is the inverse of ``M`` without row/column
        ``row``, embedded with zeros. Add: with ``b`` the new column without its diagonal entry ``v_r``,
        ``u = P' b = P b - p (p^T b) / p_rr``, the Schur complement ``sigma = v_r - b^T u`` and
        ``w = u - e_r``, the new inverse is ``P' + w w^T / sigma``. Both corrections are applied as one
        rank-two product ``P + [p, w] diag(-1/p_rr, 1/sigma) [p, w]^T``, and row/column ``r`` are then
        set to their exact value ``-w / sigma``. Nothing is written here: the product is applied to
        ``P`` in place when the step is committed (:meth:`_commit`, one read and one write of ``P``),
        so a step that fails its checks has nothing to undo, and no ``m x m`` copy is made (measured
        at m = 1024: building the new ``P`` in the spare buffer, ``addmm(out=)``, cost 2.7 ms of CPU
        time, the in-place ``addmm_`` 1.0 ms). The refinement of ``c`` reads the old ``P`` once more
        (:meth:`_refined_column` with ``pending``): four O(m^2) passes in all (``P b``, ``G G^T c0``,
        ``P r``, the update).

        Args: ``row`` (the ring index ``r``; the window is full, ``n = m``), ``col`` (the new Gram
        column ``G g``, float64 ``(m,)``, as just written into the Gram matrix) and ``entry`` (its
        entry ``|g|^2`` at ``r``, 0-d).

        Returns the refined ``c = M^{-1} e_r``, the stability margins (two 0-d tensors: the smaller of
        the pivot ``p_rr`` and ``sigma - 1e-13 v_r``, and ``tol - residual``; stable iff they are > 0
        and >= 0, see :func:`_verdicts`; the caller refactors otherwise), the pending update
        ``(left, right, edge)`` and ``G G^T c`` (see :meth:`_refined_column`).

        Fixed cost: every line is one or two small tensor operations (a few microseconds each of
        dispatch and Python, whatever ``m``; on a GPU, a launch each), so the step is written with as
        few of them as the math allows: ``-b``, ``-u``, ``-w`` and ``-r`` are carried instead of
        ``b``, ``u``, ``w``, ``r`` (a negation is exact; it saves a copy and the sign flips), the
        clamped pivot is formed once, single entries are written through views (``x[r].fill_``: a
        select and a fill, where ``x[r] = v`` also copies back), ``[p, -w]`` and ``[-p / p_rr,
        -w / sigma]`` are written into buffers made once (:class:`_Scratch`: no stacks), and the
        checks are stacked once. One checked steady-state ``update_mul`` at ``d = 1e5`` (4 slabs) went
        from 98 aten operations to 68 (``tests/test_optim_device_ready.py`` bounds the count), and the
        fixed cost (one thread, ``d = 2000`` where the ``d``-sized work is negligible, thread time
        over 1000 steps interleaved with the former code in one process, a loaded 2-core machine)
        from 0.61 / 0.43 ms (median / min) to 0.48 / 0.36 ms at ``m = 64`` (0.78x), from 1.13 / 0.72
        ms to 0.96 / 0.60 ms at ``m = 256`` (0.85x). ``torch.compile`` of this ``m x m`` stage was
        measured too and is not offered: with dynamic shapes (one compilation) it saved nothing on the
        step at ``m = 64`` and lost at ``m = 256``; with static shapes it recompiles for every row.
        """
        shift = self._shift
        inv = self._inv
        buf = self._scratch_buffers()  # left = [p, -w], right = [-p / p_rr, -w / sigma], written here
        p = inv[row]  # = P e_r (P is symmetric; row r is contiguous); inv is only read below
        pivot = p[row]
        neg_pivot = pivot.clamp_min(_TINY).neg()
        neg_b = torch.neg(col)  # -b: the Gram column r (a fresh tensor: col itself is not changed)
        neg_b[row].zero_()  # b without its diagonal entry
        diag = entry + shift  # v_r
        buf.left_p.copy_(p)
        neg_u = torch.mv(inv, neg_b, out=buf.left_w)  # -P b
        neg_u.addcmul_(p, torch.dot(p, neg_b) / neg_pivot)  # -P' b = -(P b - p (p^T b) / p_rr)
        sigma = diag - torch.dot(neg_b, neg_u)  # v_r - b^T u
        neg_u[row].fill_(1.0)  # -w
        torch.div(p, neg_pivot, out=buf.right_p)
        edge = torch.div(neg_u, sigma.clamp_min(_TINY), out=buf.right_w)  # -w / sigma: row/column r of new P
        pending = (buf.left, buf.right, edge)
        coeff, rel, gram_coeff = self._refined_column(row, self._m, shift, inv, pending)
        margins = (torch.minimum(pivot, torch.add(sigma, diag, alpha=-1e-13)), _RESIDUAL_TOL - rel)
        return coeff, margins, pending, gram_coeff

    # ------------------------------------------------------------------ hooks
    def _check_vector(self, vec: torch.Tensor, name: str) -> None:
        if not isinstance(vec, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(vec).__name__}")
        check_same_placement(vec, name, self._dtype, self._device)
        if vec.shape != (self._dim,):
            raise ValueError(f"{name} must have shape ({self._dim},), got {tuple(vec.shape)}")

    def _mul(self, x: torch.Tensor) -> torch.Tensor:
        n = self.num_stored
        if n == 0:
            return x / self._damp
        proj = self._products(x.T)  # (n, k) float64
        self._reduce(proj)
        coeff = (self._inv[:n, :n] @ proj).to(self._dtype)  # (n, k)
        return self._subtract_combination(x, coeff).div_(self._damp)

    def _diag(self) -> torch.Tensor:
        n = self.num_stored
        out = torch.full((self._dim,), 1.0 / self._damp, dtype=self._dtype, device=self._device)
        if n == 0:
            return out
        factor, _ = safe_cholesky(self._system(self._jitter), what="m x m system", entry_dtype=self._dtype)
        # no half-precision triangular solve on CPU: half windows solve in float32, slab by slab
        work = torch.float32 if self._dtype in (torch.float16, torch.bfloat16) else self._dtype
        factor = factor.to(work)
        for start in range(0, self._dim, self._chunk):
            sl = slice(start, start + self._chunk)
            q = torch.linalg.solve_triangular(factor, self._columns(sl).to(work), upper=False)
            out[sl] -= q.square().sum(0) / self._damp
        return out

    def _submatrix(self, idx: torch.Tensor) -> torch.Tensor:
        n = self.num_stored
        same = (idx[:, None] == idx[None, :]).to(self._dtype)
        if n == 0:
            return same / self._damp
        cols = self._columns_at(idx).to(SMALL_DTYPE)  # (n, s)
        inner = cols.T @ self._inv[:n, :n] @ cols
        return (same - inner.to(self._dtype)) / self._damp

    # ------------------------------------------------------------------ storage hooks
    # The only places that touch the stored rows. A variant with another storage (compressed rows:
    # mfac.fisher.compressed) overrides these and inherits all the m x m algebra above.
    def _allocate_rows(self) -> None:
        """Allocate the row storage for ``m`` rows of ``d`` coordinates (called by ``__init__``)."""
        self._grads = allocate((self._m, self._dim), self._dtype, self._device, "gradient window")
        self._old_row = torch.empty(self._dim, dtype=self._dtype, device=self._device)  # for _unstage

    def _clear_rows(self) -> None:
        """Zero every stored row (``reset``)."""
        self._grads.zero_()

    def _new_row(self, grad: torch.Tensor) -> Any:
        """Return the row to store for a validated gradient: ``grad`` itself."""
        return grad

    def _write_row(self, row: int, grad: Any, keep_old: bool) -> None:
        """Store :meth:`_new_row`'s result in ring slot ``row`` (``keep_old``: for :meth:`_restore_row`)."""
        dest = self._grads[row]
        if keep_old:
            self._old_row.copy_(dest)
        dest.copy_(grad)

    def _restore_row(self, row: int) -> None:
        """Undo the last :meth:`_write_row` made with ``keep_old`` (a step that failed its checks)."""
        self._grads[row].copy_(self._old_row)

    def _row_products(self, grad: Any, n: int) -> torch.Tensor:
        """``G g`` over the first ``n`` rows (the new one included), float64, shape ``(n,)``."""
        return self._gram_pass(n)(grad)

    def _products(self, cols: torch.Tensor) -> torch.Tensor:
        """``G cols`` over the stored rows, float64: ``cols`` ``(d, k)`` -> ``(n, k)``."""
        return accumulated_matmul(self._grads[: self.num_stored], cols, chunk=self._chunk)

    def _combination(self, coeff: torch.Tensor) -> torch.Tensor:
        """``G^T coeff`` in the window's dtype: ``coeff`` float64 ``(n,)`` -> ``(d,)``."""
        n = self.num_stored
        window = self._grads if n == self._m else self._grads[:n]
        return torch.mv(window.T, coeff.to(self._dtype))

    def _combination_float64(self, coeff: torch.Tensor) -> torch.Tensor:
        """``G^T coeff`` computed in float64 (the window upcast ``chunk`` columns at a time)."""
        window = self._grads[: self.num_stored]
        out = torch.empty(self._dim, dtype=self._dtype, device=self._device)
        for start in range(0, self._dim, self._chunk):
            sl = slice(start, start + self._chunk)
            out[sl] = coeff @ window[:, sl].to(SMALL_DTYPE)
        return out

    def _subtract_combination(self, x: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
        """``x - coeff^T G`` (new tensor): ``x`` ``(k, d)``, ``coeff`` ``(n, k)``, the window's dtype."""
        return torch.addmm(x, coeff.T, self._grads[: self.num_stored], alpha=-1.0)

    def _columns(self, cols: slice | torch.Tensor) -> torch.Tensor:
        """Columns ``G[:, cols]`` of the stored rows, dense, shape ``(n, len(cols))``."""
        return self._grads[: self.num_stored, cols]

    def _columns_at(self, idx: torch.Tensor) -> torch.Tensor:
        """Columns ``G[:, idx]`` for validated operator coordinates (``submatrix``), ``(n, s)``.

        A placement hook: :meth:`_columns` here; a sharded window gathers them from the ranks holding them.
        """
        return self._columns(idx)

    def _grow_rows(self, rows: dict[str, torch.Tensor], index: torch.Tensor) -> None:
        """Allocate the storage for the new ``d`` and put the old rows ``rows`` at columns ``index``."""
        self._allocate_rows()
        self._grads[:, index] = rows["grads"]

    def _rows_state(self) -> dict[str, torch.Tensor]:
        """Return the row storage as named tensors (checkpoints copy into them in place)."""
        return {"grads": self._grads}
