"""Test setup shared by the whole suite.

On a machine without a CUDA GPU the Triton kernels run under the Triton interpreter: the
variable must be set before any kernel module is imported, which is why it is set here.
Tests marked ``gpu`` need a GPU and are skipped (and counted as skipped) elsewhere.
"""
import os

import pytest
import torch

from errcheck import poison_

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def poisoned(monkeypatch):
    """Make torch.empty return NaN-filled floating tensors while the test runs."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return poison_(t) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
