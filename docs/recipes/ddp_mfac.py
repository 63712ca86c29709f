"""M-FAC under DistributedDataParallel: each rank keeps a 1/R slice of the gradient window.

    torchrun --standalone --nproc_per_node=2 docs/recipes/ddp_mfac.py [--check OUT.json]

With ``--check``, rank 0 also trains the same model in one process on the concatenation of every rank's
batches (what DDP's averaged gradient is the gradient of) and writes the largest parameter difference to
``OUT.json``; ``tests/test_integrations.py`` runs this file that way.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import mfac
from mfac.distributed import DistributedWindow


def make_model() -> torch.nn.Module:
    """Build the same small MLP on every rank."""
    torch.manual_seed(0)  # the same initial weights on every rank
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the mini-batch of `rank` at `step`."""
    gen = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own data
    return torch.randn(16, 12, generator=gen), torch.randint(0, 4, (16,), generator=gen)


def main() -> None:
    """Train with DDP + a sharded window; with --check compare against one process."""
    dist.init_process_group("gloo")  # "nccl" on GPUs
    rank, world = dist.get_rank(), dist.get_world_size()
    model = DDP(make_model())
    opt = mfac.MFAC(model.parameters(), lr=1e-2, ngrads=8, damp=1e-3, momentum=0.9,
                    distributed=DistributedWindow())  # the window sharded over the ranks
    steps = 6
    for step in range(steps):
        x, y = batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()  # DDP all-reduces the gradient
        opt.step()  # one all-reduce of ngrads floats, then the step's slices are all-gathered
    if "--check" in sys.argv and rank == 0:
        plain = make_model()
        ref = mfac.MFAC(plain.parameters(), lr=1e-2, ngrads=8, damp=1e-3, momentum=0.9)
        for step in range(steps):
            xs, ys = zip(*(batch(r, step) for r in range(world)), strict=True)
            ref.zero_grad()
            torch.nn.functional.cross_entropy(plain(torch.cat(xs)), torch.cat(ys)).backward()
            ref.step()
        diff = max(float((a - b).abs().max())
                   for a, b in zip(model.module.parameters(), plain.parameters(), strict=True))
        out = sys.argv[sys.argv.index("--check") + 1]
        with open(out, "w") as f:
            window = list(opt.inverse_fisher.window.shape)
            json.dump({"max_abs_diff": diff, "world": world, "window": window}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
