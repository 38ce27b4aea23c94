"""One captured step: a callable recorded once into a torch.cuda.CUDAGraph, then replayed.

    step = CapturedStep(fn)       # fn reads and writes only tensors that outlive the graph
    out = step.capture()          # warm-up on a side stream, then the capture; out: what fn returned
    out = step.replay()           # the same output tensors, written again by the replay

    step, why = try_capture(fn)   # (None, "eager (CUDA graph capture failed: ...)") when capture fails

fn's inputs are static buffers its caller fills before each replay (``copy_``, ``exponential_``);
its output is the tensors the captured call returned, which every replay rewrites in place. The
warm-up runs fn once on a side stream, so kernels are compiled and tuned and their workspaces
allocated outside the graph's memory pool; ``undo`` puts back what the warm-up changed (it runs
also when the warm-up fails, so an eager fallback starts from the same state). ``warmup=False``
records only, for a callable whose eager run has just happened; ``context`` is entered around the
capture alone.

Used for the decode step and the prefill of gptcore.generate's Generator and for the decode and
prefill buckets of gptcore.serve's ModelRunner. (gptcore.graph_step captures a training step.)
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Optional

import torch


def record(graph: torch.cuda.CUDAGraph, fn: Callable[[], Any], context: Optional[ContextManager] = None) -> Any:
    """fn() captured into ``graph``; returns its output. When the capture fails, the CUDA RNG is
    made usable again before the error propagates: a capture that ends in an error leaves each
    CUDA generator it registered in capture mode (torch's capture_end raises before the generator's
    epilogue), after which every random op of the process fails with "Offset increment outside graph
    capture encountered unexpectedly"."""
    try:
        with context if context is not None else nullcontext(), torch.cuda.graph(graph):
            return fn()
    except BaseException:
        reset_cuda_rng_after_failed_capture()
        raise


def reset_cuda_rng_after_failed_capture() -> None:
    """Give every CUDA default generator a fresh state object with the same seed and offset (the
    stuck state, still in capture mode, stays with the failed graph). Graphs captured earlier keep
    drawing from the state they captured."""
    for gen in torch.cuda.default_generators:
        try:
            gen.graphsafe_set_state(gen.clone_state())
        except RuntimeError:  # a device never initialised has no state to repair
            pass


class CapturedStep:
    """fn captured in a CUDA graph (after ``capture``) with its static output ``out``."""

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.out: Any = None

    def capture(self, *, warmup: bool = True, undo: Optional[Callable[[], None]] = None,
                context: Optional[ContextManager] = None) -> Any:
        """Warm fn up on a side stream and ``undo()`` (unless warmup=False), then capture it; returns its output."""
        if warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.stream(side):
                    self.fn()
            finally:
                torch.cuda.current_stream().wait_stream(side)
                if undo is not None:
                    undo()
        graph = torch.cuda.CUDAGraph()
        out = record(graph, self.fn, context)
        self.graph, self.out = graph, out
        return out

    def replay(self) -> Any:
        """Run the captured work again (no Python, no host sync); returns the rewritten output."""
        self.graph.replay()
        return self.out


def try_capture(fn: Callable[[], Any], **capture_kw) -> tuple[Optional[CapturedStep], str]:
    """(fn captured, "") or, when warm-up or capture raises, (None, why) after a device synchronize:
    the caller then runs fn eagerly."""
    step = CapturedStep(fn)
    try:
        step.capture(**capture_kw)
    except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
        torch.cuda.synchronize()
        return None, f"eager (CUDA graph capture failed: {type(e).__name__}: {e})"
    return step, ""
