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
    # the CUDA RNG still works: the failed capture must not leave the generator in capture mode
    assert torch.randn(4, device="cuda").isfinite().all()


@pytest.mark.parametrize("draws_inside", [False, True], ids=["no-rng-in-fn", "rng-in-fn"])
def test_random_ops_work_after_a_failed_graph_step_capture(draws_inside):
    """The training step's capture (gptcore.graph_step) goes through the same recorder: after it fails,
    dropout, init and sampling still draw (before the fix: "Offset increment outside graph capture")."""
    from gptcore.captured_step import record

    x = torch.ones(8, device="cuda")

    def body():
        y = torch.rand_like(x) if draws_inside else x + 1
        return y * float(y.sum())      # fails the capture

    with pytest.raises(RuntimeError):
        record(torch.cuda.CUDAGraph(), body)
    torch.cuda.synchronize()
    a = torch.randn(16, device="cuda")
    torch.manual_seed(5)
    b, c = torch.rand(16, device="cuda"), torch.rand(16, device="cuda")
    torch.manual_seed(5)
    assert torch.equal(b, torch.rand(16, device="cuda")) and not torch.equal(b, c) and a.isfinite().all()
    # and a later capture with random ops inside still captures and replays
    step = CapturedStep(lambda: torch.rand_like(x))
    out = step.capture()
    first = step.replay().clone()
    step.replay()
    torch.cuda.synchronize()
    assert not torch.equal(first, out)  # each replay draws fresh numbers
