"""Peer run: llm-compressor's ``SparseGPTModifier`` on a saved GPT-2 and calibration set (one subprocess).

Runs under the Python that has ``llmcompressor`` installed (its own environment: it pins its own
``transformers``), never imported by mfac. Reads ``--job`` (a ``torch.save`` file with the model's
``GPT2Config`` as a dict, its ``state_dict`` and the calibration windows ``(n, seq)``), prunes every
projection of the ``GPT2Block`` s (``lm_head`` ignored: it is tied to the embedding) with
``oneshot(recipe=SparseGPTModifier(...))``, and writes ``--out``: the pruned ``state_dict`` plus the wall
time of ``oneshot`` and the process's peak RSS.

The job lists the settings (``{"sparsity": 0.5}`` or ``{"pattern": "2:4"}``); each is run on a fresh copy
of the model, so one import of llm-compressor (a minute here) serves them all.

Usage: ``python experiments/_llmc_peer.py --job job.pt --out out.pt``
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path


def _char_tokenizer(vocab_size: int):
    """A stand-in tokenizer (ids are characters already): oneshot wants a processor with a dataset."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"c{i}": i for i in range(vocab_size)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="c0")),
                                   unk_token="c0", pad_token="c0")


def _conv1d_to_linear(model):
    """Replace every transformers ``Conv1D`` by the equivalent ``nn.Linear``; return the module names."""
    import torch
    from transformers.pytorch_utils import Conv1D

    names = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    for name in names:
        parent, _, leaf = name.rpartition(".")
        conv = model.get_submodule(name)
        linear = torch.nn.Linear(conv.nx, conv.nf)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.T)
            linear.bias.copy_(conv.bias)
        setattr(model.get_submodule(parent), leaf, linear)
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--job", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from transformers import GPT2Config, GPT2LMHeadModel

    from experiments._measure import measured

    if args.threads:
        torch.set_num_threads(args.threads)
    job = torch.load(args.job, map_location="cpu", weights_only=False)
    calib = job["calib"]
    loader = torch.utils.data.DataLoader(
        [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in calib],
        batch_size=1, shuffle=False, collate_fn=lambda rows: {
            k: torch.stack([r[k] for r in rows]) for k in rows[0]
        },
    )
    workdir = tempfile.mkdtemp(prefix="llmc_peer_")
    runs = []
    for setting in job["settings"]:
        model = GPT2LMHeadModel(GPT2Config(**job["config"]))
        model.load_state_dict(job["state"])
        model.eval()
        model.config.save_pretrained(workdir)  # oneshot re-reads the config from name_or_path
        model.config._name_or_path = workdir
        # llm-compressor 0.14 does not prune transformers' Conv1D (every GPT-2 projection): its prunable
        # types are [Linear, Conv1d, Conv2d, Conv3d] by class name, and its Hessian for a Conv1D would be
        # sized by weight.shape[1] (the output size: the weight is stored (in, out)). So the peer gets the
        # same function with each Conv1D replaced by the equivalent nn.Linear (weight transposed), and its
        # pruned weights are transposed back afterwards.
        converted = _conv1d_to_linear(model)
        if "pattern" in setting:
            n, m = (int(v) for v in setting["pattern"].split(":"))
            sparsity, structure = 1.0 - n / m, setting["pattern"]
        else:
            sparsity, structure = setting["sparsity"], "0:0"
        recipe = SparseGPTModifier(
            sparsity=sparsity, mask_structure=structure, block_size=args.block_size,
            dampening_frac=args.damp, targets=["GPT2Block"], ignore=["re:.*lm_head"],
        )
        call = functools.partial(oneshot, model=model, processor=_char_tokenizer(job["config"]["vocab_size"]),
                                 recipe=recipe, dataset=loader, num_calibration_samples=len(calib))
        _, seconds, peak = measured(call)
        state = model.state_dict()
        for name in converted:
            state[f"{name}.weight"] = state[f"{name}.weight"].T.contiguous()
        runs.append({"state": state, "seconds": seconds, "peak_delta": peak, "setting": setting})
    torch.save({"runs": runs}, args.out)


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
