r"""Layer-wise OBS (SparseGPT, OBC) with a sequential calibration pipeline: :func:`prune_layerwise`.

Global OBS needs the ``m x d`` gradient matrix (BERT-base at ``m = 1024``: 350 GB). Layer-wise OBS needs only
each layer's input Hessian: for a layer ``y = W x`` with ``W`` ``(r, c)`` and calibration inputs ``X``
``(c, N)``, pruning minimises the reconstruction loss ``||W X - W' X||_F^2``, a quadratic per output row with
the Hessian ``H = 2 X X^T / n`` shared by all rows (``c x c``). The solvers are in
:mod:`mfac.prune._layer_solvers` (SparseGPT's column sweep, OBC's exact greedy removal, the Wanda and
magnitude masks); this module finds the layers and blocks, collects the Hessians and runs the pipeline.

Sequential calibration (``sequential=True``, the default):

1. run the model on the calibration batches up to its first block and keep that block's inputs;
2. for each block: collect the Hessians of its layers (forward hooks), prune them, then feed the calibration
   inputs through the *pruned* block to get the next block's inputs, so errors made early are compensated
   later. With ``true_sequential=True`` the layers of a block are pruned in the order the block calls them,
   grouped by shared input (GPT-2: ``attn.c_attn``, then ``attn.c_proj``, then ``mlp.c_fc``, then
   ``mlp.c_proj``; LLaMA's q/k/v projections form one group): each group's Hessians are collected with the
   groups before it already pruned. Each group's pass stops right after the group's last layer (when every
   layer is called once per forward), so a block costs about two forward passes over the calibration set
   (plus one on the first batch, to find the groups), as without true sequential.

``sequential=False`` hooks every target at once and prunes them all from one pass over the dense model.

Choices (and why):

* ``n`` in ``H = 2 X X^T / n`` counts sequences (the leading dimension of a ``(batch, seq, width)`` input;
  images for a Conv2d; rows of a 2-D input), as the SparseGPT reference does. It only scales ``H``: masks
  and updates do not depend on it because ``damp`` is relative to ``mean(diag H)``.
* SparseGPT's adaptive mask ranks ``w^2 / U_jj^2`` over all rows of a ``mask_blocksize``-column block
  together (the reference's rule: rows may end up with different densities), pruning exactly a
  cumulative-rounding share of ``round(s * r * c)`` per block; N:M picks per row inside each group.
* OBC prunes the same number of weights in every row (its share of ``round(s * r * c)``); with nearly
  isotropic inputs a layer-wide magnitude ranking can then beat it, which the SparseGPT sweep avoids.
* Dead inputs (``H_jj = 0``) get ``H_jj = 1`` and their weights are pruned first (they never affect the
  output), as the reference does.

Memory: one Hessian per layer being pruned, ``c^2 * 4`` bytes in float32 (only one block's at a time when
sequential; all of them otherwise); the captured activations, ``N * seq * width * 4`` bytes for ``N``
calibration sequences (twice while a block's outputs are computed), kept on ``store`` (e.g. the CPU) while
the block runs on ``device``.
Time: per layer ``O(N_tokens c^2)`` to accumulate ``H``, ``O(c^3)`` for its factorizations and ``O(r c^2)``
for SparseGPT's sweep (OBC: ``O(r c^3)``), plus the forward passes of the blocks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mfac.numerics import check_damp, check_fraction, check_positive_int
from mfac.prune._layer_capture import BlockCall, HessianAccumulator, capture_block_inputs, run_model
from mfac.prune._layer_solvers import (
    magnitude_mask,
    obc,
    prepare_hessian,
    reconstruction_error,
    sparsegpt,
)
from mfac.prune._layer_solvers import wanda_mask as _wanda_mask
from mfac.prune._layer_targets import LayerTarget, find_blocks, find_targets, resolve_targets
from mfac.prune.masks import parse_pattern

logger = logging.getLogger(__name__)

__all__ = ["LAYERWISE_METHODS", "LayerReport", "prune_layerwise"]

#: the solvers of :func:`prune_layerwise`
LAYERWISE_METHODS = ("sparsegpt", "obc", "wanda", "magnitude")


@dataclass(frozen=True)
class LayerReport:
    """What pruning one layer did, measured on the calibration inputs it saw.

    ``error`` is the relative reconstruction error ``||W X - W' X||_F^2 / ||W X||_F^2`` (no bias), computed
    as ``tr(dW H dW^T) / tr(W H W^T)`` with the undamped ``H``; ``sparsity`` is the fraction of the layer's
    weights pruned; ``seconds`` the solve time (not the forward passes).
    """

    name: str
    shape: tuple[int, ...]  # the parameter's shape
    rows: int
    cols: int
    method: str
    sparsity: float
    error: float
    seconds: float
    nsamples: int
    block: int | None  # index of the block it belongs to (None: one-pass mode)

    def __str__(self) -> str:
        return (f"{self.name} {self.rows}x{self.cols}: {self.method} sparsity {self.sparsity:.3f}, "
                f"reconstruction error {self.error:.3e}, {self.seconds * 1e3:.1f} ms")


# ---------------------------------------------------------------------------------------------- checks
def _per_layer_sparsity(
    sparsity: float | Mapping[str, float] | None, pattern: tuple[int, int] | None, targets: list[LayerTarget]
) -> dict[str, float]:
    if pattern is not None:
        if sparsity is not None:
            raise ValueError(f"give either sparsity or pattern, not both (got sparsity={sparsity!r})")
        n, m = pattern
        for t in targets:
            if t.cols % m:
                raise ValueError(
                    f"pattern {n}:{m} needs the input size of every layer to be divisible by {m}; "
                    f"{t.name!r} has {t.cols} inputs (rows of W are {t.rows}x{t.cols})"
                )
        return {t.name: 1.0 - n / m for t in targets}
    if sparsity is None:
        raise ValueError("sparsity (a float in [0, 1) or {name: float}) or pattern ('N:M') is required")
    if isinstance(sparsity, Mapping):
        given = {(k if k.endswith(".weight") else f"{k}.weight"): v for k, v in sparsity.items()}
        names = {t.name for t in targets}
        missing, extra = sorted(names - set(given)), sorted(set(given) - names)
        if missing or extra:
            raise ValueError(
                f"sparsity dict must cover exactly the targets; missing {missing}, extra {extra}"
            )
        return {n: check_fraction(v, f"sparsity[{n!r}]", upper_open=True) for n, v in given.items()}
    value = check_fraction(sparsity, "sparsity", upper_open=True)
    return {t.name: value for t in targets}


# ---------------------------------------------------------------------------------------------- solve
@dataclass(frozen=True)
class _Settings:
    method: str
    pattern: tuple[int, int] | None
    sparsity: dict[str, float]
    blocksize: int
    mask_blocksize: int | None
    damp: float
    dtype: torch.dtype
    obc_rows: int
    callback: Callable[[LayerReport], None] | None


def _prune_layer(target: LayerTarget, acc: HessianAccumulator, cfg: _Settings, block: int | None
                 ) -> torch.Tensor:
    """Prune one layer in place from its Hessian; return its kept-mask in the parameter's shape."""
    hessian = acc.hessian()
    start = time.perf_counter()
    w = target.matrix(cfg.dtype).to(hessian.device)
    s = cfg.sparsity[target.name]
    nm = cfg.pattern
    if cfg.method in ("sparsegpt", "obc"):
        damped, dead = prepare_hessian(hessian, cfg.damp)
        if cfg.method == "sparsegpt":
            new, kept = sparsegpt(w, damped, sparsity=s, nm=nm, blocksize=cfg.blocksize,
                                  mask_blocksize=cfg.mask_blocksize, dead=dead)
        else:
            new, kept = obc(w, damped, sparsity=s, nm=nm, dead=dead, rows_per_batch=cfg.obc_rows)
    else:
        if cfg.method == "wanda":
            kept = _wanda_mask(w, hessian.diagonal(), sparsity=s, nm=nm)
        else:
            kept = magnitude_mask(w, sparsity=s, nm=nm)
        new = w * kept
    if not bool(torch.isfinite(new).all()):
        raise FloatingPointError(f"pruning {target.name!r} produced non-finite weights; try a larger damp")
    error = reconstruction_error(hessian, w, new)
    target.write(new)
    seconds = time.perf_counter() - start
    report = LayerReport(
        name=target.name, shape=tuple(target.weight.shape), rows=target.rows, cols=target.cols,
        method=cfg.method, sparsity=float((~kept).sum()) / kept.numel(), error=error, seconds=seconds,
        nsamples=acc.nsamples, block=block,
    )
    logger.info("%s", report)
    if cfg.callback is not None:
        cfg.callback(report)
    return target.to_param_shape(kept).to(target.weight.device)


# ---------------------------------------------------------------------------------------------- pipeline
class _StopBlock(Exception):  # control flow only: the rest of a block's forward is not needed
    pass


def _call_order(block: nn.Module, targets: list[LayerTarget], call: BlockCall
                ) -> tuple[list[list[LayerTarget]], bool]:
    """Targets grouped in the order ``block`` calls them; consecutive calls on the same input form a group.

    Also returns whether every target is called exactly once (then a group's Hessians are complete once its
    last layer has run, and the rest of the block's forward can be skipped).
    """
    seen: list[tuple[LayerTarget, int]] = []
    inputs: dict[int, torch.Tensor] = {}
    calls = {id(t): 0 for t in targets}

    def make_hook(t: LayerTarget):
        def hook(module: nn.Module, args: tuple) -> None:
            calls[id(t)] += 1
            if all(t is not s for s, _ in seen) and args and isinstance(args[0], torch.Tensor):
                key = next((k for k, x in inputs.items() if x is args[0]), len(inputs))
                inputs[key] = args[0]
                seen.append((t, key))
        return hook

    handles = [t.module.register_forward_pre_hook(make_hook(t)) for t in targets]
    try:
        call(block)
    finally:
        for h in handles:
            h.remove()
    missing = [t.name for t in targets if all(t is not s for s, _ in seen)]
    if missing:
        raise ValueError(f"layers {missing} are not called by their block's forward on the calibration data")
    groups: list[list[LayerTarget]] = []
    last = None
    for t, key in seen:
        if key == last:
            groups[-1].append(t)
        else:
            groups.append([t])
        last = key
    return groups, all(n == 1 for n in calls.values())


def _collect(targets: list[LayerTarget], dtype: torch.dtype, run: Callable[[], None],
             stop_after: nn.Module | None = None) -> list[HessianAccumulator]:
    accs = [HessianAccumulator(t, dtype) for t in targets]
    handle = None
    if stop_after is not None:  # registered after the accumulators' hooks, so it runs after them

        def stop(module: nn.Module, args: tuple, output: Any) -> None:
            raise _StopBlock

        handle = stop_after.register_forward_hook(stop)
    try:
        run()
    finally:
        for a in accs:
            a.remove()
        if handle is not None:
            handle.remove()
    for a in accs:
        a.hessian()  # raises on non-finite or missing inputs before any weight of the group changes
    return accs


def _sequential(model, blocks, targets, data, forward_fn, cfg, true_sequential, device, store):
    masks: dict[str, torch.Tensor] = {}
    calls = capture_block_inputs(model, blocks[0], data, forward_fn, store)
    by_module = {id(t.module): t for t in targets}
    for index, block in enumerate(blocks):
        mine = [by_module[id(m)] for m in block.modules() if id(m) in by_module]
        home = next((p.device for p in block.parameters()), None)
        if device is not None:
            block.to(device)
        try:
            if mine:
                if true_sequential:
                    groups, once = _call_order(block, mine, calls[0].to(device))
                else:
                    groups, once = [mine], False

                def run(block=block, calls=calls) -> None:
                    for c in calls:
                        try:
                            c.to(device)(block)
                        except _StopBlock:
                            pass

                for group in groups:
                    accs = _collect(group, cfg.dtype, run, group[-1].module if once else None)
                    for t, a in zip(group, accs, strict=True):
                        masks[t.name] = _prune_layer(t, a, cfg, index)
                    del accs
            outputs = []
            for i, c in enumerate(calls):
                out = c.to(device)(block).detach()
                if not bool(torch.isfinite(out).all()):
                    raise ValueError(f"block {index} produced non-finite outputs on calibration batch {i}")
                outputs.append(c.with_hidden(out.to(store) if store is not None else out))
            calls = outputs
        finally:
            if device is not None and home is not None:
                block.to(home)
    return masks


def _one_pass(model, targets, data, forward_fn, cfg):
    def run() -> None:
        count = 0
        for batch in data:
            run_model(model, batch, forward_fn)
            count += 1
        if count == 0:
            raise ValueError("data is empty: layer-wise pruning needs at least one calibration batch")

    accs = _collect(targets, cfg.dtype, run)
    return {t.name: _prune_layer(t, a, cfg, None) for t, a in zip(targets, accs, strict=True)}


def prune_layerwise(
    model: nn.Module,
    data: Iterable[Any],
    sparsity: float | Mapping[str, float] | None = None,
    *,
    pattern: str | tuple[int, int] | None = None,
    method: str = "sparsegpt",
    targets: Sequence[str] | None = None,
    blocks: str | Sequence[nn.Module] | None = None,
    blocksize: int = 128,
    mask_blocksize: int | None = None,
    damp: float = 0.01,
    sequential: bool = True,
    true_sequential: bool = True,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    hessian_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    store: torch.device | str | None = None,
    obc_rows: int = 64,
    callback: Callable[[LayerReport], None] | None = None,
) -> dict[str, torch.Tensor]:
    r"""Prune ``model``'s layers in place with layer-wise OBS; return the masks (True = kept).

    Args:
        model: the model; its target weights are overwritten in place (everything else, biases,
            normalisation parameters and buffers such as BatchNorm statistics, is left bit-identical). It runs
            in eval mode under ``torch.no_grad()`` during pruning; its training flags are restored after.
        data: iterable of calibration batches (iterated once). A batch is passed as ``model(batch)``
            (``model(**batch)`` for a mapping) unless ``forward_fn(model, batch)`` is given.
        sparsity: fraction of each layer's weights pruned, in ``[0, 1)``: one float for every layer (as
            SparseGPT does) or ``{name: float}`` covering exactly the targets. ``None`` with ``pattern``.
        pattern: ``"N:M"`` (e.g. ``"2:4"``): keep ``N`` of every ``M`` consecutive weights along the **input**
            dimension of each output row (for ``Conv1D`` too, whose weight is stored ``(in, out)``; for Conv2d
            along the flattened ``in * kh * kw``). Every target's input size must be divisible by ``M``.
        method: ``"sparsegpt"`` (the column sweep), ``"obc"`` (exact greedy OBS per row, cost
            ``O(r c^3)``: for small layers), ``"wanda"`` (``|W_ij| ||X_j||`` per row, no update) or
            ``"magnitude"`` (``|W_ij|`` over the layer, no update).
        targets: parameter or module names to prune (default: every ``nn.Linear``, ``transformers``'
            ``Conv1D`` and ``nn.Conv2d`` inside the repeated blocks, or in the whole model when it has no
            blocks; never a weight tied to an embedding).
        blocks: the repeated blocks, as a submodule path (``"transformer.h"``) or modules (default: found
            from common layouts, see :data:`mfac.prune._layer_targets.BLOCK_PATHS`, else the longest
            ``nn.ModuleList`` of one module type). With ``sequential=True`` and no blocks, the one-pass mode
            is used (logged).
        blocksize: SparseGPT's lazy-batch width ``B`` (columns updated together; BLAS-3 across batches).
        mask_blocksize: width of SparseGPT's adaptive-mask blocks (default ``blocksize``): the mask of each
            such block of columns is chosen, over all rows together, when the sweep reaches it.
        damp: relative damping: ``H += damp * mean(diag H) * I`` (``> 0``).
        sequential: feed the calibration data through the pruned blocks (see the module docstring).
        true_sequential: within a block, prune the layers group by group in call order.
        forward_fn: ``forward_fn(model, batch)`` runs the model on one batch (its output is ignored).
        hessian_dtype: dtype of ``H`` and of the solve (``torch.float32`` or ``torch.float64``).
        device: where each block runs while it is pruned (moved there and back); None: where it is.
        store: where the captured activations are kept between blocks (e.g. ``"cpu"``); None: where they
            were produced.
        obc_rows: rows OBC processes at once (memory ``obc_rows * c^2`` entries).
        callback: called with a :class:`LayerReport` after each layer (reports are also logged at INFO).

    Returns:
        ``{parameter name: bool mask}`` (True = kept) shaped like each weight, the convention of
        :func:`~mfac.prune.prune_oneshot`: keep them through fine-tuning with :func:`~mfac.prune.apply_masks`.
        Unstructured targets prune exactly ``round(s * numel)`` weights per layer.

    Raises:
        ValueError / TypeError: bad arguments (sparsity outside ``[0, 1)``, an ``M`` that does not divide a
            layer's input size, an unknown or unsupported target, empty data, non-finite activations at the
            first block), raised before any weight changes. Non-finite activations found deeper in a
            sequential run are reported with the layer's name (the blocks before it are already pruned).

    Memory and time: see the module docstring (Hessians ``c^2 * 4`` bytes per layer, activations
    ``N * seq * width * 4`` bytes).

    Example::

        masks = prune_layerwise(gpt2, calib_batches, 0.5, forward_fn=lambda m, b: m(input_ids=b))
        masks = prune_layerwise(gpt2, calib_batches, pattern="2:4", method="sparsegpt")
    """
    if method not in LAYERWISE_METHODS:
        raise ValueError(f"method must be one of {LAYERWISE_METHODS}, got {method!r}")
    nm = parse_pattern(pattern) if pattern is not None else None
    damp = check_damp(damp)
    check_positive_int(blocksize, "blocksize")
    if mask_blocksize is not None:
        check_positive_int(mask_blocksize, "mask_blocksize")
    check_positive_int(obc_rows, "obc_rows")
    if hessian_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"hessian_dtype must be torch.float32 or torch.float64, got {hessian_dtype}")
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError(f"forward_fn must be callable, got {type(forward_fn).__name__}")
    if data is None or isinstance(data, (torch.Tensor, str)):
        raise TypeError("data must be an iterable of batches (a list or a DataLoader), "
                        f"got {type(data).__name__}")
    found_blocks = find_blocks(model, blocks)
    chosen = resolve_targets(model, targets) if targets is not None else find_targets(model, found_blocks)
    if not chosen:
        raise ValueError(f"{type(model).__name__} has no layer to prune (nn.Linear, Conv1D, nn.Conv2d)")
    cfg = _Settings(method, nm, _per_layer_sparsity(sparsity, nm, chosen), blocksize, mask_blocksize, damp,
                    hessian_dtype, obc_rows, callback)
    if sequential and found_blocks is not None:
        inside = {id(m) for b in found_blocks for m in b.modules()}
        outside = [t.name for t in chosen if id(t.module) not in inside]
        if outside:
            raise ValueError(f"targets {outside} are outside the blocks; the sequential pipeline prunes "
                             "layers inside blocks only (use sequential=False)")
    elif sequential:
        logger.info("no repeated blocks found in %s: pruning in one pass", type(model).__name__)
    device = torch.device(device) if device is not None else None
    store = torch.device(store) if store is not None else None

    modes = {m: m.training for m in model.modules()}
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    try:
        model.eval()
        if use_cache:
            config.use_cache = False  # a KV cache would grow with every block call
        with torch.no_grad():
            if sequential and found_blocks is not None:
                return _sequential(model, found_blocks, chosen, data, forward_fn, cfg, true_sequential,
                                   device, store)
            return _one_pass(model, chosen, data, forward_fn, cfg)
    finally:
        for m, flag in modes.items():
            m.training = flag
        if use_cache:
            config.use_cache = use_cache
