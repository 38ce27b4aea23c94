"""Test setup shared by the whole suite.

On a machine without a CUDA GPU the Triton kernels run under the Triton interpreter: the
variable must be set before any kernel module is imported, which is why it is set here.
Tests marked ``gpu`` need a GPU and are skipped (and counted as skipped) elsewhere.
"""
import os

import pytest
import torch

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
