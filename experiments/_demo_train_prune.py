"""Demo sections 3 and 4: train on scikit-learn's digits with MFAC and Adam, then one-shot prune.

Kept apart from ``demo.py`` so that the core sections run without scikit-learn or matplotlib.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import mfac
from experiments._data import load_digits_split, loss_fn, minibatches
from experiments._measure import stopwatch
from experiments._metrics import accuracy
from experiments._models import count_parameters, mlp
from mfac.prune import magnitude_prune, prune_oneshot

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)

#: why the two optimizers' learning rates differ (printed under the training table)
LR_NOTE = (
    "Learning rates do not carry over between the two: M-FAC's direction F^{-1} g is Newton-like, about "
    "m g / |g|^2 along the directions its window has seen and g / damp along the others, so its size is "
    "set by the window and damp, not by the gradient's scale; lr is a fraction of that step, tuned on its "
    "own (3e-3 is the best MFAC setting of experiments/optimizer_comparison.py on this MLP, 1e-3 Adam's)."
)


def train(
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    split,
    *,
    epochs: int,
    seed: int = 0,
    label: str = "",
) -> tuple[nn.Module, dict]:
    """Train the digits MLP; return the model and a history (train loss per epoch, test accuracy)."""
    torch.manual_seed(seed)
    model = mlp(hidden=(128,))
    optimizer = make_optimizer(list(model.parameters()))
    gen = torch.Generator().manual_seed(seed)
    history = {"epoch_loss": [], "test_acc": [], "step_time_ms": 0.0}
    steps, elapsed = 0, 0.0
    for _ in tqdm(range(epochs), desc=f"train {label}", leave=False, disable=None, mininterval=1.0):
        model.train()
        total, count = 0.0, 0
        for xb, yb in minibatches(split.x_train, split.y_train, 64, generator=gen):
            with stopwatch() as watch:
                optimizer.zero_grad()
                loss = loss_fn(model, (xb, yb))
                loss.backward()
                optimizer.step()
            elapsed += watch.seconds
            steps += 1
            total += loss.item() * len(xb)
            count += len(xb)
        history["epoch_loss"].append(total / count)
        history["test_acc"].append(accuracy(model, split.x_test, split.y_test))
    history["step_time_ms"] = 1e3 * elapsed / steps
    return model, history


def prune_curves(model: nn.Module, split, *, ngrads: int, recompute: int,
                 sparsities=SPARSITIES) -> list[dict]:
    """Test accuracy (no fine-tuning) after one-shot magnitude and OBS (M-FAC) pruning."""
    batches = list(minibatches(split.x_train, split.y_train, 4, generator=torch.Generator().manual_seed(1)))
    rows = []
    for sparsity in tqdm(sparsities, desc="prune", leave=False, disable=None, mininterval=1.0):
        magnitude = copy.deepcopy(model)
        magnitude_prune(magnitude, sparsity)
        obs = copy.deepcopy(model)
        with stopwatch() as watch:
            # damp = 1 x the mean diagonal of (1/m) G^T G at each recomputation: the joint update's scale
            prune_oneshot(obs, loss_fn, batches, sparsity, ngrads=ngrads, damp=1.0, relative_damp=True,
                          recompute=recompute)
        seconds = watch.seconds
        rows.append({
            "sparsity": sparsity,
            "magnitude_acc": accuracy(magnitude, split.x_test, split.y_test),
            "mfac_obs_acc": accuracy(obs, split.x_test, split.y_test),
            "obs_seconds": seconds,
        })
    return rows


def run(out: Path, *, quick: bool, section) -> dict:
    """Sections 3 and 4 of the demo; returns their results and writes ``train.png``, ``prune.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = load_digits_split(seed=0)
    epochs = 2 if quick else 15
    ngrads = 32 if quick else 256
    setups = {
        # the best MFAC setting of experiments/optimizer_comparison.py on this MLP
        "MFAC (lr=3e-3, m=256, damp=1e-3, momentum=0.9)": lambda p: mfac.MFAC(
            p, lr=3e-3, ngrads=256, damp=1e-3, momentum=0.9),
        "Adam (lr=1e-3)": lambda p: torch.optim.Adam(p, lr=1e-3),
    }
    trained, rows = {}, []
    for name, make in setups.items():
        model, hist = train(make, split, epochs=epochs, label=name.split()[0])
        trained[name] = (model, hist)
        rows.append({"optimizer": name, "epochs": epochs, "train_loss": hist["epoch_loss"][-1],
                     "test_acc": hist["test_acc"][-1], "step_ms": hist["step_time_ms"]})
    section(f"3. Training an MLP ({count_parameters(trained[next(iter(setups))][0])} parameters) on "
            "scikit-learn's digits (1437 train / 360 test images)", rows,
            {"train_loss": ".4f", "test_acc": ".3f", "step_ms": ".2f"}, note=LR_NOTE)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, (_, hist) in trained.items():
        ax.plot(range(1, epochs + 1), hist["epoch_loss"], marker="o", label=name.split(" (")[0])
    ax.set(xlabel="epoch", ylabel="train loss", yscale="log", title="digits MLP")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "train.png", dpi=120)
    plt.close(fig)

    base = trained["Adam (lr=1e-3)"][0]
    sparsities = (0.5, 0.9) if quick else SPARSITIES
    prune_rows = prune_curves(base, split, ngrads=ngrads, recompute=1 if quick else 4,
                              sparsities=sparsities)
    dense_acc = accuracy(base, split.x_test, split.y_test)
    section(f"4. One-shot pruning of the Adam-trained MLP (dense test accuracy {dense_acc:.3f}; "
            f"OBS: M-FAC with m={ngrads}, damp = 1 x the mean Fisher diagonal (relative_damp), joint update, "
            f"{1 if quick else 4} recomputation steps; "
            "no fine-tuning)", prune_rows,
            {"magnitude_acc": ".3f", "mfac_obs_acc": ".3f", "obs_seconds": ".1f"})

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [100 * r["sparsity"] for r in prune_rows]
    ax.plot(xs, [r["magnitude_acc"] for r in prune_rows], marker="o", label="magnitude")
    ax.plot(xs, [r["mfac_obs_acc"] for r in prune_rows], marker="s", label="M-FAC OBS")
    ax.axhline(dense_acc, color="gray", linestyle=":", label="dense")
    ax.set(xlabel="sparsity (%)", ylabel="test accuracy", title="one-shot pruning, no fine-tuning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "prune.png", dpi=120)
    plt.close(fig)
    return {"training": rows, "pruning": prune_rows, "dense_test_acc": dense_acc}
