"""Accuracy of the streamed block statistics: float32 vs float64 accumulation vs the materialised route.

The block-diagonal inverse Fisher built three ways from the same float32 gradients, each compared with a
float64 reference (the same gradients cast to float64, built in float64):

* ``stream f32``: :class:`~mfac.fisher.BlockFisherAccumulator` with float32 statistics (the default),
  chunks of ``--chunk`` rows;
* ``stream f64``: the same with ``accumulate_dtype=torch.float64`` (twice the memory);
* ``static f32``: :class:`~mfac.fisher.StaticInverseFisher` on the materialised ``G`` (float32 Gram
  products summed in float64).

Gradients: rows with a common component and heavy-tailed column scales (as real gradients have: nearly
collinear rows make the Fisher ill-conditioned), ``damp`` relative to the mean Fisher diagonal. Reported:
the relative 2-norm error (``experiments._metrics.rel_err``) of ``F^{-1} x`` for four random ``x`` and
of ``diag(F^{-1})``.

    python experiments/block_stream_accuracy.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments._metrics import rel_err  # noqa: E402
from experiments._report import fmt_e, md_head, md_row  # noqa: E402
from mfac.fisher import BlockFisherAccumulator, StaticInverseFisher  # noqa: E402


def gradients(m: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(2.0 * torch.randn(d, generator=gen))  # heavy-tailed coordinate scales
    common = torch.randn(d, generator=gen)
    coeff = 1.0 + 0.3 * torch.randn(m, 1, generator=gen)
    rows = coeff * common + 0.3 * torch.randn(m, d, generator=gen)
    return (rows * scale).float()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ngrads", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=20_000)
    parser.add_argument("--block", type=int, default=50)
    parser.add_argument("--chunk", type=int, default=25)
    parser.add_argument("--damps", type=float, nargs="+", default=[1e-1, 1e-3, 1e-5, 1e-7])
    args = parser.parse_args(argv)
    m, d, block = args.ngrads, args.dim, args.block
    grads = gradients(m, d, 0)
    x = torch.randn(4, d, generator=torch.Generator().manual_seed(1))  # seeded: a rerun prints the same
    print(f"m = {m}, d = {d}, B = {block}, chunk = {args.chunk} rows; relative errors against float64\n")
    print(md_head(["damp (x mean diag)", "stream f32: mul", "diag", "stream f64: mul", "diag",
                   "static f32: mul", "diag"]))
    mean_diag = float(grads.double().square().mean())
    for rel_damp in args.damps:
        damp = rel_damp * mean_diag
        ref = StaticInverseFisher(grads.double(), damp, block_size=block)
        ref_mul, ref_diag = ref.mul(x.double()), ref.diag()
        cells = []
        for acc_dtype in (torch.float32, torch.float64):
            acc = BlockFisherAccumulator(d, block, accumulate_dtype=acc_dtype)
            for lo in range(0, m, args.chunk):
                acc.add(grads[lo : lo + args.chunk])
            op = acc.finalize(damp)
            cells += [fmt_e(rel_err(op.mul(x), ref_mul)), fmt_e(rel_err(op.diag(), ref_diag))]
        static = StaticInverseFisher(grads, damp, block_size=block)
        cells += [fmt_e(rel_err(static.mul(x), ref_mul)), fmt_e(rel_err(static.diag(), ref_diag))]
        print(md_row([f"{rel_damp:g}", *cells]))


if __name__ == "__main__":
    main()
