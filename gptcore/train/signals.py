"""Graceful stops: the first SIGINT/SIGTERM finishes the current step (or evaluation batch), saves
and stops; a second Ctrl-C stops at once."""
from __future__ import annotations

import signal
import sys
import threading
from typing import Optional


class _StoppedInEval(Exception):
    """A signal came during an evaluation: train() saves the state after the last step and stops."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _GracefulStop:
    """First SIGINT/SIGTERM: finish the current step, save, stop. A second SIGINT: stop now."""

    active: Optional["_GracefulStop"] = None  # the one in force (evaluate() checks it between batches)

    def __init__(self, announce: bool):
        self.signum: Optional[int] = None
        self.announce = announce
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        _GracefulStop.active = self
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:
            print(f"\ngptcore.train: {signal.Signals(signum).name} received: saving a checkpoint after this "
                  f"step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        _GracefulStop.active = None
        for s, h in self._old.items():
            signal.signal(s, h)
