"""Test setup shared by the whole suite.

Every test starts from seeds derived from its node id (``_seed_from_node_id``): inputs drawn from
torch's, Python's or numpy's global generators replay exactly, whatever the test order or xdist
worker, and a failing test's report names the seed (section "seed").

On a machine without a CUDA GPU the Triton kernels run under the Triton interpreter: the
variable must be set before any kernel module is imported, which is why it is set here.
Tests marked ``gpu`` need a GPU and are skipped (and counted as skipped) elsewhere.
"""
import os
import random
import zlib

import pytest
import torch

from errcheck import poison_

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ON_GPU = torch.cuda.is_available()
COLLECTED_IDS = pytest.StashKey[list]()  # every node id this session collected, in order
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.hookimpl(tryfirst=True)  # before -m / -k deselect: test_ci compares every collected id
def pytest_collection_modifyitems(config, items):
    config.stash[COLLECTED_IDS] = [item.nodeid for item in items]
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


def _node_seed(nodeid: str) -> int:
    return zlib.crc32(nodeid.encode())


@pytest.fixture(autouse=True)
def _seed_from_node_id(request):
    seed = _node_seed(request.node.nodeid)
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    yield


@pytest.fixture(autouse=True)
def _cuda_rng_still_draws(request):
    """After a GPU test: the CUDA RNG still draws. A CUDA graph capture that fails can leave the
    generator in capture mode; every later random op in the worker then fails, far from the cause.
    This names the test that left it so."""
    yield
    if ON_GPU and "gpu" in request.node.keywords:
        try:
            torch.rand(1, device="cuda")
        except RuntimeError as e:
            pytest.fail(f"this test left the CUDA RNG unusable for the tests after it: {e}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("seed", f"torch/random/numpy seeded with {_node_seed(item.nodeid)} "
                                        f"(crc32 of the node id {item.nodeid!r})"))


@pytest.fixture(scope="module")
def private_data_cache(tmp_path_factory):
    """GPTCORE_DATA_DIR points at a temp dir shared by one module's tests (and the processes they
    start) while they run; a module opts in with pytestmark = pytest.mark.usefixtures(...)."""
    old = os.environ.get("GPTCORE_DATA_DIR")
    os.environ["GPTCORE_DATA_DIR"] = str(tmp_path_factory.mktemp("data-cache"))
    yield
    if old is None:
        os.environ.pop("GPTCORE_DATA_DIR")
    else:
        os.environ["GPTCORE_DATA_DIR"] = old
