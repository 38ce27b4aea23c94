"""gptcore.captured_step: one callable captured in a CUDA graph and replayed (needs a GPU: -m gpu).

    python -m pytest -q tests/test_captured_step.py
"""
from contextlib import contextmanager

import pytest
import torch

from gptcore.captured_step import CapturedStep, try_capture

pytestmark = pytest.mark.gpu


def test_replay_rewrites_the_static_output_from_the_static_input():
    x = torch.randn(7, device="cuda")
    calls = torch.zeros((), device="cuda")

    def fn():
        calls.add_(1)
        return x * 2 + calls

    step = CapturedStep(fn)
    out = step.capture(undo=lambda: calls.zero_())
    torch.cuda.synchronize()
    assert float(calls) == 0          # the warm-up was undone; the capture itself runs nothing
    for n in (1, 2):
        x.normal_()
        assert step.replay() is out
        torch.cuda.synchronize()
        assert float(calls) == n
        assert torch.equal(out, x * 2 + n)


def test_without_warmup_the_context_wraps_the_capture_only():
    x = torch.randn(5, device="cuda")
    seen = []

    @contextmanager
    def ctx():
        seen.append(torch.cuda.is_current_stream_capturing())
        yield

    step = CapturedStep(lambda: x + 1)
    x + 1                              # the caller's own eager run warms the kernel up
    out = step.capture(warmup=False, context=ctx())
    assert seen == [False]             # entered before the capture began
    x.fill_(3)
    step.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, torch.full_like(x, 4))


def test_a_failed_capture_says_why_and_undoes_the_warmup():
    x = torch.ones(3, device="cuda")
    state = torch.zeros((), device="cuda")

    def syncs():
        state.add_(1)
        return x * float(x.sum())      # a host read: legal eagerly, not while capturing

    step, why = try_capture(syncs, undo=lambda: state.zero_())
    assert step is None
    assert why.startswith("eager (CUDA graph capture failed: "), why
    assert float(state) == 0
