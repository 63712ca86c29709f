"""Gradient sources: a model, a loss and data -> the ``(m, d)`` gradient matrix ``G``.

Conventions
-----------
* ``data`` is any iterable of batches (a ``DataLoader``, a list, a generator).
* ``loss_fn(model, batch)`` returns the scalar loss of one batch (a 0-dim or one-element tensor).
* The parameters are a :class:`~mfac.params.ParamSpace`, or names resolved with
  ``ParamSpace.from_module`` (user-facing names: ``"fc.weight"`` also for a module pruned by
  ``torch.nn.utils.prune``, whose gradient is then read from ``weight_orig``).

Two kinds of rows:

* **mini-batch** (default, the paper's): row ``i`` is the gradient of the loss of batch ``i``.
* **per-sample** (``per_sample=True``): each sample of each batch gives one row, computed with
  ``torch.func`` (``functional_call`` + ``vmap(grad_and_value)``). A batch must then be a tensor,
  a tuple/list of tensors or a dict of tensors, all with the sample dimension first and the same
  number of samples. Each sample is handed to ``loss_fn`` as a batch of size one (its tensors keep
  a leading dimension of size 1), so a ``loss_fn`` written for mini-batches works unchanged as long
  as it is vmap-compatible: no ``.item()``, no data-dependent Python control flow, no in-place
  updates of buffers (put batch-norm models in eval mode, ``train=False``). Random operations
  (dropout in train mode) draw independent numbers per sample (``vmap(randomness="different")``).

Model state: collecting leaves the model as it was found. Parameters are not written, every
``.grad`` and every module's train/eval mode are put back, and the running statistics of
normalization layers (BatchNorm's ``running_mean``, ``running_var``, ``num_batches_tracked``) are
copied back after the forward passes. They are restored, not frozen: a model in train mode is
differentiated with its batch statistics, as in training; pass ``train=False`` for eval-mode
(running-statistics) gradients.

Memory: the result holds ``m * d * bytes`` (logged up front at INFO level). Mini-batch rows need
one extra gradient of ``d`` entries at a time; per-sample rows need the gradients of one batch,
``batch_size * d`` entries, at a time.

:func:`stream_grads` yields the same rows as chunks of ``chunk`` rows from one reused buffer
(``chunk * d * bytes``): for consumers that fold gradients into smaller statistics and never need
``G`` (the block-diagonal Fisher of :class:`~mfac.fisher.BlockFisherAccumulator`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from mfac._reparam import reparametrized_leaves
from mfac.numerics import allocate, check_not_meta, check_positive_int, format_bytes
from mfac.params import ParamSpace

logger = logging.getLogger(__name__)

__all__ = ["collect_grads", "evaluate_loss", "stream_grads"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]

#: with ``progress=None`` a progress bar is shown (on a terminal) when ``ngrads * d`` reaches this.
PROGRESS_THRESHOLD = 10**8


# ------------------------------------------------------------------------------- helpers
#: buffers of normalization layers that a forward pass in train mode moves
RUNNING_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _running_stats(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(buffer, copy)`` of every running statistic (BatchNorm, SyncBatchNorm, InstanceNorm, ...)."""
    saved = []
    for module in model.modules():
        for key in RUNNING_STAT_BUFFERS:
            buf = module._buffers.get(key)
            if isinstance(buf, torch.Tensor) and not buf.is_meta:
                saved.append((buf, buf.detach().clone()))
    return saved


@contextmanager
def _preserved_state(model: nn.Module, train: bool | None) -> Iterator[None]:
    """Set the train/eval mode (if ``train`` is not None); restore modes, grads and statistics on exit.

    Every module's ``training`` flag, every parameter's ``.grad`` (None included) and the running
    statistics of normalization layers (:data:`RUNNING_STAT_BUFFERS`: ``running_mean``,
    ``running_var``, ``num_batches_tracked``, copied back in place, so the buffer tensors keep their
    identity) are restored, exceptions included. The statistics are *restored*, not frozen: in train
    mode each forward pass still normalizes with its batch's statistics, so the gradients are those
    of the training loss. Memory: one copy of those buffers (two per channel of each norm layer).
    """
    modes = [(module, module.training) for module in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    stats = _running_stats(model)
    try:
        if train is not None:
            model.train(train)
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        for p, g in grads:
            p.grad = g
        with torch.no_grad():
            for buf, value in stats:
                buf.copy_(value)


@contextmanager
def _preserved_prune_attributes(model: nn.Module) -> Iterator[None]:
    """Restore ``module.weight`` of torch.nn.utils.prune modules after a ``torch.func`` call.

    The prune forward pre-hook stores ``weight_orig * weight_mask`` as a plain attribute; under
    ``vmap`` that would leave a dead functorch tensor on the module.
    """
    saved = []
    for module in model.modules():
        for base in reparametrized_leaves(module):
            if base in module.__dict__:
                saved.append((module, base, module.__dict__[base]))
    try:
        yield
    finally:
        for module, base, value in saved:
            setattr(module, base, value)


def _resolve_space(model: nn.Module, params: Sequence[str] | ParamSpace | None) -> ParamSpace:
    if isinstance(params, ParamSpace):
        space = params
        owned = {id(p) for p in model.parameters()}
        foreign = [n for n, p in space.named_params() if id(p) not in owned]
        if foreign:
            raise ValueError(
                f"params {foreign} of the given ParamSpace are not parameters of the model"
            )
    else:
        space = ParamSpace.from_module(model, params)
    frozen = [n for n, p in space.named_params() if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"params {frozen} have requires_grad=False: their gradients would be all zeros; "
            "leave them out of params"
        )
    return space


def _check_scalar(loss: Any) -> None:
    """Check what ``loss_fn`` returned (every path): a tensor (``TypeError``), one entry (``ValueError``)."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a scalar torch.Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar loss, got shape {tuple(loss.shape)}")


def _check_loss(loss: Any, row: int) -> torch.Tensor:
    _check_scalar(loss)
    if not bool(torch.isfinite(loss.detach()).all()):
        raise ValueError(f"loss of gradient row {row} is {loss.item()}, must be finite")
    if not loss.requires_grad:
        raise ValueError(_detached_message(f"the loss of gradient row {row}"))
    return loss.reshape(())


def _detached_message(what: str) -> str:
    return (
        f"{what} does not require grad: loss_fn returned a detached loss (.detach(), .item() turned "
        "back into a tensor, or computed under torch.no_grad() / inference_mode), or one that uses none "
        "of the parameters; return the loss autograd can differentiate"
    )


def _check_rows(out: torch.Tensor, start: int, space: ParamSpace, masked: bool) -> None:
    """Raise ``ValueError`` naming the first row and parameter of ``out`` with a NaN or inf."""
    if bool(torch.isfinite(out).all()):
        return
    bad_rows = (~torch.isfinite(out)).any(dim=-1).nonzero().squeeze(1)
    row = int(bad_rows[0])
    for name, sl in space.named_slices(masked=masked).items():
        if not bool(torch.isfinite(out[row, sl]).all()):
            raise ValueError(
                f"gradient row {start + row} is not finite in parameter {name!r} "
                "(NaN or inf); check the loss and the data of that batch/sample"
            )
    raise AssertionError("unreachable")


class _Rows:
    """Pulls batches from ``data`` (restarting it when ``cycle``) and counts what was used."""

    def __init__(self, data: Iterable[Any], ngrads: int, cycle: bool) -> None:
        self.data = data
        self.ngrads = ngrads
        self.cycle = cycle
        self.rows = 0
        self.batches = 0
        self.rows_this_pass = 0
        self.passes = 1
        try:
            self._it = iter(data)
        except TypeError:
            raise TypeError(
                "data must be an iterable of batches (a DataLoader, a list), "
                f"got {type(data).__name__}"
            ) from None

    def next_batch(self) -> Any:
        while True:
            try:
                batch = next(self._it)
            except StopIteration:
                self._restart()
                continue
            self.batches += 1
            return batch

    def _restart(self) -> None:
        if self.rows == 0:
            raise ValueError(
                f"data yielded no gradients ({self.batches} batches); it must not be empty"
            )
        if not self.cycle:
            raise ValueError(
                f"data ran out after {self.rows} gradients ({self.batches} batches), but "
                f"ngrads={self.ngrads} were asked for; give more data, a smaller ngrads, or "
                "cycle=True to restart the data"
            )
        if self.rows_this_pass == 0:
            hint = (
                " (data is a one-shot iterator: cycle=True needs a re-iterable, e.g. a list or "
                "a DataLoader)"
                if iter(self.data) is self.data
                else ""
            )
            raise ValueError(
                f"a full pass over data yielded no gradients (pass {self.passes}, after "
                f"{self.rows} of ngrads={self.ngrads}){hint}"
            )
        logger.debug(
            "collect_grads: restarting data after pass %d (%d rows)", self.passes, self.rows
        )
        self._it = iter(self.data)
        self.passes += 1
        self.rows_this_pass = 0

    def add(self, n: int) -> None:
        self.rows += n
        self.rows_this_pass += n


def _progress_bar(progress: bool | None, ngrads: int, dim: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    if progress is None:
        disable: bool | None = None if ngrads * dim >= PROGRESS_THRESHOLD else True
    else:
        disable = not progress
    return tqdm(total=ngrads, desc=desc, unit="grad", disable=disable, leave=False)


# ------------------------------------------------------------------------------- per-sample
def _split_samples(batch: Any) -> tuple[Any, int]:
    """Check a per-sample batch; return it with tensors only and its number of samples."""
    if isinstance(batch, torch.Tensor):
        leaves = [batch]
    elif isinstance(batch, (tuple, list)):
        leaves = list(batch)
    elif isinstance(batch, dict):
        leaves = list(batch.values())
    else:
        raise TypeError(
            "with per_sample=True a batch must be a tensor, a tuple/list of tensors or a dict "
            f"of tensors (sample dimension first), got {type(batch).__name__}"
        )
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
            what = "a 0-dim tensor" if isinstance(leaf, torch.Tensor) else type(leaf).__name__
            raise TypeError(
                "with per_sample=True every element of a batch must be a tensor whose first "
                f"dimension indexes samples, got {what}"
            )
    if not leaves:
        raise ValueError("with per_sample=True a batch must hold at least one tensor, got none")
    sizes = {leaf.shape[0] for leaf in leaves}
    if len(sizes) != 1:
        raise ValueError(
            f"with per_sample=True all tensors of a batch must have the same number of samples "
            f"(first dimension), got {sorted(sizes)}"
        )
    return batch, sizes.pop()


def _take(batch: Any, n: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, dict):
        return {k: v[:n] for k, v in batch.items()}
    return type(batch)(v[:n] for v in batch) if isinstance(batch, list) else tuple(
        v[:n] for v in batch
    )


def _as_batch_of_one(sample: Any) -> Any:
    if isinstance(sample, torch.Tensor):
        return sample.unsqueeze(0)
    if isinstance(sample, dict):
        return {k: v.unsqueeze(0) for k, v in sample.items()}
    return type(sample)(v.unsqueeze(0) for v in sample)


class _LossOfModel(nn.Module):
    """``loss_fn(model, batch)`` as a module, so ``functional_call`` can swap model parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def _per_sample_grad_fn(
    model: nn.Module, loss_fn: LossFn, space: ParamSpace
) -> Callable[[Any], tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    from torch.func import functional_call, grad_and_value, vmap

    names_by_id = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    keys = [f"model.{names_by_id[id(p)]}" for p in space.params]
    wrapper = _LossOfModel(model, loss_fn)

    def sample_loss(values: tuple[torch.Tensor, ...], sample: Any) -> torch.Tensor:
        swapped = dict(zip(keys, values, strict=True))
        loss = functional_call(wrapper, swapped, (_as_batch_of_one(sample),))
        _check_scalar(loss)
        if not loss.requires_grad:  # inside torch.func.grad: False exactly for a loss cut from the params
            raise ValueError(_detached_message("a per-sample loss"))
        return loss.reshape(())

    # randomness="different": each sample draws its own random numbers (dropout), like a loop would
    batched = vmap(grad_and_value(sample_loss), in_dims=(None, 0), randomness="different")
    values = tuple(p.detach() for p in space.params)

    def compute(batch: Any) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        return batched(values, batch)

    return compute


# ------------------------------------------------------------------------------- public
def _setup(
    model: nn.Module, loss_fn: LossFn, ngrads: int, params: Any, masked: bool
) -> tuple[int, ParamSpace, int]:
    """Validate the common arguments; return ``(ngrads, space, width)``."""
    ngrads = check_positive_int(ngrads, "ngrads")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
    space = _resolve_space(model, params)
    for name, p in space.named_params():
        check_not_meta(p, f"parameter {name!r}")
    if masked and not space.has_masks:
        raise ValueError("masked=True needs params to be a ParamSpace with masks, got none")
    return ngrads, space, space.kept_dim if masked else space.dim


def _chunks(
    model: nn.Module, loss_fn: LossFn, data: Iterable[Any], space: ParamSpace, masked: bool,
    per_sample: bool, cycle: bool, train: bool | None, progress: bool | None, buf: torch.Tensor,
    ngrads: int,
) -> Iterator[torch.Tensor]:
    """Fill ``buf`` (``(chunk, width)``) with gradient rows and yield ``buf[:j]`` each time it is full."""
    rows = _Rows(data, ngrads, cycle)
    desc = "per-sample gradients" if per_sample else "gradients"
    bar = _progress_bar(progress, ngrads, buf.shape[1], desc)
    try:
        with _preserved_state(model, train):
            if per_sample:
                yield from _per_sample_chunks(model, loss_fn, space, masked, buf, rows, bar)
            else:
                yield from _mini_batch_chunks(loss_fn, model, space, masked, buf, rows, bar)
    finally:
        bar.close()
    logger.debug(
        "collect: %d rows from %d batches in %d pass(es)", rows.rows, rows.batches, rows.passes
    )


def stream_grads(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    ngrads: int,
    *,
    chunk: int = 32,
    params: Sequence[str] | ParamSpace | None = None,
    per_sample: bool = False,
    cycle: bool = False,
    masked: bool = False,
    train: bool | None = None,
    progress: bool | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the ``ngrads`` gradient rows of :func:`collect_grads` as chunks of at most ``chunk`` rows.

    The same rows in the same order as ``collect_grads`` (``torch.cat`` of the chunks equals its ``G``), but
    never more than ``chunk`` of them at a time: the consumer (e.g.
    :class:`~mfac.fisher.BlockFisherAccumulator`) folds each chunk into its own statistics.

    Args:
        model: the model; its parameters are not modified.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        data: iterable of batches (see :func:`collect_grads`).
        ngrads: ``m``, the number of rows in all, >= 1.
        chunk: rows per yielded tensor (the last one may hold fewer).
        params: which parameters make the columns (see :func:`collect_grads`).
        per_sample: one row per sample instead of per batch.
        cycle: restart ``data`` when it runs out.
        masked: rows of the kept coordinates of a masked ``ParamSpace`` only.
        train: train/eval mode while streaming (None keeps it); restored when the stream ends.
        progress: a tqdm bar (see :func:`collect_grads`).

    Yields:
        Shape ``(k, width)`` with ``1 <= k <= chunk``; ``width = d`` (``k`` kept when ``masked``). **The
        same buffer is reused**: a chunk is overwritten by the next one, so copy it to keep it.

    Memory: ``chunk * width * bytes`` for the buffer (plus, per sample, one batch's gradients).
    The arguments are checked when ``stream_grads`` is called; gradients are computed lazily while the
    stream is iterated, and the model's modes and ``.grad`` are restored when it ends (or is closed).
    Running out of data raises ``ValueError`` during iteration (after the rows that were available).
    """
    ngrads, space, width = _setup(model, loss_fn, ngrads, params, masked)
    chunk = min(check_positive_int(chunk, "chunk"), ngrads)
    buf = allocate((chunk, width), space.dtype, space.device, "gradient chunk")  # (chunk, width)
    return _chunks(model, loss_fn, data, space, masked, per_sample, cycle, train, progress, buf, ngrads)


def collect_grads(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    ngrads: int,
    *,
    params: Sequence[str] | ParamSpace | None = None,
    per_sample: bool = False,
    cycle: bool = False,
    masked: bool = False,
    train: bool | None = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """Collect ``ngrads`` gradients of ``loss_fn`` as the rows of ``G``, shape ``(ngrads, d)``.

    Row ``i`` is the gradient of the loss of the ``i``-th batch (mini-batch mode, the paper's) or
    of the ``i``-th sample (``per_sample=True``, see the module docstring for what a batch must
    be). Exactly ``ngrads`` rows; batches are pulled lazily and no more than needed (the last batch
    may be used in part in per-sample mode). :func:`stream_grads` gives the same rows chunk by chunk.

    Args:
        model: the model; its parameters are not modified.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        data: iterable of batches. It is iterated once (``iter(data)``) unless ``cycle``.
        ngrads: ``m``, the number of rows, >= 1.
        params: which parameters make the columns: a list of (user-facing) names, any order, or
            None for every parameter with ``requires_grad``; the columns follow the order of
            ``model.named_parameters()`` (see ``ParamSpace.from_module``). Or a ``ParamSpace`` of
            the model's parameters, whose layout (and masks) is then used as is.
        per_sample: one row per sample instead of per batch, computed with ``torch.func``.
        cycle: when ``data`` runs out before ``ngrads`` rows, start it again (``iter(data)``)
            instead of raising. A full pass that yields nothing raises.
        masked: keep only the kept coordinates of a masked ``ParamSpace``: rows of ``k`` entries.
        train: put the model in train (True) or eval (False) mode while collecting; None keeps
            its mode. Every module's mode is restored afterwards.
        progress: show a tqdm bar; None shows one (on a terminal only) when
            ``ngrads * d >= PROGRESS_THRESHOLD``.

    Returns:
        ``G``, shape ``(ngrads, d)`` (``(ngrads, k)`` when masked), in the parameters' dtype and on
        their device. Memory: ``ngrads * d * bytes``. A parameter the loss does not use gets zeros.

    Raises:
        ValueError: empty data; data exhausted before ``ngrads`` rows (without ``cycle``); a
            non-finite loss or gradient (naming the row and the parameter); unknown names, or
            parameters with ``requires_grad=False``.
        TypeError: ``ngrads`` not an int; ``loss_fn`` not returning a tensor.
        RuntimeError: ``per_sample=True`` and ``torch.func`` could not run ``loss_fn``.

    Every parameter's ``.grad`` (None included), every module's train/eval mode and the running
    statistics of normalization layers (BatchNorm's ``running_mean``, ``running_var``,
    ``num_batches_tracked``) are restored, also when an exception is raised: the model is left as it
    was found. The statistics are restored afterwards rather than frozen, so in train mode the
    gradients are those of the training forward pass (batch statistics), as in training.
    """
    ngrads, space, width = _setup(model, loss_fn, ngrads, params, masked)
    itemsize = torch.empty((), dtype=space.dtype).element_size()
    logger.info(
        "collect_grads: %d %s gradients x %d coordinates (%s) = %s on %s",
        ngrads, "per-sample" if per_sample else "mini-batch", width, space.dtype,
        format_bytes(ngrads * width * itemsize), space.device,
    )
    out = allocate((ngrads, width), space.dtype, space.device, "gradient matrix")  # (ngrads, width)
    for _ in _chunks(model, loss_fn, data, space, masked, per_sample, cycle, train, progress, out, ngrads):
        pass  # one chunk: the whole of ``out``
    return out


def _mini_batch_chunks(
    loss_fn: LossFn, model: nn.Module, space: ParamSpace, masked: bool, buf: torch.Tensor,
    rows: _Rows, bar: Any,
) -> Iterator[torch.Tensor]:
    params = space.params
    j = 0
    while rows.rows < rows.ngrads:
        batch = rows.next_batch()
        i = rows.rows
        with torch.enable_grad():
            loss = _check_loss(loss_fn(model, batch), i)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        filled = [
            torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
        ]
        space.flatten(filled, masked=masked, out=buf[j])
        _check_rows(buf[j : j + 1], i, space, masked)
        rows.add(1)
        bar.update(1)
        j += 1
        if j == buf.shape[0] or rows.rows == rows.ngrads:
            yield buf[:j]
            j = 0


def _per_sample_chunks(
    model: nn.Module, loss_fn: LossFn, space: ParamSpace, masked: bool, buf: torch.Tensor,
    rows: _Rows, bar: Any,
) -> Iterator[torch.Tensor]:
    compute = _per_sample_grad_fn(model, loss_fn, space)
    j = 0
    with _preserved_prune_attributes(model):
        while rows.rows < rows.ngrads:
            batch, n = _split_samples(rows.next_batch())
            i = rows.rows
            n = min(n, rows.ngrads - i)
            if n == 0:
                continue
            batch = _take(batch, n)
            try:
                # outer no_grad: regular autograd records nothing; torch.func.grad ignores it
                with torch.no_grad():
                    grads, losses = compute(batch)
            except RuntimeError as err:
                raise RuntimeError(
                    "per_sample=True: torch.func (vmap over grad) could not run loss_fn on one "
                    f"sample: {err}. loss_fn must be vmap-compatible: no .item() or data-dependent "
                    "Python control flow, no in-place buffer updates (batch norm in train mode: "
                    "use train=False). Alternatively feed batches of one sample with "
                    "per_sample=False (same rows, slower)."
                ) from err
            bad = (~torch.isfinite(losses)).nonzero()
            if bad.numel():
                k = int(bad[0])
                raise ValueError(
                    f"loss of gradient row {i + k} is {losses[k].item()}, must be finite"
                )
            done = 0
            while done < n:  # the batch's rows, split where the buffer fills
                take = min(n - done, buf.shape[0] - j)
                part = buf[j : j + take]
                space.flatten([g[done : done + take] for g in grads], masked=masked, out=part)
                _check_rows(part, rows.rows, space, masked)
                rows.add(take)
                bar.update(take)
                j += take
                done += take
                if j == buf.shape[0] or rows.rows == rows.ngrads:
                    yield buf[:j]
                    j = 0


def evaluate_loss(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    max_batches: int | None = None,
    *,
    train: bool | None = False,
) -> float:
    """Return the mean of ``loss_fn(model, batch)`` over the batches of ``data`` (no gradients).

    Every batch weighs the same (the mean of per-batch losses, not of per-sample losses when
    batch sizes differ). A non-finite loss is returned as is (it is a measurement, not an error).

    Args:
        model: the model (not modified).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        data: iterable of batches, iterated once.
        max_batches: use at most this many batches (None: all).
        train: mode while evaluating: False (default) eval, True train, None keep; restored after.

    Raises:
        ValueError: ``data`` yields no batch.
    """
    if max_batches is not None:
        max_batches = check_positive_int(max_batches, "max_batches")
    total = 0.0
    count = 0
    with _preserved_state(model, train), torch.no_grad():
        for batch in data:
            loss = loss_fn(model, batch)
            _check_scalar(loss)
            total += float(loss.detach().to(torch.float64))
            count += 1
            if max_batches is not None and count >= max_batches:
                break
    if count == 0:
        raise ValueError("data yielded no batches; cannot evaluate the loss of empty data")
    return total / count
