"""Layer-wise pruning of a character-level GPT-2 on Shakespeare: SparseGPT and OBC against the baselines.

A ``transformers.GPT2LMHeadModel`` (``experiments/_chargpt.py``: 4 blocks, width 128, 0.8M parameters, its
head tied to the embedding) is trained on the plays of the ``shakespeare`` package (whole plays held out
for validation; cached under ``--out``), then pruned one-shot (no fine-tuning) at 50/60/70/80 % unstructured
and at 2:4 and 4:8 by

* magnitude (layer-wise, ``mfac.prune.magnitude_prune(scope="layer")``);
* Wanda (``|W_ij| ||X_j||`` per output row, ``prune_layerwise(method="wanda")``);
* SparseGPT (ours, ``prune_layerwise``, sequential, blocksize 128, damp 0.01);
* OBC (ours, exact greedy per row, ``method="obc"``: ``--obc-settings``, slow at width 512);
* global M-FAC OBS (``mfac.prune_oneshot``, block-diagonal Fisher with ``--mfac-block`` and ``--ngrads``
  gradients of the calibration windows, ``relative_damp``);
* llm-compressor's ``SparseGPTModifier`` (``--peer-python``: a Python with ``llmcompressor`` installed runs
  ``experiments/_llmc_peer.py`` in a subprocess on the same checkpoint and calibration windows).

Every method prunes the same 16 projections (the Conv1D layers of the blocks; never the tied head or the
embeddings) from the same dense checkpoint with the same calibration windows. Reported: validation
perplexity, wall time of the pruning call and the peak RSS increase during it (the process's ``VmHWM``
after a reset, minus the RSS before; the peer measures its own ``oneshot`` call the same way).

Outputs in ``--out``: ``results.json``, ``results.md`` and ``perplexity.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments._chargpt import (
    ModelConfig,
    eval_windows,
    lm_loss,
    load_chars,
    perplexity,
    random_windows,
    train_or_load,
)
from experiments._measure import measured
from experiments._provenance import RunRecord
from experiments._report import jsonable, md_head, md_row
from mfac.prune import magnitude_prune, prune_layerwise, prune_oneshot

logger = logging.getLogger("layerwise_pruning")

SETTINGS = ("50%", "60%", "70%", "80%", "2:4", "4:8")
METHODS = ("magnitude", "wanda", "sparsegpt", "sparsegpt_block", "obc", "mfac", "llmcompressor")
LABELS = {
    "dense": "dense",
    "magnitude": "magnitude (layer-wise)",
    "wanda": "Wanda",
    "sparsegpt": "SparseGPT (mfac)",
    "sparsegpt_block": "SparseGPT (mfac, true_sequential=False)",
    "obc": "OBC (mfac)",
    "mfac": "global M-FAC OBS",
    "llmcompressor": "llm-compressor SparseGPT",
}


def setting_args(setting: str) -> dict:
    """``"50%"`` -> ``{"sparsity": 0.5}``, ``"2:4"`` -> ``{"pattern": "2:4"}``."""
    if setting.endswith("%"):
        return {"sparsity": float(setting[:-1]) / 100}
    return {"pattern": setting}


def targets_of(model) -> list[str]:
    return [f"transformer.h.{i}.{n}.weight" for i in range(len(model.transformer.h))
            for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def fwd(model, ids):
    return model(input_ids=ids)


def run_ours(method, dense, setting, calib, args):
    model = copy.deepcopy(dense)
    kw = setting_args(setting)
    batches = [calib[i : i + args.calib_batch] for i in range(0, len(calib), args.calib_batch)]
    names = targets_of(model)
    if method == "magnitude":
        call = lambda: magnitude_prune(model, params=names, scope="layer", **kw)  # noqa: E731
    elif method in ("wanda", "sparsegpt", "obc", "sparsegpt_block"):
        solver = "sparsegpt" if method == "sparsegpt_block" else method
        call = lambda: prune_layerwise(model, batches, method=solver, forward_fn=fwd,  # noqa: E731
                                       blocksize=128, damp=0.01, true_sequential=method != "sparsegpt_block",
                                       **kw)
    elif method == "mfac":
        grads = [calib[i : i + 1] for i in range(min(args.ngrads, len(calib)))]
        call = lambda: prune_oneshot(  # noqa: E731
            model, lm_loss, grads, ngrads=len(grads), damp=args.mfac_damp, relative_damp=True,
            block_size=args.mfac_block, params=names, scope="global", **kw)
    else:
        raise ValueError(method)
    masks, seconds, mem = measured(call)
    sparsity = sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    return model, seconds, mem, sparsity


def run_peer(python, dense, settings, calib, out_dir):
    """All settings in one subprocess (llm-compressor's import takes a minute here); returns per setting."""
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.pt"
        torch.save({"config": dense.config.to_dict(), "state": dense.state_dict(), "calib": calib,
                    "settings": [setting_args(s) for s in settings]}, job)
        result = Path(tmp) / "out.pt"
        cmd = [python, str(Path(__file__).resolve().parent / "_llmc_peer.py"), "--job", str(job),
               "--out", str(result), "--threads", str(torch.get_num_threads())]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        (out_dir / "llmcompressor.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"llm-compressor peer failed (log in {out_dir / 'llmcompressor.log'}): {tail}")
        runs = torch.load(result, map_location="cpu", weights_only=False)["runs"]
    out = {}
    for setting, run in zip(settings, runs, strict=True):
        model = copy.deepcopy(dense)
        model.load_state_dict(run["state"])
        out[setting] = (model, run["seconds"], run["peak_delta"])
    return out


def pruned_sparsity(model) -> float:
    ws = [model.get_parameter(n) for n in targets_of(model)]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def plot(results, settings, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    unstructured = [s for s in settings if s.endswith("%")]
    nm = [s for s in settings if not s.endswith("%")]
    dense = results["dense"]["ppl"]
    for ax, group, title in ((axes[0], unstructured, "unstructured"), (axes[1], nm, "N:M")):
        for method, label in LABELS.items():
            if method == "dense":
                continue
            pts = [(i, results["runs"][method][s]["ppl"]) for i, s in enumerate(group)
                   if s in results["runs"].get(method, {})]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.axhline(dense, color="k", ls="--", lw=1, label="dense")
        ax.set_xticks(range(len(group)), group)
        ax.set_yscale("log")
        ax.set_title(f"validation perplexity, {title}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results, settings) -> str:
    lines = [f"Model: {results['model']}; dense validation perplexity {results['dense']['ppl']:.3f}.", ""]
    lines += ["Validation perplexity (lower is better):", "", md_head(["method", *settings])]
    for method in METHODS:
        runs = results["runs"].get(method)
        if runs:
            lines.append(md_row([LABELS[method]] + [f"{runs[s]['ppl']:.3f}" if s in runs else "-"
                                                    for s in settings]))
    lines += ["", "Wall time of the pruning call, s (peak RSS increase during it, MiB):", "",
              md_head(["method", *settings])]
    for method in METHODS:
        runs = results["runs"].get(method)
        if runs:
            cells = [f"{runs[s]['seconds']:.1f} ({runs[s]['peak_mib']:.0f})" if s in runs else "-"
                     for s in settings]
            lines.append(md_row([LABELS[method], *cells]))
    if "llmcompressor" in results["runs"] and "sparsegpt" in results["runs"]:
        ours, peer = results["runs"]["sparsegpt"], results["runs"]["llmcompressor"]
        common = [s for s in settings if s in ours and s in peer]
        lines += ["", "SparseGPT (mfac) vs llm-compressor, ratios ours / peer (perplexity, wall time):",
                  "", md_head(["", *common]),
                  md_row(["perplexity ratio", *[f"{ours[s]['ppl'] / peer[s]['ppl']:.4f}" for s in common]]),
                  md_row(["time ratio", *[f"{ours[s]['seconds'] / peer[s]['seconds']:.2f}" for s in common]])]
    if results.get("peer_error"):
        lines += ["", f"llm-compressor peer: {results['peer_error']}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/layerwise"))
    ap.add_argument("--quick", action="store_true", help="tiny model and data: seconds (smoke test)")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt,obc,mfac")
    ap.add_argument("--obc-settings", default="50%", help="settings OBC runs at (it costs O(r c^3))")
    ap.add_argument("--ncalib", type=int, default=64, help="calibration windows (of the model's seq length)")
    ap.add_argument("--calib-batch", type=int, default=8)
    ap.add_argument("--nvalid", type=int, default=200, help="validation windows")
    ap.add_argument("--ngrads", type=int, default=64, help="gradients for global M-FAC (one window each)")
    ap.add_argument("--mfac-block", type=int, default=128)
    ap.add_argument("--mfac-damp", type=float, default=0.1, help="relative damp of global M-FAC")
    ap.add_argument("--peer-python", default=None,
                    help="a python with llmcompressor installed (e.g. /work/venvs/llmc/bin/python)")
    ap.add_argument("--update", action="store_true",
                    help="keep the runs of other methods from an earlier results.json in --out")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for every method and the peer (0: torch's default)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("mfac").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    record = RunRecord(argv)
    settings = [s for s in args.settings.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    if args.peer_python:
        methods.append("llmcompressor")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {METHODS}")

    if args.quick:
        cfg = ModelConfig(n_embd=32, n_layer=2, n_head=2, seq=32, batch=8, steps=10, max_chars=50_000)
        args.ncalib, args.nvalid, args.ngrads = min(args.ncalib, 8), min(args.nvalid, 16), min(args.ngrads, 8)
    else:
        cfg = ModelConfig()
    data = load_chars(cfg.max_chars)
    dense, info = train_or_load(cfg, data, args.out)
    calib = random_windows(data.train, args.ncalib, cfg.seq, torch.Generator().manual_seed(1234))
    valid = eval_windows(data.valid, cfg.seq, args.nvalid)
    n_params = sum(p.numel() for p in dense.parameters())
    n_pruned = sum(dense.get_parameter(n).numel() for n in targets_of(dense))
    results = {
        "model": (f"GPT-2, {cfg.n_layer} blocks, width {cfg.n_embd}, seq {cfg.seq}, {n_params / 1e6:.2f}M "
                  f"parameters ({n_pruned / 1e6:.2f}M in the pruned projections), trained "
                  f"{cfg.steps} steps x {cfg.batch} windows ({info['train_seconds']:.0f} s); "
                  f"{args.ncalib} calibration windows, {len(valid)} validation windows of held-out plays"),
        "config": vars(args) | {"out": str(args.out)},
        "train": info,
        "dense": {"ppl": perplexity(dense, valid)},
        "runs": {},
    }
    logger.info("dense perplexity %.3f", results["dense"]["ppl"])
    if args.update and (args.out / "results.json").exists():
        old = json.loads((args.out / "results.json").read_text())
        results["runs"] = {m: r for m, r in old["runs"].items() if m not in methods}
        results["peer_error"] = old.get("peer_error") if "llmcompressor" not in methods else None
    for method in methods:
        if method == "llmcompressor":
            continue
        for setting in settings:
            if method == "obc" and setting not in args.obc_settings.split(","):
                continue
            model, seconds, mem, sparsity = run_ours(method, dense, setting, calib, args)
            ppl = perplexity(model, valid)
            results["runs"].setdefault(method, {})[setting] = {
                "ppl": ppl, "seconds": seconds, "peak_mib": mem / 2**20, "sparsity": sparsity}
            logger.info("%s %s: ppl %.3f, %.1f s, %.0f MiB, sparsity %.3f", method, setting, ppl, seconds,
                        mem / 2**20, sparsity)
    if "llmcompressor" in methods:
        try:
            peer = run_peer(args.peer_python, dense, settings, calib, args.out)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
            results["peer_error"] = str(err)
            logger.warning("%s", err)
        else:
            for setting, (model, seconds, mem) in peer.items():
                ppl = perplexity(model, valid)
                results["runs"].setdefault("llmcompressor", {})[setting] = {
                    "ppl": ppl, "seconds": seconds, "peak_mib": mem / 2**20,
                    "sparsity": pruned_sparsity(model)}
                logger.info("llmcompressor %s: ppl %.3f, %.1f s", setting, ppl, seconds)
    results["meta"] = record.finish()
    (args.out / "results.json").write_text(json.dumps(jsonable(results), indent=1))
    (args.out / "results.md").write_text(markdown(results, settings))
    plot(results, settings, args.out / "perplexity.png")
    print(markdown(results, settings))
    return results


if __name__ == "__main__":
    main()
