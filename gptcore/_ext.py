"""Loads the compiled extension ``gptcore._C`` and says how to fix it when it is missing."""
from __future__ import annotations

import functools

import torch

_FIX = (
    "Build it with torch installed first:\n"
    "    pip install --no-build-isolation -e .\n"
    "(the build compiles against your installed torch; if torch was upgraded since, rebuild)."
)


@functools.lru_cache(maxsize=None)
def load() -> None:
    """Import gptcore._C so its ops appear under torch.ops.gptcore; raise a clear error if not built."""
    try:
        from gptcore import _C  # noqa: F401  (import registers the ops)
    except ImportError as e:
        msg = str(e)
        if "undefined symbol" in msg or "ABI" in msg:
            raise ImportError(
                f"gptcore._C was built against a different torch than the one installed "
                f"({torch.__version__}): {msg}\n{_FIX}"
            ) from e
        raise ImportError(f"gptcore's C++ extension gptcore._C is not built ({msg}).\n{_FIX}") from e


def available() -> bool:
    try:
        load()
        return True
    except ImportError:
        return False


def ops():
    """torch.ops.gptcore, with the extension loaded."""
    load()
    return torch.ops.gptcore
