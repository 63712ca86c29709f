"""Shared pytest configuration: hypothesis profiles and device/dtype parametrisation."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

# The operator contract suite is a mixin run by several classes (one per operator); hypothesis sees the
# same test function under different executors, which is intended here (each build is deterministic).

settings.register_profile(
    "default", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors]
)
settings.register_profile(
    "thorough", deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


class _FakeTorchvisionSet:
    """Stands in for a torchvision dataset class: ``(root, train, download, transform)``, CHW tensors."""

    def __init__(self, root, train=True, download=False, transform=None):
        gen = torch.Generator().manual_seed(0 if train else 1)
        n = 40 if train else 12
        self.images = torch.rand(n, 32, 32, 3, generator=gen)  # HWC, as PIL/numpy would be
        self.labels = [i % 10 for i in range(n)]
        self.transform = transform
        self.root, self.download = root, download

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i]
        return (self.transform(image) if self.transform else image), self.labels[i]


@pytest.fixture
def fake_torchvision(monkeypatch):
    """A stand-in ``torchvision`` module (no download, no install): ``torchvision.datasets.FakeCIFAR``."""
    import types

    tv = types.ModuleType("torchvision")
    tv.datasets = types.SimpleNamespace(FakeCIFAR=_FakeTorchvisionSet)
    transforms = types.ModuleType("torchvision.transforms")
    transforms.ToTensor = lambda: (lambda hwc: hwc.permute(2, 0, 1).contiguous())
    tv.transforms = transforms
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.transforms", transforms)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread avoids thread-pool overhead on loaded machines (restored after).

    Use per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
