"""Model builders shared by the experiment scripts (small, CPU-friendly, seeded by the caller).

* :func:`mlp` and :func:`small_cnn` for 8x8 single-channel images (scikit-learn's digits);
* :func:`char_mlp`: a next-character model (embedding, two hidden layers) for the Shakespeare task;
* :func:`resnet20_like`: ResNet-20 for 32x32 RGB images (He et al. 2016, CIFAR variant), about 272k
  parameters, for timing at a realistic size.
"""

from __future__ import annotations

from torch import nn


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def mlp(
    in_features: int = 64, hidden: tuple[int, ...] = (128,), num_classes: int = 10
) -> nn.Module:
    """Flatten -> (Linear -> ReLU) per hidden width -> Linear. Default: 9,610 parameters."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def small_cnn(in_channels: int = 1, num_classes: int = 10, side: int = 8) -> nn.Module:
    """Two 3x3 convolutions (16, 32 channels), one 2x2 max-pool, one linear layer.

    For ``side x side`` inputs (8 for digits): 9,930 parameters.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (side // 2) ** 2, num_classes),
    )


def char_mlp(vocab: int, context: int, embed: int = 16, hidden: int = 256) -> nn.Module:
    """Embedding(vocab, embed) -> Flatten -> Linear(context * embed, hidden) -> ReLU -> Linear(hidden, hidden)
    -> ReLU -> Linear(hidden, vocab): logits of the next character.

    Default (39 symbols, 16 characters of context): 142,231 parameters, of which the embedding's 624 are
    never pruned (:func:`mfac.default_prunable` leaves embeddings out).
    """
    return nn.Sequential(
        nn.Embedding(vocab, embed),
        nn.Flatten(),
        nn.Linear(context * embed, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, vocab),
    )


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out))
        return (out + self.shortcut(x)).relu()


def resnet20_like(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> nn.Module:
    """ResNet-20 (3 stages of 3 basic blocks, widths w, 2w, 4w) with 1x1 projection shortcuts.

    ``width=16`` is the CIFAR ResNet-20: 272,474 parameters. Smaller widths give small stand-ins.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
    ]
    cin = width
    for stage, cout in enumerate((width, 2 * width, 4 * width)):
        for block in range(3):
            layers.append(_BasicBlock(cin, cout, 2 if stage > 0 and block == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def build_model(
    name: str, image_shape: tuple[int, ...], num_classes: int = 10, *, hidden: tuple[int, ...] = (128,)
) -> nn.Module:
    """``"mlp"``, ``"cnn"`` or ``"resnet20"`` for images of shape ``(C, H, W)`` (digits: ``(1, 8, 8)``).

    The MLP (hidden widths ``hidden``) and CNN keep their digits architectures (9,610 and 9,930
    parameters there) with the input size adapted; ResNet-20 suits 32x32 RGB (CIFAR-10) and is
    global-pooled, so any size works.
    """
    key = name.lower()
    if key == "charmlp":  # inputs: (context,) character indices
        from experiments._data import CHAR_ALPHABET

        (context,) = image_shape
        return char_mlp(vocab=len(CHAR_ALPHABET), context=context)
    channels, height, width = image_shape
    if key == "mlp":
        return mlp(in_features=channels * height * width, hidden=hidden, num_classes=num_classes)
    if key == "cnn":
        if height != width:
            raise ValueError(f"the small CNN wants square images, got {height}x{width}")
        return small_cnn(in_channels=channels, num_classes=num_classes, side=height)
    if key == "resnet20":
        return resnet20_like(num_classes=num_classes, in_channels=channels)
    raise ValueError(f"model must be 'mlp', 'cnn', 'resnet20' or 'charmlp', got {name!r}")
