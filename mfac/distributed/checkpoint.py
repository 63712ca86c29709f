"""Sharded checkpoints: per-rank files, and the offline tools that consolidate and reshard them.

:func:`save_sharded` / :func:`load_sharded` run at checkpoint time (collective only in that every
rank agrees the files are there); :func:`consolidate_state_dicts` and :func:`shard_state_dict` are
offline tools (no process group); :func:`state_nbytes` measures an operator's memory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mfac.distributed._comm import _agree, _rank_world
from mfac.distributed._layout import ShardSpec

__all__ = [
    "consolidate_state_dicts",
    "load_sharded",
    "save_sharded",
    "shard_state_dict",
    "state_nbytes",
]


def state_nbytes(obj: Any) -> int:
    """Bytes of the distinct tensor storages held in ``obj``'s attributes (an operator's memory)."""
    seen: dict[int, int] = {}
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())



_FILE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.pt$")


def _shard_file(directory: Path, rank: int, world: int) -> Path:
    return directory / f"shard-{rank:05d}-of-{world:05d}.pt"


def save_sharded(
    state: Mapping[str, Any], directory: str | os.PathLike, *, process_group: Any = None
) -> Path:
    """Each rank writes its own ``state`` to ``directory/shard-RRRRR-of-WWWWW.pt`` (atomic rename).

    ``state`` is any per-rank state dict: a sharded operator's, or an optimizer's whose window is
    sharded. Collective only in that it ends with a barrier (all files exist when it returns).
    """
    rank, world = _rank_world(process_group)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = _shard_file(directory, rank, world)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(dict(state), tmp)
    os.replace(tmp, path)
    if world > 1:
        dist.barrier(group=process_group)
    return path


def load_sharded(
    directory: str | os.PathLike,
    *,
    process_group: Any = None,
    map_location: Any = "cpu",
    weights_only: bool = True,
) -> dict[str, Any]:
    """Read, on each rank, the file :func:`save_sharded` wrote for it (collective).

    Raises on every rank (never hangs) when any rank's file is missing or the checkpoint was written
    by a different number of ranks (then say so: reshard with :func:`consolidate_state_dicts` and
    :func:`shard_state_dict`).
    """
    rank, world = _rank_world(process_group)
    directory = Path(directory)
    error: BaseException | None = None
    state: dict[str, Any] = {}
    try:
        path = _shard_file(directory, rank, world)
        if not path.exists():
            worlds = sorted(
                {
                    int(mt.group(2))
                    for p in directory.glob("shard-*.pt")
                    if (mt := _FILE.match(p.name))
                }
            )
            if worlds and world not in worlds:
                raise ValueError(
                    f"{directory} holds a checkpoint written by {worlds} rank(s), this group has "
                    f"{world}: reshard it (consolidate_state_dicts, then shard_state_dict)"
                )
            raise FileNotFoundError(f"no shard file for rank {rank} of {world}: {path}")
        state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except (OSError, ValueError, RuntimeError) as err:
        error = err
    _agree("load_sharded", error, {}, [], process_group, world, None)
    return state


def consolidate_state_dicts(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One single-process :class:`~mfac.fisher.sliding.SlidingInverseFisher` state from all ranks'.

    ``states``: every rank's :meth:`ShardedSlidingInverseFisher.state_dict` (any order). Checks that
    they form one layout and agree on the replicated state; concatenates the window slices.
    No process group needed (an offline tool, e.g. to reshard or to inspect a run).
    """
    if not states:
        raise ValueError("states must hold every rank's state_dict, got none")
    by_rank = sorted(states, key=lambda s: int(s["shard"]["rank"]))
    bounds = [tuple(s["shard"]["bounds"]) for s in by_rank]
    ranks = [int(s["shard"]["rank"]) for s in by_rank]
    if len(set(bounds)) != 1 or ranks != list(range(len(bounds[0]) - 1)):
        raise ValueError(
            f"states do not form one layout: ranks {ranks} with bounds {[list(b) for b in bounds]}"
        )
    first = by_rank[0]
    for s in by_rank[1:]:
        for key in ("ngrads", "damp", "average_over", "num_seen", "since_refactor", "jitter"):
            if s.get(key) != first.get(key):
                raise ValueError(f"states disagree on {key}: {first.get(key)!r} vs {s.get(key)!r}")
        for key in ("gram", "inv"):
            if not torch.equal(s[key], first[key]):
                raise ValueError(f"states disagree on the replicated {key!r} matrix")
    full = {k: v for k, v in first.items() if k != "shard"}
    full["grads"] = torch.cat([s["grads"] for s in by_rank], dim=1)
    full["dim"] = int(bounds[0][-1])
    return full


def shard_state_dict(state: Mapping[str, Any], shard: ShardSpec) -> dict[str, Any]:
    """Cut a single-process ``SlidingInverseFisher`` state (or a consolidated one) for one rank."""
    if int(state["dim"]) != shard.dim:
        raise ValueError(f"state has dim={state['dim']}, the layout d={shard.dim}")
    out = dict(state)
    out["grads"] = shard.take(state["grads"]).clone()
    out["dim"] = shard.size
    out["shard"] = shard.to_dict()
    return out
