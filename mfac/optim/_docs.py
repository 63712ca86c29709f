"""The text shared by the docstrings of :class:`~mfac.optim.MFAC` and :class:`~mfac.optim.MFACPreconditioner`.

Their common arguments, the rules for parameters and gradients, and the cost per step: one text,
appended to both class docstrings.
"""

__all__: list[str] = []

COMMON_DOC = r"""
    The arguments below are shared by :class:`MFAC` and :class:`MFACPreconditioner`.

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer (also named
            parameters). All on one device; any real floating dtypes.
        ngrads: ``m``, the window size (the number of recent gradients kept). Global: every group
            must have the same value.
        damp: ``lambda > 0`` in ``F = damp I + (1/s) G^T G``. Global, like ``ngrads``, but it may
            change during training (:meth:`set_damp`, or ``group["damp"]`` set in every group, e.g. by a
            schedule): the window is kept and its ``m x m`` state refactored, O(m^3).
        weight_decay: per group, added as ``weight_decay * w`` to the gradient *before*
            preconditioning (the paper's choice), so the window holds decayed gradients.
        masks: optional ``{parameter tensor: mask}`` of fixed sparsity masks, shaped like the
            parameter, ``torch.bool`` (True = kept; ``TypeError`` for other dtypes and for
            name keys: use ``MaskHandle.param_masks()``). Masked-out coordinates take no room in the window
            (``d`` counts kept coordinates only) and get a zero direction. Explicit: never
            inferred from exact zeros in the weights. Fixed for the optimizer's life: to change
            masks, build a new optimizer.
        dtype: dtype of the window and of all curvature work: None (default) picks the parameters'
            dtype promoted to at least float32 (bfloat16 / float16 parameters get a float32 window;
            any float64 parameter gives float64). ``torch.float32`` or ``torch.float64``.
        average_over: ``"seen"`` (default: ``s`` = number of gradients in the window, so the first
            step is ``g / (damp + |g|^2)``) or ``"ngrads"`` (``s = m`` from the start, the paper's
            code: first step ``g / (damp + |g|^2 / m)``). Global.
        save_window: True (default): :meth:`state_dict` carries the whole window, and
            save -> load -> step equals an uninterrupted run bit for bit. False: it leaves the
            ``m x d`` window (and its ``m x m`` Gram matrix and inverse, useless without it) out;
            loading such a checkpoint restarts the window empty, everything else (step counters,
            momentum, masks, the window's coordinate set) is restored. Also an attribute.
        skip_nonfinite: what a step with a NaN or inf gradient (plus weight decay), or a finite
            one whose squared norm overflows the window's dtype (``|g| > 1.8e19`` in float32), does. False
            (default): raise ``ValueError`` naming the parameters; the window, the parameters and
            the momentum are left untouched, so the caller may catch it and continue. True: skip the
            step silently (counted in :attr:`num_skipped`, logged at debug level), e.g. under a
            ``torch.amp.GradScaler``, which skips such steps itself.
        check_finite: True (default): every step checks the gradient for NaN/inf, from ``|g|^2``
            computed on the device together with the window's numerical checks, read in one host
            synchronisation per step. False: no check and no synchronisation at all (the numerical
            checks act one step late); for loops that guarantee finite gradients (a ``GradScaler``
            only calls ``step`` for finite ones). A non-finite gradient then gives a NaN step and stays
            in the window for ``ngrads`` steps. Also an attribute.
        distributed: None (default: one process), or a :class:`mfac.distributed.DistributedWindow`
            that shards the window over ``torch.distributed`` ranks (DDP: each rank keeps a slice
            of the coordinates and the step is all-gathered; FSDP2 ``fully_shard``: each rank
            works on its local parameter shards). Per step the window all-reduces ``m`` floats;
            ``step`` and ``load_state_dict`` become collectives, ``state_dict`` holds this rank's
            part (save it per rank: :func:`mfac.distributed.save_sharded`). Every parameter must
            have a gradient at the first step (the window cannot grow); no masks with FSDP.
        density: None (default: the dense window) or the kept fraction in (0, 1] of each gradient
            for a compressed window (EFCP: error feedback + top-k per block of 4096 coordinates,
            :class:`mfac.fisher.compressed.CompressedSlidingInverseFisher`): the step adds the
            gradient to an accumulator ``e``, stores its ``k ~ density * d`` largest entries as
            values + int32 indices, keeps the rest in ``e`` and returns ``F'^{-1} g'`` for the sent
            part ``g'``. Memory ``m k 8 + d 4`` bytes instead of ``m d 4`` (density 0.01, m = 256:
            1/42), cost O(m k + d) per step. ``1.0`` is the dense window (the same code path).
            Global; not with ``distributed``. The checkpoint carries ``e`` and the sparse rows.
        values_dtype, index_dtype: storage of a compressed window's rows (only with ``density``):
            ``values_dtype=torch.bfloat16`` halves the value bytes (the rounding error stays in the
            accumulator); ``index_dtype=torch.int16`` stores offsets inside the 4096-coordinate
            blocks instead of int32 indices (such a window cannot grow: every parameter must have
            a gradient at the first step). None: the window's dtype and int32. At density 0.01 and
            m = 256 the rows cost ``m k 8`` bytes, ``m k 6`` with int16, ``m k 4`` with both.
        window_dtype: None (default: the window is stored in ``dtype``) or ``torch.bfloat16``: the
            ``m x d`` window stored in bfloat16 (:class:`mfac.fisher.lowp.LowPrecisionSlidingInverseFisher`),
            half the memory (``m d 2`` bytes), while the products over it still accumulate in ``dtype``
            (float32 partial sums, float64 totals) and the ``m x m`` work stays float64. Each gradient
            is rounded to bfloat16 once as it enters the window; the step is then the exact M-FAC step
            of the rounded gradients (measured: relative difference to the float32 window 3e-3, the
            same training result on digits; ``experiments/bench_lowp.py``). Use it when the float32
            window does not fit, or to double ``ngrads`` in the same memory; not for speed on CPU, where
            the conversion made a step 3-4.5x the float32 floor (torch's own bfloat16 products, which
            round to 8 bits, ran at 0.5-0.75x: a kernel that reads bfloat16 and accumulates in float32
            is what would make it faster; not measured here). With ``density`` it stores the
            compressed values in bfloat16 (``values_dtype``). Not with ``distributed``. Checkpoints hold
            the bfloat16 window and load only into an optimizer with the same ``window_dtype``.

    Parameters and gradients:
        * The window's coordinate set is the parameters that have a gradient at the first step,
          in param-group order. A parameter whose ``.grad`` is None at a later step (an unused head)
          contributes zeros to the window's new row (its gradient *is* zero) and is not updated (no
          step, no momentum decay, no weight decay), like ``torch.optim``. A parameter that gets its
          first gradient later (unfrozen layer, ``add_param_group``) joins the window with zero
          columns in the older rows, which is exact: the Gram matrix is unchanged (this reallocates
          the window once: briefly the old and the new window). The set never shrinks; it is part of
          the checkpoint, so resumed runs skip the same parameters.
        * Parameters with ``requires_grad=False`` never get a gradient and cost nothing.
        * A step where no parameter has a gradient does nothing.
        * The window is created at the first step (its memory, ``m * d * 4`` bytes in float32, is
          allocated then, with a ``MemoryError`` saying how much if it does not fit).

    Cost per step: two passes over the ``m x d`` window plus ``O(m^2)`` float64 work (``O(m^3)``
    every ``m`` steps and while the window fills, where the ``m x m`` system is refactored).
"""
