"""Checks of an M-FAC optimizer checkpoint before anything is loaded (private to :mod:`mfac.optim`).

The structure, the per-parameter state (momentum buffers shaped like their parameter, finite) and the
saved global state's counters and types. The window itself is checked by
:meth:`mfac.fisher.SlidingInverseFisher.check_state_dict` when it is rebuilt. Malformed or corrupt
entries raise ``ValueError`` (a state dict that is not a dict: ``TypeError``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mfac.numerics import check_not_meta

__all__: list[str] = []


def check_optimizer_state(
    opt: Any, state_dict: Any, state_key: str, window_dtypes: tuple[torch.dtype, ...]
) -> None:
    """Check the structure and the per-parameter state of an M-FAC ``state_dict``; change nothing.

    The window itself is checked by :meth:`~mfac.fisher.SlidingInverseFisher.check_state_dict` when it is
    rebuilt (finiteness, counters, shapes, Gram diagonal against the window's row norms).
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    missing = [k for k in ("state", "param_groups") if k not in state_dict]
    if missing:
        raise ValueError(
            f"state_dict is missing {missing}; expected the output of {type(opt).__name__}.state_dict()"
        )
    groups, states = state_dict["param_groups"], state_dict["state"]
    if not isinstance(states, Mapping) or not isinstance(groups, (list, tuple)) or not all(
        isinstance(g, Mapping) and "params" in g for g in groups
    ):
        raise ValueError(
            "state_dict['state'] must be a dict and state_dict['param_groups'] a list of dicts "
            "with 'params'"
        )
    params = opt._params()
    saved_ids = [i for g in groups for i in g["params"]]
    if len(saved_ids) != len(params):
        raise ValueError(
            f"state_dict has {len(saved_ids)} parameters, this optimizer {len(params)}: "
            "a checkpoint of another model or optimizer"
        )
    id_map = dict(zip(saved_ids, params, strict=True))
    for key, value in states.items():
        if not isinstance(value, Mapping):
            raise ValueError(f"state_dict['state'][{key!r}] must be a dict, got {type(value).__name__}")
        glob = value.get(state_key)
        if glob is not None:
            _check_global_state(glob, window_dtypes)
        param = id_map.get(key)
        for name, item in value.items():
            if name == state_key or not isinstance(item, torch.Tensor):
                continue
            if param is None:
                raise ValueError(
                    f"state_dict['state'] has an entry for parameter id {key!r}, which no param "
                    f"group lists (ids: {saved_ids})"
                )
            where = f"state of {opt._name(param)}: {name!r}"
            if not item.is_floating_point():
                raise ValueError(f"{where} must be a floating tensor, got dtype {item.dtype}")
            check_not_meta(item, where)
            if name == "momentum_buffer" and tuple(item.shape) != tuple(opt._local(param).shape):
                raise ValueError(
                    f"{where} has shape {tuple(item.shape)}, the parameter "
                    f"{tuple(opt._local(param).shape)} (a checkpoint of another model?)"
                )
            if not bool(torch.isfinite(item).all()):
                raise ValueError(f"{where} must be finite, it holds NaN or inf")

def _check_global_state(glob: Any, window_dtypes: tuple[torch.dtype, ...]) -> None:
    """Structure and ranges of the saved global (curvature) state."""
    if not isinstance(glob, Mapping):
        raise ValueError(f"the saved M-FAC state must be a dict, got {type(glob).__name__}")
    keys = ("version", "num_steps", "num_skipped", "masks", "active", "window_dtype", "fisher")
    missing = [k for k in keys if k not in glob]
    if missing:
        raise ValueError(f"the saved M-FAC state (state_dict['state'][0]['mfac']) is missing {missing}")
    for key in ("num_steps", "num_skipped"):
        value = glob[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"the saved M-FAC state has {key}={value!r}; it must be an int >= 0")
    if glob["active"] is not None and glob["window_dtype"] not in window_dtypes:
        raise ValueError(
            f"the saved M-FAC state has window_dtype={glob['window_dtype']!r}; expected one of "
            f"{window_dtypes}"
        )
    if not isinstance(glob["masks"], Mapping) or not all(
        isinstance(m, torch.Tensor) and m.dtype == torch.bool for m in glob["masks"].values()
    ):
        raise ValueError("the saved M-FAC state's masks must be a dict {position: bool tensor}")


def check_saved_settings(
    glob: Mapping[str, Any], masks: Mapping[int, torch.Tensor], *, version: int, **settings: tuple[str, Any]
) -> None:
    """Raise ``ValueError`` unless a checkpoint's window settings are this optimizer's; change nothing.

    ``glob`` is the saved global state (checked in form by :func:`check_optimizer_state`); ``masks`` this
    optimizer's masks by parameter position; ``settings`` maps a saved key to ``(public name, value)``
    (e.g. ``density=("density", 0.01)``): each saved value must equal this optimizer's.
    """
    if glob.get("version") != version:
        raise ValueError(f"unsupported M-FAC state version {glob.get('version')!r} (expected {version})")
    theirs = glob["masks"]
    same = masks.keys() == theirs.keys() and all(
        torch.equal(masks[i], theirs[i].to(masks[i].device)) for i in masks
    )
    if not same:
        raise ValueError(
            "the checkpoint was saved with masks on parameters at positions "
            f"{sorted(theirs)}, this optimizer has masks on {sorted(masks)} (or different "
            "values); build the optimizer with the same masks as the one that was saved"
        )
    for key, (name, mine) in settings.items():
        if glob.get(key) != mine:
            raise ValueError(
                f"the checkpoint was saved with {name}={glob.get(key)!r}, this optimizer has "
                f"{name}={mine!r}; build the optimizer with the saved {name}"
            )
