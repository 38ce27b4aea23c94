"""What every gptcore command line shares: expected failures become one message and exit status 2.

    def main(argv=None) -> int:
        return run_cli("python -m gptcore.eval", _main, argv)

An expected failure is bad input the user can fix: a bad flag or config, a missing, foreign or
corrupt file, a run directory that is in use or not empty, a size that cannot fit, a device or
backend that cannot run here. ``run_cli`` prints ``<prog>: error: <message>`` on stderr and
returns 2; with ``--debug`` (any CLI) or ``GPTCORE_DEBUG=1`` it re-raises, traceback and all.
Ctrl-C outside a command's own handling ends with status 130 and one line.

The numeric checks here are shared by the CLIs' flags and the trainer's config fields:
``check_finite`` / ``check_int_range`` name the field and the allowed range.
"""
from __future__ import annotations

import errno
import math
import os
import signal
import sys
import threading
from typing import Callable, Optional

EXIT_USAGE = 2
MAX_SEED = 2**63 - 1


class UsageError(ValueError):
    """A flag value that cannot work (out of range, not finite, too large to fit). Exit status 2."""


def debug_enabled(argv: Optional[list[str]]) -> bool:
    return os.environ.get("GPTCORE_DEBUG", "") not in ("", "0") or "--debug" in (argv or [])


def add_debug_flag(parser) -> None:
    parser.add_argument("--debug", action="store_true", default=False,
                        help="on an error, show the Python traceback instead of the one-line message "
                             "(also: GPTCORE_DEBUG=1)")


def _expected() -> tuple[type, ...]:
    """Exception classes that mean bad input, not a bug (imported lazily: a CLI may fail before
    torch is imported)."""
    classes: list[type] = [UsageError, OSError, UnicodeError, ValueError]
    for mod, names in (("gptcore.data", ["DataError"]), ("gptcore.io.common", ["CheckpointError"]),
                       ("gptcore.rundir", ["RunDirError"]), ("gptcore.train", ["ConfigError"])):
        m = sys.modules.get(mod)
        for n in names:
            if m is not None and hasattr(m, n):
                classes.append(getattr(m, n))
    return tuple(classes)


def describe_os_error(e: OSError) -> str:
    name = f" {e.filename}" if getattr(e, "filename", None) else ""
    what = e.strerror or str(e)
    fix = {
        errno.ENOSPC: "free disk space or point the output elsewhere (e.g. GPTCORE_DATA_DIR, --out-dir)",
        errno.EDQUOT: "free disk space or point the output elsewhere",
        errno.EACCES: "check the permissions, or use another path",
        errno.EPERM: "check the permissions, or use another path",
        errno.EROFS: "the file system is read-only: use another path",
        errno.ENOTDIR: "a path component is a file, not a directory: use another path",
        errno.EISDIR: "give a file, not a directory",
        errno.ENOENT: "check the path",
        errno.ELOOP: "the path has a symlink loop: fix the links or use the real path",
    }.get(e.errno, "check the path and try again")
    return f"{what}{':' + name if name else ''}; {fix}"


class Terminated(BaseException):
    """SIGTERM arrived while no command-specific handler was installed."""


def _on_sigterm(signum, frame):
    raise Terminated()


def run_cli(prog: str, fn: Callable[[list[str]], int], argv: Optional[list[str]] = None) -> int:
    """``fn(argv)`` with expected failures turned into one line and exit status 2 (see the module
    docstring); SIGTERM unwinds like Ctrl-C (cleanup runs, status 143)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return fn(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{prog}: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        return 130
    except Terminated:
        if debug:
            raise
        print(f"\n{prog}: stopped by SIGTERM", file=sys.stderr, flush=True)
        return 128 + signal.SIGTERM
    except Exception as e:  # noqa: BLE001 - sorted below: expected ones become a message
        if debug:
            raise
        if isinstance(e, OSError) and type(e).__module__ == "builtins":
            msg = describe_os_error(e)
        elif isinstance(e, _expected()) or _is_torch_expected(e):
            msg = str(e) or type(e).__name__
        else:
            raise
        print(f"{prog}: error: {msg}\n(run again with --debug or GPTCORE_DEBUG=1 for the traceback)",
              file=sys.stderr, flush=True)
        return EXIT_USAGE
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _is_torch_expected(e: Exception) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(e, torch.cuda.OutOfMemoryError)


# ---- numeric checks -------------------------------------------------------------------------------
def check_finite(name: str, value, *, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float, or UsageError if it is NaN, infinite or outside [low, high]
    (an open end excludes the bound)."""
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise UsageError(f"{name} must be a finite number, got {value!r}")
    lo_bad = low is not None and (v <= low if low_open else v < low)
    hi_bad = high is not None and (v >= high if high_open else v > high)
    if lo_bad or hi_bad:
        rng = (f"{'(' if low_open else '['}{'-inf' if low is None else low:g}, "
               f"{'inf' if high is None else f'{high:g}'}{')' if high_open else ']'}")
        raise UsageError(f"{name} must be in {rng}, got {value!r}")
    return v


def check_int_range(name: str, value: int, low: Optional[int] = None, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "" if low is None else f">= {low}"
        hi = "" if high is None else f"<= {high:,}"
        raise UsageError(f"{name} must be {' and '.join(x for x in (lo, hi) if x)}, got {value:,}")
    return value


# ---- will it fit? ----------------------------------------------------------------------------------
def available_memory(device) -> Optional[int]:
    """Bytes the device could give at most: total GPU memory, or the host's physical memory."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            return torch.cuda.mem_get_info(dev)[1]
        except Exception:  # noqa: BLE001 - unknown: do not refuse
            return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def refuse_if_too_big(what: str, need: int, device, fix: str) -> None:
    """UsageError when ``need`` bytes (a lower bound) exceed what ``device`` has at all."""
    have = available_memory(device)
    if have is not None and need > have:
        raise UsageError(f"{what} needs at least {need / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} GiB "
                         f"this {'GPU' if str(device).startswith('cuda') else 'machine'} has; {fix}")


def check_device(spec: str, flag: str = "--device"):
    """torch.device for ``spec`` ('auto', cpu, cuda, cuda:N), or UsageError when it cannot run here."""
    import torch

    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} must be auto, cpu, cuda or cuda:N, got {spec!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {spec}: no CUDA GPU is visible here; use {flag} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {spec}: only {torch.cuda.device_count()} GPU(s) are visible "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type != "cpu":
        raise UsageError(f"{flag} must be auto, cpu, cuda or cuda:N, got {spec!r}")
    return dev


def check_backend(backend: Optional[str], flag: str = "--backend") -> None:
    """UsageError when ``backend`` cannot run on this machine (today: triton without Triton or a GPU)."""
    if backend == "triton":
        from gptcore.ops import triton_status

        why = triton_status()
        if why is not None:
            raise UsageError(f"{flag} triton cannot run here: {why}; use {flag} torch")
