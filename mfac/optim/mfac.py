r"""The M-FAC optimizer and the M-FAC gradient preconditioner over one sliding-window Fisher.

Both classes share one implementation (:class:`_MFACBase`): each ``step`` gathers the gradients of
all parameters into one flat vector, adds it to the window of the last ``ngrads`` gradients and
preconditions it (:class:`~mfac.fisher.sliding.SlidingInverseFisher`). They differ only in what
they do with the preconditioned direction ``u``:

* :class:`MFACPreconditioner` writes ``u`` into ``p.grad`` in place, for any optimizer to consume;
* :class:`MFAC` applies momentum and the learning rate itself (the paper's update).

The math, per step ``t`` (``w``: all parameters with gradients, concatenated; :math:`\lambda` is ``damp``,
:math:`\beta` is ``momentum``, :math:`\eta` is ``lr``, :math:`\delta` is ``weight_decay``):

.. math::

    g_t &= \nabla_w \mathcal{L}(w_t) + \delta\, w_t
        && \text{weight decay before preconditioning (per group)} \\
    F_t &= \lambda I + \frac{1}{s} \textstyle\sum_i g_i g_i^\top
        && \text{over the window: } g_t \text{ and up to } m - 1 \text{ older } g_i \\
    u_t &= F_t^{-1} g_t && O(md)\text{: two passes over the } m \times d \text{ window} \\
    v_t &= \beta v_{t-1} + (1 - \beta) u_t, \quad v_0 = 0 && \text{(MFAC only; per group)} \\
    w_{t+1} &= w_t - \eta\, v_t && \text{(MFAC only; per group)}

``m`` is ``ngrads``, ``damp`` is lambda, and ``s`` is the averaging count (``average_over``:
``"seen"`` divides by the number of gradients in the window, so the first step is the
Sherman-Morrison step ``u_1 = g / (damp + |g|^2)``; ``"ngrads"`` divides by ``m`` from the start,
as the paper's code does: ``u_1 = g / (damp + |g|^2 / m)``). Memory: ``m * d * 4`` bytes for a
float32 window (``m = 1024``, ``d = 270k``, ResNet-20's size: 1.1 GB), plus ``2 m^2 * 8`` bytes of
float64 ``m x m`` state and one ``(d,)`` work vector.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch.optim import Optimizer

from mfac.fisher.compressed import check_density
from mfac.fisher.sliding import SlidingInverseFisher, check_average_over
from mfac.numerics import (
    NonFiniteGradientError,
    check_damp,
    check_nonnegative,
    check_not_meta,
    check_positive_int,
    check_real,
)
from mfac.optim._checkpoint import check_optimizer_state, check_saved_settings
from mfac.optim._docs import COMMON_DOC
from mfac.optim._layout import Layout
from mfac.optim._placement import (
    LocalPlacement,
    NonFiniteElsewhere,
    Placement,
    check_compressed_storage,
    check_window_dtype,
)
from mfac.params import check_mask

logger = logging.getLogger(__name__)

__all__ = ["MFAC", "MFACPreconditioner"]

#: hyper-parameters of the one window over all parameters: equal in every param group.
_GLOBAL_KEYS = ("ngrads", "damp")
#: key of the global (curvature) state inside ``state_dict()["state"][0]``.
_STATE_KEY = "mfac"
_STATE_VERSION = 1
_WINDOW_DTYPES = (torch.float32, torch.float64)
#: instance attributes of _MFACBase that pickling (and copy.deepcopy) must carry.
_PICKLED = (
    "_window_dtype",
    "_average_over",
    "save_window",
    "skip_nonfinite",
    "check_finite",
    "_fisher",
    "_layout",
    "_flat",
    "_num_steps",
    "_num_skipped",
    "_masks",
    "_pruned",
    "_placement",
    "_density",
    "_compressed_storage",
    "_window_storage",
)


#: functions wrapped with torch.compiler.disable on first use.
_EAGER: dict[str, Callable[..., Any]] = {}


def _finite(vec: torch.Tensor) -> bool:
    """Whether ``vec`` is finite and ``|vec|^2`` does not overflow (what the window needs).

    One dot product: it is NaN or inf exactly when an entry is, or when the squared norm overflows.
    """
    return math.isfinite(float(torch.dot(vec, vec)))


class _MFACBase(Optimizer):
    """One sliding window over all parameters that have gradients; the shared ``step`` machinery.

    Subclasses give the group defaults, check their own group keys (``_check_group``) and consume
    the preconditioned directions (``_apply``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        masks: Mapping[torch.Tensor, torch.Tensor] | None,
        dtype: torch.dtype | None,
        average_over: Literal["seen", "ngrads"],
        save_window: bool,
        skip_nonfinite: bool,
        distributed: Any = None,
        check_finite: bool = True,
        density: float | None = None,
        values_dtype: torch.dtype | None = None,
        index_dtype: torch.dtype | None = None,
        window_dtype: torch.dtype | None = None,
    ) -> None:
        check_positive_int(defaults["ngrads"], "ngrads")
        defaults["damp"] = check_damp(defaults["damp"])
        self._check_group(defaults)
        check_average_over(average_over)
        if dtype is not None and dtype not in _WINDOW_DTYPES:
            raise TypeError(
                f"dtype (of the gradient window) must be one of {_WINDOW_DTYPES} or None, "
                f"got {dtype!r}"
            )
        self._window_dtype = dtype
        self._average_over = average_over
        for key, flag in (("save_window", save_window), ("skip_nonfinite", skip_nonfinite)):
            if not isinstance(flag, bool):
                raise TypeError(f"{key} must be a bool, got {type(flag).__name__} {flag!r}")
        density = check_density(density)
        #: kept fraction of each gradient in a compressed window (None: the dense window).
        self._density = None if density == 1.0 else density
        if self._density is not None and distributed is not None:
            raise ValueError(
                f"density={density} (a compressed window) cannot be combined with distributed: "
                "the compressed window is not sharded; use density=None with distributed"
            )
        #: storage dtype of the window when it is not the compute dtype (None: the compute dtype).
        self._window_storage = check_window_dtype(window_dtype, distributed)
        if self._window_storage is not None and self._density is not None and values_dtype is None:
            values_dtype = self._window_storage  # a compressed window stores its values in it
        #: storage options of a compressed window (values and index dtypes).
        self._compressed_storage = check_compressed_storage(self._density, values_dtype, index_dtype)
        if distributed is not None and not isinstance(distributed, Placement):
            raise TypeError(
                "distributed must be a mfac.distributed.DistributedWindow or None, got "
                f"{type(distributed).__name__}"
            )
        #: where the window lives (mfac.optim._placement): one process, or torch.distributed ranks.
        self._placement: Placement = (
            LocalPlacement(self._density, window_dtype=self._window_storage, **self._compressed_storage)
            if distributed is None else distributed
        )
        #: leave the m x d window out of :meth:`state_dict` (see the class docstring).
        self.save_window = bool(save_window)
        #: skip steps whose gradient is not finite instead of raising (see the class docstring).
        self.skip_nonfinite = bool(skip_nonfinite)
        #: check every gradient for NaN/inf (one host synchronisation per step; see the class docstring).
        self.check_finite = bool(check_finite)
        self._fisher: SlidingInverseFisher | None = None
        self._layout: Layout | None = None
        self._flat: torch.Tensor | None = None  # shape: (d,), the gathered gradient (reused)
        self._num_steps = 0
        self._num_skipped = 0
        self._masks: dict[torch.Tensor, torch.Tensor] = {}
        self._pruned: dict[torch.Tensor, torch.Tensor] = {}
        super().__init__(params, defaults)
        if masks is not None:
            self._set_masks(masks)

    # ------------------------------------------------------------------ public read-only views
    @property
    def inverse_fisher(self) -> SlidingInverseFisher | None:
        """The window's inverse-Fisher operator (``mul``, ``diag``, ...); None before step 1.

        Its coordinates are the kept entries of the parameters that have had gradients, in
        param-group order. Read from it freely; updating it outside ``step`` desynchronises the
        optimizer.
        """
        return self._fisher

    @property
    def num_steps(self) -> int:
        """Number of steps taken (gradients added to the window), skipped steps not counted."""
        return self._num_steps

    @property
    def num_skipped(self) -> int:
        """Number of steps skipped for a non-finite gradient (only with ``skip_nonfinite=True``)."""
        return self._num_skipped

    # ------------------------------------------------------------------ param groups
    def _check_group(self, group: Mapping[str, Any]) -> None:
        """Validate the per-group hyper-parameters of ``group`` (defaults filled in)."""
        check_nonnegative(group["weight_decay"], "weight_decay")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (see ``torch.optim.Optimizer.add_param_group``).

        ``ngrads`` and ``damp`` belong to the one window over all parameters: a group may repeat
        them but not change them. Parameters must be real floating point and on the device of the
        others. Parameters added after the first step join the window when they first get a
        gradient.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        for key in _GLOBAL_KEYS:
            if key in param_group and param_group[key] != self.defaults[key]:
                raise ValueError(
                    f"{key} is global to the M-FAC window and cannot differ between param groups: "
                    f"a group has {key}={param_group[key]!r}, the optimizer "
                    f"{key}={self.defaults[key]!r}"
                )
        self._check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            devices = {p.device for g in self.param_groups for p in g["params"]}
            if len(devices) > 1:
                raise ValueError(
                    "all parameters of an M-FAC optimizer must be on one device (one window over "
                    f"all of them), got {sorted(str(d) for d in devices)}"
                )
            for p in group["params"]:
                if not p.is_floating_point():
                    raise TypeError(f"parameters must be real floating point, got dtype {p.dtype}")
                check_not_meta(p, f"parameter of shape {tuple(p.shape)}")
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _params(self) -> list[torch.Tensor]:
        """All parameters in param-group order (what positions in a checkpoint refer to)."""
        return [p for group in self.param_groups for p in group["params"]]

    def _name(self, param: torch.Tensor) -> str:
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p is param:
                    names = group.get("param_names")
                    if names is not None:
                        return repr(names[pi])
                    return f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"
        return f"a parameter of shape {tuple(param.shape)}"

    def _set_masks(self, masks: Mapping[torch.Tensor, torch.Tensor]) -> None:
        if not isinstance(masks, Mapping):
            raise TypeError(
                f"masks must be a mapping {{parameter: mask}}, got {type(masks).__name__}"
            )
        params = self._params()
        known = {id(p) for p in params}
        checked = {}
        for param, mask in masks.items():
            if isinstance(param, str):
                raise TypeError(
                    f"masks are keyed by the parameter tensors of this optimizer, got the name {param!r}; "
                    "pass {model.get_parameter(name): mask} or MaskHandle.param_masks()"
                )
            if not isinstance(param, torch.Tensor):
                raise TypeError(
                    "masks are keyed by the parameter tensors of this optimizer, got a key of type "
                    f"{type(param).__name__}"
                )
            if id(param) not in known:
                raise ValueError(
                    f"masks are keyed by parameters of this optimizer; a key of shape "
                    f"{tuple(param.shape)} is not one of them (a copy, or another model's)"
                )
            name = self._name(param)
            checked[param] = check_mask(mask, f"mask of {name}", param)  # the one mask contract
        for param, kept in checked.items():  # nothing is set before every mask is checked
            self._masks[param] = kept
            self._pruned[param] = ~kept

    def _check_global_settings(self) -> tuple[int, float]:
        values = {}
        for key in _GLOBAL_KEYS:
            seen = {group[key] for group in self.param_groups}
            if len(seen) > 1:
                raise ValueError(
                    f"{key} must be the same in every param group (one window over all "
                    f"parameters), got {sorted(seen)}"
                )
            values[key] = seen.pop()
        ngrads, damp = values["ngrads"], values["damp"]
        fisher = self._fisher
        if fisher is not None and fisher.ngrads != ngrads:
            raise ValueError(
                f"ngrads cannot change once the window exists (window: ngrads={fisher.ngrads}, "
                f"param groups: ngrads={ngrads}); build a new optimizer to change it"
            )
        if fisher is not None and fisher.damp != damp:
            fisher.set_damp(check_damp(damp))  # O(m^3): the window is kept
            self.defaults["damp"] = fisher.damp
        return ngrads, damp

    def set_damp(self, damp: float) -> None:
        """Set ``damp`` (lambda) in every param group; the window is kept, its ``m x m`` state refactored.

        Equivalent to writing ``group["damp"] = damp`` in every group (a damping schedule may do that):
        the next step refactors ``M = s damp I + G G^T`` from the stored Gram matrix (O(m^3), nothing
        ``d``-sized), giving exactly the operator a new window with this ``damp`` would build from the
        same gradients.
        """
        damp = check_damp(damp)
        for group in self.param_groups:
            group["damp"] = damp
        self.defaults["damp"] = damp
        if self._fisher is not None:
            self._fisher.set_damp(damp)

    # ------------------------------------------------------------------ the shared step
    def _local(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return the part of a parameter or gradient this rank works on (itself on one process)."""
        return self._placement.local(tensor)

    def _new_layout(self, params: list[torch.Tensor], dtype: torch.dtype) -> Layout:
        return Layout(params, self._masks, dtype, params[0].device, local=self._placement.local)

    def _new_fisher(self, layout: Layout, ngrads: int, damp: float) -> SlidingInverseFisher:
        if self._masks and any(self._local(p) is not p for p in layout.params):
            raise NotImplementedError("masks are not supported with FSDP-sharded parameters")
        return self._placement.new_fisher(  # collective: the ranks' windows agree
            layout.dim, ngrads, damp, params=layout.params, dtype=layout.dtype,
            device=layout.device, average_over=self._average_over,
        )

    def _ensure_layout(self, present: list[torch.Tensor], ngrads: int, damp: float) -> None:
        """Create the window at the first step; grow it when a parameter first gets a gradient."""
        layout = self._layout
        if layout is not None and all(p in layout for p in present):
            return
        params = self._params()
        if layout is None:
            dtype = self._window_dtype or functools.reduce(
                torch.promote_types, (p.dtype for p in present), torch.float32
            )
            new = self._new_layout(present, dtype)
            self._fisher = self._new_fisher(new, ngrads, damp)
            logger.debug("M-FAC window created: %d x %d (%s)", ngrads, new.dim, dtype)
        else:
            # Grow: the new parameters' coordinates had zero gradient in every stored row (the
            # operator's own SlidingInverseFisher.grow: zero columns, the m x m state unchanged).
            ids = {id(p) for p in present}
            new = self._new_layout([p for p in params if p in layout or id(p) in ids], layout.dtype)
            position = {id(s.param): s.offset for s in new.slots}
            index = torch.cat([
                torch.arange(position[id(s.param)], position[id(s.param)] + s.size) for s in layout.slots
            ])
            assert self._fisher is not None
            try:
                self._fisher.grow(new.dim, index)
            except NotImplementedError as err:
                raise NotImplementedError(
                    f"{err}: every parameter must have a gradient at the first step "
                    f"({len(present) - sum(p in layout for p in present)} got their first one later)"
                ) from None
            logger.debug("M-FAC window grown from %d to %d coordinates", layout.dim, new.dim)
        self._layout = new
        self._flat = torch.empty(new.dim, dtype=new.dtype, device=new.device)

    def _precondition(self) -> list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]] | None:
        """Run :meth:`_precondition_eager` outside any ``torch.compile`` graph (bookkeeping, checks).

        ``torch.compiler.disable`` is applied on first use, not at import (importing torch's compiler
        stack has side effects: warning filters, sympy).
        """
        fn = _EAGER.get("precondition")
        if fn is None:
            fn = _EAGER["precondition"] = torch.compiler.disable(_MFACBase._precondition_eager)
        return fn(self)

    def _precondition_eager(self) -> list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]] | None:
        """Add the current gradient to the window; return ``(group, param, direction)`` per param.

        ``direction`` is ``F^{-1} g`` restricted to the parameter, shaped like it, in the window's
        dtype, zero at masked-out coordinates. Only parameters with a gradient this step are listed.
        Returns None when the step is skipped (non-finite gradient with ``skip_nonfinite``).
        """
        ngrads, damp = self._check_global_settings()
        group_of: dict[int, dict[str, Any]] = {}
        present = []
        for group in self.param_groups:
            for p in group["params"]:
                group_of[id(p)] = group
                if p.grad is not None:
                    if p.grad.layout != torch.strided:
                        raise TypeError(
                            f"M-FAC does not support sparse gradients; {self._name(p)} has a "
                            f"{p.grad.layout} gradient"
                        )
                    present.append(p)
        if not present:
            return []
        self._ensure_layout(present, ngrads, damp)
        layout, fisher, flat = self._layout, self._fisher, self._flat
        assert layout is not None and fisher is not None and flat is not None
        if present[0].device != layout.device:
            raise ValueError(
                f"the parameters moved to {present[0].device} after the window was created on "
                f"{layout.device}; create the optimizer after moving the model"
            )
        grads = [p.grad for p in layout.params]
        decays = [group_of[id(p)]["weight_decay"] for p in layout.params]
        layout.gather(grads, flat, decays)
        try:  # shape: (d,), as flat (FSDP: this rank's local coordinates; DDP: all, step all-gathered)
            direction = self._placement.update_mul(fisher, flat, check_finite=self.check_finite)
        except NonFiniteGradientError as err:
            self._nonfinite(flat, elsewhere=isinstance(err, NonFiniteElsewhere))
            return None
        self._num_steps += 1
        return [
            (group_of[id(p)], p, layout.scatter(direction, i))
            for i, p in enumerate(layout.params)
            if p.grad is not None
        ]

    def _nonfinite(self, flat: torch.Tensor, elsewhere: bool) -> None:
        """Skip or raise for a non-finite gradient (``elsewhere``: found by a vote over processes)."""
        assert self._layout is not None
        slots = self._layout.slots
        parts = [flat[s.offset : s.offset + s.size] for s in slots]
        bad = [self._name(s.param) for s, part in zip(slots, parts, strict=True) if not _finite(part)]
        if not bad:
            bad = [
                "the part of the parameters another rank holds"
                if elsewhere
                else "all parameters together (each part is finite, the squared norm overflows)"
            ]
        if self.skip_nonfinite:
            self._num_skipped += 1
            logger.debug("M-FAC step skipped: non-finite gradient in %s", ", ".join(bad))
            return
        raise ValueError(
            f"gradient (plus weight_decay * parameter) must be finite, with a squared norm finite in "
            f"{flat.dtype}; got NaN, inf or an overflowing norm in "
            f"{', '.join(bad)}; the window and the parameters were left untouched (pass "
            "skip_nonfinite=True to skip such steps instead)"
        )

    def _apply(self, directions: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; ``closure`` (optional) is evaluated once, with gradients enabled, first.

        Returns:
            The closure's return value (the loss), or None without a closure.

        Raises:
            ValueError: a non-finite gradient (unless ``skip_nonfinite``); nothing is changed then.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        directions = self._precondition()
        if directions:
            self._apply(directions)
        return loss

    # ------------------------------------------------------------------ checkpoints
    def __getstate__(self) -> dict[str, Any]:
        # torch pickles only defaults, state and param_groups; keep the window too (copy.deepcopy)
        return {**super().__getstate__(), **{k: self.__dict__[k] for k in _PICKLED}}

    def _global_state(self) -> dict[str, Any]:
        layout, fisher = self._layout, self._fisher
        position = {id(p): i for i, p in enumerate(self._params())}
        return {
            "version": _STATE_VERSION,
            "num_steps": self._num_steps,
            "num_skipped": self._num_skipped,
            "masks": {position[id(p)]: m for p, m in self._masks.items()},
            "active": None if layout is None else [position[id(p)] for p in layout.params],
            "window_dtype": None if layout is None else layout.dtype,
            "density": self._density,
            "window_storage": self._window_storage,
            "fisher": fisher.state_dict() if fisher is not None and self.save_window else None,
        }

    def state_dict(self) -> dict[str, Any]:
        """Return the optimizer state, the curvature under ``state[0]["mfac"]`` (as LBFGS does).

        ``state[0]["mfac"]`` holds the window (``fisher``: the operator's ``state_dict``, or None
        with ``save_window=False``), the window's coordinates (``active``: positions of the
        parameters in param-group order; ``masks``), its dtype, and the step counters.
        Per-parameter state (momentum buffers) is where torch puts it. Tensors are references, as
        in torch.
        """
        packed = super().state_dict()
        packed["state"] = dict(packed["state"])
        packed["state"][0] = {**packed["state"].get(0, {}), _STATE_KEY: self._global_state()}
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict` output: the window comes back exactly, in its own dtype.

        Unlike ``torch.optim.Optimizer.load_state_dict``, tensors keep the dtype they were saved in
        (torch would cast them to the parameter's: a float32 window and momentum of bfloat16
        parameters would lose bits); they move to the parameters' device. The optimizer must have
        been built with the same masks. A checkpoint saved with ``save_window=False`` restarts the
        window empty (everything else is restored). Everything is checked before anything changes.
        """
        check_optimizer_state(self, state_dict, _STATE_KEY, _WINDOW_DTYPES)
        per_param: dict[Any, dict[str, Any]] = {}
        glob = None
        for key, value in state_dict["state"].items():
            value = dict(value)
            if _STATE_KEY in value:
                glob = value.pop(_STATE_KEY)
            if value:
                per_param[key] = value
        params = self._params()
        window = self._restore_window(glob, params, state_dict["param_groups"])
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        id_map = dict(zip(saved_ids, params, strict=True))
        for key, value in per_param.items():
            param = id_map.get(key)
            if param is None:
                continue
            self.state[param] = {
                k: v.to(device=param.device, copy=True)
                if isinstance(v, torch.Tensor)
                else copy.deepcopy(v)
                for k, v in value.items()
            }
        self._layout, self._fisher, self._num_steps, self._num_skipped = window
        self._flat = (
            None
            if self._layout is None
            else torch.empty(self._layout.dim, dtype=self._layout.dtype, device=self._layout.device)
        )

    def _restore_window(
        self, glob: dict[str, Any] | None, params: list[torch.Tensor], groups: list[dict[str, Any]]
    ) -> tuple[Layout | None, SlidingInverseFisher | None, int, int]:
        """Check the saved global state against this optimizer and rebuild the window from it."""
        if glob is None:  # saved before the first step
            return None, None, 0, 0
        check_saved_settings(
            glob, {i: self._masks[p] for i, p in enumerate(params) if p in self._masks},
            version=_STATE_VERSION, density=("density", self._density),
            window_storage=("window_dtype", self._window_storage),
        )
        counters = int(glob["num_steps"]), int(glob["num_skipped"])
        if glob["active"] is None:
            return None, None, *counters
        if len(params) != sum(len(g["params"]) for g in groups):
            raise ValueError(
                "loaded state dict has a different number of parameters than this optimizer"
            )
        try:
            active = [params[i] for i in glob["active"]]
        except IndexError:
            raise ValueError(
                f"the checkpoint's window covers parameter positions {glob['active']}, this "
                f"optimizer has {len(params)} parameters"
            ) from None
        settings = {}
        for key in _GLOBAL_KEYS:
            seen = {g[key] for g in groups}
            if len(seen) != 1:
                raise ValueError(f"{key} must be the same in every saved param group, got {seen}")
            settings[key] = seen.pop()
        layout = self._new_layout(active, glob["window_dtype"])
        fisher = self._new_fisher(layout, settings["ngrads"], settings["damp"])
        if glob["fisher"] is not None:
            fisher.load_state_dict(glob["fisher"])  # checks dim, ngrads, damp, average_over
        else:
            logger.debug("M-FAC checkpoint without window: the window restarts empty")
        return layout, fisher, *counters


class MFACPreconditioner(_MFACBase):
    r"""Rewrites each ``p.grad`` in place with the M-FAC direction ``F^{-1} (grad + wd * w)``.

    Any optimizer then consumes the preconditioned gradients::

        precond = MFACPreconditioner(model.parameters(), ngrads=256, damp=1e-4)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            precond.step()  # p.grad <- F^{-1} g, restricted to p
            opt.step()

    ``MFAC(lr, momentum=0, weight_decay=wd)`` equals ``MFACPreconditioner(weight_decay=wd)``
    followed by ``SGD(lr)``; the preconditioner with ``SGD(momentum=mu)`` gives torch's heavy-ball
    momentum (``v <- mu v + u``, ``v_1 = u_1``) instead of the paper's EMA. Decoupled weight decay
    goes to the optimizer (``AdamW(weight_decay=...)``), with ``weight_decay=0`` here.

    ``step`` writes ``p.grad`` only for parameters that have a gradient; masked-out coordinates of
    ``p.grad`` become zero (the weights are not touched: zero them once, e.g. by pruning; SGD, Adam
    and AdamW then keep them at zero). A skipped step (``skip_nonfinite=True``) leaves every
    ``p.grad`` as it was, so a ``GradScaler`` still sees the inf and skips the optimizer's step.
    Param groups carry ``weight_decay`` (per group), ``ngrads`` and ``damp`` (global).
    """

    def __init__(
        self,
        params: Iterable[Any],
        ngrads: int = 1024,
        damp: float = 1e-5,
        weight_decay: float = 0.0,
        *,
        masks: Mapping[torch.Tensor, torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
        average_over: Literal["seen", "ngrads"] = "seen",
        save_window: bool = True,
        skip_nonfinite: bool = False,
        distributed: Any = None,
        check_finite: bool = True,
        density: float | None = None,
        values_dtype: torch.dtype | None = None,
        index_dtype: torch.dtype | None = None,
        window_dtype: torch.dtype | None = None,
    ) -> None:
        defaults = {"ngrads": ngrads, "damp": damp, "weight_decay": weight_decay}
        super().__init__(
            params,
            defaults,
            masks=masks,
            dtype=dtype,
            average_over=average_over,
            save_window=save_window,
            skip_nonfinite=skip_nonfinite,
            distributed=distributed,
            check_finite=check_finite,
            density=density,
            values_dtype=values_dtype,
            index_dtype=index_dtype,
            window_dtype=window_dtype,
        )

    def _apply(self, directions: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]) -> None:
        for _, p, direction in directions:
            self._local(p.grad).copy_(direction)


MFACPreconditioner.__doc__ = (MFACPreconditioner.__doc__ or "") + COMMON_DOC


class MFAC(_MFACBase):
    r"""The M-FAC optimizer: ``w <- w - lr v``, ``v <- momentum v + (1 - momentum) F^{-1} g``.

    A drop-in ``torch.optim.Optimizer`` (param groups, LR schedulers, closures, ``state_dict``)::

        opt = MFAC(model.parameters(), lr=1e-3, ngrads=256, damp=1e-4, momentum=0.9)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

    Per group: ``lr >= 0``, ``momentum`` in ``[0, 1)`` and ``weight_decay >= 0``. Momentum is the
    paper's exponential average of the preconditioned directions, ``v_0 = 0`` (so the first step
    moves ``(1 - momentum) lr u``); it is stored per parameter as ``state[p]["momentum_buffer"]`` in
    the window's dtype (float32 for bfloat16 parameters). For torch's heavy-ball momentum, or any
    other update rule, use :class:`MFACPreconditioner` with that optimizer.

    Masked-out coordinates of the parameters (``masks``) are set to zero at every step.

    Example (the first step with ``average_over="seen"`` is the Sherman-Morrison step
    ``u = g / (damp + |g|^2)``):

        >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
        >>> opt = MFAC([w], lr=1.0, ngrads=4, damp=1e-2)
        >>> w.grad = torch.tensor([0.3, 0.4], dtype=torch.float64)   # |g|^2 = 0.25
        >>> opt.step()
        >>> w.detach() - torch.tensor([3.0, 4.0], dtype=torch.float64)  # -lr g / (0.01 + 0.25)
        tensor([-1.1538, -1.5385], dtype=torch.float64)
        >>> w.grad = 10 * w.grad     # the same direction, 10x longer: F = damp I + (g1 g1^T + g2 g2^T) / 2
        >>> before = w.detach().clone(); opt.step()
        >>> round(float((w.detach() - before).norm()), 4)    # |g2| / (0.01 + (0.25 + 25) / 2): shorter
        0.3957

    Learning rate: the step is not scale-invariant, and SGD's learning rates do not carry over.
    The window holds the current gradient, so ``u = F^{-1} g`` lies in the span of the window, where
    ``F``'s eigenvalues are ``damp + sigma_k^2 / s`` (``sigma_k^2``: eigenvalues of ``G G^T``). Two
    regimes follow:

    .. math::

        u \approx \frac{g}{\lambda + \lVert g \rVert^2 / c}, \qquad 1 \le c \le s .

    * ``damp`` large against ``|g|^2 / s``: ``u ~ g / damp``, SGD with learning rate ``lr / damp``.
    * ``damp`` small (the usual case, ``damp ~ 1e-5..1e-3``): ``u ~ g / (damp + |g|^2 / c)`` with ``c``
      between 1 (a window of nearly parallel gradients: exactly ``g / (damp + |g|^2)``, the first step
      with ``average_over="seen"``) and ``s`` (mutually orthogonal gradients of equal norm). So
      ``|u| ~ c / |g|``: multiplying the loss by 10 makes the step 10 times *shorter*, and steps grow as
      gradients shrink. For small ``damp`` the learning rate that works scales like ``|g|^2``, not like
      SGD's.

    Rule of thumb: ``lr ~ lr_SGD * (damp + |g|^2 / c)`` with ``|g|^2`` the squared norm of a typical
    mini-batch gradient at the start (``c = ngrads`` for diverse gradients, 1 for collinear ones), then a
    log-spaced sweep around it (factors of 3); the learning rates that train can differ from SGD's by
    orders of magnitude either way (a model whose ``|g|^2`` is ~100 can need ``lr ~ 1``). Gradient
    accumulation, loss scaling or a different loss reduction (sum vs mean) changes ``|g|`` and hence the
    step: keep them fixed when reusing a tuned ``lr`` (see the Hugging Face Trainer note in the
    integration docs).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        ngrads: int = 1024,
        damp: float = 1e-5,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        masks: Mapping[torch.Tensor, torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
        average_over: Literal["seen", "ngrads"] = "seen",
        save_window: bool = True,
        skip_nonfinite: bool = False,
        distributed: Any = None,
        check_finite: bool = True,
        density: float | None = None,
        values_dtype: torch.dtype | None = None,
        index_dtype: torch.dtype | None = None,
        window_dtype: torch.dtype | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "ngrads": ngrads,
            "damp": damp,
            "momentum": momentum,
            "weight_decay": weight_decay,
        }
        super().__init__(
            params,
            defaults,
            masks=masks,
            dtype=dtype,
            average_over=average_over,
            save_window=save_window,
            skip_nonfinite=skip_nonfinite,
            distributed=distributed,
            check_finite=check_finite,
            density=density,
            values_dtype=values_dtype,
            index_dtype=index_dtype,
            window_dtype=window_dtype,
        )

    def _check_group(self, group: Mapping[str, Any]) -> None:
        super()._check_group(group)
        if isinstance(group["lr"], torch.Tensor):
            raise TypeError("lr must be a float (tensor learning rates are not supported)")
        check_nonnegative(group["lr"], "lr")
        momentum = check_real(group["momentum"], "momentum")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")

    def _apply(self, directions: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]) -> None:
        for group, p, direction in directions:
            momentum = group["momentum"]
            if momentum != 0.0:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = torch.zeros_like(direction, memory_format=torch.contiguous_format)
                    state["momentum_buffer"] = buf
                buf.mul_(momentum).add_(direction, alpha=1.0 - momentum)
                direction = buf
            # computed in the window's dtype, rounded once
            self._local(p).add_(direction, alpha=-group["lr"])
            pruned = self._pruned.get(p)
            if pruned is not None:
                p.masked_fill_(pruned, 0.0)


MFAC.__doc__ = (MFAC.__doc__ or "") + COMMON_DOC
